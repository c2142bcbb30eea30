"""User notifications, stored in the `notifications` table."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from enum import Enum

import sqlalchemy as sa
from sqlmodel import Session, col, select

from storage.database import for_writes, get_engine
from storage.models import Notification, utcnow


class Level(str, Enum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class NotificationService:
    def __init__(self, database_url: str) -> None:
        self._engine = get_engine(database_url)
        self._writer = for_writes(self._engine)

    def notify(self, job_id: uuid.UUID | str | None, level: Level, message: str) -> Notification:
        notification = Notification(job_id=_job_uuid(job_id), level=level.value, message=message)
        with Session(self._writer, expire_on_commit=False) as session:
            session.add(notification)
            session.commit()
        return notification

    def notify_many(self, notifications: Sequence[tuple[str | None, Level, str]]) -> int:
        """Store (job id, level, message) notifications with one INSERT, all or none; returns how many.

        They share one `created_at`, so among themselves they list in id order, not as given.
        """
        if not notifications:
            return 0
        now = utcnow()
        rows = [
            {"id": uuid.uuid4(), "job_id": _job_uuid(job_id), "level": level.value, "message": message}
            for job_id, level, message in notifications
        ]
        with self._writer.begin() as connection:
            connection.execute(sa.insert(Notification).values(created_at=now), rows)
        return len(rows)

    def list(self, *, job_id: uuid.UUID | None = None, level: Level | None = None, limit: int = 50) -> list[Notification]:
        query = select(Notification)
        if job_id is not None:
            query = query.where(Notification.job_id == job_id)
        if level is not None:
            query = query.where(Notification.level == level.value)
        query = query.order_by(col(Notification.created_at).desc(), col(Notification.id)).limit(limit)
        with Session(self._engine, expire_on_commit=False) as session:
            return list(session.exec(query))


def _job_uuid(job_id: uuid.UUID | str | None) -> uuid.UUID | None:
    return uuid.UUID(str(job_id)) if job_id else None
