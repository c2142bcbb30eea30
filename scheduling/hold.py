"""Putting a job on hold while no healthy GPU can take it: the backoff and the record kept on the job.

A held job stays `pending` in its place in its lane. `metadata.degraded` says why, since when, and
when the router will try again (`retry_after_seconds`); `metadata.degraded.history` gets one entry
per delay. The router retries earlier by itself as soon as a healthy replica reports.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class Backoff:
    """Delay n (1-based) waits base * 2**(n-1) seconds spread by +/- jitter, never more than the cap."""

    base_s: float = 5.0
    cap_s: float = 300.0
    jitter: float = 0.2

    def delay_s(self, delay_number: int, rand: Callable[[], float] = random.random) -> int:
        raw = min(self.cap_s, self.base_s * 2 ** (delay_number - 1))
        spread = 1 - self.jitter + 2 * self.jitter * rand()
        return max(1, round(min(self.cap_s, raw * spread)))


def is_held(metadata: dict[str, Any]) -> bool:
    degraded = metadata.get("degraded")
    return bool(degraded) and "resumed_at" not in degraded


def delays_so_far(metadata: dict[str, Any]) -> int:
    """Delays in the current hold: the backoff restarts once a held job has run again."""
    if not is_held(metadata):
        return 0
    return sum(1 for entry in metadata["degraded"]["history"] if entry["at"] >= metadata["degraded"]["since"])


def held(metadata: dict[str, Any], *, reason: str, replica_id: str | None, retry_after_s: int, now: datetime) -> dict[str, Any]:
    """The job's metadata with one more delay recorded."""
    previous = metadata.get("degraded") or {}
    at = now.isoformat()
    entry = {"at": at, "reason": reason, "replica_id": replica_id, "retry_after_seconds": retry_after_s}
    degraded = {
        "reason": reason,
        "since": previous["since"] if is_held(metadata) else at,
        "retry_after_seconds": retry_after_s,
        "replica_id": replica_id,
        "history": [*previous.get("history", []), entry],
    }
    return {**metadata, "degraded": degraded}


def resumed(metadata: dict[str, Any], now: datetime) -> dict[str, Any]:
    """The job's metadata once it runs again; its delays stay in the history."""
    if not is_held(metadata):
        return metadata
    return {**metadata, "degraded": {**metadata["degraded"], "resumed_at": now.isoformat()}}
