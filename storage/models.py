"""SQL tables. `metadata` is JSONB on PostgreSQL so `metadata->'degraded'` works in plain SQL."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field, SQLModel

from storage.delivery import MAX_URL_CHARS
from storage.job_status import JobStatus

JSON_DOCUMENT = sa.JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _timestamp(nullable: bool = True) -> Any:
    return Field(default=None, sa_type=sa.DateTime(timezone=True), nullable=nullable)


def _newest_first(table: str, *leading: str) -> sa.Index:
    """An index for a listing filtered on `leading` and ordered `created_at DESC, id`, read in order."""
    return sa.Index(f"ix_{table}_{'_'.join((*leading, 'created_at', 'id'))}", *leading, sa.desc("created_at"), "id")


class GenerationJob(SQLModel, table=True):
    __tablename__ = "generation_jobs"
    __table_args__ = (
        _newest_first("generation_jobs"),
        _newest_first("generation_jobs", "status"),
        _newest_first("generation_jobs", "lane"),
        _newest_first("generation_jobs", "batch_id"),
        # A user's own listings, with or without a status.
        _newest_first("generation_jobs", "owner"),
        _newest_first("generation_jobs", "owner", "status"),
        # The router's queue rebuild: unfinished jobs in dispatch order.
        sa.Index("ix_generation_jobs_status_priority_created_at_id", "status", "priority", "created_at", "id"),
        # Webhook deliveries a dead router left unstored: keyed jobs by when they ended.
        sa.Index(
            "ix_generation_jobs_finished_at_keyed",
            "finished_at",
            postgresql_where=sa.text("key_id IS NOT NULL"),
            sqlite_where=sa.text("key_id IS NOT NULL"),
        ),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    status: str = Field(default=JobStatus.PENDING.value, max_length=16)
    lane: str = Field(max_length=16)
    priority: int
    # The batch's name (storage.batches), per owner; a UUID's is its canonical text.
    batch_id: str | None = Field(default=None, max_length=64)
    # The API key's user who submitted it; '' (jobs from before API keys): admins alone see it.
    owner: str = Field(default="", max_length=64, sa_column_kwargs={"server_default": ""})
    # The API key that submitted it (None: authentication off): its webhook secret signs the job's
    # deliveries, and its default webhook stands in for a job without `webhook_url`.
    key_id: str | None = Field(default=None, max_length=12)
    webhook_url: str | None = Field(default=None, max_length=MAX_URL_CHARS)

    prompt: str = Field(sa_type=sa.Text)
    negative_prompt: str | None = Field(default=None, sa_type=sa.Text)
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    seed: int = Field(sa_type=sa.BigInteger)
    # A name of the served models ('': the default, as for jobs from before there were several),
    # and the LoRA adapters applied to it: [{"name", "scale"}].
    model: str = Field(default="", max_length=128, sa_column_kwargs={"server_default": ""})
    loras: list[dict[str, Any]] = Field(
        default_factory=list, sa_column=sa.Column(JSON_DOCUMENT, nullable=False, server_default=sa.text("'[]'"))
    )

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
    __table_args__ = (
        _newest_first("notifications"),
        # Leading job_id also serves the cascade from generation_jobs.
        _newest_first("notifications", "job_id"),
        _newest_first("notifications", "level"),
        _newest_first("notifications", "owner"),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    job_id: uuid.UUID | None = Field(default=None, foreign_key="generation_jobs.id", ondelete="CASCADE")
    level: str = Field(max_length=16)
    message: str = Field(sa_type=sa.Text)
    # Its job's owner, copied at insert so a user's listing needs no join; '' without a job: admins alone.
    owner: str = Field(default="", max_length=64, sa_column_kwargs={"server_default": ""})
    created_at: datetime = Field(default_factory=utcnow, sa_type=sa.DateTime(timezone=True), nullable=False)


class IdempotencyKey(SQLModel, table=True):
    """A submission's `Idempotency-Key`: a retry with the same key gets the jobs it created."""

    __tablename__ = "idempotency_keys"

    # Keys are unique per owner (the API key's user).
    owner: str = Field(default="", max_length=64, primary_key=True, sa_column_kwargs={"server_default": ""})
    key: str = Field(max_length=255, primary_key=True)
    request_hash: str = Field(max_length=64)  # sha256 hex of the request body
    job_ids: list[str] = Field(sa_column=sa.Column(JSON_DOCUMENT, nullable=False))
    batch_id: str | None = Field(default=None, max_length=64)
    created_at: datetime = Field(default_factory=utcnow, sa_type=sa.DateTime(timezone=True), nullable=False, index=True)


class ApiKey(SQLModel, table=True):
    """An API key, stored as the sha256 of its text: the key itself is shown once, at creation."""

    __tablename__ = "api_keys"

    key_id: str = Field(max_length=12, primary_key=True)  # the public part of the key, for look-up
    secret_hash: str = Field(max_length=64)  # sha256 hex of the whole key text
    user: str = Field(max_length=64, index=True)
    admin: bool = False
    created_at: datetime = Field(default_factory=utcnow, sa_type=sa.DateTime(timezone=True), nullable=False)
    expires_at: datetime | None = _timestamp()
    revoked_at: datetime | None = _timestamp()
    # Per-key quota overrides; None: the service's per-user setting.
    max_waiting_realtime: int | None = None
    max_waiting_batch: int | None = None
    submissions_per_minute: int | None = None
    # Webhooks: where the deliveries of the key's jobs go when a job names no URL of its own, and
    # the secret that signs every delivery. The secret is kept as it is, not hashed: the router
    # signs with it.
    webhook_url: str | None = Field(default=None, max_length=MAX_URL_CHARS)
    # Since when `webhook_url` is what it is: a job that ended before was not delivered to it.
    webhook_url_since: datetime | None = _timestamp()
    webhook_secret: str | None = Field(default=None, max_length=64, repr=False)


class WebhookDelivery(SQLModel, table=True):
    """One webhook POST, its body frozen, and how its attempts went (`scheduling/webhooks.py`).

    A job's delivery (`job.completed`, `job.failed`, `job.cancelled`) goes with its job: deleting
    the job deletes it. A batch's (`batch.ended`) waits, armed by the request that gave its URL,
    until none of the batch's jobs is unfinished; then `job_id` is the job that ended it.
    """

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        # What the router resumes as it starts: the pending deliveries, by when they are due.
        sa.Index("ix_webhook_deliveries_status_next_attempt_at", "status", "next_attempt_at"),
        # A batch's armed delivery, looked up as each of its jobs ends.
        sa.Index("ix_webhook_deliveries_owner_batch_id_status", "owner", "batch_id", "status"),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    event: str = Field(max_length=32)
    owner: str = Field(max_length=64)
    key_id: str = Field(max_length=12)  # whose secret signs it
    url: str = Field(max_length=MAX_URL_CHARS)
    from_key_default: bool = False  # the key's default URL: changing that default cancels it
    job_id: uuid.UUID | None = Field(default=None, foreign_key="generation_jobs.id", ondelete="CASCADE", index=True)
    batch_id: str | None = Field(default=None, max_length=64)
    body: str | None = Field(default=None, sa_type=sa.Text)  # the exact bytes signed and sent; None while waiting
    status: str = Field(max_length=16)
    attempts: int = 0
    last_status: int | None = None  # the receiver's HTTP status at the last attempt
    last_error: str | None = Field(default=None, sa_type=sa.Text)  # why the last attempt got no answer, or why it ended
    created_at: datetime = Field(default_factory=utcnow, sa_type=sa.DateTime(timezone=True), nullable=False)
    last_attempt_at: datetime | None = _timestamp()
    next_attempt_at: datetime | None = _timestamp()
    ended_at: datetime | None = _timestamp()
