"""The job repository. Status changes go through `JobStore.transition`, which refuses illegal ones."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, select

from storage.database import get_engine
from storage.job_status import IllegalTransition, JobStatus, check_transition
from storage.models import GenerationJob, utcnow


class JobNotFound(LookupError):
    def __init__(self, job_id: uuid.UUID | str) -> None:
        super().__init__(f"job {job_id} does not exist")
        self.job_id = str(job_id)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return type(self), (self.job_id,)


def as_utc(moment: datetime | None) -> datetime | None:
    """Timestamps in UTC: SQLite hands back naive ones (written in UTC), PostgreSQL the session's zone."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


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

    def existing_ids(self, job_ids: Sequence[uuid.UUID | str]) -> set[str]:
        query = select(GenerationJob.id).where(GenerationJob.id.in_([_uuid(job_id) for job_id in job_ids]))
        with self._session() as session:
            return {str(job_id) for job_id in session.exec(query)}

    def for_batch(self, batch_id: uuid.UUID | str) -> list[GenerationJob]:
        query = select(GenerationJob).where(GenerationJob.batch_id == _uuid(batch_id))
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
        edit_metadata: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        count_attempt: bool = False,
        from_status: JobStatus | None = None,
        **changes: Any,
    ) -> GenerationJob:
        """Move a job to `target`, setting `changes` (and counting an attempt) in one transaction.

        With `from_status`, only a job in that status moves (IllegalTransition otherwise): the
        caller's belief about the job is checked, not just the state machine. The row is locked
        (FOR UPDATE; BEGIN IMMEDIATE on SQLite), so two writers cannot both move a job out of the
        same status, and `edit_metadata` reads and writes in the same lock.
        """
        with self._session() as session:
            job = self._locked(session, job_id)
            current = JobStatus(job.status)
            if from_status is not None and current is not from_status:
                raise IllegalTransition(str(job.id), current, target)
            check_transition(str(job.id), current, target)
            job.status = target.value
            if count_attempt:
                job.attempts += 1
            return self._save(session, job, changes, metadata_patch, edit_metadata)

    def annotate(
        self,
        job_id: uuid.UUID | str,
        *,
        while_status: JobStatus,
        edit_metadata: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        **changes: Any,
    ) -> GenerationJob | None:
        """Change a job without changing its status, if it still has `while_status`; else None."""
        with self._session() as session:
            job = self._locked(session, job_id)
            if job.status != while_status.value:
                return None
            return self._save(session, job, changes, None, edit_metadata)

    @staticmethod
    def _locked(session: Session, job_id: uuid.UUID | str) -> GenerationJob:
        job = session.exec(select(GenerationJob).where(GenerationJob.id == _uuid(job_id)).with_for_update()).first()
        if job is None:
            raise JobNotFound(job_id)
        return job

    @staticmethod
    def _save(
        session: Session,
        job: GenerationJob,
        changes: dict[str, Any],
        metadata_patch: dict[str, Any] | None,
        edit_metadata: Callable[[dict[str, Any]], dict[str, Any]] | None,
    ) -> GenerationJob:
        for name, value in changes.items():
            setattr(job, name, value)
        # Always a new dict: SQLAlchemy does not see changes made inside the old one.
        meta = {**job.meta, **(metadata_patch or {})}
        job.meta = edit_metadata(meta) if edit_metadata else meta
        job.updated_at = utcnow()
        session.add(job)
        session.commit()
        return job

    def count_by_status(self) -> dict[str, int]:
        query = select(GenerationJob.status, sa.func.count()).group_by(GenerationJob.status)
        with self._session() as session:
            return {status: count for status, count in session.exec(query)}

