"""The router's database writes, carried out one at a time in the order the core decided them.

Order matters: a job's start must land before its completion, a hold before the start that ends it.
Outages (a lost connection, a locked SQLite file, a pool timeout) are retried until they pass, so no
decision is dropped. A write retried after an outage that finds its job already where it was going
counts as done: its first commit went through and only the answer was lost. A refusal (the row
changed or vanished behind the router) is the write's result, for the caller to handle.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from scheduling import metrics
from scheduling.lanes import lane_for
from scheduling.scheduler import JobWrite
from storage.database import DATABASE_OUTAGES
from storage.job_status import IllegalTransition, JobStatus
from storage.jobs import JobStore
from storage.models import GenerationJob, utcnow
from storage.notifications import Level, NotificationService

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Errors that say nothing about the write itself: the database could not be reached or was busy.


class JobWriter:
    def __init__(self, jobs: JobStore, notifications: NotificationService, retry_max_s: float = 30.0) -> None:
        self._jobs = jobs
        self._notifications = notifications
        self._retry_max_s = retry_max_s
        self._pending: deque[tuple[Callable[[bool], Any], asyncio.Future[Any]]] = deque()
        self._wake = asyncio.Event()

    # ----- what can be written (each returns at once; await the future for the outcome) -----

    def transition(self, write: JobWrite) -> asyncio.Future[GenerationJob]:
        return self._enqueue(lambda retried: apply_write(self._jobs, write, retried))

    def holds(self, holds: Sequence[tuple[str, dict[str, Any]]]) -> asyncio.Future[int]:
        return self._enqueue(lambda _retried: self._jobs.hold_many(holds))

    def notify(self, notifications: Sequence[tuple[str | None, Level, str]]) -> asyncio.Future[int]:
        return self._enqueue(lambda _retried: self._notifications.notify_many(notifications))

    def _enqueue(self, call: Callable[[bool], T]) -> asyncio.Future[T]:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append((call, future))
        self._wake.set()
        return future

    # ----- the one writer task -----

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                call, future = self._pending.popleft()
                try:
                    result = await self._until_it_lands(call)
                except Exception as refused:
                    if not future.done():
                        future.set_exception(refused)
                else:
                    if not future.done():
                        future.set_result(result)

    async def _until_it_lands(self, call: Callable[[bool], T]) -> T:
        delay_s, retried = 0.5, False
        while True:
            try:
                return await asyncio.to_thread(call, retried)
            except DATABASE_OUTAGES as outage:
                metrics.storage_errors().inc(tags={"call": "write"})
                logger.warning("Database write failed (%s); retrying in %.1f s", type(outage).__name__, delay_s)
                await asyncio.sleep(delay_s)
                delay_s, retried = min(delay_s * 2, self._retry_max_s), True


def apply_write(jobs: JobStore, write: JobWrite, retried: bool = False) -> GenerationJob:
    """Carry out one of the core's writes; raises IllegalTransition or JobNotFound when refused."""
    changes: dict[str, Any] = {}
    if write.priority is not None:
        changes.update(priority=write.priority, lane=lane_for(write.priority).value)
    if write.attempts is not None:
        changes["attempts"] = write.attempts
    if write.mark_started:
        changes["started_at"] = utcnow()
    if write.mark_finished:
        changes["finished_at"] = utcnow()
    if write.reopen:
        changes.update(finished_at=None, error=None)
    if write.error is not None:
        changes["error"] = write.error
    if write.result_key is not None:
        changes["result_key"] = write.result_key

    def edit(meta: dict[str, Any]) -> dict[str, Any]:
        return {**meta, **write.metadata}

    try:
        if write.to_status in write.from_status:
            job = jobs.annotate(write.job_id, while_status=write.to_status, edit_metadata=edit, **changes)
            if job is None:
                raise IllegalTransition(write.job_id, JobStatus(jobs.get(write.job_id).status), write.to_status)
            return job
        return jobs.transition(write.job_id, write.to_status, from_status=write.from_status, edit_metadata=edit, **changes)
    except IllegalTransition as refused:
        if retried and refused.current is write.to_status:
            return jobs.get(write.job_id)
        raise
