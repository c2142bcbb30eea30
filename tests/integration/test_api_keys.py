"""API keys and owners in storage, on SQLite and PostgreSQL: keys stored as hashes only, checked
against expiry and revocation; every job and notification listing narrowed to its owner; migration
0003 on a database with rows in it."""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from alembic import command

from storage.api_keys import ApiKeyStore, KeyLimits, KeyNotFound, Principal
from storage.database import alembic_config, current_revision, get_engine, upgrade
from storage.job_status import JobStatus
from storage.jobs import JobNotFound, JobStore, as_utc
from storage.models import ApiKey, Notification
from storage.notifications import Level, NotificationService
from tests.integration.test_storage import (  # noqa: F401  (database_url and store: fixtures, SQLite and PostgreSQL)
    database_url,
    insert_into_older_schema,
    new_job,
    query_plan,
    schema_differences,
    statements,
    store,
)

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def keys(database_url: str) -> ApiKeyStore:
    upgrade(database_url)
    return ApiKeyStore(database_url)


def stored_text(database_url: str) -> str:
    """Every value of every api_keys row, as text."""
    with get_engine(database_url).connect() as connection:
        rows = connection.execute(sa.select(ApiKey.__table__)).all()  # type: ignore[attr-defined]
    return repr([tuple(row) for row in rows])


# ----- keys -----


def test_a_new_key_authenticates_as_its_user(keys: ApiKeyStore) -> None:
    created = keys.create("alice", now=T0)
    assert re.fullmatch(r"seidra_[0-9a-f]{12}_[A-Za-z0-9_-]{43}", created.key)
    assert created.key.split("_")[1] == created.record.key_id
    assert (created.record.user, created.record.admin, created.record.expires_at, created.record.revoked_at) == (
        "alice", False, None, None
    )  # fmt: skip
    assert keys.authenticate(created.key) == Principal("alice", admin=False, key_id=created.record.key_id, limits=KeyLimits())

    admin = keys.create("root@ops", admin=True, limits=KeyLimits(max_waiting_realtime=5, submissions_per_minute=2))
    assert keys.authenticate(admin.key) == Principal("root@ops", True, admin.record.key_id, KeyLimits(5, None, 2))
    assert keys.create("alice").key != created.key


def test_only_the_hash_of_a_key_is_stored(keys: ApiKeyStore, database_url: str) -> None:
    created = keys.create("alice")
    secret = created.key.split("_", 2)[2]
    [stored] = keys.list()
    assert stored.secret_hash == hashlib.sha256(created.key.encode()).hexdigest()
    text = stored_text(database_url)
    assert created.record.key_id in text and stored.secret_hash in text
    assert created.key not in text and secret not in text


def test_authenticate_refuses_a_wrong_secret_and_an_unknown_id(keys: ApiKeyStore) -> None:
    created = keys.create("alice")
    key_id = created.record.key_id
    other_secret = keys.create("bob").key.split("_", 2)[2]
    assert keys.authenticate(f"seidra_{key_id}_{other_secret}") is None
    assert keys.authenticate(created.key[:-1] + ("A" if created.key[-1] != "A" else "B")) is None
    unknown_id = "0" * 12 if key_id != "0" * 12 else "1" * 12
    assert keys.authenticate(created.key.replace(key_id, unknown_id)) is None


@pytest.mark.parametrize(
    "malformed",
    [
        "",
        "seidra_",
        "Bearer seidra_0123456789ab_" + "a" * 43,
        "seidra_0123456789AB_" + "a" * 43,  # upper-case id
        "seidra_0123456789a_" + "a" * 43,  # short id
        "seidra_0123456789ab_" + "a" * 42,  # short secret
        "seidra_0123456789ab_" + "a" * 44,  # long secret
        "seidra_0123456789ab_" + "a" * 42 + "=",  # not URL-safe base64
        "other_0123456789ab_" + "a" * 43,
        " seidra_0123456789ab_" + "a" * 43,
        "seidra_0123456789ab_" + "a" * 43 + "\n",
    ],
)
def test_a_malformed_key_is_refused_without_reading_the_database(keys: ApiKeyStore, database_url: str, malformed: str) -> None:
    with statements(database_url) as seen:
        assert keys.authenticate(malformed) is None
    assert seen == []


def test_authenticate_is_one_primary_key_read(keys: ApiKeyStore, database_url: str) -> None:
    created = keys.create("alice")
    with statements(database_url) as seen:
        assert keys.authenticate(created.key) is not None
    [(sql, parameters, _)] = seen
    assert sql.startswith("SELECT") and "WHERE api_keys.key_id = " in sql
    assert created.key not in repr(parameters)


def test_a_key_expires(keys: ApiKeyStore) -> None:
    created = keys.create("alice", expires_in_days=1.5, now=T0)
    assert as_utc(created.record.expires_at) == T0 + timedelta(days=1.5)
    assert keys.authenticate(created.key, now=T0 + timedelta(days=1.5, seconds=-1)) is not None
    assert keys.authenticate(created.key, now=T0 + timedelta(days=1.5)) is None
    [listed] = keys.list()
    assert as_utc(listed.expires_at) == T0 + timedelta(days=1.5)


def test_a_revoked_key_stays_revoked_from_its_first_revocation(keys: ApiKeyStore) -> None:
    created, kept = keys.create("alice"), keys.create("alice")
    revoked = keys.revoke(created.record.key_id, now=T0)
    assert as_utc(revoked.revoked_at) == T0
    assert keys.authenticate(created.key) is None
    assert keys.authenticate(kept.key) is not None  # the user's other keys still work
    again = keys.revoke(created.record.key_id, now=T0 + timedelta(hours=1))
    assert as_utc(again.revoked_at) == T0
    assert {key.key_id: as_utc(key.revoked_at) for key in keys.list()} == {
        created.record.key_id: T0, kept.record.key_id: None
    }  # fmt: skip


def test_revoking_an_unknown_key(keys: ApiKeyStore) -> None:
    with pytest.raises(KeyNotFound, match="API key 'feedfeedfeed' does not exist"):
        keys.revoke("feedfeedfeed")


def test_keys_list_oldest_first(keys: ApiKeyStore) -> None:
    made = [keys.create(user, now=T0 + timedelta(minutes=n)) for n, user in enumerate(["carol", "alice", "bob"])]
    assert [key.key_id for key in keys.list()] == [created.record.key_id for created in made]


@pytest.mark.parametrize(
    ("create", "field"),
    [
        (lambda keys: keys.create(""), "user"),
        (lambda keys: keys.create("-alice"), "user"),
        (lambda keys: keys.create("alice smith"), "user"),
        (lambda keys: keys.create("a" * 65), "user"),
        (lambda keys: keys.create("local"), "user"),  # authentication off's one user
        (lambda keys: keys.create("alice", expires_in_days=0), "expires_in_days"),
        (lambda keys: keys.create("alice", expires_in_days=-1), "expires_in_days"),
        (lambda keys: keys.create("alice", expires_in_days=float("nan")), "expires_in_days"),
        (lambda keys: keys.create("alice", expires_in_days=float("inf")), "expires_in_days"),
        (lambda keys: keys.create("alice", limits=KeyLimits(max_waiting_realtime=0)), "max_waiting_realtime"),
        (lambda keys: keys.create("alice", limits=KeyLimits(max_waiting_batch=True)), "max_waiting_batch"),
        (lambda keys: keys.create("alice", limits=KeyLimits(submissions_per_minute=-3)), "submissions_per_minute"),
    ],
)  # fmt: skip
def test_bad_input_names_the_field_and_stores_nothing(
    keys: ApiKeyStore, create: Callable[[ApiKeyStore], object], field: str
) -> None:
    with pytest.raises(ValueError, match=rf"^{field} "):
        create(keys)
    assert keys.list() == []


def test_user_names_up_to_64_characters(keys: ApiKeyStore) -> None:
    for user in ["a", "A" * 64, "svc.batch-01_x@example.org"]:
        created = keys.create(user)
        assert keys.authenticate(created.key) == Principal(user, False, created.record.key_id, KeyLimits())


def test_a_key_id_already_taken_is_drawn_again(keys: ApiKeyStore, monkeypatch: pytest.MonkeyPatch) -> None:
    taken = keys.create("alice").record.key_id
    draws = iter([taken, taken, "abcdefabcdef"])
    monkeypatch.setattr("storage.api_keys.secrets.token_hex", lambda _bytes: next(draws))
    created = keys.create("bob")
    assert created.record.key_id == "abcdefabcdef"
    assert keys.authenticate(created.key) == Principal("bob", False, "abcdefabcdef", KeyLimits())


def test_a_key_id_taken_on_every_draw_is_an_error(keys: ApiKeyStore, monkeypatch: pytest.MonkeyPatch) -> None:
    taken = keys.create("alice").record.key_id
    monkeypatch.setattr("storage.api_keys.secrets.token_hex", lambda _bytes: taken)
    with pytest.raises(sa.exc.IntegrityError):
        keys.create("bob")
    assert [key.user for key in keys.list()] == ["alice"]


# ----- owners -----


def test_another_owners_job_is_not_found_like_a_missing_one(store: JobStore) -> None:
    alices, bobs = store.add_all([new_job(owner="alice"), new_job(owner="bob")])
    assert store.get(alices.id, owner="alice").id == alices.id
    assert store.get(bobs.id).owner == "bob"  # no owner: anyone's, for admins and the router
    missing = uuid.uuid4()
    errors = []
    for job_id in (bobs.id, missing):
        with pytest.raises(JobNotFound) as raised:
            store.get(job_id, owner="alice")
        errors.append(str(raised.value).replace(str(job_id), "<id>"))
    assert errors == ["job <id> does not exist"] * 2
    with pytest.raises(JobNotFound):
        store.get(alices.id, owner="")  # '' is a real owner: the jobs from before API keys


def test_listings_and_counts_narrowed_to_an_owner(store: JobStore) -> None:
    batch_id = "nightly"
    jobs = store.add_all(
        [
            new_job(8, owner="alice", batch_id=batch_id),
            new_job(8, owner="bob", batch_id=batch_id),  # two owners never share a batch; here it shows the filter at work
            new_job(2, owner="alice", status="completed"),
            new_job(2, owner="bob"),
            new_job(2),
        ]
    )
    alices = {jobs[0].id, jobs[2].id}
    assert {job.id for job in store.list(owner="alice")} == alices
    assert [job.id for job in store.list(owner="alice", status=JobStatus.COMPLETED)] == [jobs[2].id]
    assert [job.id for job in store.list(owner="alice", lane="batch")] == [jobs[0].id]
    assert [job.id for job in store.list(owner="bob", batch_id=batch_id)] == [jobs[1].id]
    assert [job.id for job in store.list(owner="")] == [jobs[4].id]
    assert store.list(owner="carol") == []
    assert len(store.list()) == 5
    assert [job.id for job in store.for_batch(batch_id, owner="alice")] == [jobs[0].id]
    assert len(store.for_batch(batch_id)) == 2
    assert store.count_by_status(owner="alice") == {"pending": 1, "completed": 1}
    assert store.count_by_status(owner="carol") == {}
    assert store.count_by_status() == {"pending": 4, "completed": 1}


def test_notifications_carry_their_jobs_owner(store: JobStore, database_url: str) -> None:
    alices, bobs, ownerless = store.add_all([new_job(owner="alice"), new_job(owner="bob"), new_job()])
    notes = NotificationService(database_url)
    assert notes.notify(alices.id, Level.INFO, "one").owner == "alice"
    assert notes.notify(None, Level.WARNING, "no job").owner == ""
    with statements(database_url) as seen:
        notes.notify_many([
            (str(bobs.id), Level.WARNING, "held"), (str(alices.id), Level.INFO, "resumed"),
            (str(ownerless.id), Level.INFO, "old"), (None, Level.ERROR, "none"),
        ])  # fmt: skip
    [(sql, _, executemany)] = seen  # the owners are read by the INSERT itself
    assert sql.startswith("INSERT INTO notifications") and executemany
    assert sorted(n.message for n in notes.list(owner="alice")) == ["one", "resumed"]
    assert [n.message for n in notes.list(owner="bob")] == ["held"]
    assert sorted(n.message for n in notes.list(owner="")) == ["no job", "none", "old"]
    assert [n.message for n in notes.list(owner="alice", level=Level.INFO, job_id=alices.id, limit=1)] == ["resumed"]
    assert notes.list(owner="bob", job_id=alices.id) == []
    assert len(notes.list()) == 6


OWNER_LISTINGS: dict[str, tuple[Callable[[JobStore, NotificationService], object], str]] = {
    "jobs": (lambda jobs, _: jobs.list(owner="user-1"), "ix_generation_jobs_owner_created_at_id"),
    "jobs by status": (
        lambda jobs, _: jobs.list(owner="user-1", status=JobStatus.PENDING),
        "ix_generation_jobs_owner_status_created_at_id",
    ),
    "notifications": (lambda _, notes: notes.list(owner="user-1"), "ix_notifications_owner_created_at_id"),
}


@pytest.mark.parametrize("listing", OWNER_LISTINGS)
def test_a_users_listings_read_an_index_in_order(store: JobStore, database_url: str, listing: str) -> None:
    # Ten users; one job in ten waits.
    jobs = store.add_all([new_job(owner=f"user-{n % 10}", status="pending" if n % 100 < 10 else "completed") for n in range(300)])
    notes = NotificationService(database_url)
    notes.notify_many([(str(job.id), Level.INFO, "hello") for job in jobs])
    with get_engine(database_url).connect() as connection:
        connection.exec_driver_sql("ANALYZE")
        connection.commit()
    run, index = OWNER_LISTINGS[listing]
    with statements(database_url) as seen:
        run(store, notes)
    [(sql, parameters, _)] = seen
    plan = query_plan(database_url, sql, parameters)
    assert index in plan
    assert "Sort" not in plan and "TEMP B-TREE" not in plan, plan


# ----- migration 0003 -----


def test_migration_0003_gives_earlier_rows_no_owner(database_url: str) -> None:
    upgrade(database_url, "0002")
    job = new_job(owner="ignored: the column does not exist yet")
    insert_into_older_schema(database_url, job, Notification(job_id=job.id, level="info", message="before"))
    upgrade(database_url)
    assert current_revision(database_url) == "0007"
    assert schema_differences(database_url) == []

    store = JobStore(database_url)
    assert store.get(job.id).owner == ""
    assert store.list(owner="alice") == [] and [j.id for j in store.list(owner="")] == [job.id]
    [note] = NotificationService(database_url).list()
    assert (note.message, note.owner) == ("before", "")
    assert ApiKeyStore(database_url).list() == []


def test_migration_0003_downgrades_and_upgrades_again_keeping_the_rows(database_url: str) -> None:
    upgrade(database_url)
    store = JobStore(database_url)
    [job] = store.add_all([new_job(owner="alice")])
    NotificationService(database_url).notify(job.id, Level.INFO, "kept")
    ApiKeyStore(database_url).create("alice")

    command.downgrade(alembic_config(database_url), "0002")
    inspector = sa.inspect(get_engine(database_url))
    assert "api_keys" not in inspector.get_table_names()
    for table in ("generation_jobs", "notifications"):
        assert "owner" not in {column["name"] for column in inspector.get_columns(table)}
        assert not any("owner" in index["name"] for index in inspector.get_indexes(table))

    upgrade(database_url)
    assert schema_differences(database_url) == []
    assert [(j.id, j.owner) for j in store.list()] == [(job.id, "")]  # the owner went with the column
    assert [n.message for n in NotificationService(database_url).list(job_id=job.id)] == ["kept"]
