"""Webhook deliveries, kept in `webhook_deliveries`; what to send and when is `scheduling/webhooks.py`'s.

Each change to a delivery is also written to its job's metadata, in the same transaction, as the
delivery log a caller reads at `GET /jobs/{id}`: `metadata.webhook` for the job's own delivery,
`metadata.batch_webhook` on the job that ended a batch for the batch's.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, select

from storage.database import Store
from storage.delivery import BATCH_EVENT, DeliveryStatus
from storage.job_status import TERMINAL
from storage.jobs import UNFINISHED, as_utc
from storage.models import ApiKey, GenerationJob, WebhookDelivery

SUPERSEDED = "superseded: the job ended again"


@dataclass(frozen=True)
class EndedBatch:
    """A batch none of whose jobs is unfinished, and its armed delivery."""

    delivery_id: uuid.UUID
    counts: dict[str, int]  # the batch's jobs by status
    last_ended: uuid.UUID | None  # the job of the batch that ended last


def log_key(event: str) -> str:
    """Where on its job a delivery's log is shown."""
    return "batch_webhook" if event == BATCH_EVENT else "webhook"


def delivery_log(delivery: WebhookDelivery) -> dict[str, Any]:
    """The delivery as its job's metadata shows it."""

    def moment(value: datetime | None) -> str | None:
        return None if value is None else as_utc(value).isoformat()

    return {
        "delivery_id": str(delivery.id),
        "event": delivery.event,
        "url": delivery.url,
        "status": delivery.status,
        "attempts": delivery.attempts,
        "last_status": delivery.last_status,
        "last_error": delivery.last_error,
        "last_attempt_at": moment(delivery.last_attempt_at),
        "next_attempt_at": moment(delivery.next_attempt_at),
        "ended_at": moment(delivery.ended_at),
    }


class WebhookStore(Store):
    def get(self, delivery_id: uuid.UUID) -> WebhookDelivery | None:
        with self._session() as session:
            return session.get(WebhookDelivery, delivery_id)

    def add_job_delivery(self, delivery: WebhookDelivery) -> bool:
        """Store a job's delivery, pending, in place of any of the job's earlier ones still pending (it
        ended again: a retried job); False, and nothing stored, when the job is gone."""
        with self._write_session() as session:
            # Deliveries are locked before their job, here as everywhere: two writers never wait on each other.
            earlier = select(WebhookDelivery).where(
                WebhookDelivery.job_id == delivery.job_id,
                WebhookDelivery.status == DeliveryStatus.PENDING.value,
                WebhookDelivery.event != BATCH_EVENT,
            )
            superseded = list(session.exec(earlier.with_for_update()))
            job = _locked_job(session, delivery.job_id)
            if job is None:
                return False
            for older in superseded:
                _end(older, DeliveryStatus.CANCELLED, SUPERSEDED, delivery.created_at)
                session.add(older)
            session.add(delivery)
            _show(session, job, delivery)
            session.commit()
        return True

    def arm_batch(self, owner: str, batch_id: str, key_id: str, url: str) -> None:
        """Arm `owner`'s batch's delivery to `url`, or point the one armed already there."""
        with self._write_session() as session:
            armed = session.exec(_armed(owner, batch_id).with_for_update()).first()
            if armed is None:
                armed = WebhookDelivery(
                    event=BATCH_EVENT, owner=owner, batch_id=batch_id, key_id=key_id, url=url, status=DeliveryStatus.WAITING.value
                )
            armed.key_id, armed.url = key_id, url
            session.add(armed)
            session.commit()

    def ended_batch(self, owner: str, batch_id: str) -> EndedBatch | None:
        """`owner`'s batch, if a delivery is armed for it and it has jobs, none of them unfinished.

        Asked as each of a batch's jobs ends: while one is unfinished, finding it is all it costs
        (the batch's jobs are counted once, when it ended), so a batch of n jobs is not n counts of n.
        """
        jobs = col(GenerationJob.owner) == owner, col(GenerationJob.batch_id) == batch_id
        with self._session() as session:
            armed = session.exec(_armed(owner, batch_id)).first()
            if armed is None:
                return None
            if session.exec(select(GenerationJob.id).where(*jobs, col(GenerationJob.status).in_(UNFINISHED)).limit(1)).first():
                return None
            counts = dict(
                session.exec(select(GenerationJob.status, sa.func.count()).where(*jobs).group_by(GenerationJob.status)).all()
            )
            last_ended = session.exec(
                select(GenerationJob.id)
                .where(*jobs, col(GenerationJob.finished_at).is_not(None))
                .order_by(col(GenerationJob.finished_at).desc())
                .limit(1)
            ).first()
        return EndedBatch(armed.id, counts, last_ended) if counts else None

    def fire_batch(self, delivery_id: uuid.UUID, job_id: uuid.UUID | None, body: str, now: datetime) -> bool:
        """Make an armed delivery pending, due now, with `body`, shown on `job_id`; False when it is
        no longer armed (another job's end fired it first)."""
        with self._write_session() as session:
            armed = _locked_delivery(session, delivery_id, DeliveryStatus.WAITING)
            if armed is None:
                return False
            armed.status, armed.body, armed.job_id = DeliveryStatus.PENDING.value, body, job_id
            armed.created_at = armed.next_attempt_at = now
            session.add(armed)
            job = _locked_job(session, job_id)
            if job is not None:
                _show(session, job, armed)
            session.commit()
        return True

    def record(self, delivery_id: uuid.UUID, changes: Mapping[str, Any]) -> WebhookDelivery | None:
        """Apply `changes` (columns) to a delivery still pending, and show it on its job; None, and
        nothing changed, when it is pending no more (superseded) or gone (its job deleted)."""
        with self._write_session() as session:
            delivery = _locked_delivery(session, delivery_id, DeliveryStatus.PENDING)
            if delivery is None:
                return None
            for name, value in changes.items():
                setattr(delivery, name, value)
            session.add(delivery)
            job = _locked_job(session, delivery.job_id)
            if job is not None:
                _show(session, job, delivery)
            session.commit()
            return delivery

    def pending(self) -> list[tuple[uuid.UUID, datetime | None]]:
        """Every pending delivery's id and when it is due (None: now), soonest first: the router resumes them."""
        query = (
            select(WebhookDelivery.id, WebhookDelivery.next_attempt_at)
            .where(WebhookDelivery.status == DeliveryStatus.PENDING.value)
            .order_by(col(WebhookDelivery.next_attempt_at))
        )
        with self._session() as session:
            return [(delivery_id, as_utc(due)) for delivery_id, due in session.exec(query)]

    def ended_without_delivery(self, since: datetime, until: datetime) -> list[GenerationJob]:
        """Jobs that ended between `since` and `until` with a webhook (their own, or their key's
        default if it was set before they ended) but no delivery of their own made since they ended:
        their router died between the job's final write and its delivery's. Oldest first."""
        delivered = select(WebhookDelivery.id).where(
            WebhookDelivery.job_id == GenerationJob.id,
            WebhookDelivery.event != BATCH_EVENT,
            col(WebhookDelivery.created_at) >= GenerationJob.finished_at,
        )
        query = (
            select(GenerationJob)
            .join(ApiKey, col(ApiKey.key_id) == GenerationJob.key_id)
            .where(
                col(GenerationJob.key_id).is_not(None),  # the partial index's condition, said where it is seen
                col(GenerationJob.finished_at) >= since,
                col(GenerationJob.finished_at) < until,
                col(GenerationJob.status).in_([status.value for status in TERMINAL]),
                sa.or_(
                    col(GenerationJob.webhook_url).is_not(None),
                    # The key's default as it is now, if it already was when the job ended.
                    sa.and_(col(ApiKey.webhook_url).is_not(None), col(ApiKey.webhook_url_since) <= GenerationJob.finished_at),
                ),
                col(ApiKey.revoked_at).is_(None),
                ~sa.exists(delivered),
            )
            .order_by(col(GenerationJob.finished_at))
        )
        with self._session() as session:
            return list(session.exec(query))

    def armed_batches(self) -> list[tuple[str, str]]:
        """(owner, batch id) of every armed batch delivery: the router sweeps them for batches that
        ended unseen."""
        query = select(WebhookDelivery.owner, WebhookDelivery.batch_id).where(
            WebhookDelivery.status == DeliveryStatus.WAITING.value
        )
        with self._session() as session:
            return [(owner, batch_id) for owner, batch_id in session.exec(query) if batch_id is not None]


def _armed(owner: str, batch_id: str) -> Any:
    return select(WebhookDelivery).where(
        WebhookDelivery.owner == owner,
        WebhookDelivery.batch_id == batch_id,
        WebhookDelivery.status == DeliveryStatus.WAITING.value,
    )


def _locked_delivery(session: Session, delivery_id: uuid.UUID, status: DeliveryStatus) -> WebhookDelivery | None:
    query = select(WebhookDelivery).where(WebhookDelivery.id == delivery_id, WebhookDelivery.status == status.value)
    return session.exec(query.with_for_update()).first()


def _locked_job(session: Session, job_id: uuid.UUID | None) -> GenerationJob | None:
    if job_id is None:
        return None
    return session.exec(select(GenerationJob).where(GenerationJob.id == job_id).with_for_update()).first()


def _end(delivery: WebhookDelivery, status: DeliveryStatus, reason: str, now: datetime) -> None:
    delivery.status, delivery.last_error, delivery.ended_at, delivery.next_attempt_at = status.value, reason, now, None


def _show(session: Session, job: GenerationJob, delivery: WebhookDelivery) -> None:
    # A new dict: SQLAlchemy does not see changes made inside the old one. The job's status and
    # updated_at stay as they are: the job did not change, its delivery did.
    job.meta = {**job.meta, log_key(delivery.event): delivery_log(delivery)}
    session.add(job)
