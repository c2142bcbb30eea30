"""Refusals that tell the caller when to come back (HTTP 429 or 503 with `Retry-After`)."""

from __future__ import annotations


class RetryLater(Exception):
    def __init__(self, reason: str, retry_after_s: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s

    def __reduce__(self):  # type: ignore[no-untyped-def]
        # Crosses Ray actor boundaries: rebuild from the fields, not from the message.
        return type(self), (self.reason, self.retry_after_s)
