"""The event stream of a job (serve_app/events.py): observations in, events and their ids out."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest

from serve_app.events import JobEvents, JobGone, Observation, Told, shown_progress, stream

SINCE = "2024-05-01T12:00:00+00:00"


def live(state: str = "waiting", step: int = 0, position: int | None = None, held: dict[str, Any] | None = None) -> Observation:
    return Observation(
        live={
            "state": state,
            "step": step,
            "total_steps": 12,
            "queue_position": position,
            "replica_id": "r1" if state == "running" else None,
            "held": held,
        }
    )


def hold(delays: int = 1, since: str = SINCE) -> dict[str, Any]:
    return {"reason": "GPU too hot", "since": since, "retry_after_seconds": 2 * delays, "delays": delays, "history": []}


def ended(status: str) -> Observation:
    return Observation(final={"id": "j1", "status": status, "num_inference_steps": 12})


def names(events: JobEvents, *observations: Observation) -> list[str]:
    return [event.name for observation in observations for event in events.observe(observation)]


def test_a_job_from_the_queue_to_the_end() -> None:
    events = JobEvents()
    told = [event for o in (live(position=2), live(position=1), live(position=1), live("running"),
                            live("running", 4), live("waiting", 4, position=0), live("running", 8), ended("completed"))
            for event in events.observe(o)]  # fmt: skip
    assert [(e.name, dict(e.data)) for e in told] == [
        ("queued", {"queue_position": 2}),
        ("queued", {"queue_position": 1}),
        ("started", {"replica_id": "r1", "total_steps": 12}),
        ("progress", {"step": 4, "total_steps": 12}),  # between two slices it stays started: no `queued`
        ("progress", {"step": 8, "total_steps": 12}),
        ("progress", {"step": 12, "total_steps": 12}),  # a watched run shows through to its last step
        ("completed", {"id": "j1", "status": "completed", "num_inference_steps": 12}),
    ]
    assert events.finished
    assert len({event.id for event in told}) == len(told)


def test_every_id_resumes_exactly_after_its_event() -> None:
    """A client that reconnects with any id it got, observing the same, gets exactly what followed it."""
    observations = [live(position=3), live(held=hold(), position=3), live(held=hold(2), position=1),
                    live("running", 0), live("running", 4), live("running", 8), ended("completed")]  # fmt: skip
    events = JobEvents()
    told = [(event, index) for index, o in enumerate(observations) for event in events.observe(o)]
    for position, (event, index) in enumerate(told):
        resumed = JobEvents(event.id)
        rest = [e for o in observations[index:] for e in resumed.observe(o)]
        assert [(e.name, e.id) for e in rest] == [(e.name, e.id) for e, _ in told[position + 1 :]]


def test_a_hold_is_told_with_each_delay_and_its_end() -> None:
    events = JobEvents()
    held = [e for o in (live(position=0), live(held=hold(1), position=0), live(held=hold(1), position=0),
                        live(held=hold(2), position=0), live("running")) for e in events.observe(o)]  # fmt: skip
    assert [e.name for e in held] == ["queued", "held", "held", "resumed", "started"]
    assert {key: held[1].data[key] for key in ("reason", "retry_after_seconds")} == {
        "reason": "GPU too hot",
        "retry_after_seconds": 2,
    }
    assert held[2].data["retry_after_seconds"] == 4
    # A call that timed out mid-run: held with its steps kept, resumed where it was.
    assert names(events, live("running", 4), live("waiting", 4, 0, hold(1, "2024-05-01T12:01:00+00:00")), live("running", 4)) == [
        "progress", "held", "resumed"
    ]  # fmt: skip


def test_a_restarted_router_shows_the_run_begin_again() -> None:
    events = JobEvents()
    assert names(events, live("running", 8)) == ["started", "progress"]
    assert names(events, Observation(note="the router is restarting")) == []  # nothing known: nothing told
    assert names(events, live(position=0), live("running", 0), live("running", 4)) == ["queued", "started", "progress"]
    # A new run seen only once it was past its start: a step behind the one told.
    assert names(events, live("running", 8), live("running", 4)) == ["progress", "started", "progress"]


def test_a_stream_opened_on_an_ended_job_gets_the_end_alone_and_a_reconnect_after_it_nothing() -> None:
    events = JobEvents()
    [end] = events.observe(ended("completed"))
    assert end.name == "completed" and events.finished
    again = JobEvents(end.id)
    assert again.observe(ended("completed")) == [] and again.finished


def test_a_job_retried_after_its_end_is_followed_again() -> None:
    [failed] = JobEvents().observe(ended("failed"))
    events = JobEvents(failed.id)
    assert names(events, live(position=0), live("running", 4), ended("failed")) == ["queued", "started", "progress", "failed"]


def test_a_job_cancelled_while_waiting_was_never_started() -> None:
    events = JobEvents()
    assert names(events, live(position=4), ended("cancelled")) == ["queued", "cancelled"]


@pytest.mark.parametrize(
    "bad", [None, "", "garbage", "v1.1.2", "v2.0.0.-.-.0.-", "v1.0.-3.-.-.0.-", "v1.0.0.-.-.0.pending?", "v1.0.0.-.-.0.running"]
)
def test_unreadable_ids_start_from_the_current_state(bad: str | None) -> None:
    assert Told.from_event_id(bad) is None
    assert names(JobEvents(bad), live("running", 4)) == ["started", "progress"]


def test_ids_round_trip() -> None:
    told = Told(started=True, step=8, queue_position=None, hold_since_ms=1714564800000, hold_delays=2, ended="failed")
    assert Told.from_event_id(told.event_id()) == told


def test_events_on_the_wire() -> None:
    [event] = JobEvents().observe(live(position=7))
    lines = event.encode().split("\n")
    assert lines[:2] == [f"id: {event.id}", "event: queued"] and lines[3:] == ["", ""]
    assert json.loads(lines[2].removeprefix("data: ")) == {"queue_position": 7}


def test_shown_progress() -> None:
    view = live("waiting", 4, position=3).live
    assert shown_progress("running", True, 12, view) == ({"step": 4, "total_steps": 12}, 3)
    assert shown_progress("completed", True, 12, None) == ({"step": 12, "total_steps": 12}, None)
    assert shown_progress("pending", False, 12, None) == ({"step": 0, "total_steps": 12}, None)
    assert shown_progress("cancelled", True, 12, None) == (None, None)  # where it stopped is not stored


class FakeTime:
    def __init__(self) -> None:
        self.now_s = 0.0

    def clock(self) -> float:
        return self.now_s

    async def sleep(self, seconds: float) -> None:
        self.now_s += seconds


def run_stream(observations: list[Observation | type[Exception]], **options: Any) -> list[str]:
    pending: Iterator[Observation | type[Exception]] = iter(observations)
    time = FakeTime()

    async def observe() -> Observation:
        item = next(pending)
        if isinstance(item, type):
            raise item
        return item

    async def collect() -> list[str]:
        return [chunk async for chunk in stream(observe, None, clock=time.clock, sleep=time.sleep, **options)]

    return asyncio.run(collect())


def test_the_stream_keeps_quiet_times_alive_and_closes_after_the_end() -> None:
    restarting = Observation(note="the router is restarting")
    chunks = run_stream([live(position=0), *[restarting] * 9, live("running", 4), ended("completed")],
                        poll_interval_s=0.25, keepalive_interval_s=1.0)  # fmt: skip
    assert chunks[0] == "retry: 1000\n\n"
    kinds = [chunk.split("\n")[1] if chunk.startswith("id:") else chunk.strip() for chunk in chunks[1:]]
    assert kinds == [
        "event: queued",
        ": the router is restarting",  # a second passed without news: at its fourth quiet poll, then four more on
        ": the router is restarting",
        "event: started",
        "event: progress",
        "event: progress",
        "event: completed",
    ]


def test_a_job_deleted_meanwhile_ends_the_stream() -> None:
    assert run_stream([live(position=0), JobGone])[-1].startswith("id: ")
