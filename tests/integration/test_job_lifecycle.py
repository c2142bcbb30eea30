"""The job-lifecycle defects of issue 9, each reproduced through the public surface (HTTP, SQL,
`ray kill`, stopping a server) on the session's local cluster.

Each of these failed before the scheduling core and the router shell replaced the old router.
"""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Iterator

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image

from storage.database import get_engine
from storage.object_store import image_key
from storage.settings import StorageSettings
from tests.ray_app import RunningApp
from tests.servers import PostgresServer, S3Server, ServerProcess, unavailable


def stoppable(process: ServerProcess | None, what: str) -> ServerProcess:
    if process is None:
        unavailable(f"{what} is external: the tests cannot stop it")
    return process


@pytest.fixture(autouse=True)
def healthy_afterwards(app: RunningApp) -> Iterator[None]:
    yield
    app.clear_faults()
    app.eventually(lambda: app.http.get("/status").status_code == 200, "the API answering", timeout_s=120)
    app.eventually(lambda: app.status()["usable_slots"] >= 1 and not app.status().get("recovering"), "a usable worker", timeout_s=120)


def sql(statement: str, **params: object) -> list[sa.Row]:
    with get_engine(StorageSettings().database_url).begin() as connection:
        result = connection.execute(sa.text(statement), params)
        return list(result) if result.returns_rows else []


def test_retrying_a_running_job_is_refused_at_every_moment_of_its_run(app: RunningApp) -> None:
    """Was 202 (the job dispatched a second time) or, between two slices, 500 with the job lost."""
    job_id = app.submit(prompt="long", num_inference_steps=60)["id"]  # 15 slices of 4 steps
    app.wait_for([job_id], statuses=("running",), timeout_s=60)
    answers = set()
    while app.job(job_id)["status"] == "running":
        answers.add(app.http.post(f"/jobs/{job_id}/retry").status_code)
    assert answers == {409}
    [done] = app.wait_for([job_id])
    assert (done["attempts"], done["metadata"].get("failures", 0)) == (1, 0)
    assert app.media.exists(done["result_key"])


def test_cancelling_a_running_job_stops_it_and_frees_its_slot(app: RunningApp) -> None:
    """Was 409: a running job could not be cancelled at all."""
    app.inject(inference_delay_s=0.1)
    running = app.submit(prompt="cancel me", num_inference_steps=120)["id"]
    app.wait_for([running], statuses=("running",), timeout_s=60)
    cancelled = app.http.delete(f"/jobs/{running}")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled" and cancelled.json()["finished_at"]
    app.clear_faults()
    after = app.submit(prompt="runs next")["id"]
    [done] = app.wait_for([after], timeout_s=60)
    assert done["started_at"] > cancelled.json()["finished_at"]
    assert app.job(running)["status"] == "cancelled" and not app.media.exists(image_key(running))
    assert app.http.delete(f"/jobs/{running}").status_code == 409
    assert app.http.delete(f"/jobs/{after}").status_code == 409


def test_the_router_restarts_while_the_database_is_down(app: RunningApp, postgres: PostgresServer) -> None:
    """Was: the router's constructor raised, Ray never restarted it, and the API answered 503 forever."""
    import ray

    from scheduling.router import get_router
    from serve_app.app import APP_NAME

    if not postgres.serves(StorageSettings().database_url):
        unavailable("the session's app does not run on this PostgreSQL server")
    with stoppable(postgres.process, "PostgreSQL").down():
        ray.kill(get_router(APP_NAME), no_restart=False)
        refused = app.eventually(
            lambda: (r := app.http.post("/generation/single", json={"prompt": "x"})).status_code == 503 and r,
            "a 503 while the router cannot read its queue",
        )
        assert int(refused.headers["retry-after"]) >= 1
        status = app.eventually(lambda: (r := app.http.get("/status")).status_code == 200 and r.json(), "a status")
        assert status["recovering"] is True and status["database"].startswith("unreachable")
        assert app.http.get(f"/jobs/{uuid.uuid4()}").status_code == 503
    app.eventually(lambda: not app.status()["recovering"], "the router recovered", timeout_s=60)
    [done] = app.wait_for([app.submit(prompt="after the outage")["id"]], timeout_s=60)
    assert done["status"] == "completed"


def test_an_object_store_outage_is_a_storage_fault_not_a_gpu_fault(app: RunningApp, s3: S3Server) -> None:
    """Was: each failed upload counted as a failed inference; jobs ended `failed` and the replica was
    reported stuck when a cancel arrived during an upload."""
    if StorageSettings().s3_endpoint != s3.endpoint:
        unavailable("the session's app does not store images on this S3 server")
    with stoppable(s3.process, "the S3 server").down():
        jobs = [app.submit(prompt=f"during the outage {i}")["id"] for i in range(3)]
        app.eventually(
            lambda: all(app.job(j)["metadata"].get("storage_faults", 0) >= 1 for j in jobs[:1]), "a storage fault", timeout_s=60
        )
        victim = app.submit(prompt="cancelled while it uploads", priority=0)["id"]  # next, ahead of the others
        app.eventually(lambda: app.job(victim)["status"] == "running", "the victim running", timeout_s=60)
        time.sleep(1)  # its 4 steps take a fraction of that: it is retrying its upload now
        assert app.http.delete(f"/jobs/{victim}").status_code == 200
        time.sleep(6)  # past SEIDRA_STUCK_INFERENCE_AFTER_S: a call cancelled in its upload is no stuck GPU
        [worker] = app.status()["workers"]
        assert (worker["health"], worker["consecutive_failures"]) == ("healthy", 0)
    finished = app.wait_for(jobs, timeout_s=120)
    for job in finished:
        assert (job["status"], job["attempts"], job["metadata"].get("failures", 0)) == ("completed", 1, 0)
        assert app.media.exists(job["result_key"])
    assert app.job(victim)["status"] == "cancelled"


def test_rows_changed_behind_the_routers_back_are_reconciled(app: RunningApp) -> None:
    """Was: a deleted head-of-queue row made dispatch fail on it forever; a pending row the router
    did not know stayed pending forever; nothing compared the router with the database."""
    app.inject(inference_delay_s=0.1)
    blocker = app.submit(prompt="keeps the worker busy", num_inference_steps=40)["id"]
    app.wait_for([blocker], statuses=("running",), timeout_s=60)
    deleted, ended, after = (str(j) for j in app.submit_batch([{"prompt": p} for p in ("deleted", "ended", "after")])["job_ids"])
    sql("DELETE FROM generation_jobs WHERE id = :id", id=uuid.UUID(deleted))
    sql("UPDATE generation_jobs SET status = 'failed', error = 'by hand' WHERE id = :id", id=uuid.UUID(ended))
    orphan = uuid.uuid4()  # stored by someone else: the router never heard of it
    sql(
        "INSERT INTO generation_jobs (id, status, lane, priority, prompt, width, height, num_inference_steps, "
        "guidance_scale, seed, metadata, attempts, created_at, updated_at) VALUES (:id, 'pending', 'batch', 8, "
        "'orphan', 64, 64, 4, 7.5, 1, '{}', 0, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)",
        id=orphan,
    )
    app.clear_faults()
    finished = {job["id"]: job for job in app.wait_for([blocker, after, str(orphan)], timeout_s=120)}
    assert all(job["status"] == "completed" for job in finished.values())
    assert app.http.get(f"/jobs/{deleted}").status_code == 404
    assert (app.job(ended)["status"], app.job(ended)["started_at"]) == ("failed", None)


def test_an_idempotency_key_makes_a_repeated_submission_return_the_original(app: RunningApp) -> None:
    """Was: a client whose POST timed out could only submit again and get a second job."""
    key = {"Idempotency-Key": f"order-{uuid.uuid4()}"}
    body = {"prompt": "once only", "width": 64, "height": 64, "num_inference_steps": 4}
    first = app.http.post("/generation/single", json=body, headers=key)
    again = app.http.post("/generation/single", json=body, headers=key)
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json()["id"] == first.json()["id"] and again.json()["seed"] == first.json()["seed"]
    other = app.http.post("/generation/single", json={**body, "prompt": "something else"}, headers=key)
    assert other.status_code == 422 and key["Idempotency-Key"] in other.json()["detail"]
    batch_key = {"Idempotency-Key": f"batch-{uuid.uuid4()}"}
    items = {"items": [{**body, "prompt": f"tile {i}"} for i in range(2)]}
    batch, batch_again = (app.http.post("/generation/batch", json=items, headers=batch_key) for _ in range(2))
    assert (batch.status_code, batch_again.status_code) == (202, 200)
    assert batch_again.json()["batch_id"] == batch.json()["batch_id"]
    assert batch_again.json()["job_ids"] == batch.json()["job_ids"]
    assert app.http.post("/generation/single", json=body, headers={"Idempotency-Key": "x" * 256}).status_code == 422
    [row] = sql("SELECT count(*) FROM generation_jobs WHERE prompt = 'once only'")
    assert row[0] == 1
    app.wait_for([first.json()["id"], *batch.json()["job_ids"]])


def test_a_long_hold_keeps_a_small_record_and_notifies_once(app: RunningApp) -> None:
    """Was: one history entry and one notification row per delay, forever."""
    app.inject(temperature_c=99)
    app.eventually(lambda: app.status()["outage"], "an outage")
    job_id = app.submit(prompt="waits out the outage")["id"]
    held = app.eventually(
        lambda: (job := app.job(job_id))["metadata"].get("degraded", {}).get("delays", 0) >= 4 and job,
        "four delays", timeout_s=60,
    )  # fmt: skip
    degraded = held["metadata"]["degraded"]
    assert len(degraded["history"]) == 2 and degraded["history"][0]["at"] == degraded["since"]
    assert [n["level"] for n in app.notifications(job_id)] == ["warning"]
    app.clear_faults()
    [done] = app.wait_for([job_id])
    assert [n["level"] for n in app.notifications(job_id)] == ["info", "warning"]
    assert done["metadata"]["degraded"]["delays"] >= 4 and "resumed_at" in done["metadata"]["degraded"]


def png_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_a_realtime_job_takes_the_slot_of_a_running_batch_job_which_resumes_to_the_same_image(app: RunningApp) -> None:
    fields = {"prompt": "a long batch image", "width": 64, "height": 64, "num_inference_steps": 60, "seed": 5}
    app.inject(inference_delay_s=0.05)  # 3 s for the batch job's 60 steps, 0.2 s per 4-step slice
    [long] = app.submit_batch([fields])["job_ids"]
    app.wait_for([long], statuses=("running",), timeout_s=60)
    urgent = app.submit(prompt="urgent", width=64, height=64, num_inference_steps=8)["id"]
    [urgent_done] = app.wait_for([urgent], timeout_s=60)
    assert urgent_done["status"] == "completed"
    assert app.job(long)["status"] == "running"  # it gave its slot away at a slice boundary, not its progress
    app.clear_faults()
    [long_done] = app.wait_for([long], timeout_s=60)
    assert (long_done["status"], long_done["attempts"], long_done["metadata"].get("failures", 0)) == ("completed", 1, 0)
    # The same job again, on an idle cluster, in one call: the same image.
    [alone] = app.wait_for([app.submit_batch([fields])["job_ids"][0]], timeout_s=60)
    yielded, whole = (png_pixels(app.media.get(job["result_key"])) for job in (long_done, alone))
    assert np.abs(yielded.astype(int) - whole.astype(int)).max() <= 1
