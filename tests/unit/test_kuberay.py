"""deploy/kuberay/rayservice.yaml runs serve_app/serve_config.yaml's application, checked offline.

The Serve config against Ray's own schema, the pod templates and the API service against
Kubernetes' (kubernetes-validate), and what SEIDRA needs of them: the same environment on every
node, secrets from Kubernetes Secrets only, GPU workers from zero under the Ray autoscaler, and pods
ready for traffic only once the API answers.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import ray
import yaml
from ray.serve.schema import ServeDeploySchema

from serve_app.cluster import SERVE_CONFIG
from storage.settings import is_secret_variable

ROOT = Path(__file__).parents[2]
MANIFEST = ROOT / "deploy" / "kuberay" / "rayservice.yaml"
DOCKERFILE = ROOT / "deploy" / "kuberay" / "Dockerfile"
# A release KubeRay supports and kubernetes-validate ships schemas for.
KUBERNETES_VERSION = "1.33.0"
GPU = "nvidia.com/gpu"


@pytest.fixture(scope="module")
def documents() -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(MANIFEST.read_text()) if document]


@pytest.fixture(scope="module")
def rayservice(documents: list[dict[str, Any]]) -> dict[str, Any]:
    [service] = [document for document in documents if document["kind"] == "RayService"]
    assert service["apiVersion"] == "ray.io/v1"
    return service


@pytest.fixture(scope="module")
def cluster(rayservice: dict[str, Any]) -> dict[str, Any]:
    return rayservice["spec"]["rayClusterConfig"]


@pytest.fixture(scope="module")
def serve_config(rayservice: dict[str, Any]) -> dict[str, Any]:
    # KubeRay takes serveConfigV2 as a YAML string.
    text = rayservice["spec"]["serveConfigV2"]
    assert isinstance(text, str)
    return yaml.safe_load(text)


@pytest.fixture(scope="module")
def gpu_group(cluster: dict[str, Any]) -> dict[str, Any]:
    [group] = [group for group in cluster["workerGroupSpecs"] if group["groupName"] == "gpu"]
    return group


def groups(cluster: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {"head": cluster["headGroupSpec"], **{group["groupName"]: group for group in cluster["workerGroupSpecs"]}}


def ray_container(group: dict[str, Any]) -> dict[str, Any]:
    # KubeRay runs Ray in the first container of each pod.
    return group["template"]["spec"]["containers"][0]


def seidra_containers(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    """Every container that runs SEIDRA's code: the Ray containers and the head's migration."""
    pods = [group["template"]["spec"] for group in groups(cluster).values()]
    return [ray_container(group) for group in groups(cluster).values()] + [
        container for pod in pods for container in pod.get("initContainers", [])
    ]


def test_serve_config_v2_is_a_valid_serve_deploy_config(serve_config: dict[str, Any]) -> None:
    ServeDeploySchema.model_validate(serve_config)


def test_serve_config_v2_is_the_serve_config_file(serve_config: dict[str, Any]) -> None:
    # The whole file, application and proxy alike: `serve deploy`, cluster.yaml and KubeRay run one app.
    assert serve_config == yaml.safe_load(SERVE_CONFIG.read_text())


@pytest.mark.parametrize("group_name", ["head", "gpu"])
def test_pod_template_is_a_valid_kubernetes_pod_template(cluster: dict[str, Any], group_name: str) -> None:
    pod_template = {
        "apiVersion": "v1",
        "kind": "PodTemplate",
        "metadata": {"name": f"seidra-{group_name}"},
        "template": groups(cluster)[group_name]["template"],
    }
    kubernetes_validate.validate(pod_template, KUBERNETES_VERSION, strict=True)


def test_api_service_is_a_valid_kubernetes_service_on_the_serve_port(
    rayservice: dict[str, Any], cluster: dict[str, Any], serve_config: dict[str, Any]
) -> None:
    serve_service = rayservice["spec"]["serveService"]
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "Service", **serve_service}, KUBERNETES_VERSION, strict=True)
    port = serve_config["http_options"]["port"]
    # KubeRay keeps only the port named `serve`.
    assert [(p["name"], p["port"]) for p in serve_service["spec"]["ports"]] == [("serve", port)]
    for group in groups(cluster).values():
        assert {"name": "serve", "containerPort": port} in ray_container(group)["ports"]


def test_every_seidra_process_gets_the_same_environment(cluster: dict[str, Any]) -> None:
    environments = [container["env"] for container in seidra_containers(cluster)]
    assert all(env == environments[0] for env in environments)
    names = {entry["name"] for entry in environments[0]}
    assert {"SEIDRA_DATABASE_URL", "SEIDRA_S3_ACCESS_KEY", "SEIDRA_S3_SECRET_KEY", "HF_TOKEN"} <= names


def test_secrets_come_only_from_kubernetes_secrets(
    documents: list[dict[str, Any]], cluster: dict[str, Any], serve_config: dict[str, Any]
) -> None:
    assert "Secret" not in {document["kind"] for document in documents}
    entries = [entry for container in seidra_containers(cluster) for entry in container["env"]]
    secret_entries = [entry for entry in entries if is_secret_variable(entry["name"])]
    assert secret_entries
    for entry in secret_entries:
        assert "value" not in entry, entry["name"]
        assert entry["valueFrom"]["secretKeyRef"]["name"], entry["name"]
    [app] = serve_config["applications"]
    assert [name for name in app["args"] if is_secret_variable(f"SEIDRA_{name.upper()}")] == []
    assert [name for name in app["runtime_env"].get("env_vars", {}) if is_secret_variable(name)] == []


def test_api_keys_and_ray_tokens_stay_on(cluster: dict[str, Any], serve_config: dict[str, Any]) -> None:
    # The proxy listens beyond loopback.
    assert serve_config["http_options"]["host"] == "0.0.0.0"
    assert serve_config["applications"][0]["args"]["auth"] == "keys"
    assert cluster["authOptions"]["mode"] == "token"


def test_gpu_workers_scale_from_zero_under_the_ray_autoscaler(
    cluster: dict[str, Any], gpu_group: dict[str, Any], serve_config: dict[str, Any]
) -> None:
    assert cluster["enableInTreeAutoscaling"] is True
    assert gpu_group["minReplicas"] == 0
    limits = ray_container(gpu_group)["resources"]["limits"]
    assert str(limits[GPU]) == "1"
    # Room for every worker replica Serve may ask for, one GPU each.
    args = serve_config["applications"][0]["args"]
    assert gpu_group["maxReplicas"] * int(limits[GPU]) >= args["max_workers"] * args["num_gpus"]


def test_head_has_no_gpu(cluster: dict[str, Any]) -> None:
    head = cluster["headGroupSpec"]
    resources = ray_container(head)["resources"]
    assert GPU not in resources.get("limits", {}) and GPU not in resources.get("requests", {})
    assert head["rayStartParams"]["num-gpus"] == "0"


def test_workers_take_traffic_only_once_the_api_answers_health(gpu_group: dict[str, Any], serve_config: dict[str, Any]) -> None:
    probe = " ".join(ray_container(gpu_group)["readinessProbe"]["exec"]["command"])
    port = serve_config["http_options"]["port"]
    # KubeRay's own checks, which a probe written here replaces, and the API's unauthenticated route.
    for url in (
        "http://localhost:52365/api/local_raylet_healthz",
        f"http://localhost:{port}/-/healthz",
        f"http://localhost:{port}/health",
    ):
        assert url in probe


def test_head_readiness_does_not_wait_for_the_application(cluster: dict[str, Any]) -> None:
    # KubeRay deploys serveConfigV2 only once the head is ready.
    assert "readinessProbe" not in ray_container(cluster["headGroupSpec"])


def test_the_database_is_migrated_before_the_head_starts(cluster: dict[str, Any]) -> None:
    [migrate] = cluster["headGroupSpec"]["template"]["spec"]["initContainers"]
    assert migrate["command"] == ["seidra", "db", "upgrade"]


def test_upgrades_never_run_two_routers_on_one_database(rayservice: dict[str, Any]) -> None:
    assert rayservice["spec"]["upgradeStrategy"]["type"] == "None"


def test_every_pod_runs_the_image_built_on_the_installed_ray(cluster: dict[str, Any]) -> None:
    assert cluster["rayVersion"] == ray.__version__
    assert len({container["image"] for container in seidra_containers(cluster)}) == 1
    [base] = re.findall(r"^FROM (\S+)$", DOCKERFILE.read_text(), flags=re.MULTILINE)
    assert base == f"rayproject/ray:{ray.__version__}-py311-gpu"
