"""Storage under concurrent callers: SQLite's readers beside its writer, idempotent submissions racing."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
from sqlmodel import Session, select

from storage.database import for_writes, get_engine, upgrade
from storage.job_status import IllegalTransition, JobStatus
from storage.jobs import JobStore
from storage.models import GenerationJob, IdempotencyKey
from tests.integration.test_storage import batch_jobs, claim, database_url, ids, new_job, store  # noqa: F401  (fixtures)

T = TypeVar("T")
# Well under SQLite's busy timeout (30 s): a caller stuck behind a lock fails the test quickly.
PROMPT_S = 5.0
# Long enough for a caller that is not blocked to have finished.
SETTLE_S = 0.5


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    upgrade(url)
    return url


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=8) as executor:
        yield executor


def in_thread(pool: ThreadPoolExecutor, call: Callable[..., T], *args: Any) -> Future[T]:
    return pool.submit(call, *args)


def test_a_transition_commits_while_a_read_transaction_is_open(sqlite_url: str, pool: ThreadPoolExecutor) -> None:
    jobs = JobStore(sqlite_url)
    [job] = jobs.add_all([new_job()])
    status = select(GenerationJob.status).where(GenerationJob.id == job.id)
    with Session(get_engine(sqlite_url)) as reader:  # a session as JobStore's reads open them
        assert reader.exec(status).one() == "pending"  # its transaction is open from here on
        moved = in_thread(pool, jobs.transition, job.id, JobStatus.RUNNING).result(timeout=PROMPT_S)
        assert moved.status == "running"
        assert reader.exec(status).one() == "pending"  # still reading its snapshot
    assert jobs.get(job.id).status == "running"


def test_reads_go_on_while_a_writer_holds_the_lock(sqlite_url: str, pool: ThreadPoolExecutor) -> None:
    jobs = JobStore(sqlite_url)
    [job] = jobs.add_all([new_job()])
    with for_writes(get_engine(sqlite_url)).connect() as writer:
        writer.execute(sa.update(GenerationJob).where(GenerationJob.id == job.id).values(priority=0))
        reads: list[Future[Any]] = [
            in_thread(pool, jobs.get, job.id),
            in_thread(pool, jobs.list),
            in_thread(pool, jobs.unfinished),
            in_thread(pool, jobs.unfinished_view),
            in_thread(pool, jobs.statuses, [str(job.id)]),
            in_thread(pool, jobs.get_many, [str(job.id)]),
            in_thread(pool, jobs.count_by_status),
        ]
        loaded, *_ = [read.result(timeout=PROMPT_S) for read in reads]
        assert loaded.priority == 2  # the writer has not committed
        writer.rollback()


def test_writers_take_turns_so_check_and_write_stay_atomic(sqlite_url: str, pool: ThreadPoolExecutor) -> None:
    jobs = JobStore(sqlite_url)
    [job] = jobs.add_all([new_job()])
    with for_writes(get_engine(sqlite_url)).connect() as holder:
        holder.execute(sa.text("SELECT 1"))  # BEGIN IMMEDIATE: the write lock is held from here on
        racers = [in_thread(pool, _start, jobs, job.id) for _ in range(2)]
        time.sleep(SETTLE_S)
        assert not any(racer.done() for racer in racers)  # both wait for the lock
        holder.rollback()
    outcomes = sorted(racer.result(timeout=PROMPT_S) for racer in racers)
    # Had both read `pending` before either wrote, the second would fail with "database is locked".
    assert outcomes == ["refused: job is running", "started"]


def _start(jobs: JobStore, job_id: Any) -> str:
    try:
        jobs.transition(job_id, JobStatus.RUNNING, from_status=JobStatus.PENDING)
    except IllegalTransition as refused:
        return f"refused: job is {refused.current.value}"
    return "started"


def test_concurrent_submissions_with_one_key_store_one_set_of_jobs(
    store: JobStore, pool: ThreadPoolExecutor  # noqa: F811  (fixtures)
) -> None:
    start = threading.Barrier(8)

    def submit() -> Any:
        jobs = [new_job(), new_job()]
        start.wait()
        return store.submit(jobs, claim("shared"))

    results = [future.result(timeout=60) for future in [in_thread(pool, submit) for _ in range(8)]]
    assert sum(result.created for result in results) == 1
    assert len({tuple(ids(result.jobs)) for result in results}) == 1
    assert store.count_by_status() == {"pending": 2}


def test_a_submission_that_loses_the_race_for_a_key_gets_the_winners_jobs(
    store: JobStore, database_url: str, pool: ThreadPoolExecutor  # noqa: F811  (fixtures)
) -> None:
    first = claim("raced")
    winners = [new_job(), new_job()]
    winner_ids = ids(winners)
    with Session(for_writes(get_engine(database_url))) as winner:
        winner.add(IdempotencyKey(owner="", key="raced", request_hash=first.request_hash, job_ids=winner_ids))
        winner.add_all(winners)
        winner.flush()  # stored, not committed: the loser cannot see the key yet
        loser = in_thread(pool, store.submit, [new_job()], first)
        _wait_until_blocked(database_url, "idempotency_keys")
        assert not loser.done()
        winner.commit()
    result = loser.result(timeout=PROMPT_S)
    assert (result.created, ids(result.jobs)) == (False, winner_ids)
    assert store.count_by_status() == {"pending": 2}


def test_a_batch_submission_that_loses_the_race_for_its_items_gets_the_winners_jobs(
    store: JobStore, database_url: str, pool: ThreadPoolExecutor  # noqa: F811  (fixtures)
) -> None:
    winners = batch_jobs("ann", "nightly", "a kite", "a fox")
    winner_ids = {job.id for job in winners}
    with Session(for_writes(get_engine(database_url))) as winner:
        winner.add_all(winners)
        winner.flush()  # stored, not committed: the loser cannot see the jobs yet
        loser = in_thread(pool, store.submit, batch_jobs("ann", "nightly", "a kite", "a fox", "an owl"))
        _wait_until_blocked(database_url, "generation_jobs")
        assert not loser.done()
        winner.commit()
    result = loser.result(timeout=PROMPT_S)
    assert (result.found, [job.prompt for job in result.new]) == (winner_ids, ["an owl"])
    assert store.count_by_status() == {"pending": 3}


def _wait_until_blocked(url: str, table: str) -> None:
    """Until the loser waits on the winner: on PostgreSQL, inserting into `table` what it did not find."""
    if url.startswith("sqlite"):
        time.sleep(SETTLE_S)  # SQLite: it waits at BEGIN IMMEDIATE, where nothing shows it
        return
    waiting = sa.text(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE :insert"
    ).bindparams(insert=f"INSERT INTO {table}%")
    deadline = time.monotonic() + PROMPT_S
    with get_engine(url).connect() as connection:
        while connection.execute(waiting).scalar_one() == 0:
            assert time.monotonic() < deadline, f"the second submission never reached its insert into {table}"
            time.sleep(0.05)
            connection.rollback()  # a fresh snapshot of pg_stat_activity each time
