"""The job repository. Status changes go through `JobStore.transition`, which refuses illegal ones."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, select

from storage.database import get_engine
from storage.job_status import JobStatus, check_transition
from storage.models import GenerationJob, utcnow


class JobNotFound(LookupError):
    def __init__(self, job_id: uuid.UUID | str) -> None:
        super().__init__(f"job {job_id} does not exist")
        self.job_id = str(job_id)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return type(self), (self.job_id,)


def as_utc(moment: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; every timestamp here is written in UTC."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=timezone.utc)


def _uuid(job_id: uuid.UUID | str) -> uuid.UUID:
    return job_id if isinstance(job_id, uuid.UUID) else uuid.UUID(str(job_id))


class JobStore:
    def __init__(self, database_url: str) -> None:
        self._engine = get_engine(database_url)

    def _session(self) -> Session:
        return Session(self._engine, expire_on_commit=False)

    def add_all(self, jobs: Sequence[GenerationJob]) -> list[GenerationJob]:
        """Insert jobs in one transaction: all of them or none."""
        with self._session() as session:
            session.add_all(jobs)
            session.commit()
        return list(jobs)

    def get(self, job_id: uuid.UUID | str) -> GenerationJob:
        with self._session() as session:
            job = session.get(GenerationJob, _uuid(job_id))
        if job is None:
            raise JobNotFound(job_id)
        return job

    def list(
        self,
        *,
        status: JobStatus | None = None,
        lane: str | None = None,
        batch_id: uuid.UUID | None = None,
        limit: int = 50,
    ) -> list[GenerationJob]:
        query = select(GenerationJob)
        if status is not None:
            query = query.where(GenerationJob.status == status.value)
        if lane is not None:
            query = query.where(GenerationJob.lane == lane)
        if batch_id is not None:
            query = query.where(GenerationJob.batch_id == batch_id)
        query = query.order_by(GenerationJob.created_at.desc(), GenerationJob.id).limit(limit)
        with self._session() as session:
            return list(session.exec(query))

    def unfinished(self) -> list[GenerationJob]:
        """Pending and running jobs in dispatch order, to rebuild the router's queue."""
        query = (
            select(GenerationJob)
            .where(GenerationJob.status.in_([JobStatus.PENDING.value, JobStatus.RUNNING.value]))
            .order_by(GenerationJob.priority, GenerationJob.created_at, GenerationJob.id)
        )
        with self._session() as session:
            return list(session.exec(query))

    def transition(
        self,
        job_id: uuid.UUID | str,
        target: JobStatus,
        *,
        metadata_patch: dict[str, Any] | None = None,
        count_attempt: bool = False,
        **changes: Any,
    ) -> GenerationJob:
        """Move a job to `target`, setting `changes` (and counting an attempt) in one transaction.

        The row is locked (FOR UPDATE; SQLite serialises writers anyway), so two writers cannot both
        move a job out of the same status.
        """
        with self._session() as session:
            job = session.exec(
                select(GenerationJob).where(GenerationJob.id == _uuid(job_id)).with_for_update()
            ).first()
            if job is None:
                raise JobNotFound(job_id)
            check_transition(str(job.id), JobStatus(job.status), target)
            job.status = target.value
            for name, value in changes.items():
                setattr(job, name, value)
            if count_attempt:
                job.attempts += 1
            if metadata_patch:
                job.meta = {**job.meta, **metadata_patch}
            job.updated_at = utcnow()
            session.add(job)
            session.commit()
            return job

    def count_by_status(self) -> dict[str, int]:
        query = select(GenerationJob.status, sa.func.count()).group_by(GenerationJob.status)
        with self._session() as session:
            return {status: count for status, count in session.exec(query)}

