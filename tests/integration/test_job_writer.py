"""The router's database writer on a real database (SQLite here; the store itself is tested on
PostgreSQL too): order, outages, a commit whose answer was lost, refusals."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy.exc

from scheduling.job_writer import JobWriter
from scheduling.scheduler import JobWrite
from storage.database import upgrade
from storage.job_status import IllegalTransition, JobStatus
from storage.jobs import JobNotFound, JobStore
from storage.models import GenerationJob
from storage.notifications import NotificationService

PENDING, RUNNING = frozenset({JobStatus.PENDING}), frozenset({JobStatus.RUNNING})


class LosesAnswers(JobStore):
    """Commits, then loses the connection before the caller hears back (once per listed call)."""

    def __init__(self, url: str, lose: list[str]) -> None:
        super().__init__(url)
        self.lose = lose

    def transition(self, *args: Any, **kwargs: Any) -> GenerationJob:
        job = super().transition(*args, **kwargs)
        if self.lose and self.lose[0] == "transition":
            self.lose.pop(0)
            raise sqlalchemy.exc.OperationalError("COMMIT", {}, ConnectionResetError("connection lost after commit"))
        return job


@pytest.fixture
def url(tmp_path: Path) -> str:
    database = f"sqlite:///{tmp_path / 'writer.db'}"
    upgrade(database)
    return database


def stored(store: JobStore) -> GenerationJob:
    [job] = store.add_all(
        [GenerationJob(lane="realtime", priority=2, prompt="p", width=64, height=64, num_inference_steps=4, guidance_scale=7.5, seed=1)]
    )
    return job


async def run_writes(writer: JobWriter, *writes: JobWrite) -> list[Any]:
    task = asyncio.create_task(writer.run())
    try:
        return await asyncio.gather(*(writer.transition(write) for write in writes), return_exceptions=True)
    finally:
        task.cancel()


def test_a_commit_whose_answer_was_lost_counts_as_done_when_retried(url: str) -> None:
    store = LosesAnswers(url, lose=["transition"])
    job_id = str(stored(store).id)
    writer = JobWriter(store, NotificationService(url), retry_max_s=0.01)
    start = JobWrite(job_id, PENDING, JobStatus.RUNNING, attempts=1, mark_started=True)
    finish = JobWrite(job_id, RUNNING, JobStatus.COMPLETED, result_key="images/x.png", mark_finished=True)
    started, finished = asyncio.run(run_writes(writer, start, finish))
    assert (started.status, finished.status, finished.result_key) == ("running", "completed", "images/x.png")
    assert store.get(job_id).attempts == 1  # written once, not twice


def test_writes_land_in_the_order_decided_and_refusals_come_back(url: str) -> None:
    store = JobStore(url)
    job_id = str(stored(store).id)
    writer = JobWriter(store, NotificationService(url))
    results = asyncio.run(
        run_writes(
            writer,
            JobWrite(job_id, PENDING, JobStatus.RUNNING, attempts=1),
            JobWrite(job_id, RUNNING, JobStatus.PENDING, metadata={"failures": 1}),
            JobWrite(job_id, RUNNING, JobStatus.COMPLETED),  # the core would never: the row is pending
            JobWrite("00000000-0000-0000-0000-000000000000", PENDING, JobStatus.RUNNING),
        )
    )
    assert [type(result).__name__ for result in results] == ["GenerationJob", "GenerationJob", "IllegalTransition", "JobNotFound"]
    assert isinstance(results[2], IllegalTransition) and isinstance(results[3], JobNotFound)
    assert (store.get(job_id).status, store.get(job_id).meta["failures"]) == ("pending", 1)
