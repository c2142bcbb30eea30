"""User notifications, stored in the `notifications` table.

Each carries its job's owner, copied from the job's row when it is stored, so that a user's
listing reads one table; a notification without a job has owner '' (admins alone see it).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from enum import Enum
from typing import Any

import sqlalchemy as sa
from sqlmodel import col, select

from storage.database import Store
from storage.models import GenerationJob, Notification, utcnow

_JOBS = GenerationJob.__table__  # type: ignore[attr-defined]  # SQLModel sets it on table models; its stubs do not say so
# Each row's owner, read by the INSERT itself from the job named by the row's `job_of_owner`.
_OWNER_OF_JOB = sa.func.coalesce(
    sa.select(_JOBS.c.owner).where(_JOBS.c.id == sa.bindparam("job_of_owner", type_=sa.Uuid())).scalar_subquery(), ""
)


class Level(str, Enum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class NotificationService(Store):
    def notify(self, job_id: uuid.UUID | str | None, level: Level, message: str) -> Notification:
        job_uuid = _job_uuid(job_id)
        with self._write_session() as session:
            owner = session.exec(select(GenerationJob.owner).where(GenerationJob.id == job_uuid)).first() if job_uuid else None
            notification = Notification(job_id=job_uuid, level=level.value, message=message, owner=owner or "")
            session.add(notification)
            session.commit()
        return notification

    def notify_many(self, notifications: Sequence[tuple[str | None, Level, str]]) -> int:
        """Store (job id, level, message) notifications with one INSERT, all or none; returns how many.

        They share one `created_at`, so among themselves they list in id order, not as given. Each
        row's owner is read from its job by the INSERT itself: no read before it.
        """
        if not notifications:
            return 0
        now = utcnow()
        rows = [_row(job_id, level, message) for job_id, level, message in notifications]
        with self._writer.begin() as connection:
            connection.execute(sa.insert(Notification).values(created_at=now, owner=_OWNER_OF_JOB), rows)
        return len(rows)

    def list(
        self, *, job_id: uuid.UUID | None = None, level: Level | None = None, owner: str | None = None, limit: int = 50
    ) -> list[Notification]:
        """The newest first; each filter given narrows the list (`owner`: that user's notifications only)."""
        query = select(Notification)
        if owner is not None:
            query = query.where(Notification.owner == owner)
        if job_id is not None:
            query = query.where(Notification.job_id == job_id)
        if level is not None:
            query = query.where(Notification.level == level.value)
        query = query.order_by(col(Notification.created_at).desc(), col(Notification.id)).limit(limit)
        with self._session() as session:
            return list(session.exec(query))


def _row(job_id: str | None, level: Level, message: str) -> dict[str, Any]:
    job_uuid = _job_uuid(job_id)
    # The job id twice: `job_id` is the INSERT's own parameter, which its sub-select may not share.
    return {"id": uuid.uuid4(), "job_id": job_uuid, "job_of_owner": job_uuid, "level": level.value, "message": message}


def _job_uuid(job_id: uuid.UUID | str | None) -> uuid.UUID | None:
    return uuid.UUID(str(job_id)) if job_id else None
