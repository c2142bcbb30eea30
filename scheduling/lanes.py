"""Lanes and priorities: which lane a job waits in follows from its priority number."""

from __future__ import annotations

from enum import Enum

MIN_PRIORITY = 0
MAX_PRIORITY = 9
# Priorities 0..4 are interactive; 5..9 are batch work.
MAX_REALTIME_PRIORITY = 4

NAMED_PRIORITIES: dict[str, int] = {"high": 0, "normal": 2, "low": 8}

DEFAULT_REALTIME_PRIORITY = NAMED_PRIORITIES["normal"]
DEFAULT_BATCH_PRIORITY = NAMED_PRIORITIES["low"]


class Lane(str, Enum):
    """A lane is a queue with strict precedence over the lanes after it (declaration order)."""

    REALTIME = "realtime"
    BATCH = "batch"


def parse_priority(value: int | str) -> int:
    """Accept an integer 0..9 or one of the names in `NAMED_PRIORITIES`."""
    if isinstance(value, bool):
        raise ValueError("priority must be an integer 0-9 or one of high, normal, low")
    if isinstance(value, str):
        name = value.strip().lower()
        if name in NAMED_PRIORITIES:
            return NAMED_PRIORITIES[name]
        if not name.lstrip("-").isdigit():
            raise ValueError(f"unknown priority {value!r}: use an integer 0-9 or high, normal, low")
        value = int(name)
    if not MIN_PRIORITY <= value <= MAX_PRIORITY:
        raise ValueError(f"priority {value} is out of range {MIN_PRIORITY}-{MAX_PRIORITY}")
    return value


def lane_for(priority: int) -> Lane:
    return Lane.REALTIME if priority <= MAX_REALTIME_PRIORITY else Lane.BATCH
