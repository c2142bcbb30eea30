"""What a webhook delivery record is made of, without SQL (the API's schemas and the batch driver
import it): its statuses, its events, the width of a webhook URL."""

from __future__ import annotations

from enum import Enum

MAX_URL_CHARS = 2048  # the width of every webhook URL column
BATCH_EVENT = "batch.ended"


class DeliveryStatus(str, Enum):
    WAITING = "waiting"  # a batch's, armed: sent once none of the batch's jobs is unfinished
    PENDING = "pending"  # its next attempt is due at `next_attempt_at`
    DELIVERED = "delivered"  # the receiver answered 2xx
    FAILED = "failed"  # given up: too many attempts, or for too long
    CANCELLED = "cancelled"  # not sent any more: its webhook was removed (`last_error` says how)


def job_event(status: str) -> str:
    """The event of a job that ended in `status`: `job.completed`, `job.failed`, `job.cancelled`."""
    return f"job.{status}"
