"""Storage against real backends: SQLite and PostgreSQL; a local folder and an S3 server."""

from __future__ import annotations

import hashlib
import pickle
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext
from sqlalchemy.schema import CreateIndex
from sqlmodel import SQLModel

from storage.batches import BatchConflict, ChangedJob, batch_job_id
from storage.database import alembic_config, current_revision, get_engine, upgrade
from storage.job_status import IllegalTransition, JobStatus
from storage.jobs import (
    IdempotencyClaim,
    IdempotencyMismatch,
    JobNotFound,
    JobStore,
    as_utc,
)
from storage.models import GenerationJob, IdempotencyKey, Notification
from storage.notifications import Level, NotificationService
from storage.object_store import (
    LocalObjectStore,
    ObjectNotFound,
    ObjectStore,
    S3ObjectStore,
    image_key,
)
from storage.settings import StorageSettings
from tests.servers import S3Server

RUNBOOK_QUERY = """SELECT id, status, metadata->'degraded' AS degraded_info
FROM generation_jobs
WHERE status = 'pending' AND metadata->'degraded' IS NOT NULL
ORDER BY updated_at DESC
LIMIT 10;"""


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'jobs.db'}"
        return
    url = request.getfixturevalue("postgres_url")
    engine = get_engine(url)
    with engine.begin() as connection:  # each test starts from an empty schema
        connection.execute(sa.text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    yield url


@pytest.fixture
def store(database_url: str) -> JobStore:
    upgrade(database_url)
    return JobStore(database_url)


def new_job(priority: int = 2, **overrides: object) -> GenerationJob:
    fields = dict(prompt="a lighthouse", width=64, height=64, num_inference_steps=4, guidance_scale=7.5, seed=1)
    return GenerationJob(priority=priority, lane="realtime" if priority <= 4 else "batch", **{**fields, **overrides})


def claim(key: str = "key-1", body: str = "request", owner: str = "", batch_id: str | None = None) -> IdempotencyClaim:
    return IdempotencyClaim(owner, key, hashlib.sha256(body.encode()).hexdigest(), batch_id)


def ids(jobs: list[GenerationJob]) -> list[str]:
    return [str(job.id) for job in jobs]


def schema_differences(database_url: str) -> list[Any]:
    """What alembic's autogenerate would change to make the database match the models."""
    with get_engine(database_url).connect() as connection:
        if connection.dialect.name != "sqlite":
            return compare_metadata(MigrationContext.configure(connection), SQLModel.metadata)
        # SQLite's reflection loses an index's DESC, so alembic cannot compare indexes there: their
        # stored DDL is compared with the models' instead.
        context = MigrationContext.configure(connection, opts={"include_object": _not_an_index})
        stored = dict(
            connection.exec_driver_sql("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL").all()
        )
        modelled = {
            index.name: str(CreateIndex(index).compile(dialect=connection.dialect))
            for table in SQLModel.metadata.tables.values()
            for index in table.indexes
        }
        return compare_metadata(context, SQLModel.metadata) + ([] if stored == modelled else [("indexes", stored, modelled)])


# (revision, column, its type before that revision): batch ids were UUIDs before they were names.
RETYPED_COLUMNS: list[tuple[str, str, sa.types.TypeEngine[Any]]] = [("0005", "batch_id", sa.Uuid())]


def insert_into_older_schema(database_url: str, *rows: SQLModel) -> None:
    """Insert model rows into a schema at an older revision: only the columns it has are written,
    each as that revision typed it."""
    at = current_revision(database_url)
    retyped = {name: kind for revision, name, kind in RETYPED_COLUMNS if at is not None and at < revision}
    with get_engine(database_url).begin() as connection:
        for row in rows:
            table = type(row).__table__  # type: ignore[attr-defined]
            present = {column["name"] for column in sa.inspect(connection).get_columns(table.name)}
            values = {prop.columns[0].name: getattr(row, prop.key) for prop in sa.inspect(type(row)).column_attrs}
            typed = {name: retyped.get(name, table.c[name].type) for name in values}
            # A bare table clause: no column defaults of the models' to fill in the columns left out.
            older = sa.table(table.name, *(sa.column(name, typed[name]) for name in values if name in present))
            connection.execute(sa.insert(older).values({column.name: values[column.name] for column in older.c}))


def _not_an_index(_object: Any, _name: str | None, type_: str, _reflected: bool, _compare_to: Any) -> bool:
    return type_ != "index"


@contextmanager
def statements(database_url: str) -> Iterator[list[tuple[str, Any, bool]]]:
    """(SQL, parameters, executemany) of each statement run meanwhile, BEGINs left out."""
    seen: list[tuple[str, Any, bool]] = []

    def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, executemany: bool) -> None:
        if not statement.startswith("BEGIN"):
            seen.append((statement, parameters, executemany))

    engine = get_engine(database_url)
    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)


def test_migrations_build_exactly_the_models_schema(database_url: str) -> None:
    upgrade(database_url)
    upgrade(database_url)  # idempotent: `seidra up` runs it every time
    assert current_revision(database_url) == "0007"
    assert schema_differences(database_url) == []


def test_migration_0002_downgrades_and_upgrades_again_keeping_the_jobs(database_url: str) -> None:
    upgrade(database_url, "0001")
    store = JobStore(database_url)
    job = new_job()
    insert_into_older_schema(database_url, job, Notification(job_id=job.id, level="info", message="kept"))
    upgrade(database_url)
    store.submit([new_job()], claim())

    command.downgrade(alembic_config(database_url), "0001")
    assert current_revision(database_url) == "0001"
    inspector = sa.inspect(get_engine(database_url))
    assert "idempotency_keys" not in inspector.get_table_names()
    assert {index["name"] for index in inspector.get_indexes("generation_jobs")} == {
        "ix_generation_jobs_status",
        "ix_generation_jobs_batch_id",
        "ix_generation_jobs_status_lane",
    }
    assert {index["name"] for index in inspector.get_indexes("notifications")} == {
        "ix_notifications_job_id",
        "ix_notifications_level",
    }

    upgrade(database_url)
    assert schema_differences(database_url) == []
    assert store.count_by_status() == {"pending": 2}
    assert [n.message for n in NotificationService(database_url).list(job_id=job.id)] == ["kept"]


def test_migration_0004_gives_earlier_jobs_the_default_model_and_no_adapters(database_url: str) -> None:
    upgrade(database_url, "0003")
    job = new_job(model="ignored: the column does not exist yet", loras=[{"name": "ignored", "scale": 1.0}])
    insert_into_older_schema(database_url, job)
    upgrade(database_url)
    assert schema_differences(database_url) == []
    store = JobStore(database_url)
    assert (store.get(job.id).model, store.get(job.id).loras) == ("", [])

    [chosen] = store.add_all([new_job(model="second", loras=[{"name": "ink", "scale": 0.5}])])
    assert (store.get(chosen.id).model, store.get(chosen.id).loras) == ("second", [{"name": "ink", "scale": 0.5}])
    command.downgrade(alembic_config(database_url), "0003")
    assert not {"model", "loras"} & {
        column["name"] for column in sa.inspect(get_engine(database_url)).get_columns("generation_jobs")
    }
    upgrade(database_url)
    assert schema_differences(database_url) == []
    assert {j.id: (j.model, j.loras) for j in store.list()} == {job.id: ("", []), chosen.id: ("", [])}


def test_migration_0005_keeps_each_jobs_batch_as_its_uuid_text(database_url: str) -> None:
    upgrade(database_url, "0004")
    batch = uuid.uuid4()
    job, loose = new_job(8, batch_id=batch), new_job()
    key = IdempotencyKey(owner="ann", key="k", request_hash="h", job_ids=[str(job.id)], batch_id=batch)
    insert_into_older_schema(database_url, job, loose, key)
    upgrade(database_url)
    assert schema_differences(database_url) == []  # the DESC of the batch index included
    store = JobStore(database_url)
    assert ([j.id for j in store.list(batch_id=str(batch))], store.get(loose.id).batch_id) == ([job.id], None)
    with get_engine(database_url).connect() as connection:
        assert connection.execute(sa.select(IdempotencyKey.batch_id)).scalar_one() == str(batch)

    [named] = store.add_all([new_job(8, owner="ann", batch_id="nightly-2026-12-01")])
    command.downgrade(alembic_config(database_url), "0004")
    with get_engine(database_url).connect() as connection:
        jobs = sa.table("generation_jobs", sa.column("id", sa.Uuid()), sa.column("batch_id", sa.Uuid()))
        downgraded = dict(connection.execute(sa.select(jobs.c.id, jobs.c.batch_id)).all())
    assert (downgraded[job.id], downgraded[loose.id]) == (batch, None)
    assert isinstance(downgraded[named.id], uuid.UUID)  # a name becomes a UUID of its own, its batch whole

    upgrade(database_url)
    assert schema_differences(database_url) == []
    assert [j.id for j in store.list(batch_id=str(batch))] == [job.id]
    assert [j.id for j in store.list(batch_id=str(downgraded[named.id]))] == [named.id]


def test_sqlite_migrations_run_without_foreign_keys_then_restore_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    seen: list[int] = []
    run_migrations = EnvironmentContext.run_migrations

    def checked(self: EnvironmentContext, **kwargs: Any) -> None:
        seen.append(self.get_context().connection.exec_driver_sql("PRAGMA foreign_keys").scalar())
        run_migrations(self, **kwargs)

    monkeypatch.setattr(EnvironmentContext, "run_migrations", checked)
    upgrade(url)
    assert seen == [0]  # a batch migration recreating a table would otherwise cascade-delete rows
    with get_engine(url).connect() as connection:  # the pooled connection the migration used
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_jobs_round_trip_with_metadata_and_timestamps(store: JobStore) -> None:
    [job] = store.add_all([new_job(meta={"origin": "test"})])
    loaded = store.get(job.id)
    assert (loaded.status, loaded.lane, loaded.meta, loaded.attempts) == ("pending", "realtime", {"origin": "test"}, 0)
    with pytest.raises(JobNotFound):
        store.get(uuid.uuid4())


def test_transitions_go_through_the_state_machine(store: JobStore) -> None:
    [job] = store.add_all([new_job()])
    with pytest.raises(IllegalTransition):
        store.transition(job.id, JobStatus.COMPLETED)
    assert store.get(job.id).status == "pending"  # a refused change changes nothing

    running = store.transition(job.id, JobStatus.RUNNING, count_attempt=True, metadata_patch={"a": 1})
    assert (running.status, running.attempts, running.meta) == ("running", 1, {"a": 1})
    done = store.transition(job.id, JobStatus.COMPLETED, result_key="images/x.png", metadata_patch={"b": 2})
    assert (done.status, done.result_key, done.meta) == ("completed", "images/x.png", {"a": 1, "b": 2})
    with pytest.raises(IllegalTransition):
        store.transition(job.id, JobStatus.PENDING)


def test_running_jobs_can_be_cancelled(store: JobStore) -> None:
    [job] = store.add_all([new_job()])
    store.transition(job.id, JobStatus.RUNNING)
    assert store.transition(job.id, JobStatus.CANCELLED).status == "cancelled"


def test_transition_from_any_of_several_statuses(store: JobStore) -> None:
    pending, running = store.add_all([new_job(), new_job(status="running")])
    either = {JobStatus.PENDING, JobStatus.RUNNING}
    assert store.transition(pending.id, JobStatus.CANCELLED, from_status=either).status == "cancelled"
    assert store.transition(running.id, JobStatus.CANCELLED, from_status=[JobStatus.RUNNING]).status == "cancelled"
    with pytest.raises(IllegalTransition) as refused:
        store.transition(pending.id, JobStatus.PENDING, from_status=(JobStatus.FAILED, JobStatus.RUNNING))
    assert (refused.value.current, refused.value.target) == (JobStatus.CANCELLED, JobStatus.PENDING)
    assert store.get(pending.id).status == "cancelled"
    with pytest.raises(IllegalTransition):  # a single status still works as before
        store.transition(pending.id, JobStatus.PENDING, from_status=JobStatus.FAILED)


def test_unfinished_jobs_come_back_in_dispatch_order(store: JobStore) -> None:
    jobs = store.add_all([new_job(8, prompt="batch"), new_job(2, prompt="rt-a"), new_job(0, prompt="rt-high")])
    store.add_all([new_job(2, prompt="rt-b")])
    store.transition(jobs[0].id, JobStatus.RUNNING)
    finished = store.add_all([new_job(1, prompt="done")])[0]
    store.transition(finished.id, JobStatus.CANCELLED)
    assert [job.prompt for job in store.unfinished()] == ["rt-high", "rt-a", "rt-b", "batch"]


def test_unfinished_view_reads_status_and_update_time_only(store: JobStore, database_url: str) -> None:
    pending, running, _done = store.add_all([new_job(), new_job(status="running"), new_job(status="completed")])
    with statements(database_url) as seen:
        view = store.unfinished_view()
    assert view == {
        str(pending.id): ("pending", as_utc(pending.updated_at)),
        str(running.id): ("running", as_utc(running.updated_at)),
    }
    assert all(moment.tzinfo is timezone.utc for _, moment in view.values())
    [(sql, _, _)] = seen
    assert sql.startswith("SELECT generation_jobs.id, generation_jobs.status, generation_jobs.updated_at \nFROM")


def test_statuses_of_many_ids_in_chunks(store: JobStore, database_url: str) -> None:
    jobs = store.add_all([new_job(status="running" if n % 3 == 0 else "pending") for n in range(1100)])
    missing = str(uuid.uuid4())
    with statements(database_url) as seen:
        view = store.statuses([*ids(jobs), missing])
    assert len(seen) == 3  # 1,101 ids, 500 per IN list
    assert view == {str(job.id): (job.status, as_utc(job.updated_at)) for job in jobs}
    assert store.statuses([]) == {}


def test_get_many_in_dispatch_order(store: JobStore, database_url: str) -> None:
    jobs = store.add_all([new_job(priority=n % 10, prompt=str(n)) for n in range(1100)])
    with statements(database_url) as seen:
        loaded = store.get_many([*reversed(ids(jobs)), str(uuid.uuid4())])
    assert len(seen) == 3
    arrival = {str(job.id): n for n, job in enumerate(jobs)}  # created_at follows it
    assert ids(loaded) == sorted(ids(jobs), key=lambda job_id: (arrival[job_id] % 10, arrival[job_id]))
    assert store.get_many([]) == []


def test_submit_stores_jobs_once_per_key(store: JobStore) -> None:
    batch_id = "nightly"
    first = store.submit([new_job(batch_id=batch_id), new_job(batch_id=batch_id)], claim(batch_id=batch_id))
    assert (first.created, first.batch_id, first.found) == (True, batch_id, frozenset())
    store.transition(first.jobs[1].id, JobStatus.RUNNING)

    again = store.submit([new_job(), new_job(), new_job()], claim(batch_id="another"))
    assert (again.created, again.batch_id, ids(again.jobs)) == (False, batch_id, ids(first.jobs))
    assert (again.found, again.new) == ({job.id for job in first.jobs}, [])
    assert [job.status for job in again.jobs] == ["pending", "running"]  # as stored now
    assert store.count_by_status() == {"pending": 1, "running": 1}

    other_owner = store.submit([new_job()], claim(owner="team-b"))
    assert other_owner.created
    with pytest.raises(IdempotencyMismatch) as mismatch:
        store.submit([new_job()], claim(body="another request"))
    assert mismatch.value.key == "key-1"
    crossed = pickle.loads(pickle.dumps(mismatch.value))  # as it comes back from a Ray actor
    assert (type(crossed), crossed.key, str(crossed)) == (IdempotencyMismatch, "key-1", str(mismatch.value))


def test_submit_without_a_key(store: JobStore) -> None:
    batch_id = str(uuid.uuid4())
    submission = store.submit([new_job(batch_id=batch_id), new_job(batch_id=batch_id)])
    assert (submission.created, submission.batch_id) == (True, batch_id)
    assert store.submit([new_job(), new_job(batch_id=batch_id)]).batch_id is None
    assert store.count_by_status() == {"pending": 4}


def test_submit_is_all_or_nothing(store: JobStore, database_url: str) -> None:
    store.add_all([new_job()])
    with pytest.raises(sa.exc.IntegrityError):
        store.submit([new_job(), new_job(prompt=None)], claim())  # one job the table refuses
    with get_engine(database_url).connect() as connection:
        assert connection.execute(sa.select(sa.func.count()).select_from(IdempotencyKey)).scalar_one() == 0
    assert store.count_by_status() == {"pending": 1}
    assert store.submit([new_job()], claim()).created  # the key was not spent


def batch_jobs(owner: str, name: str, *prompts: str, priority: int = 8) -> list[GenerationJob]:
    """The jobs of items 0, 1, ... of `owner`'s batch `name`, under the ids the API gives them."""
    return [
        new_job(priority, id=batch_job_id(owner, name, index), owner=owner, batch_id=name, prompt=prompt)
        for index, prompt in enumerate(prompts)
    ]


def test_a_batch_submitted_again_stores_only_its_new_items(store: JobStore) -> None:
    first = store.submit(batch_jobs("ann", "nightly", "a kite", "a fox"))
    store.transition(first.jobs[0].id, JobStatus.RUNNING)

    # A retry raises a job's priority (and lane): neither is compared, as neither changes the image.
    again = store.submit(batch_jobs("ann", "nightly", "a kite", "a fox", "an owl", priority=2))
    assert (again.created, again.batch_id, again.found) == (True, "nightly", {job.id for job in first.jobs})
    assert ids(again.jobs) == [*ids(first.jobs), str(batch_job_id("ann", "nightly", 2))]
    assert [(job.prompt, job.status, job.priority) for job in again.jobs] == [
        ("a kite", "running", 8), ("a fox", "pending", 8), ("an owl", "pending", 2),
    ]  # fmt: skip
    assert [job.prompt for job in again.new] == ["an owl"]

    same = store.submit(batch_jobs("ann", "nightly", "a kite"), claim("k", batch_id="nightly"))
    assert (same.created, ids(same.jobs)) == (False, ids(first.jobs[:1]))
    assert store.count_by_status() == {"running": 1, "pending": 2}
    assert store.submit(batch_jobs("bob", "nightly", "a kite")).created  # names are per owner


def test_an_item_that_asks_for_another_image_than_its_job_refuses_the_submission(store: JobStore, database_url: str) -> None:
    [kite, fox] = store.submit(batch_jobs("ann", "nightly", "a kite", "a fox")).jobs
    edited = batch_jobs("ann", "nightly", "a kite", "a red fox", "an owl")
    edited[0].seed = 7
    for attempt in (lambda: store.submit(edited, claim("k")), lambda: store.stored_already(edited)):
        with pytest.raises(BatchConflict) as refused:
            attempt()
        assert refused.value.changed == [
            ChangedJob(kite.id, {"seed": (1, 7)}),
            ChangedJob(fox.id, {"prompt": ("a fox", "a red fox")}),
        ]
    crossed = pickle.loads(pickle.dumps(refused.value))  # as it comes back from a Ray actor
    assert (type(crossed), crossed.changed, str(crossed)) == (BatchConflict, refused.value.changed, str(refused.value))

    assert sorted(job.prompt for job in store.list()) == ["a fox", "a kite"]  # no owl: nothing of it was stored
    with get_engine(database_url).connect() as connection:
        assert connection.execute(sa.select(sa.func.count()).select_from(IdempotencyKey)).scalar_one() == 0
    assert store.stored_already(batch_jobs("ann", "nightly", "a kite", "a fox", "an owl")) == {kite.id, fox.id}


def test_old_idempotency_keys_are_deleted(store: JobStore, database_url: str) -> None:
    old, recent = store.submit([new_job()], claim("old")), store.submit([new_job()], claim("recent"))
    now = datetime.now(timezone.utc)
    with get_engine(database_url).begin() as connection:
        connection.execute(
            sa.update(IdempotencyKey).where(IdempotencyKey.key == "old").values(created_at=now - timedelta(days=2))
        )
    # Any time zone: the cutoff is compared in UTC.
    assert store.delete_idempotency_keys((now - timedelta(days=1)).astimezone(timezone(timedelta(hours=-5)))) == 1
    assert store.submit([new_job()], claim("old")).created
    assert ids(store.submit([new_job()], claim("recent")).jobs) == ids(recent.jobs)
    assert store.get(old.jobs[0].id).status == "pending"  # the jobs themselves stay


def test_hold_many_marks_only_pending_jobs_with_one_statement(store: JobStore, database_url: str) -> None:
    statuses = ["pending", "pending", "running", "completed", "failed"]
    jobs = store.add_all(
        [
            new_job(status=statuses[n % 5], meta={"origin": n, "degraded": {"first": "hold"}} if n % 2 else {"origin": n})
            for n in range(1000)
        ]
    )
    holds = [(str(job.id), {"reason": "no healthy GPU", "retry_after_seconds": n}) for n, job in enumerate(jobs)]
    with statements(database_url) as seen:
        changed = store.hold_many(holds)
    [(sql, parameters, executemany)] = seen
    assert sql.startswith("UPDATE generation_jobs SET") and executemany and len(parameters) == 1000
    assert changed == 400

    loaded_by_id = {str(job.id): job for job in store.get_many(ids(jobs))}
    for job, (job_id, document) in zip(jobs, holds):
        loaded = loaded_by_id[job_id]
        if job.status == "pending":
            assert loaded.meta == {**job.meta, "degraded": document}
            assert as_utc(loaded.updated_at) > as_utc(job.updated_at)
        else:
            assert (loaded.meta, as_utc(loaded.updated_at)) == (job.meta, as_utc(job.updated_at))
    assert store.hold_many([]) == 0
    assert store.hold_many([(str(uuid.uuid4()), {"reason": "gone"})]) == 0


def test_notify_many_inserts_all_with_one_statement(store: JobStore, database_url: str) -> None:
    [job] = store.add_all([new_job()])
    service = NotificationService(database_url)
    levels = [Level.INFO, Level.WARNING, Level.ERROR]
    batch = [(str(job.id) if n % 2 else None, levels[n % 3], f"message {n}") for n in range(1000)]
    with statements(database_url) as seen:
        assert service.notify_many(batch) == 1000
    [(sql, parameters, executemany)] = seen
    assert sql.startswith("INSERT INTO notifications") and executemany and len(parameters) == 1000

    for_job = service.list(job_id=job.id, limit=2000)
    assert sorted(n.message for n in for_job) == sorted(message for job_id, _, message in batch if job_id)
    assert len(service.list(level=Level.ERROR, limit=2000)) == 333
    assert service.notify_many([]) == 0
    with pytest.raises(sa.exc.IntegrityError):  # one unknown job: none of them is stored
        service.notify_many([(str(job.id), Level.INFO, "not kept"), (str(uuid.uuid4()), Level.INFO, "unknown job")])
    with get_engine(database_url).connect() as connection:
        assert connection.execute(sa.select(sa.func.count()).select_from(Notification)).scalar_one() == 1000


def query_plan(database_url: str, sql: str, parameters: Any) -> str:
    with get_engine(database_url).connect() as connection:
        if connection.dialect.name == "sqlite":
            rows = connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", parameters).all()
            return "\n".join(row[-1] for row in rows)
        # Small test tables: the planner would rightly read them whole, or sort the few rows a
        # bitmap scan finds; without those options it shows which index serves the query.
        connection.exec_driver_sql("SET LOCAL enable_seqscan = off")
        connection.exec_driver_sql("SET LOCAL enable_bitmapscan = off")
        return "\n".join(row[0] for row in connection.exec_driver_sql(f"EXPLAIN {sql}", parameters).all())


NEWEST_FIRST_LISTINGS: dict[str, tuple[Callable[[JobStore, NotificationService, GenerationJob], object], str]] = {
    "jobs": (lambda jobs, _, job: jobs.list(), "ix_generation_jobs_created_at_id"),
    "jobs by status": (lambda jobs, _, job: jobs.list(status=JobStatus.PENDING), "ix_generation_jobs_status_created_at_id"),
    "jobs by lane": (lambda jobs, _, job: jobs.list(lane="batch"), "ix_generation_jobs_lane_created_at_id"),
    "jobs by batch": (lambda jobs, _, job: jobs.list(batch_id=job.batch_id), "ix_generation_jobs_batch_id_created_at_id"),
    "jobs by batch, a next page": (
        lambda jobs, _, job: jobs.list(batch_id=job.batch_id, after=job.id),
        "ix_generation_jobs_batch_id_created_at_id",
    ),
    "notifications": (lambda _, notes, job: notes.list(), "ix_notifications_created_at_id"),
    "notifications by job": (lambda _, notes, job: notes.list(job_id=job.id), "ix_notifications_job_id_created_at_id"),
    "notifications by level": (lambda _, notes, job: notes.list(level=Level.INFO), "ix_notifications_level_created_at_id"),
}


@pytest.mark.parametrize("listing", NEWEST_FIRST_LISTINGS)
def test_newest_first_listings_read_an_index_in_order(store: JobStore, database_url: str, listing: str) -> None:
    # Filters as selective as they would be in production: one job in ten is waiting, is a batch
    # job, belongs to the batch, gets an `info` notification.
    batch_id = "nightly-2026-12-01"
    jobs = store.add_all(
        [new_job(8, status="pending", batch_id=batch_id) if n % 10 == 1 else new_job(2, status="completed") for n in range(300)]
    )
    notes = NotificationService(database_url)
    notes.notify_many([(str(job.id), Level.INFO if n % 10 == 1 else Level.WARNING, "hello") for n, job in enumerate(jobs * 2)])
    with get_engine(database_url).connect() as connection:
        connection.exec_driver_sql("ANALYZE")
        connection.commit()
    run, index = NEWEST_FIRST_LISTINGS[listing]
    with statements(database_url) as seen:
        run(store, notes, jobs[1])
    [(sql, parameters, _)] = seen
    plan = query_plan(database_url, sql, parameters)
    assert index in plan
    assert "Sort" not in plan and "TEMP B-TREE" not in plan, plan  # the index gives the order


def test_pages_of_a_listing_follow_each_other(store: JobStore) -> None:
    moments = [datetime(2026, 12, 1, tzinfo=timezone.utc) + timedelta(seconds=n // 3) for n in range(8)]  # ties
    jobs = store.add_all([new_job(8, owner="ann", batch_id="nightly", created_at=moment) for moment in moments])
    [bobs] = store.add_all([new_job(owner="bob", created_at=moments[4])])
    pages, after = [], None
    while page := store.list(batch_id="nightly", owner="ann", after=after, limit=3):
        pages.append(ids(page))
        after = page[-1].id
    listed = sorted(jobs, key=lambda job: (-job.created_at.timestamp(), job.id))
    assert pages == [ids(listed[:3]), ids(listed[3:6]), ids(listed[6:])]
    assert store.list(owner="ann", after=bobs.id) == []  # from someone else's job: nothing to learn
    assert ids(store.list(owner=None, after=bobs.id, limit=1)) != []


def test_unfinished_jobs_are_found_by_index(store: JobStore, database_url: str) -> None:
    store.add_all([new_job(priority=n % 10, status=["pending", "running", "completed"][n % 3]) for n in range(50)])
    with statements(database_url) as seen:
        store.unfinished()
    [(sql, parameters, _)] = seen
    assert "ix_generation_jobs_status_priority_created_at_id" in query_plan(database_url, sql, parameters)


def test_runbook_query_finds_held_jobs_on_postgresql(postgres_url: str) -> None:
    with get_engine(postgres_url).begin() as connection:
        connection.execute(sa.text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    upgrade(postgres_url)
    store = JobStore(postgres_url)
    held, plain = store.add_all([new_job(meta={"degraded": {"retry_after_seconds": 30}}), new_job()])
    with get_engine(postgres_url).connect() as connection:
        rows = connection.execute(sa.text(RUNBOOK_QUERY)).all()
    assert [(row.id, row.status, row.degraded_info) for row in rows] == [(held.id, "pending", {"retry_after_seconds": 30})]


@pytest.fixture(params=["local", "s3"])
def object_store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return LocalObjectStore(tmp_path / "media")
    server: S3Server = request.getfixturevalue("s3")
    settings = StorageSettings(
        s3_endpoint=server.endpoint,
        s3_access_key=server.access_key,
        s3_secret_key=server.secret_key,
        s3_bucket=f"test-{uuid.uuid4().hex[:12]}",
    )
    return S3ObjectStore(settings)


def test_object_store_round_trip_and_overwrite(object_store: ObjectStore) -> None:
    key = image_key(str(uuid.uuid4()))
    assert not object_store.exists(key)
    with pytest.raises(ObjectNotFound):
        object_store.get(key)
    object_store.put(key, b"first", "image/png")
    object_store.put(key, b"second", "image/png")  # a re-run replaces, never duplicates
    assert object_store.exists(key)
    assert object_store.get(key) == b"second"


def test_object_locations_can_be_fetched(object_store: ObjectStore) -> None:
    key = image_key(str(uuid.uuid4()))
    object_store.put(key, b"\x89PNG bytes", "image/png")
    location = object_store.location(key)
    if isinstance(object_store, S3ObjectStore):
        assert "X-Amz-Signature" in location  # presigned
        with urllib.request.urlopen(location, timeout=10) as response:
            assert response.read() == b"\x89PNG bytes"
    else:
        assert Path(location).read_bytes() == b"\x89PNG bytes"


def test_local_keys_cannot_escape_the_media_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="escapes"):
        LocalObjectStore(tmp_path / "media").put("../outside.png", b"x", "image/png")


def test_s3_settings_need_credentials() -> None:
    with pytest.raises(ValueError, match="SEIDRA_S3_ACCESS_KEY"):
        StorageSettings(s3_endpoint="127.0.0.1:9000", s3_access_key="", s3_secret_key="")
