"""User notifications, stored in the `notifications` table."""

from __future__ import annotations

import uuid
from enum import Enum

from sqlmodel import Session, select

from storage.database import get_engine
from storage.models import Notification


class Level(str, Enum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class NotificationService:
    def __init__(self, database_url: str) -> None:
        self._engine = get_engine(database_url)

    def notify(self, job_id: uuid.UUID | str | None, level: Level, message: str) -> Notification:
        notification = Notification(
            job_id=uuid.UUID(str(job_id)) if job_id else None, level=level.value, message=message
        )
        with Session(self._engine, expire_on_commit=False) as session:
            session.add(notification)
            session.commit()
        return notification

    def list(
        self, *, job_id: uuid.UUID | None = None, level: Level | None = None, limit: int = 50
    ) -> list[Notification]:
        query = select(Notification)
        if job_id is not None:
            query = query.where(Notification.job_id == job_id)
        if level is not None:
            query = query.where(Notification.level == level.value)
        query = query.order_by(Notification.created_at.desc(), Notification.id).limit(limit)
        with Session(self._engine, expire_on_commit=False) as session:
            return list(session.exec(query))
