"""The fault-matrix rows (docs/reliability.md) that need a SEIDRA of their own, brought up with
`seidra up` as an operator would: SQLite and the local media folder in its SEIDRA_HOME."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from storage.jobs import JobStore
from storage.object_store import image_key
from tests.otlp import STATUS_ERROR, OtlpCollector
from tests.seidra_command import Seidra

JOB = {"width": 64, "height": 64}


@pytest.fixture
def traced(otlp_collector: OtlpCollector) -> dict[str, str]:
    """Variables for `seidra up` that send its traces to this session's collector."""
    return {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": otlp_collector.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "200"}


@contextlib.contextmanager
def api(seidra: Seidra) -> Iterator[httpx.Client]:
    """An operator's client, with an admin key made as the README says (`seidra keys create`)."""
    state = seidra.state()
    assert state is not None and state["status"] == "up"
    made = seidra.run("keys", "create", "--user", "operator", "--admin")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    with httpx.Client(base_url=state["url"], timeout=60, headers={"Authorization": f"Bearer {key}"}) as client:
        yield client


def up(seidra: Seidra, **env: str) -> None:
    done = seidra.up(SEIDRA_STEPS_PER_DISPATCH="4", **env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def eventually(check: Any, what: str, timeout_s: float = 120) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.3)
    raise AssertionError(f"not within {timeout_s} s: {what}")


def finished(client: httpx.Client, job_ids: list[str]) -> list[dict[str, Any]]:
    def all_ended() -> list[dict[str, Any]] | None:
        jobs = [client.get(f"/jobs/{job_id}").json() for job_id in job_ids]
        return jobs if all(job["status"] in ("completed", "failed", "cancelled") for job in jobs) else None

    return eventually(all_ended, f"jobs {job_ids} ended", timeout_s=240)


def successful_uploads(collector: OtlpCollector, job: dict[str, Any]) -> int:
    spans = collector.spans(job["metadata"]["trace_id"])
    return sum(1 for span in spans if span.name == "seidra.upload" and span.status_code != STATUS_ERROR)


def test_the_whole_cluster_stopped_then_up_again(seidra: Seidra, traced: dict[str, str], otlp_collector: OtlpCollector) -> None:
    up(seidra, SEIDRA_FAULT_INJECTION="1", **traced)
    with api(seidra) as client:
        # Slow steps: the long job is still running when the cluster dies (the fault ends with it).
        eventually(lambda: client.post("/admin/faults", json={"inference_delay_s": 0.05}).json()["workers"], "slow steps")
        # A replica gets the fault with its next heartbeat: a job started before runs at full speed,
        # and may have ended by the time the cluster dies.
        eventually(lambda: all(w["faults_injected"] for w in client.get("/status").json()["workers"]), "slowed replicas")
        running = client.post(
            "/generation/single", json={**JOB, "prompt": "running as the cluster dies", "num_inference_steps": 150}
        ).json()
        batch = client.post(
            "/generation/batch", json={"items": [{**JOB, "prompt": f"waiting {i}", "num_inference_steps": 8} for i in range(3)]}
        ).json()
        eventually(lambda: client.get(f"/jobs/{running['id']}").json()["status"] == "running", "the long job running")
    state = seidra.state()
    assert state is not None
    os.killpg(state["head_pid"], signal.SIGKILL)  # the machine's power cut, as far as Ray knows
    for pid in seidra.leftovers():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    stored = JobStore(f"sqlite:///{seidra.home / 'seidra.db'}")
    assert stored.get(running["id"]).status == "running"  # what the new router finds
    down = seidra.run("down", timeout_s=120)
    assert down.returncode == 0, down.stderr[-3000:]
    up(seidra, **traced)
    job_ids = [running["id"], *(str(job_id) for job_id in batch["job_ids"])]
    with api(seidra) as client:
        jobs = finished(client, job_ids)
    assert [job["status"] for job in jobs] == ["completed"] * 4
    assert jobs[0]["metadata"]["requeued"] == "router restarted"
    for job in jobs:
        assert (seidra.home / "media" / image_key(job["id"])).is_file()
        # Spans a SIGKILL caught in a process's buffer are lost, so "once" is checked as "not twice".
        assert successful_uploads(otlp_collector, job) <= 1, job["id"]


def test_the_media_folder_made_unwritable(seidra: Seidra) -> None:
    up(seidra)
    media = seidra.home / "media"
    media.mkdir(parents=True, exist_ok=True)
    aside = seidra.home / "media.aside"
    media.rename(aside)
    media.write_text("not a folder")  # root ignores permissions: a file in its place stops every write
    try:
        with api(seidra) as client:
            job_ids = [
                client.post("/generation/single", json={**JOB, "prompt": f"nowhere to go {i}"}).json()["id"] for i in range(3)
            ]
            eventually(
                lambda: client.get(f"/jobs/{job_ids[0]}").json()["metadata"].get("storage_faults", 0) >= 1,
                "a storage fault recorded",
            )
            [worker] = client.get("/status").json()["workers"]
            assert (worker["usable"], worker["health"], worker["consecutive_failures"]) == (True, "healthy", 0)
    finally:
        media.unlink()
        aside.rename(media)
    with api(seidra) as client:
        jobs = finished(client, job_ids)
    for job in jobs:
        assert (job["status"], job["attempts"], job["metadata"].get("failures", 0)) == ("completed", 1, 0)
        assert (media / image_key(job["id"])).is_file()
