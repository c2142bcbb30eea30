"""Storage against real backends: SQLite and PostgreSQL; a local folder and an S3 server."""

from __future__ import annotations

import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlmodel import SQLModel

from storage.database import current_revision, get_engine, upgrade
from storage.job_status import IllegalTransition, JobStatus
from storage.jobs import JobNotFound, JobStore
from storage.models import GenerationJob
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


def test_migrations_build_exactly_the_models_schema(database_url: str) -> None:
    upgrade(database_url)
    upgrade(database_url)  # idempotent: `seidra up` runs it every time
    assert current_revision(database_url) == "0001"
    with get_engine(database_url).connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), SQLModel.metadata) == []


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


def test_unfinished_jobs_come_back_in_dispatch_order(store: JobStore) -> None:
    jobs = store.add_all([new_job(8, prompt="batch"), new_job(2, prompt="rt-a"), new_job(0, prompt="rt-high")])
    store.add_all([new_job(2, prompt="rt-b")])
    store.transition(jobs[0].id, JobStatus.RUNNING)
    finished = store.add_all([new_job(1, prompt="done")])[0]
    store.transition(finished.id, JobStatus.CANCELLED)
    assert [job.prompt for job in store.unfinished()] == ["rt-high", "rt-a", "rt-b", "batch"]


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
