"""Webhooks in storage, on SQLite and PostgreSQL: the keys' secrets and default URLs, deliveries and
the log each shows on its job, batches armed and fired once, and migration 0006 on rows made before."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from alembic import command

from storage.api_keys import ApiKeyStore, KeyNotFound
from storage.database import alembic_config, get_engine, upgrade
from storage.delivery import BATCH_EVENT, DeliveryStatus
from storage.job_status import JobStatus
from storage.jobs import JobStore, as_utc
from storage.models import ApiKey, GenerationJob, WebhookDelivery
from storage.webhooks import SUPERSEDED, WebhookStore
from tests.integration.test_storage import (  # noqa: F401  (database_url and store: fixtures, SQLite and PostgreSQL)
    database_url,
    insert_into_older_schema,
    new_job,
    schema_differences,
    store,
)

T0 = datetime(2026, 12, 3, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def webhooks(store: JobStore, database_url: str) -> WebhookStore:  # noqa: F811
    return WebhookStore(database_url)


def ended(store: JobStore, job: GenerationJob, status: JobStatus = JobStatus.COMPLETED) -> GenerationJob:  # noqa: F811
    if status is not JobStatus.CANCELLED:
        store.transition(job.id, JobStatus.RUNNING)
    return store.transition(job.id, status, finished_at=datetime.now(timezone.utc))


def job_delivery(job: GenerationJob, url: str = "https://hooks.example/h", at: datetime = T0) -> WebhookDelivery:
    return WebhookDelivery(
        event=f"job.{job.status}", owner=job.owner, key_id="0123456789ab", url=url, job_id=job.id,
        body="{}", status=DeliveryStatus.PENDING.value, created_at=at, next_attempt_at=at,
    )  # fmt: skip


# ----- keys -----


def test_a_key_has_a_webhook_secret_from_the_start_and_a_new_one_on_rotation(database_url: str) -> None:  # noqa: F811
    upgrade(database_url)
    keys = ApiKeyStore(database_url)
    created = keys.create("alice", webhook_url="https://hooks.example/a")
    first = keys.webhook(created.record.key_id)
    assert first is not None and first.url == "https://hooks.example/a" and not first.revoked
    assert first.secret.startswith("whsec_") and len(first.secret) == 49
    assert first.secret not in repr(first) and first.secret not in repr(created.record)

    rotated = keys.rotate_webhook_secret(created.record.key_id)
    assert rotated != first.secret and keys.webhook(created.record.key_id).secret == rotated  # type: ignore[union-attr]

    keys.set_webhook(created.record.key_id, None)
    keys.revoke(created.record.key_id)
    assert keys.webhook(created.record.key_id) == type(first)(created.record.key_id, None, rotated, True)
    assert keys.webhook("feedfeedfeed") is None
    with pytest.raises(KeyNotFound):
        keys.rotate_webhook_secret("feedfeedfeed")
    with pytest.raises(KeyNotFound):
        keys.set_webhook("feedfeedfeed", "https://hooks.example/a")


# ----- a job's deliveries -----


def test_a_delivery_shows_on_its_job_and_each_change_too(store: JobStore, webhooks: WebhookStore) -> None:  # noqa: F811
    [job] = store.add_all([new_job(owner="alice")])
    job = ended(store, job)
    delivery = job_delivery(job)
    assert webhooks.add_job_delivery(delivery)
    shown = store.get(job.id)
    assert shown.meta["webhook"] == {
        "delivery_id": str(delivery.id), "event": "job.completed", "url": "https://hooks.example/h", "status": "pending",
        "attempts": 0, "last_status": None, "last_error": None, "last_attempt_at": None,
        "next_attempt_at": T0.isoformat(), "ended_at": None,
    }  # fmt: skip
    assert (shown.status, as_utc(shown.updated_at)) == (job.status, as_utc(job.updated_at))  # the job itself did not change

    later = T0 + timedelta(seconds=5)
    recorded = webhooks.record(delivery.id, {"attempts": 1, "last_status": 500, "last_attempt_at": T0, "next_attempt_at": later})
    assert recorded is not None and recorded.attempts == 1
    assert store.get(job.id).meta["webhook"]["last_status"] == 500
    assert webhooks.pending() == [(delivery.id, later)]

    webhooks.record(delivery.id, {"status": "delivered", "attempts": 2, "last_status": 200, "next_attempt_at": None})
    assert store.get(job.id).meta["webhook"]["status"] == "delivered"
    assert webhooks.record(delivery.id, {"attempts": 9}) is None  # over: nothing changes any more
    assert webhooks.get(delivery.id).attempts == 2  # type: ignore[union-attr]
    assert webhooks.pending() == []


def test_a_job_that_ends_again_supersedes_its_pending_delivery(store: JobStore, webhooks: WebhookStore) -> None:  # noqa: F811
    [job] = store.add_all([new_job(owner="alice")])
    failed = ended(store, job, JobStatus.FAILED)
    first = job_delivery(failed)
    webhooks.add_job_delivery(first)
    store.transition(job.id, JobStatus.PENDING)  # retried
    second = job_delivery(ended(store, job), at=T0 + timedelta(minutes=1))
    webhooks.add_job_delivery(second)

    old = webhooks.get(first.id)
    assert old is not None and (old.status, old.last_error) == ("cancelled", SUPERSEDED)
    assert webhooks.record(first.id, {"attempts": 1}) is None  # its attempt in flight records nothing
    assert store.get(job.id).meta["webhook"]["delivery_id"] == str(second.id)
    assert [delivery_id for delivery_id, _ in webhooks.pending()] == [second.id]


def test_deleting_a_job_deletes_its_deliveries(store: JobStore, webhooks: WebhookStore, database_url: str) -> None:  # noqa: F811
    [job] = store.add_all([new_job(owner="alice")])
    delivery = job_delivery(ended(store, job))
    webhooks.add_job_delivery(delivery)
    with get_engine(database_url).begin() as connection:
        connection.execute(sa.delete(GenerationJob).where(GenerationJob.id == job.id))  # type: ignore[arg-type]
    assert webhooks.get(delivery.id) is None
    assert webhooks.record(delivery.id, {"attempts": 1}) is None
    assert not webhooks.add_job_delivery(job_delivery(job))  # a job gone has no delivery made


def test_the_jobs_a_dead_router_ended_without_a_delivery_are_found(
    store: JobStore,  # noqa: F811
    webhooks: WebhookStore,
    database_url: str,  # noqa: F811
) -> None:
    keys = ApiKeyStore(database_url)
    with_default = keys.create("alice", webhook_url="https://hooks.example/default").record.key_id
    without_default, revoked = keys.create("bob").record.key_id, keys.create("carol").record.key_id
    default_later = keys.create("dave").record.key_id
    jobs = store.add_all([
        new_job(owner="alice", key_id=with_default),  # the key's default webhook
        new_job(owner="bob", key_id=without_default, webhook_url="https://hooks.example/own"),
        new_job(owner="bob", key_id=without_default),  # no webhook at all
        new_job(owner="carol", key_id=revoked, webhook_url="https://hooks.example/own"),  # nothing signs it
        new_job(owner="alice", key_id=with_default),  # its delivery was stored
        new_job(owner="alice", key_id=with_default),  # ended again after its delivery
        new_job(owner="dave", key_id=default_later),  # no webhook when it ended
        new_job(owner="alice", key_id=with_default, batch_id="b"),  # it ended its batch: the batch's delivery is not its own
        new_job(owner="alice", key_id=with_default),  # still running
        new_job(owner="alice"),  # no key (authentication off)
    ])  # fmt: skip
    keys.revoke(revoked)
    for job in jobs[:8]:
        ended(store, job)
    store.transition(jobs[8].id, JobStatus.RUNNING)
    ended(store, jobs[9])
    keys.set_webhook(default_later, "https://hooks.example/later")
    assert webhooks.add_job_delivery(job_delivery(store.get(jobs[4].id), at=datetime.now(timezone.utc)))
    now = datetime.now(timezone.utc)
    assert webhooks.add_job_delivery(job_delivery(store.get(jobs[5].id), at=now - timedelta(minutes=5)))
    webhooks.arm_batch("alice", "b", with_default, "https://hooks.example/batch")
    [batch] = [webhooks.ended_batch("alice", "b")]
    assert batch is not None and webhooks.fire_batch(batch.delivery_id, jobs[7].id, "{}", now)

    found = webhooks.ended_without_delivery(now - timedelta(hours=1), now + timedelta(seconds=1))
    assert [job.id for job in found] == [jobs[0].id, jobs[1].id, jobs[5].id, jobs[7].id]
    assert webhooks.ended_without_delivery(now - timedelta(hours=1), now - timedelta(hours=1) + timedelta(seconds=1)) == []
    assert webhooks.ended_without_delivery(now + timedelta(seconds=1), now + timedelta(hours=1)) == []


# ----- a batch's delivery -----


def test_a_batch_delivery_is_armed_once_and_fired_once_its_jobs_ended(store: JobStore, webhooks: WebhookStore) -> None:  # noqa: F811
    first, second = store.add_all([new_job(8, owner="ann", batch_id="nightly"), new_job(8, owner="ann", batch_id="nightly")])
    store.add_all([new_job(8, owner="bob", batch_id="nightly")])  # another owner's batch of that name
    assert webhooks.ended_batch("ann", "nightly") is None
    webhooks.arm_batch("ann", "nightly", "0123456789ab", "https://hooks.example/old")
    webhooks.arm_batch("ann", "nightly", "0123456789ab", "https://hooks.example/b")  # the same delivery, elsewhere
    assert webhooks.armed_batches() == [("ann", "nightly")]

    ended(store, first)
    assert webhooks.ended_batch("ann", "nightly") is None  # one still pending
    last = ended(store, second, JobStatus.CANCELLED)
    armed = webhooks.ended_batch("ann", "nightly")
    assert armed is not None and armed.last_ended == last.id
    assert armed.counts == {"completed": 1, "cancelled": 1}

    assert webhooks.fire_batch(armed.delivery_id, armed.last_ended, '{"batch": 1}', T0)
    assert not webhooks.fire_batch(armed.delivery_id, armed.last_ended, '{"batch": 2}', T0)  # fired already
    fired = webhooks.get(armed.delivery_id)
    assert fired is not None
    assert (fired.event, fired.status, fired.url, fired.body, fired.job_id) == (
        BATCH_EVENT, "pending", "https://hooks.example/b", '{"batch": 1}', last.id
    )  # fmt: skip
    assert store.get(last.id).meta["batch_webhook"]["status"] == "pending"
    assert webhooks.ended_batch("ann", "nightly") is None and webhooks.armed_batches() == []

    webhooks.arm_batch("ann", "nightly", "0123456789ab", "https://hooks.example/b")  # armed again: a new delivery
    again = webhooks.ended_batch("ann", "nightly")
    assert again is not None and again.delivery_id != armed.delivery_id
    assert webhooks.ended_batch("ann", "empty") is None and webhooks.ended_batch("bob", "nightly") is None
    webhooks.arm_batch("ann", "empty", "0123456789ab", "https://hooks.example/b")
    assert webhooks.ended_batch("ann", "empty") is None  # armed, but no job of it stored (yet)


# ----- migration 0006 -----


def test_migration_0006_gives_each_earlier_key_a_secret_of_its_own(database_url: str) -> None:  # noqa: F811
    upgrade(database_url, "0005")
    keys = [ApiKey(key_id=f"00000000000{index}", secret_hash="h" * 64, user=f"user{index}") for index in range(2)]
    job = new_job(owner="user0")
    insert_into_older_schema(database_url, *keys, job)
    upgrade(database_url)
    assert schema_differences(database_url) == []
    stored_keys = ApiKeyStore(database_url)
    secrets = {stored_keys.webhook(key.key_id).secret for key in keys}  # type: ignore[union-attr]
    assert len(secrets) == 2 and all(secret.startswith("whsec_") for secret in secrets)
    stored = JobStore(database_url).get(job.id)
    assert (stored.key_id, stored.webhook_url) == (None, None)  # submitted before webhooks: none

    command.downgrade(alembic_config(database_url), "0005")
    assert "webhook_deliveries" not in sa.inspect(get_engine(database_url)).get_table_names()
    upgrade(database_url)
    assert schema_differences(database_url) == []
    assert JobStore(database_url).get(job.id).owner == "user0"
