"""Degraded GPUs on a local Ray cluster: the runbook's three named tests, and the wiring around them.

The runbook names this file: `pytest tests/test_generation_fallback.py`, with
`test_gpu_timeout_triggers_degraded_mode`, `test_priority_queue_requeues_after_gpu_unavailability`
and `test_realtime_jobs_take_precedence_over_batch_queue`. The decisions themselves (holds,
ordered resume, drains, attempts, retries, cancels) are tested event by event in the scheduling
core, without Ray: tests/unit/test_scheduler.py. Faults are injected through the admin endpoint
(the test cluster runs with SEIDRA_FAULT_INJECTION=1).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from storage.database import get_engine
from storage.settings import StorageSettings
from tests.otlp import STATUS_ERROR
from tests.ray_app import RunningApp

RUNBOOK_QUERY = """SELECT id, status, metadata->'degraded' AS degraded_info
FROM generation_jobs
WHERE status = 'pending' AND metadata->'degraded' IS NOT NULL
ORDER BY updated_at DESC
LIMIT 10;"""


@pytest.fixture(autouse=True)
def healthy_afterwards(app: RunningApp) -> Iterator[None]:
    yield
    app.clear_faults()
    app.http.post("/admin/maintenance", json={"enabled": False})
    app.eventually(lambda: app.status()["usable_slots"] >= 1, "a usable worker again", timeout_s=120)


def held_info(app: RunningApp, job_id: str) -> dict[str, Any] | None:
    job = app.job(job_id)
    degraded = job["metadata"].get("degraded")
    return job if job["status"] == "pending" and degraded and "resumed_at" not in degraded else None


def router_log_lines() -> list[str]:
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    return [line for path in logs.glob("worker-*") for line in path.read_text(errors="replace").splitlines()]


def started(job: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(job["started_at"])


def test_gpu_timeout_triggers_degraded_mode(app: RunningApp) -> None:
    app.inject(inference_delay_s=3)  # 4 steps per call: 12 s, past the 4 s inference timeout
    job_id = app.submit(prompt="slow GPU", num_inference_steps=4)["id"]

    job = app.eventually(lambda: held_info(app, job_id), "the job put on hold")
    degraded = job["metadata"]["degraded"]
    assert degraded["retry_after_seconds"] >= 1
    first = degraded["history"][0]  # later delays may follow while the replica cools down
    assert (first["reason"], first["at"]) == ("GPU inference timeout", degraded["since"])
    assert first["replica_id"] and first["retry_after_seconds"] >= 1
    # One warning when the hold starts, however many delays follow.
    app.eventually(lambda: [n["level"] for n in app.notifications(job_id)] == ["warning"], "one warning")

    [worker] = app.status()["workers"]
    assert worker["usable"] is False
    notification = app.notifications(job_id)[-1]  # the oldest: newest first
    assert notification["level"] == "warning" and "GPU inference timeout" in notification["message"]
    line = f"Delaying job {job_id} due to GPU unavailability: GPU inference timeout"
    logged = app.eventually(lambda: [text for text in router_log_lines() if line in text], "the delay in the router's log")
    trace_id = job["metadata"]["trace_id"]
    assert all(f"trace_id={trace_id}" in text for text in logged)
    holds = app.eventually(lambda: [s for s in app.traces.spans(trace_id) if s.name == "seidra.hold"], "the hold in the trace")
    assert holds[0].attributes["seidra.reason"] == "GPU inference timeout"

    def given_up() -> list[tuple[str, str]]:  # the slice that timed out, failed on both sides
        spans = app.traces.spans(trace_id)
        dispatches = {s.span_id for s in spans if s.name == "seidra.dispatch" and s.status_code == STATUS_ERROR}
        return [(s.parent_span_id, s.name) for s in spans if s.name == "seidra.inference" and s.parent_span_id in dispatches and s.status_code == STATUS_ERROR]

    app.eventually(given_up, "the timed-out slice's dispatch and inference spans in error")

    app.clear_faults()
    [done] = app.wait_for([job_id])
    assert done["metadata"]["degraded"]["history"][0]["reason"] == "GPU inference timeout"
    assert "resumed_at" in done["metadata"]["degraded"]
    assert done["metadata"]["failures"] >= 1
    levels = [n["level"] for n in app.notifications(job_id)]
    assert levels == ["info", "warning"]  # newest first: running again, then the hold


def test_priority_queue_requeues_after_gpu_unavailability(app: RunningApp) -> None:
    app.inject(temperature_c=95)
    [worker] = app.eventually(lambda: [w for w in app.status()["workers"] if w["mode"] == "degraded"], "a hot GPU")
    assert (worker["health"], worker["reason"]) == ("degraded", "GPU temperature 95 °C >= 85 °C")
    assert worker["gpu"]["temperature_c"] == 95
    assert "GPU temperature 95" in app.status()["outage"]

    batch = [str(job_id) for job_id in app.submit_batch([{"prompt": f"batch {i}"} for i in range(3)])["job_ids"]]
    realtime = [app.submit(prompt=f"realtime {i}")["id"] for i in range(2)]
    jobs = batch + realtime
    app.eventually(lambda: all(held_info(app, job_id) for job_id in jobs), "every job on hold")
    assert app.status()["held"] == {"realtime": 2, "batch": 3}
    assert all(len(app.notifications(job_id)) >= 1 for job_id in jobs)

    with get_engine(StorageSettings().database_url).connect() as connection:
        rows = connection.execute(sa.text(RUNBOOK_QUERY)).all()
    assert set(jobs) <= {str(row.id) for row in rows}

    app.clear_faults()
    finished = {job["id"]: job for job in app.wait_for(jobs)}
    assert all(job["attempts"] == 1 for job in finished.values())  # none lost, none run twice
    assert all(app.media.exists(job["result_key"]) for job in finished.values())
    order = sorted(jobs, key=lambda job_id: started(finished[job_id]))
    assert order == realtime + batch  # realtime first, each lane in its original order


def test_realtime_jobs_take_precedence_over_batch_queue(app: RunningApp) -> None:
    """With the only worker busy and batch jobs waiting, a realtime job submitted last starts first."""
    long_batch = app.submit_batch([{"prompt": "long batch job", "num_inference_steps": 120}])["job_ids"][0]
    app.wait_for([long_batch], statuses=("running",), timeout_s=60)
    waiting = app.submit_batch([{"prompt": f"queued batch {index}"} for index in range(3)])["job_ids"]
    realtime = app.submit(prompt="interactive request")["id"]

    jobs = {job["id"]: job for job in app.wait_for([long_batch, *waiting, realtime])}
    assert all(started(jobs[realtime]) < started(jobs[job_id]) for job_id in waiting)
    # The long job's call yields its slot at a slice boundary, so the realtime job does not wait for it either.
    assert jobs[realtime]["finished_at"] < jobs[long_batch]["finished_at"]


def test_maintenance_drains_running_work_and_holds_new_work(app: RunningApp) -> None:
    app.inject(inference_delay_s=0.1)  # 80 steps: 8 s at least, in 4-step slices well inside the timeout
    long_job = app.submit(prompt="long job", num_inference_steps=80)["id"]
    app.wait_for([long_job], statuses=("running",), timeout_s=60)
    response = app.http.post("/admin/maintenance", json={"enabled": True})
    assert response.status_code == 200
    app.eventually(lambda: app.status()["workers"][0]["mode"] == "maintenance", "the replica reports maintenance")
    newcomer = app.submit(prompt="arrives during maintenance")["id"]

    [drained] = app.wait_for([long_job])
    assert "degraded" not in drained["metadata"]  # it finished where it was, never held
    assert drained["finished_at"] > app.job(newcomer)["created_at"]  # so it ran during maintenance
    held = app.eventually(lambda: held_info(app, newcomer), "the newcomer on hold")
    assert "maintenance" in held["metadata"]["degraded"]["reason"]

    assert app.http.post("/admin/maintenance", json={"enabled": False}).status_code == 200
    app.wait_for([newcomer])
    assert app.http.post("/admin/maintenance", json={"enabled": True, "replica_id": "nope"}).status_code == 404


def test_attempts_exhausted_then_retry_with_countdown(app: RunningApp) -> None:
    app.inject(fail_inference=True)
    job_id = app.submit_batch([{"prompt": "breaks the pipeline"}])["job_ids"][0]
    [failed] = app.wait_for([str(job_id)], statuses=("failed",))
    assert failed["error"] == "failed 3 times; last: RuntimeError: injected inference failure"
    assert (failed["attempts"], failed["metadata"]["failures"]) == (3, 3)

    app.clear_faults()
    retried = app.http.post(f"/jobs/{job_id}/retry", params={"countdown_s": 2})
    assert retried.status_code == 202, retried.text
    body = retried.json()
    assert (body["status"], body["lane"], body["priority"], body["error"]) == ("pending", "realtime", 2, None)
    [done] = app.wait_for([str(job_id)])
    assert started(done) >= datetime.fromisoformat(body["metadata"]["retry"]["not_before"])

    assert app.http.post(f"/jobs/{job_id}/retry").status_code == 409  # completed stays completed
    assert app.http.post("/jobs/00000000-0000-0000-0000-000000000000/retry").status_code == 404


def test_an_unhealthy_replica_is_replaced_by_serve(app: RunningApp) -> None:
    [before] = app.status()["workers"]
    app.inject(health="unhealthy", replica_id=before["replica_id"])
    app.eventually(
        lambda: [w for w in app.status()["workers"] if w["replica_id"] != before["replica_id"] and w["usable"]],
        "a new healthy replica",
        timeout_s=120,
    )
    job_id = app.submit(prompt="after the replacement")["id"]
    [done] = app.wait_for([job_id])
    assert done["metadata"]["replica_id"] != before["replica_id"]


def test_fault_requests_are_validated(app: RunningApp) -> None:
    response = app.http.post("/admin/faults", json={"temperature_c": 300})
    assert response.status_code == 422 and "temperature_c" in response.json()["message"]
    assert app.http.post("/admin/faults", json={"health": "on fire"}).status_code == 422


def test_pausing_the_batch_lane_lets_only_realtime_work_run(app: RunningApp) -> None:
    assert app.http.post("/admin/lanes/batch", json={"paused": True}).json() == {"paused_lanes": ["batch"]}
    try:
        batch = str(app.submit_batch([{"prompt": "waits for the lane"}])["job_ids"][0])
        realtime = app.submit(prompt="runs anyway")["id"]
        app.wait_for([realtime])
        assert app.job(batch)["status"] == "pending" and app.status()["paused_lanes"] == ["batch"]
    finally:
        assert app.http.post("/admin/lanes/batch", json={"paused": False}).json() == {"paused_lanes": []}
    app.wait_for([batch])
    assert app.http.post("/admin/lanes/bulk", json={"paused": True}).status_code == 422
