"""Hold records and backoff, exactly."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from scheduling.hold import Backoff, delays_so_far, held, is_held, resumed

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def test_backoff_doubles_up_to_the_cap() -> None:
    backoff = Backoff(base_s=5, cap_s=60, jitter=0)
    assert [backoff.delay_s(n) for n in range(1, 7)] == [5, 10, 20, 40, 60, 60]


def test_jitter_spreads_within_bounds() -> None:
    backoff = Backoff(base_s=10, cap_s=300, jitter=0.2)
    assert backoff.delay_s(1, rand=lambda: 0.0) == 8
    assert backoff.delay_s(1, rand=lambda: 0.5) == 10
    assert backoff.delay_s(1, rand=lambda: 0.999999) == 12
    assert backoff.delay_s(1, rand=lambda: 0.0) >= 1
    assert backoff.delay_s(9, rand=lambda: 0.999999) == 300  # jitter never passes the cap
    assert backoff.delay_s(9, rand=lambda: 0.0) == 240


def test_each_delay_appends_history_and_keeps_since() -> None:
    first = held({"trace": "x"}, reason="GPU inference timeout", replica_id="r1", retry_after_s=5, now=T0)
    second = held(first, reason="GPU temperature 95 °C >= 85 °C", replica_id=None, retry_after_s=10, now=T0 + timedelta(seconds=5))
    assert second["trace"] == "x"
    degraded = second["degraded"]
    assert (degraded["reason"], degraded["retry_after_seconds"], degraded["since"]) == (
        "GPU temperature 95 °C >= 85 °C", 10, T0.isoformat(),
    )
    assert degraded["history"] == [
        {"at": T0.isoformat(), "reason": "GPU inference timeout", "replica_id": "r1", "retry_after_seconds": 5},
        {"at": (T0 + timedelta(seconds=5)).isoformat(), "reason": "GPU temperature 95 °C >= 85 °C", "replica_id": None, "retry_after_seconds": 10},
    ]
    assert is_held(second) and delays_so_far(second) == 2


def test_resuming_ends_the_hold_and_a_new_hold_restarts_the_backoff() -> None:
    once = held({}, reason="a", replica_id="r1", retry_after_s=5, now=T0)
    running = resumed(once, T0 + timedelta(seconds=7))
    assert not is_held(running) and delays_so_far(running) == 0
    assert running["degraded"]["history"] == once["degraded"]["history"]
    again = held(running, reason="b", replica_id="r2", retry_after_s=5, now=T0 + timedelta(seconds=9))
    assert again["degraded"]["since"] == (T0 + timedelta(seconds=9)).isoformat()
    assert len(again["degraded"]["history"]) == 2 and delays_so_far(again) == 1
    assert resumed({}, T0) == {}
