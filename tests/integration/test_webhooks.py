"""Webhooks end to end on the session's cluster, against a local receiver: a job's JSON delivered and
signed, retries after 500s, giving up, a receiver that is down, a batch delivered once, a cancelled
job, a webhook removed before its delivery, a router restarted mid-delivery, and URLs refused.

The cluster runs with SEIDRA_WEBHOOK_ALLOW_PRIVATE=true (the receiver is on 127.0.0.1), attempts a
second apart and 3 attempts at most (tests/ray_app.py).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from storage.api_keys import KeyLimits
from tests.ray_app import RunningApp
from tests.webhook_receiver import closed_port_url, receiver, verify

MAX_ATTEMPTS = 3  # SEIDRA_WEBHOOK_MAX_ATTEMPTS of the session's cluster
SMALL = {"width": 64, "height": 64, "num_inference_steps": 4}


@dataclass
class Caller:
    key_id: str
    secret: str  # the key's webhook secret, as `seidra keys webhook-secret` shows it
    http: httpx.Client

    def submit(self, **fields: Any) -> dict[str, Any]:
        response = self.http.post("/generation/single", json={"prompt": "a lighthouse", **SMALL, **fields})
        assert response.status_code == 202, response.text
        return response.json()  # type: ignore[no-any-return]

    def job(self, job_id: str) -> dict[str, Any]:
        response = self.http.get(f"/jobs/{job_id}")
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]


@pytest.fixture
def caller(app: RunningApp) -> Iterator[Caller]:
    created = app.keys.create(f"hooks-{uuid.uuid4().hex[:8]}", limits=KeyLimits(submissions_per_minute=10_000))
    secret = app.keys.rotate_webhook_secret(created.record.key_id)
    with app.client(created.key) as http:
        yield Caller(created.record.key_id, secret, http)


def delivery_log(app: RunningApp, caller: Caller, job_id: str, status: str, key: str = "webhook") -> dict[str, Any]:
    """The job's delivery log once its delivery is `status`."""

    def ended() -> dict[str, Any] | None:
        log: dict[str, Any] = caller.job(job_id)["metadata"].get(key, {})
        return log if log.get("status") == status else None

    return app.eventually(ended, f"job {job_id}'s {key} {status}")  # type: ignore[no-any-return]


def test_a_completed_job_is_delivered_as_its_json_signed_with_the_keys_secret(app: RunningApp, caller: Caller) -> None:
    with receiver() as hook:
        job = caller.submit(webhook_url=hook.url("/seidra?source=test"))
        assert job["webhook_url"] == hook.url("/seidra?source=test")
        [request] = hook.wait_for(1)
    assert request.path == "/seidra?source=test"
    assert verify(caller.secret, request.headers["seidra-signature"], request.body)
    assert not verify(app.keys.rotate_webhook_secret(caller.key_id), request.headers["seidra-signature"], request.body)
    document = request.document
    assert (document["event"], request.headers["seidra-event"]) == ("job.completed", "job.completed")
    shown = caller.job(job["id"])
    delivered = document["job"]
    for field in ("id", "owner", "status", "prompt", "seed", "width", "result_key", "batch_id", "created_at", "finished_at"):
        assert delivered[field] == shown[field], field
    assert delivered["image_url"] == f"/jobs/{job['id']}/image"
    assert caller.http.get(delivered["image_url"]).headers["content-type"] == "image/png"

    log = delivery_log(app, caller, job["id"], "delivered")
    assert log["delivery_id"] == document["id"] == request.headers["seidra-delivery"]
    assert (log["event"], log["attempts"], log["last_status"], log["last_error"]) == ("job.completed", 1, 200, None)


def test_500s_are_retried_until_the_receiver_takes_it(app: RunningApp, caller: Caller) -> None:
    with receiver([500, 502, 200]) as hook:
        job = caller.submit(webhook_url=hook.url())
        log = delivery_log(app, caller, job["id"], "delivered")
        requests = hook.received
    assert (log["attempts"], log["last_status"]) == (3, 200)
    assert len(requests) == 3 and len({request.headers["seidra-delivery"] for request in requests}) == 1
    assert all(verify(caller.secret, request.headers["seidra-signature"], request.body) for request in requests)


def test_a_delivery_is_given_up_after_the_limit_and_the_log_says_so(app: RunningApp, caller: Caller) -> None:
    with receiver([500]) as hook:
        job = caller.submit(webhook_url=hook.url())
        log = delivery_log(app, caller, job["id"], "failed")
        time.sleep(2)  # no attempt after the last
        assert len(hook.received) == MAX_ATTEMPTS
    assert (log["attempts"], log["last_status"], log["next_attempt_at"]) == (MAX_ATTEMPTS, 500, None)
    assert caller.job(job["id"])["status"] == "completed"


def test_a_receiver_that_is_down_never_blocks_or_fails_the_job(app: RunningApp, caller: Caller) -> None:
    started = time.monotonic()
    response = caller.http.post(
        "/generation/single", params={"wait": "true"}, json={"prompt": "nobody listens", **SMALL, "webhook_url": closed_port_url()}
    )
    assert response.status_code == 200 and response.json()["status"] == "completed", response.text
    assert time.monotonic() - started < 30
    after = caller.submit()  # the next job runs as ever
    app.wait_for([after["id"]])
    log = delivery_log(app, caller, response.json()["id"], "failed")
    assert log["attempts"] == MAX_ATTEMPTS and log["last_status"] is None and "ConnectError" in log["last_error"]


def test_a_batch_is_delivered_once_when_all_its_jobs_ended(app: RunningApp, caller: Caller) -> None:
    name = f"hooked-{uuid.uuid4().hex[:8]}"
    with receiver() as hook:
        items = [{"prompt": f"fox {index}", **SMALL} for index in range(3)]
        response = caller.http.post("/generation/batch", json={"items": items, "batch_id": name, "webhook_url": hook.url("/batch")})
        assert response.status_code == 202, response.text
        job_ids = response.json()["job_ids"]
        [request] = hook.wait_for(1, path="/batch")
        time.sleep(2)  # the jobs that ended after the first do not send it again
        assert len(hook.received) == 1
    assert verify(caller.secret, request.headers["seidra-signature"], request.body)
    document = request.document
    assert document["event"] == "batch.ended"
    assert document["batch"]["batch_id"] == name
    assert document["batch"]["jobs"] == {"total": 3, "completed": 3, "failed": 0, "cancelled": 0}
    jobs = [caller.job(job_id) for job_id in job_ids]
    assert all(job["status"] == "completed" and "webhook" not in job["metadata"] for job in jobs)  # no URL of their own
    [shown] = [job["metadata"]["batch_webhook"] for job in jobs if "batch_webhook" in job["metadata"]]
    assert shown["delivery_id"] == document["id"]


def test_a_cancelled_job_is_delivered_as_cancelled(app: RunningApp, caller: Caller) -> None:
    with receiver() as hook:
        job = caller.submit(prompt="cancelled at once", num_inference_steps=100, webhook_url=hook.url())
        assert caller.http.delete(f"/jobs/{job['id']}").status_code == 200
        [request] = hook.wait_for(1)
    assert request.document["event"] == "job.cancelled"
    assert request.document["job"]["status"] == "cancelled" and request.document["job"]["image_url"] is None
    assert delivery_log(app, caller, job["id"], "delivered")["event"] == "job.cancelled"


def test_a_webhook_removed_before_its_delivery_is_not_sent(app: RunningApp, caller: Caller) -> None:
    """The key's default webhook (the job names none) answers 500 once; removed, it gets nothing more."""
    with receiver([500, 200]) as hook:
        app.keys.set_webhook(caller.key_id, hook.url("/default"))
        job = caller.submit()
        hook.wait_for(1)
        app.keys.set_webhook(caller.key_id, None)
        log = delivery_log(app, caller, job["id"], "cancelled")
        time.sleep(2)
        assert [request.path for request in hook.received] == ["/default"]
    assert (log["attempts"], log["last_status"]) == (1, 500)
    assert log["last_error"] == "its API key's default webhook was removed"


def test_a_delivery_pending_when_the_router_restarts_is_resumed(app: RunningApp, caller: Caller) -> None:
    import ray

    from scheduling.router import get_router
    from serve_app.app import APP_NAME

    with receiver([500, 200]) as hook:
        job = caller.submit(webhook_url=hook.url())
        hook.wait_for(1)
        ray.kill(get_router(APP_NAME), no_restart=False)  # Ray restarts it: max_restarts=-1
        log = delivery_log(app, caller, job["id"], "delivered")
        assert len(hook.received) >= 2
    assert log["last_status"] == 200


def test_a_job_whose_router_died_before_storing_its_delivery_is_delivered_by_the_next(app: RunningApp, caller: Caller) -> None:
    """The router stores a job's delivery after the job's final write; one that dies in between
    leaves the job ended without a delivery. That state is made here with SQL, then the router killed."""
    import ray
    import sqlalchemy as sa
    from sqlmodel import col

    from scheduling.router import get_router
    from serve_app.app import APP_NAME
    from storage.database import get_engine
    from storage.models import WebhookDelivery
    from storage.settings import StorageSettings

    with receiver() as hook:
        job = caller.submit(webhook_url=hook.url())
        first = delivery_log(app, caller, job["id"], "delivered")
        with get_engine(StorageSettings().database_url).begin() as connection:
            connection.execute(sa.delete(WebhookDelivery).where(col(WebhookDelivery.job_id) == uuid.UUID(job["id"])))
        ray.kill(get_router(APP_NAME), no_restart=False)  # Ray restarts it: max_restarts=-1
        [_, again] = hook.wait_for(2, timeout_s=60)
    assert again.document["job"]["id"] == job["id"] and again.document["id"] != first["delivery_id"]
    assert verify(caller.secret, again.headers["seidra-signature"], again.body)
    assert delivery_log(app, caller, job["id"], "delivered")["delivery_id"] == again.document["id"]


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://hooks.example/h", "must be an http:// or https:// URL"),
        ("https://user:secret@hooks.example/h", "must not carry credentials"),
        ("https:///h", "must name a host"),
    ],
)
def test_a_bad_webhook_url_is_refused_naming_the_field(caller: Caller, url: str, reason: str) -> None:
    single = caller.http.post("/generation/single", json={"prompt": "p", **SMALL, "webhook_url": url})
    batch = caller.http.post("/generation/batch", json={"items": [{"prompt": "p", **SMALL}], "webhook_url": url})
    for response in (single, batch):
        assert response.status_code == 422, response.text
        assert response.json()["message"].startswith(f"webhook_url: Value error, {reason}")
