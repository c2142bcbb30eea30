"""One local Ray cluster for the whole session, running the real application with the tiny model.

Imported by tests/conftest.py, so every test that asks for `app` shares it.

It stores jobs in PostgreSQL and images in S3 when those servers are available (always under CI),
otherwise in SQLite and a local folder.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from storage.api_keys import ApiKeyStore, KeyLimits
from storage.jobs import JobStore
from storage.notifications import NotificationService
from storage.object_store import ObjectStore, open_object_store
from storage.settings import StorageSettings
from tests.otlp import OtlpCollector

SECOND_MODEL = "tiny-b"  # served beside the tiny model: same architecture, other weights
ADAPTER = "ink"  # a tiny LoRA adapter of SEIDRA_LORA_DIR

TEST_ENV = {
    "SEIDRA_AUTH": "keys",
    "SEIDRA_TORCH_THREADS": "1",
    "SEIDRA_MAX_WORKERS": "0",  # one worker: the tests reason about its single slot
    "SEIDRA_FAULT_INJECTION": "1",
    # Short enough for fault drills, long enough for any 4-step slice of a 64x64 tiny-model job.
    "SEIDRA_INFERENCE_TIMEOUT_S": "4",
    "SEIDRA_DEGRADED_COOLDOWN_S": "3",
    "SEIDRA_HOLD_BASE_S": "1",
    "SEIDRA_HOLD_CAP_S": "4",
    "SEIDRA_HEALTH_CHECK_PERIOD_S": "1",
    "SEIDRA_HEALTH_CHECK_TIMEOUT_S": "10",
    "SEIDRA_UNHEALTHY_AFTER_FAILURES": "50",
    # Small slices, so that realtime work overtakes batch work within a few steps.
    "SEIDRA_STEPS_PER_DISPATCH": "4",
    "SEIDRA_MAX_BATCH_QUEUE": "20",
    "SEIDRA_HEARTBEAT_INTERVAL_S": "0.5",
    "SEIDRA_WORKER_TTL_S": "3",
    "SEIDRA_MIN_IMAGE_SIZE": "32",
    # Requests without sizes (plain-text batch lines) stay small enough for the 4 s timeout.
    "SEIDRA_DEFAULT_IMAGE_SIZE": "64",
    "SEIDRA_DEFAULT_INFERENCE_STEPS": "8",
    # Quick repairs and short storage retries, so that outage tests take seconds.
    "SEIDRA_RECONCILE_INTERVAL_S": "1",
    "SEIDRA_UPLOAD_TIMEOUT_S": "3",
    "SEIDRA_STUCK_INFERENCE_AFTER_S": "5",
    # Webhook receivers listen on 127.0.0.1; attempts a second apart, three at most.
    "SEIDRA_WEBHOOK_ALLOW_PRIVATE": "true",
    "SEIDRA_WEBHOOK_RETRY_BASE_S": "1",
    "SEIDRA_WEBHOOK_RETRY_CAP_S": "1",
    "SEIDRA_WEBHOOK_MAX_ATTEMPTS": "3",
    "SEIDRA_WEBHOOK_TIMEOUT_S": "2",
}


@dataclass
class RunningApp:
    url: str
    dashboard_url: str
    http: httpx.Client
    jobs: JobStore
    media: ObjectStore
    traces: OtlpCollector  # what every process of the app exported
    notifier: NotificationService  # writes notifications straight to the database
    keys: ApiKeyStore
    admin_key: str  # `http` sends it with every request

    def key_for(self, user: str, admin: bool = False, **limits: Any) -> str:
        """A fresh API key for `user` (limits: KeyLimits overrides)."""
        return self.keys.create(user, admin=admin, limits=KeyLimits(**limits)).key

    def client(self, key: str | None) -> httpx.Client:
        """A client of the app sending `key` (None: no Authorization header at all)."""
        headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
        return httpx.Client(base_url=self.url, timeout=60, headers=headers)

    def submit(self, **fields: Any) -> dict[str, Any]:
        body = {"width": 64, "height": 64, "num_inference_steps": 4, **fields}
        response = self.http.post("/generation/single", json=body)
        assert response.status_code == 202, response.text
        return response.json()

    def submit_batch(self, items: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
        items = [{"width": 64, "height": 64, "num_inference_steps": 4, **item} for item in items]
        response = self.http.post("/generation/batch", json={"items": items, **fields})
        assert response.status_code == 202, response.text
        return response.json()

    def job(self, job_id: str) -> dict[str, Any]:
        response = self.http.get(f"/jobs/{job_id}")
        assert response.status_code == 200, response.text
        return response.json()

    def status(self) -> dict[str, Any]:
        return self.http.get("/status").json()

    def notifications(self, job_id: str) -> list[dict[str, Any]]:
        return self.http.get("/notifications", params={"job_id": job_id}).json()

    def inject(self, **faults: Any) -> None:
        """Inject faults and wait until the targeted replicas got them (with their next heartbeat)."""
        response = self.http.post("/admin/faults", json=faults)
        assert response.status_code == 200, response.text
        self._wait_for_faults(True, faults.get("replica_id"))

    def clear_faults(self) -> None:
        assert self.http.delete("/admin/faults").status_code == 200
        self._wait_for_faults(False, None)

    def _wait_for_faults(self, injected: bool, replica_id: str | None) -> None:
        def arrived() -> bool:
            workers = [w for w in self.status()["workers"] if replica_id in (None, w["replica_id"])]
            return all(w["faults_injected"] is injected for w in workers)

        self.eventually(arrived, f"replicas reporting faults_injected={injected}")

    def eventually(self, check: Callable[[], Any], what: str, timeout_s: float = 60) -> Any:
        """Poll `check` until it returns something truthy."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = check()
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"not within {timeout_s} s: {what}")

    def wait_for(
        self, job_ids: list[str], statuses: tuple[str, ...] = ("completed",), timeout_s: float = 180
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        while True:
            jobs = [self.job(job_id) for job_id in job_ids]
            if all(job["status"] in statuses for job in jobs):
                return jobs
            if time.monotonic() > deadline:
                raise AssertionError(f"jobs not {statuses} after {timeout_s} s: {[(j['id'], j['status']) for j in jobs]}")
            time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _storage_env(request: pytest.FixtureRequest) -> dict[str, str]:
    env: dict[str, str] = {}
    try:
        env["SEIDRA_DATABASE_URL"] = request.getfixturevalue("postgres").database("seidra_app")
    except pytest.skip.Exception:
        pass  # SQLite in SEIDRA_HOME
    try:
        s3 = request.getfixturevalue("s3")
        env.update(SEIDRA_S3_ENDPOINT=s3.endpoint, SEIDRA_S3_ACCESS_KEY=s3.access_key, SEIDRA_S3_SECRET_KEY=s3.secret_key)
    except pytest.skip.Exception:
        pass  # a local media folder
    return env


@pytest.fixture(scope="session")
def otlp_collector() -> Iterator[OtlpCollector]:
    collector = OtlpCollector().start()
    try:
        yield collector
    finally:
        collector.stop()


@pytest.fixture(scope="session")
def app(
    request: pytest.FixtureRequest, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory, otlp_collector: OtlpCollector
) -> Iterator[RunningApp]:
    import ray
    from ray import serve

    from deployments.tiny_model import make_tiny_lora, make_tiny_model
    from serve_app.cluster import deploy_serve_config
    from storage.database import upgrade

    # Two models (the tiny one the default, named as SEIDRA_MODEL alone would name it) and an adapter.
    assets = tmp_path_factory.mktemp("served")
    models = {tiny_model.name: str(tiny_model), SECOND_MODEL: str(make_tiny_model(assets / SECOND_MODEL, seed=1))}
    make_tiny_lora(assets / "loras" / ADAPTER, seed=0)
    env = {
        **TEST_ENV,
        **_storage_env(request),
        "SEIDRA_HOME": str(tmp_path_factory.mktemp("seidra-home")),
        "SEIDRA_MODEL": str(tiny_model),
        "SEIDRA_MODELS": json.dumps(models),
        "SEIDRA_MODELS_PER_REPLICA": "2",
        "SEIDRA_LORA_DIR": str(assets / "loras"),
        "HF_HUB_OFFLINE": "1",
        # Traces go where Tempo would take them, flushed often enough for the tests to wait on.
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": otlp_collector.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        # As `seidra up` does for its head: `ray job submit -- python ...` finds this environment.
        patch.setenv("PATH", os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
        storage = StorageSettings()
        upgrade(storage.database_url)
        port, dashboard_port = free_port(), free_port()
        ray.init(
            address="local", num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1",
            dashboard_port=dashboard_port, log_to_driver=False,
        )  # fmt: skip
        try:
            # Deployed as operators do: `serve deploy serve_app/serve_config.yaml`, through the dashboard.
            url = deploy_serve_config(f"http://127.0.0.1:{dashboard_port}", "127.0.0.1", port, 0, timeout_s=180)
            keys = ApiKeyStore(storage.database_url)
            # Tests submit far faster than a person: the admin key lifts the submission rate.
            admin_key = keys.create("test-admin", admin=True, limits=KeyLimits(submissions_per_minute=1_000_000)).key
            http = httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {admin_key}"})
            _wait_for_capacity(http)
            dashboard_url = f"http://127.0.0.1:{dashboard_port}"
            jobs, media = JobStore(storage.database_url), open_object_store(storage)
            notifications = NotificationService(storage.database_url)
            yield RunningApp(url, dashboard_url, http, jobs, media, otlp_collector, notifications, keys, admin_key)
        finally:
            serve.shutdown()
            ray.shutdown()


def _wait_for_capacity(http: httpx.Client, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if http.get("/status").json()["usable_slots"] >= 1:
            return
        time.sleep(0.2)
    raise AssertionError("no worker replica reported to the router")
