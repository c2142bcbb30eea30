from __future__ import annotations

import pytest

from scheduling.lanes import Lane, lane_for, parse_priority


@pytest.mark.parametrize(
    ("given", "expected"),
    [("high", 0), ("normal", 2), ("low", 8), ("HIGH", 0), (" low ", 8), (0, 0), (9, 9), ("5", 5)],
)
def test_priorities_by_name_or_number(given: int | str, expected: int) -> None:
    assert parse_priority(given) == expected


@pytest.mark.parametrize("given", [-1, 10, "urgent", "", "10", True, "-1"])
def test_bad_priorities_are_refused(given: object) -> None:
    with pytest.raises(ValueError):
        parse_priority(given)  # type: ignore[arg-type]


def test_lane_follows_priority() -> None:
    assert [lane_for(p) for p in range(10)] == [Lane.REALTIME] * 5 + [Lane.BATCH] * 5
