"""Putting a job on hold while no healthy GPU can take it: the backoff and the record kept on the job.

A held job stays `pending` in its place in its lane. `metadata.degraded` says why, since when, and
when the router will look at it again (`retry_after_seconds`). A hold episode lasts from the first
delay to the job's next start; the router retries earlier by itself as soon as a healthy replica
reports. However long an outage lasts, the record stays small: `history` keeps the episode's first
and latest delays, `delays` counts them all.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any


@dataclass(frozen=True)
class Backoff:
    """Delay n (1-based) waits base * 2**(n-1) seconds spread by +/- jitter, never more than the cap."""

    base_s: float = 5.0
    cap_s: float = 300.0
    jitter: float = 0.2

    def delay_s(self, delay_number: int, rand: Callable[[], float] = random.random) -> int:
        raw = min(self.cap_s, self.base_s * 2.0 ** min(delay_number - 1, 64))
        spread = 1 - self.jitter + 2 * self.jitter * rand()
        return max(1, round(min(self.cap_s, raw * spread)))


@dataclass(frozen=True)
class Delay:
    at: datetime
    reason: str
    replica_id: str | None
    retry_after_s: int

    def document(self) -> dict[str, Any]:
        return {
            "at": self.at.isoformat(),
            "reason": self.reason,
            "replica_id": self.replica_id,
            "retry_after_seconds": self.retry_after_s,
        }

    @classmethod
    def from_document(cls, document: Mapping[str, Any]) -> Delay:
        return cls(
            datetime.fromisoformat(document["at"]),
            document["reason"],
            document.get("replica_id"),
            int(document["retry_after_seconds"]),
        )


@dataclass(frozen=True)
class Hold:
    """One hold episode: its first and latest delays, and how many there were."""

    first: Delay
    last: Delay
    delays: int = 1

    @classmethod
    def begin(cls, delay: Delay) -> Hold:
        return cls(delay, delay)

    def delayed(self, delay: Delay) -> Hold:
        return replace(self, last=delay, delays=self.delays + 1)

    def document(self) -> dict[str, Any]:
        """`metadata.degraded` while the job waits."""
        history = [self.first] if self.delays == 1 else [self.first, self.last]
        return {
            "reason": self.last.reason,
            "since": self.first.at.isoformat(),
            "retry_after_seconds": self.last.retry_after_s,
            "replica_id": self.last.replica_id,
            "delays": self.delays,
            "history": [delay.document() for delay in history],
        }

    def resumed_document(self, at: datetime) -> dict[str, Any]:
        """`metadata.degraded` once the job runs again: the episode stays on record."""
        return {**self.document(), "resumed_at": at.isoformat()}

    @classmethod
    def from_document(cls, document: Mapping[str, Any] | None) -> Hold | None:
        """The episode a stored job is in, or None when it is not held (never, or resumed since)."""
        if not document or "resumed_at" in document or not document.get("history"):
            return None
        history = document["history"]
        return cls(
            Delay.from_document(history[0]),
            Delay.from_document(history[-1]),
            int(document.get("delays", len(history))),
        )


def utc(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, timezone.utc)
