"""Per-user limits on submissions: unfinished jobs per lane, and a submission rate (a token bucket).

Pure, with the clock passed in. The scheduling core checks them with every reservation, so two
submissions of one user racing for their last allowed job cannot both get it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from scheduling.lanes import Lane
from scheduling.retry_later import RetryLater

SECONDS_PER_MINUTE = 60.0


@dataclass(frozen=True)
class Quota:
    """What one user may have waiting or running per lane, and submit per minute (bursts of as many)."""

    max_unfinished: Mapping[Lane, int]
    submissions_per_minute: int


class QuotaExceeded(RetryLater):
    """A user's submission goes beyond their quota; they should come back after `retry_after_s`."""


class SubmissionTooLarge(ValueError):
    """More jobs in one submission than the user may ever have unfinished: coming back will not help."""


@dataclass
class TokenBucket:
    """Up to `per_minute` tokens, refilled at `per_minute` a minute; one submission takes one."""

    per_minute: int
    tokens: float
    updated_at: float

    @classmethod
    def full(cls, per_minute: int, now: float) -> TokenBucket:
        return cls(per_minute, float(per_minute), now)

    def refill(self, now: float, per_minute: int) -> None:
        """Brings the bucket to `now`; a changed rate (another key of the same user) applies from here."""
        self.per_minute = per_minute
        elapsed_s = max(0.0, now - self.updated_at)
        self.tokens = min(float(per_minute), self.tokens + elapsed_s * per_minute / SECONDS_PER_MINUTE)
        self.updated_at = now

    def wait_s(self) -> float:
        """How long until a token is there (0 when one is)."""
        return max(0.0, (1.0 - self.tokens) * SECONDS_PER_MINUTE / self.per_minute)

    def is_full(self) -> bool:
        return self.tokens >= self.per_minute


def retry_after_s(wait_s: float) -> int:
    """A Retry-After in whole seconds that is never too early."""
    return max(1, math.ceil(wait_s))
