"""SQL tables. `metadata` is JSONB on PostgreSQL so `metadata->'degraded'` works in plain SQL."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field, SQLModel

from storage.job_status import JobStatus

JSON_DOCUMENT = sa.JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _timestamp(nullable: bool = True) -> Any:
    return Field(default=None, sa_type=sa.DateTime(timezone=True), nullable=nullable)


class GenerationJob(SQLModel, table=True):
    __tablename__ = "generation_jobs"
    __table_args__ = (sa.Index("ix_generation_jobs_status_lane", "status", "lane"),)

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    status: str = Field(default=JobStatus.PENDING.value, max_length=16, index=True)
    lane: str = Field(max_length=16)
    priority: int
    batch_id: uuid.UUID | None = Field(default=None, index=True)

    prompt: str = Field(sa_type=sa.Text)
    negative_prompt: str | None = Field(default=None, sa_type=sa.Text)
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    seed: int = Field(sa_type=sa.BigInteger)

    # The attribute cannot be called `metadata` (SQLAlchemy reserves it); the column is.
    meta: dict[str, Any] = Field(default_factory=dict, sa_column=sa.Column("metadata", JSON_DOCUMENT, nullable=False))
    result_key: str | None = Field(default=None, max_length=512)
    error: str | None = Field(default=None, sa_type=sa.Text)
    attempts: int = 0

    created_at: datetime = Field(default_factory=utcnow, sa_type=sa.DateTime(timezone=True), nullable=False)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=sa.DateTime(timezone=True), nullable=False)
    started_at: datetime | None = _timestamp()
    finished_at: datetime | None = _timestamp()


class Notification(SQLModel, table=True):
    __tablename__ = "notifications"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    job_id: uuid.UUID | None = Field(default=None, foreign_key="generation_jobs.id", index=True, ondelete="CASCADE")
    level: str = Field(max_length=16, index=True)
    message: str = Field(sa_type=sa.Text)
    created_at: datetime = Field(default_factory=utcnow, sa_type=sa.DateTime(timezone=True), nullable=False)
