"""Hold records and backoff, exactly."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from scheduling.hold import Backoff, Delay, Hold

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def test_backoff_doubles_up_to_the_cap() -> None:
    backoff = Backoff(base_s=5, cap_s=60, jitter=0)
    assert [backoff.delay_s(n) for n in range(1, 7)] == [5, 10, 20, 40, 60, 60]
    assert backoff.delay_s(10_000) == 60  # an outage of any length


def test_jitter_spreads_within_bounds() -> None:
    backoff = Backoff(base_s=10, cap_s=300, jitter=0.2)
    assert backoff.delay_s(1, rand=lambda: 0.0) == 8
    assert backoff.delay_s(1, rand=lambda: 0.5) == 10
    assert backoff.delay_s(1, rand=lambda: 0.999999) == 12
    assert backoff.delay_s(1, rand=lambda: 0.0) >= 1
    assert backoff.delay_s(9, rand=lambda: 0.999999) == 300  # jitter never passes the cap
    assert backoff.delay_s(9, rand=lambda: 0.0) == 240


def test_an_episode_keeps_its_first_and_latest_delays_and_counts_them_all() -> None:
    first = Delay(T0, "GPU inference timeout", "r1", 5)
    hold = Hold.begin(first)
    assert hold.document() == {
        "reason": "GPU inference timeout",
        "since": T0.isoformat(),
        "retry_after_seconds": 5,
        "replica_id": "r1",
        "delays": 1,
        "history": [{"at": T0.isoformat(), "reason": "GPU inference timeout", "replica_id": "r1", "retry_after_seconds": 5}],
    }
    for n in range(1, 100):
        hold = hold.delayed(Delay(T0 + timedelta(seconds=n), "GPU temperature 95 °C >= 85 °C", None, 10))
    document = hold.document()
    assert (document["delays"], document["since"], document["reason"], document["retry_after_seconds"]) == (
        100, T0.isoformat(), "GPU temperature 95 °C >= 85 °C", 10,
    )  # fmt: skip
    assert [entry["at"] for entry in document["history"]] == [T0.isoformat(), (T0 + timedelta(seconds=99)).isoformat()]


def test_a_stored_episode_reads_back_unless_it_has_ended() -> None:
    hold = Hold.begin(Delay(T0, "a", "r1", 5)).delayed(Delay(T0 + timedelta(seconds=5), "b", None, 10))
    assert Hold.from_document(hold.document()) == hold
    assert Hold.from_document(hold.resumed_document(T0 + timedelta(seconds=7))) is None
    assert hold.resumed_document(T0)["resumed_at"] == T0.isoformat()
    assert Hold.from_document(None) is None and Hold.from_document({}) is None
