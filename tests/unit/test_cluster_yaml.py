"""cluster.yaml passes the checks `ray up` makes before it touches AWS, and fits SEIDRA.

`ray up` fills the config out with the provider's defaults (`prepare_config`), then checks it
against the JSON schema Ray ships (`ray/autoscaler/ray-schema.json`) and the node types
(`validate_config`). Both run offline; the one step between them that asks AWS for instance
resources (`fillout_available_node_types_resources`) is left out.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).parents[2] / "cluster.yaml"
SERVE_CONFIG = "serve_app/serve_config.yaml"
# EC2 instance families with GPUs: Ray autodetects their GPUs even when `resources` leaves them out.
GPU_INSTANCE = re.compile(r"^(g\d|p\d|gr\d)")


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def ray_schema() -> dict[str, Any]:
    # The file validate_config reads: next to the ray.autoscaler package.
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_matches_rays_schema(config: dict[str, Any]) -> None:
    # The file as written, before defaults could hide a misspelled or out-of-range key.
    jsonschema.validate(config, ray_schema())


def test_passes_ray_ups_checks(config: dict[str, Any]) -> None:
    validate_config(prepare_config(copy.deepcopy(config)))


def test_head_has_no_gpu(config: dict[str, Any]) -> None:
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert not GPU_INSTANCE.match(head["node_config"]["InstanceType"])
    assert (head["min_workers"], head["max_workers"]) == (0, 0)


def test_gpu_workers_scale_from_zero(config: dict[str, Any]) -> None:
    workers = {name: spec for name, spec in config["available_node_types"].items() if name != config["head_node_type"]}
    assert workers
    for name, spec in workers.items():
        assert spec["resources"].get("GPU", 0) >= 1, name
        # The schema puts no bounds on per-type counts.
        assert spec["min_workers"] == 0, name
        assert 1 <= spec["max_workers"] <= config["max_workers"], name


def test_autoscaling_is_tuned(config: dict[str, Any]) -> None:
    # Set here, not inherited from Ray's AWS defaults.
    assert config["idle_timeout_minutes"] > 0
    assert config["upscaling_speed"] > 0
    # Ray's AWS default is true, and the schema lets a misspelled provider key through.
    assert config["provider"]["cache_stopped_nodes"] is False


def test_head_deploys_the_serve_app_after_ray_starts(config: dict[str, Any]) -> None:
    commands = config["head_start_ray_commands"]
    start = next(i for i, command in enumerate(commands) if "ray start --head" in command)
    deploys = [i for i, command in enumerate(commands) if "serve deploy" in command and SERVE_CONFIG in command]
    assert deploys and min(deploys) > start
    # The deployed file is the repository's, synced to ~/seidra.
    assert config["file_mounts"].get("~/seidra") == "."


def test_every_node_uses_token_auth(config: dict[str, Any]) -> None:
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2
    assert all("RAY_AUTH_MODE=token" in command for command in starts)
    assert "~/.ray/auth_token" in config["file_mounts"]
