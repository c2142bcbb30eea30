"""The webhook sender against a local receiver, without Ray: a SQLite database, the sender's loop in
this test's event loop, short retry delays. What the router does with it is tests/integration/test_webhooks.py's."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from scheduling.hold import Backoff
from scheduling.webhook_sender import WebhookConfig, WebhookSender
from scheduling.webhooks import RetryPolicy
from storage.api_keys import ApiKeyStore
from storage.database import upgrade
from storage.job_status import JobStatus
from storage.jobs import JobStore
from storage.models import GenerationJob, utcnow
from storage.webhooks import WebhookStore
from tests.integration.test_storage import new_job
from tests.webhook_receiver import Receiver, closed_port_url, receiver, verify

FAST = RetryPolicy(Backoff(base_s=1, cap_s=1, jitter=0), max_attempts=3, retry_for_s=60)


class Setup:
    def __init__(self, database_url: str) -> None:
        upgrade(database_url)
        self.jobs = JobStore(database_url)
        self.keys = ApiKeyStore(database_url)
        self.webhooks = WebhookStore(database_url)
        self.key_id = self.keys.create("alice").record.key_id
        self.secret = self.keys.rotate_webhook_secret(self.key_id)

    def sender(self, **config: Any) -> WebhookSender:
        """Made before the jobs it is handed, as the router is: a sender makes the deliveries of the
        jobs that ended before it without one itself (a dead router's)."""
        settings = {"policy": FAST, "timeout_s": 5.0, "concurrency": 4, "allow_private": True, "sweep_interval_s": 0.2}
        return WebhookSender(self.webhooks, self.keys, WebhookConfig(**{**settings, **config}))

    def ended_job(self, status: JobStatus = JobStatus.COMPLETED, **fields: Any) -> GenerationJob:
        [job] = self.jobs.add_all([new_job(owner="alice", **{"key_id": self.key_id, **fields})])
        if status is not JobStatus.CANCELLED:
            self.jobs.transition(job.id, JobStatus.RUNNING)
        return self.jobs.transition(job.id, status, finished_at=utcnow())

    def log(self, job: GenerationJob, key: str = "webhook") -> dict[str, Any]:
        return self.jobs.get(job.id).meta.get(key, {})  # type: ignore[no-any-return]


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return Setup(f"sqlite:///{tmp_path / 'seidra.db'}")


@asynccontextmanager
async def running(sender: WebhookSender) -> AsyncIterator[WebhookSender]:
    task = asyncio.create_task(sender.run())
    try:
        yield sender
    finally:
        task.cancel()


async def until(check: Callable[[], Any], what: str, timeout_s: float = 30) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        await asyncio.sleep(0.05)
    return value


async def arrived(hook: Receiver, count: int, timeout_s: float = 30) -> list[Any]:
    """The receiver's first `count` requests, waited for without blocking the sender's event loop."""
    await until(lambda: len(hook.received) >= count, f"{count} webhook requests", timeout_s)
    return hook.received[:count]


def ended_as(setup: Setup, job: GenerationJob, status: str, key: str = "webhook") -> Callable[[], Any]:
    return lambda: setup.log(job, key).get("status") == status


def test_a_job_is_delivered_signed_to_the_address_checked(setup: Setup) -> None:
    async def scenario(hook: Receiver) -> None:
        sender = setup.sender()
        job = setup.ended_job(webhook_url=hook.url("/jobs?token=t"))
        async with running(sender):
            sender.job_ended(job)
            await until(ended_as(setup, job, "delivered"), "delivered")
        [request] = hook.received
        assert request.path == "/jobs?token=t"
        assert verify(setup.secret, request.headers["seidra-signature"], request.body)
        assert not verify("whsec_someone-else", request.headers["seidra-signature"], request.body)
        document = request.document
        assert request.headers["seidra-delivery"] == document["id"] == setup.log(job)["delivery_id"]
        assert request.headers["seidra-event"] == document["event"] == "job.completed"
        assert request.headers["host"] == f"127.0.0.1:{hook.port}"
        assert request.headers["content-type"] == "application/json"
        assert document["job"]["id"] == str(job.id) and document["job"]["status"] == "completed"
        assert setup.log(job)["attempts"] == 1 and setup.log(job)["last_status"] == 200

    with receiver() as hook:
        asyncio.run(scenario(hook))


def test_a_host_name_is_resolved_by_the_sender_connected_to_at_its_address_and_kept_in_host(setup: Setup) -> None:
    async def scenario(hook: Receiver) -> None:
        sender = setup.sender()
        job = setup.ended_job(webhook_url=hook.url("/by-name").replace("127.0.0.1", "localhost"))
        async with running(sender):
            sender.job_ended(job)
            await until(ended_as(setup, job, "delivered"), "delivered")
        [request] = hook.received
        assert (request.path, request.headers["host"]) == ("/by-name", f"localhost:{hook.port}")

    with receiver() as hook:
        asyncio.run(scenario(hook))


def test_500s_are_tried_again_until_a_2xx_then_the_same_body_is_signed_anew(setup: Setup) -> None:
    async def scenario(hook: Receiver) -> None:
        sender = setup.sender()
        job = setup.ended_job(webhook_url=hook.url())
        async with running(sender):
            sender.job_ended(job)
            await until(ended_as(setup, job, "delivered"), "delivered")
        requests = hook.received
        assert len(requests) == 3 and len({r.body for r in requests}) == 1
        assert all(verify(setup.secret, r.headers["seidra-signature"], r.body) for r in requests)
        assert requests[1].at - requests[0].at >= 0.9  # the backoff's second
        log = setup.log(job)
        assert (log["attempts"], log["last_status"], log["last_error"]) == (3, 200, None)

    with receiver([500, 503, 200]) as hook:
        asyncio.run(scenario(hook))


def test_a_delivery_is_given_up_after_the_last_attempt(setup: Setup) -> None:
    async def scenario(hook: Receiver) -> None:
        sender = setup.sender()
        job = setup.ended_job(JobStatus.FAILED, webhook_url=hook.url())
        async with running(sender):
            sender.job_ended(job)
            await until(ended_as(setup, job, "failed"), "given up")
            await asyncio.sleep(1.5)  # nothing more comes
        assert len(hook.received) == 3
        log = setup.log(job)
        assert (log["event"], log["attempts"], log["last_status"], log["next_attempt_at"]) == ("job.failed", 3, 500, None)

    with receiver([500]) as hook:
        asyncio.run(scenario(hook))


def test_a_receiver_that_is_down_or_slow_fails_the_delivery_not_the_caller(setup: Setup) -> None:
    async def scenario(slow: Receiver) -> None:
        sender = setup.sender(timeout_s=0.3)
        down, late = setup.ended_job(webhook_url=closed_port_url()), setup.ended_job(webhook_url=slow.url())
        async with running(sender):
            started = time.monotonic()
            sender.job_ended(down)
            sender.job_ended(late)
            assert time.monotonic() - started < 0.1  # handed over, not waited for
            await until(lambda: ended_as(setup, down, "failed")() and ended_as(setup, late, "failed")(), "both given up")
        assert setup.log(down)["last_status"] is None and "ConnectError" in setup.log(down)["last_error"]
        assert setup.log(late)["last_error"] == "no answer within 0.3 s"

    with receiver(delay_s=1.0) as slow:
        asyncio.run(scenario(slow))


def test_a_private_address_is_refused_at_each_attempt_unless_allowed(setup: Setup) -> None:
    async def scenario(hook: Receiver) -> None:
        sender = setup.sender(allow_private=False)
        job = setup.ended_job(webhook_url=hook.url())
        async with running(sender):
            sender.job_ended(job)
            await until(ended_as(setup, job, "failed"), "given up")
        assert hook.received == []
        assert setup.log(job)["last_error"] == (
            "refused: host 127.0.0.1 resolves to 127.0.0.1, a loopback address (SEIDRA_WEBHOOK_ALLOW_PRIVATE is off)"
        )

    with receiver() as hook:
        asyncio.run(scenario(hook))


def test_the_keys_default_webhook_removed_cancels_what_is_pending_for_it(setup: Setup) -> None:
    async def scenario(hook: Receiver) -> None:
        sender = setup.sender()
        setup.keys.set_webhook(setup.key_id, hook.url("/default"))
        job = setup.ended_job(JobStatus.CANCELLED)  # no URL of its own: the key's default
        async with running(sender):
            sender.job_ended(job)
            await arrived(hook, 1)
            setup.keys.set_webhook(setup.key_id, None)
            await until(ended_as(setup, job, "cancelled"), "cancelled")
            await asyncio.sleep(1.5)
        assert [r.path for r in hook.received] == ["/default"]  # the one attempt before the removal
        assert hook.received[0].document["event"] == "job.cancelled"
        log = setup.log(job)
        assert (log["attempts"], log["last_status"]) == (1, 500)
        assert log["last_error"] == "its API key's default webhook was removed"

    with receiver([500]) as hook:
        asyncio.run(scenario(hook))


def test_a_revoked_key_signs_nothing_more(setup: Setup) -> None:
    async def scenario(hook: Receiver) -> None:
        sender = setup.sender()
        job = setup.ended_job(webhook_url=hook.url())
        async with running(sender):
            sender.job_ended(job)
            await arrived(hook, 1)
            setup.keys.revoke(setup.key_id)
            await until(ended_as(setup, job, "cancelled"), "cancelled")
        assert len(hook.received) == 1 and setup.log(job)["last_error"] == "its API key was revoked"

    with receiver([500]) as hook:
        asyncio.run(scenario(hook))


def test_a_job_without_a_key_or_a_webhook_has_no_delivery(setup: Setup) -> None:
    async def scenario() -> None:
        sender = setup.sender()
        unsigned = setup.ended_job(webhook_url="http://127.0.0.1:9/x", key_id=None)
        plain = setup.ended_job()
        async with running(sender):
            sender.job_ended(unsigned)
            sender.job_ended(plain)
            await asyncio.sleep(0.5)
        assert setup.log(unsigned) == {} and setup.log(plain) == {}
        assert setup.webhooks.pending() == []

    asyncio.run(scenario())


def test_a_new_sender_resumes_what_the_last_one_left_pending(setup: Setup) -> None:
    async def scenario(hook: Receiver) -> None:
        first = setup.sender()
        job = setup.ended_job(webhook_url=hook.url())
        async with running(first):
            first.job_ended(job)
            await arrived(hook, 1)
            await until(lambda: setup.log(job).get("attempts") == 1, "the first attempt recorded")
        async with running(setup.sender()):  # a restarted router
            await until(ended_as(setup, job, "delivered"), "delivered")
        assert len(hook.received) == 2 and setup.log(job)["attempts"] == 2

    with receiver([500, 200]) as hook:
        asyncio.run(scenario(hook))


def test_a_new_sender_delivers_what_the_last_one_ended_but_died_before_storing(setup: Setup) -> None:
    async def scenario(hook: Receiver) -> None:
        job = setup.ended_job(webhook_url=hook.url())  # its router died before `job_ended`
        no_webhook = setup.ended_job()
        async with running(setup.sender()):  # a restarted router
            await until(ended_as(setup, job, "delivered"), "delivered")
            await asyncio.sleep(0.5)
        [request] = hook.received
        assert request.document["job"]["id"] == str(job.id) and setup.log(no_webhook) == {}

    with receiver() as hook:
        asyncio.run(scenario(hook))


def test_a_batch_is_delivered_once_when_its_jobs_ended_together(setup: Setup) -> None:
    async def scenario(hook: Receiver) -> None:
        sender = setup.sender()
        first, second = (setup.ended_job(batch_id="nightly", status=status) for status in (JobStatus.COMPLETED, JobStatus.FAILED))
        setup.webhooks.arm_batch("alice", "nightly", setup.key_id, hook.url("/batch"))
        async with running(sender):
            sender.job_ended(first)
            sender.job_ended(second)
            [request] = await arrived(hook, 1)
            await asyncio.sleep(1)
        assert len(hook.received) == 1
        assert verify(setup.secret, request.headers["seidra-signature"], request.body)
        batch = request.document["batch"]
        assert (request.document["event"], batch["batch_id"], batch["owner"]) == ("batch.ended", "nightly", "alice")
        assert batch["jobs"] == {"total": 2, "completed": 1, "failed": 1, "cancelled": 0}
        shown = [setup.log(job, "batch_webhook") for job in (first, second)]
        assert [log.get("status") for log in shown].count("delivered") == 1

    with receiver() as hook:
        asyncio.run(scenario(hook))


def test_a_batch_that_ended_before_it_was_armed_is_found_by_the_sweep(setup: Setup) -> None:
    async def scenario(hook: Receiver) -> None:
        sender = setup.sender()
        job = setup.ended_job(batch_id="quick")
        async with running(sender):
            sender.job_ended(job)  # ends before the API armed its batch
            await asyncio.sleep(0.3)
            setup.webhooks.arm_batch("alice", "quick", setup.key_id, hook.url("/batch"))
            [request] = await arrived(hook, 1, timeout_s=5)
        assert request.document["batch"]["jobs"]["total"] == 1

    with receiver() as hook:
        asyncio.run(scenario(hook))


def test_attempts_at_once_are_bounded_by_the_concurrency(setup: Setup) -> None:
    async def scenario(hook: Receiver) -> None:
        sender = setup.sender(concurrency=2)
        jobs = [setup.ended_job(webhook_url=hook.url(f"/{index}")) for index in range(6)]
        async with running(sender):
            for job in jobs:
                sender.job_ended(job)
            await until(lambda: all(ended_as(setup, job, "delivered")() for job in jobs), "all delivered")
        starts = sorted(request.at for request in hook.received)
        # Each takes 0.4 s at the receiver: two at a time make three waves.
        assert starts[-1] - starts[0] >= 0.7

    with receiver(delay_s=0.4) as hook:
        asyncio.run(scenario(hook))


def test_the_delivery_id_names_the_row(setup: Setup) -> None:
    async def scenario(hook: Receiver) -> None:
        sender = setup.sender()
        job = setup.ended_job(webhook_url=hook.url())
        async with running(sender):
            sender.job_ended(job)
            [request] = await arrived(hook, 1)
        stored = setup.webhooks.get(uuid.UUID(request.headers["seidra-delivery"]))
        assert stored is not None and stored.body is not None and stored.body.encode() == request.body

    with receiver() as hook:
        asyncio.run(scenario(hook))
