"""The secret sentinel run (issue 10): SEIDRA started as on a cluster (`seidra up --http-host 0.0.0.0`,
API keys), with a distinct sentinel as each secret: the PostgreSQL password of a role of its own, the
S3 keys, HF_TOKEN, the OTLP headers, and the API keys. After a job, a batch through `seidra batch`,
every API route, the CLI, `serve config`/`serve status`, the dashboard's views and Serve's records in
the GCS, no sentinel may be found in any answer, any output, any file under SEIDRA_HOME or any file
of the Ray session (logs, job working dirs). Then a keyless deploy on that proxy is refused.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import yaml

from serve_app.cluster import SERVE_APP_NAME, _dashboard_auth_headers, auth_off_refusal
from tests.otlp import OtlpCollector
from tests.seidra_command import Seidra
from tests.servers import PostgresServer, s3_server

SERVE = Path(sys.executable).with_name("serve")
DASHBOARD_VIEWS = (
    "/api/serve/applications/",
    "/api/v0/actors?detail=1&limit=1000",
    "/api/v0/tasks?detail=1&limit=1000",
    "/api/v0/nodes?detail=1",
    "/api/v0/workers?detail=1&limit=1000",
    "/api/v0/placement_groups?detail=1",
    "/api/jobs/",
    "/nodes?view=summary",
    "/api/cluster_status",
)
# Serve's records in the GCS (deployment configs, pickled init args), which any client of the cluster
# may read: dumped by a Ray driver of their own, as hex, by key.
DUMP_SERVE_KV = """
import json, ray
from ray.experimental import internal_kv
from ray.serve._private.storage.kv_store import SERVE_INTERNAL_KV_NAMESPACE
ray.init(address=__import__("sys").argv[1], log_to_driver=False)
keys = internal_kv._internal_kv_list(b"", namespace=SERVE_INTERNAL_KV_NAMESPACE)
print(json.dumps({key.hex(): (internal_kv._internal_kv_get(key, namespace=SERVE_INTERNAL_KV_NAMESPACE) or b"").hex()
                  for key in keys}))
"""
SMALL = {"width": 64, "height": 64, "num_inference_steps": 2}
SIGV4_CREDENTIAL = "X-Amz-Credential="


def sentinel(what: str) -> str:
    return f"sentinel-{what}-{uuid.uuid4().hex}"


def private_file(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


class Seen:
    """Everything a user, an operator or a Ray client got to see, by where it was seen."""

    def __init__(self) -> None:
        self.texts: dict[str, bytes] = {}

    def add(self, where: str, content: str | bytes) -> None:
        self.texts[f"{where} #{len(self.texts)}"] = content.encode() if isinstance(content, str) else content

    def response(self, response: httpx.Response) -> httpx.Response:
        self.add(f"{response.request.method} {response.request.url}", f"{response.headers}\n".encode() + response.content)
        return response

    def command(self, done: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
        self.add(" ".join(str(part) for part in done.args), done.stdout + done.stderr)
        return done

    def files(self, folder: Path) -> None:
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink():
                self.texts[str(path)] = path.read_bytes()

    def where(self, secrets: dict[str, str]) -> list[str]:
        def found(value: str, text: bytes) -> bool:
            # A presigned image URL names the S3 access key id (the secret key signs it), by design
            # of SigV4: the job's owner gets one. Anywhere else the access key is a finding too.
            return value.encode() in text.replace(f"{SIGV4_CREDENTIAL}{value}".encode(), b"")

        return [
            f"{name} in {where}" for name, value in secrets.items() for where, text in self.texts.items() if found(value, text)
        ]


def every_route(api: httpx.Client, seen: Seen, schema: dict[str, Any], job_id: str) -> None:
    """Each operation of the OpenAPI schema, once, with the parameters it needs and an empty body."""
    seen.response(api.get("/openapi.json"))
    for path, operations in schema["paths"].items():
        concrete = path.replace("{job_id}", job_id).replace("{lane}", "batch")
        for method in operations:
            body = {"json": {}} if method in ("post", "put", "patch") else {}
            response = seen.response(api.request(method.upper(), concrete, **body))
            assert response.status_code < 500, f"{method.upper()} {concrete}: {response.status_code} {response.text}"
    seen.response(api.get("/docs"))


def wait_for(api: httpx.Client, seen: Seen, job_ids: list[str], timeout_s: float = 300) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while True:
        jobs = [seen.response(api.get(f"/jobs/{job_id}")).json() for job_id in job_ids]
        if all(job["status"] in ("completed", "failed", "cancelled") for job in jobs):
            return jobs
        assert time.monotonic() < deadline, f"jobs still running: {[(job['id'], job['status']) for job in jobs]}"
        time.sleep(1)


def test_a_whole_run_leaks_no_secret(seidra: Seidra, postgres: PostgresServer, tmp_path: Path) -> None:
    otlp_collector = OtlpCollector().start()  # its own: the spans it gets came through the sentinel headers
    try:
        run_with_sentinels(seidra, postgres, otlp_collector, tmp_path)
    finally:
        otlp_collector.stop()


def run_with_sentinels(seidra: Seidra, postgres: PostgresServer, otlp_collector: OtlpCollector, tmp_path: Path) -> None:
    database = f"seidra_secrets_{uuid.uuid4().hex[:8]}"
    secrets = {"the database password": sentinel("db"), "HF_TOKEN": sentinel("hf"), "the OTLP headers": sentinel("otlp")}
    database_url = postgres.database_with_password(database, secrets["the database password"])
    access_key = f"SENTINEL{uuid.uuid4().hex[:12].upper()}"
    with s3_server(access_key=access_key, secret_key=sentinel("s3")) as s3:
        secrets.update({"the S3 access key": s3.access_key, "the S3 secret key": s3.secret_key})
        seidra.env.update(
            SEIDRA_AUTH="keys",
            # The database URL from a secret file (the Docker/Kubernetes way), the rest from variables.
            SEIDRA_DATABASE_URL_FILE=str(private_file(tmp_path / "secrets" / "database-url", database_url)),
            SEIDRA_S3_ENDPOINT=s3.endpoint, SEIDRA_S3_ACCESS_KEY=s3.access_key, SEIDRA_S3_SECRET_KEY=s3.secret_key,
            HF_TOKEN=secrets["HF_TOKEN"],
            OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=otlp_collector.endpoint,
            OTEL_EXPORTER_OTLP_HEADERS=f"x-seidra-test={secrets['the OTLP headers']}",
        )  # fmt: skip
        # `seidra keys create` shows each key once, on purpose: not counted as seen.
        user_key = seidra.run("keys", "create", "--user", "alice").stdout.strip()
        admin_key = seidra.run("keys", "create", "--user", "ops", "--admin").stdout.strip()
        assert user_key.startswith("seidra_") and admin_key.startswith("seidra_")
        secrets.update({"the user's API key": user_key, "the admin's API key": admin_key})
        seen = Seen()

        up = seen.command(seidra.up("--http-host", "0.0.0.0", timeout_s=600))
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        state = seidra.state()
        assert state is not None
        run_everything(seidra, seen, state, user_key, admin_key, tmp_path)
        refuse_keyless_deploy(seidra, seen, state["dashboard_url"], tmp_path)

        seen.files(seidra.home)
        seen.files(seidra.session_dir())
        assert seen.where(secrets) == []
    assert otlp_collector.spans(), "no process exported a span: the OTLP headers were never used"


def run_everything(seidra: Seidra, seen: Seen, state: dict[str, Any], user_key: str, admin_key: str, tmp_path: Path) -> None:
    url, dashboard = state["url"], state["dashboard_url"]
    with (
        httpx.Client(base_url=url, timeout=300, headers={"Authorization": f"Bearer {user_key}"}) as user,
        httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {admin_key}"}) as admin,
        httpx.Client(base_url=url, timeout=60) as anonymous,
    ):
        single = seen.response(user.post("/generation/single", params={"wait": "true"}, json={"prompt": "a lamp", **SMALL}))
        batch = seen.response(user.post("/generation/batch", json={"items": [{"prompt": "a fox", **SMALL}] * 2}))
        assert (single.status_code, batch.status_code) in {(200, 202), (202, 202)}, single.text + batch.text
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text(json.dumps({"prompt": "a kite", **SMALL}) + "\n")
        key_file = private_file(tmp_path / "secrets" / "alice.key", user_key)
        driven = seen.command(seidra.run("batch", str(prompts), "--api-key-file", str(key_file), "--wait", timeout_s=600))
        assert driven.returncode == 0 and '"completed": 1' in driven.stdout, driven.stdout[-3000:] + driven.stderr[-3000:]

        jobs = wait_for(user, seen, [single.json()["id"], *map(str, batch.json()["job_ids"])])
        assert {job["status"] for job in jobs} == {"completed"}
        seen.response(user.get(f"/jobs/{jobs[0]['id']}/image"))
        schema = seen.response(admin.get("/openapi.json")).json()
        for client in (user, admin, anonymous):
            every_route(client, seen, schema, jobs[0]["id"])
    for command in (("status", "--json"), ("jobs", "--json"), ("notifications", "--json"), ("keys", "list")):
        seen.command(seidra.run(*command, SEIDRA_API_KEY=admin_key))
    for command in ("config", "status"):
        done = seen.command(subprocess.run([str(SERVE), command, "--address", dashboard], env={**seidra.env, "RAY_AUTH_MODE": "token"},
                                           capture_output=True, text=True, timeout=120))  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
    headers = _dashboard_auth_headers()
    for view in DASHBOARD_VIEWS:
        assert seen.response(httpx.get(f"{dashboard}{view}", headers=headers, timeout=60)).status_code == 200, view
    dumped = subprocess.run([sys.executable, "-c", DUMP_SERVE_KV, state["address"]], env={**seidra.env, "RAY_AUTH_MODE": "token"},
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert dumped.returncode == 0, dumped.stderr[-3000:]
    records = json.loads(dumped.stdout.splitlines()[-1])
    assert records, "Serve keeps no record in the GCS?"
    for key, value in records.items():
        seen.add(f"GCS key {bytes.fromhex(key)!r}", bytes.fromhex(value))


def refuse_keyless_deploy(seidra: Seidra, seen: Seen, dashboard: str, tmp_path: Path) -> None:
    """`serve deploy` of the running config with `auth: off`: the proxy listens on 0.0.0.0, so the builder refuses."""
    config = yaml.safe_load((seidra.home / "run" / "serve_config.yaml").read_text())
    [app] = [app for app in config["applications"] if app["name"] == SERVE_APP_NAME]
    app["args"]["auth"] = "off"
    keyless = tmp_path / "keyless.yaml"
    keyless.write_text(yaml.safe_dump(config))
    deploy = seen.command(subprocess.run([str(SERVE), "deploy", str(keyless), "--address", dashboard],
                                         env={**seidra.env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=120))  # fmt: skip
    assert deploy.returncode == 0, deploy.stderr[-2000:]  # Serve accepts the config, then builds it
    headers = _dashboard_auth_headers()
    deadline = time.monotonic() + 180
    while True:
        details = seen.response(httpx.get(f"{dashboard}/api/serve/applications/", headers=headers, timeout=60)).json()
        application = details["applications"][SERVE_APP_NAME]
        if application["status"] == "DEPLOY_FAILED":
            break
        assert time.monotonic() < deadline, f"the keyless deploy was not refused: {application['status']}"
        time.sleep(1)
    assert auth_off_refusal("0.0.0.0") in application["message"]
