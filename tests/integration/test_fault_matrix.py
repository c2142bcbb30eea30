"""The fault matrix of docs/reliability.md, row by row on the session's local cluster.

In every row: no job is lost, no image is stored twice for one job (counted as successful
`seidra.upload` spans in the job's trace), and every job ends `completed` or `failed` with its reason.
The rows that stop the whole cluster or need the local media folder are in tests/cluster/.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from storage.settings import StorageSettings
from tests.otlp import STATUS_ERROR
from tests.ray_app import RunningApp
from tests.servers import PostgresServer, S3Server, ServerProcess, unavailable

OUTAGE_S = 30


@pytest.fixture(autouse=True)
def healthy_afterwards(app: RunningApp) -> Iterator[None]:
    yield
    app.clear_faults()
    app.eventually(lambda: app.http.get("/status").status_code == 200, "the API answering", timeout_s=120)
    app.eventually(lambda: app.status()["usable_slots"] >= 1 and not app.status()["recovering"], "a usable worker", timeout_s=120)


def stoppable(process: ServerProcess | None, what: str) -> ServerProcess:
    if process is None:
        unavailable(f"{what} is external: the tests cannot stop it")
    return process


def stored_once(app: RunningApp, job: dict[str, Any]) -> None:
    """The job completed with its image, written exactly once."""
    assert job["status"] == "completed", (job["id"], job["status"], job["error"])
    assert app.media.exists(job["result_key"])

    def uploads() -> list[Any]:
        spans = app.traces.spans(job["metadata"]["trace_id"])
        return [s for s in spans if s.name == "seidra.upload" and s.status_code != STATUS_ERROR]

    app.eventually(uploads, f"the upload of {job['id']} in its trace")
    time.sleep(0.5)  # a second upload would have been exported by now (OTEL_BSP_SCHEDULE_DELAY=200)
    assert len(uploads()) == 1, f"job {job['id']} stored its image {len(uploads())} times"


def test_a_worker_replica_killed_mid_job(app: RunningApp) -> None:
    import ray

    app.inject(inference_delay_s=0.05)
    jobs = [app.submit(prompt=f"outlives its worker {i}", num_inference_steps=60)["id"] for i in range(3)]
    app.wait_for([jobs[0]], statuses=("running",), timeout_s=60)
    [worker] = app.status()["workers"]
    replica = ray.get_actor(f"SERVE_REPLICA::seidra#DiffusionWorker#{worker['replica_id']}", namespace="serve")
    ray.kill(replica, no_restart=True)
    app.eventually(lambda: [w for w in app.status()["workers"] if w["replica_id"] != worker["replica_id"]], "a new replica", 120)
    app.clear_faults()
    finished = app.wait_for(jobs, timeout_s=180)
    for job in finished:
        stored_once(app, job)
    assert finished[0]["metadata"]["failures"] == 1  # the run it lost counts; the job did not
    assert all(job["metadata"]["replica_id"] != worker["replica_id"] for job in finished)


def test_the_router_killed_mid_dispatch(app: RunningApp) -> None:
    import ray

    from scheduling.router import get_router
    from serve_app.app import APP_NAME

    # Long enough that the first one is still running when the router dies.
    jobs = app.submit_batch([{"prompt": f"survivor {index}", "num_inference_steps": 100} for index in range(4)])["job_ids"]
    app.wait_for([jobs[0]], statuses=("running",), timeout_s=60)
    ray.kill(get_router(APP_NAME), no_restart=False)  # Ray restarts it: max_restarts=-1

    finished = app.wait_for(jobs, timeout_s=180)
    for job in finished:
        stored_once(app, job)
    assert finished[0]["metadata"].get("requeued") == "router restarted"


def test_the_router_killed_after_a_start_its_database_write_never_recorded(app: RunningApp, postgres: PostgresServer) -> None:
    """The router sends a call without waiting for its `running` write: the dead router's next job
    is `pending` in the database while the replica runs it. Its new router must not store it twice."""
    import ray

    from scheduling.router import get_router
    from serve_app.app import APP_NAME

    if not postgres.serves(StorageSettings().database_url):
        unavailable("the session's app does not run on this PostgreSQL server")
    app.inject(inference_delay_s=0.05)
    first, second = (app.submit(prompt=f"sent before its write {i}", num_inference_steps=60)["id"] for i in range(2))
    app.wait_for([first], statuses=("running",), timeout_s=60)

    def running_on_the_replica() -> bool:
        return any(second in worker["running_jobs"] for worker in app.status()["workers"])

    with stoppable(postgres.process, "PostgreSQL").down():
        app.eventually(running_on_the_replica, "the second job sent while its write waits for the database")
        ray.kill(get_router(APP_NAME), no_restart=False)
    finished = app.wait_for([first, second], timeout_s=180)
    for job in finished:
        stored_once(app, job)
    assert all(job["metadata"].get("failures", 0) == 0 for job in finished)


def test_postgresql_stopped_during_submissions_and_completions(app: RunningApp, postgres: PostgresServer) -> None:
    if not postgres.serves(StorageSettings().database_url):
        unavailable("the session's app does not run on this PostgreSQL server")
    app.inject(inference_delay_s=0.05)
    running = app.submit(prompt="completes while the database is down", num_inference_steps=40)["id"]
    app.wait_for([running], statuses=("running",), timeout_s=60)
    answers: list[tuple[int, str | None]] = []
    with stoppable(postgres.process, "PostgreSQL").down():
        deadline = time.monotonic() + OUTAGE_S
        while time.monotonic() < deadline:
            response = app.http.post("/generation/single", json={"prompt": "refused", "width": 64, "height": 64})
            answers.append((response.status_code, response.headers.get("retry-after")))
            time.sleep(1)
    assert {status for status, _ in answers} == {503}
    assert all(retry_after and int(retry_after) >= 1 for _, retry_after in answers)
    app.clear_faults()
    [done] = app.wait_for([running], timeout_s=120)  # its result, kept by the router, is recorded now
    stored_once(app, done)
    assert (done["attempts"], done["metadata"].get("failures", 0)) == (1, 0)
    after = app.submit(prompt="after the outage")["id"]
    stored_once(app, app.wait_for([after], timeout_s=60)[0])


def test_the_s3_server_stopped(app: RunningApp, s3: S3Server) -> None:
    if StorageSettings().s3_endpoint != s3.endpoint:
        unavailable("the session's app does not store images on this S3 server")
    with stoppable(s3.process, "the S3 server").down():
        jobs = [app.submit(prompt=f"made while S3 is down {i}")["id"] for i in range(4)]
        time.sleep(OUTAGE_S)
        [worker] = app.status()["workers"]
        assert (worker["usable"], worker["health"], worker["consecutive_failures"]) == (True, "healthy", 0)
    finished = app.wait_for(jobs, timeout_s=120)
    for job in finished:
        stored_once(app, job)
        assert (job["attempts"], job["metadata"].get("failures", 0)) == (1, 0)
    assert any(job["metadata"].get("storage_faults", 0) >= 1 for job in finished)
