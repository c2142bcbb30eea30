"""A job's life as server-sent events (`GET /jobs/{id}/events`), from polled observations.

The API polls the router's live view of the job (`JobRouter.progress`) and, once the router lets go
of it, the database row; `JobEvents` turns successive observations into events: `queued` (with the
queue position, again whenever it changes), `started`, `progress` (step, total_steps), `held` and
`resumed`, and finally `completed`, `failed` or `cancelled` with the job as `GET /jobs/{id}` shows
it, after which the stream closes. Pure: no Ray, no database, no clock but the one `stream` is given.

Event ids. An event's id names what the client has been told once it has that event (`Told`): the
job's phase (started or not), the step reached, the queue position, the hold episode (its start
and its count of delays) and the final status. A client that reconnects with `Last-Event-ID`
resumes from that state: the server sends only what differs from it now. So any API replica can
resume any stream (the id carries all it needs), and nothing the client already has is sent again:
a `progress` event after a resume has a step the client was not told, a `queued` event a position
it was not told last. Two events have the same id only when they tell the same thing (a position
that went 5, 4, then 5 again, when a realtime job came ahead). An id that cannot be read (another
format, a forged one) counts as none: the stream starts from the job's current state.

Polling, not pushing: the router's step moves when a slice ends (and as a replica reports it
within a call), and a poll every `POLL_INTERVAL_S` sees it; at most one `progress` event goes per
poll, so at most one every 250 ms, and at least one per slice whenever slices last longer than that
(shorter ones are summed up by the next).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from storage.job_status import JobStatus

POLL_INTERVAL_S = 0.25
# A comment line this often on a quiet stream: proxies keep it open, clients notice a dead one.
KEEPALIVE_INTERVAL_S = 5.0
# What a browser's EventSource waits before it reconnects (with Last-Event-ID).
RECONNECT_DELAY_MS = 1000
ID_FORMAT = "v1"
NONE = "-"
# The router's places where the job has a call on a replica: its run has begun.
STARTED_PLACES = frozenset({"running", "stopping"})


class JobGone(Exception):
    """The job is no longer there (deleted meanwhile): the stream ends without a final event."""


@dataclass(frozen=True)
class Told:
    """What a client has been told of a job; encoded, it is the id of the event that told it."""

    started: bool = False  # its current run has begun (a call, or a step done)
    step: int = 0
    queue_position: int | None = None  # while it waits for its run to begin
    hold_since_ms: int | None = None  # the hold episode it is in, by its start...
    hold_delays: int = 0  # ...and how many delays it has had
    ended: str | None = None  # the final status

    def event_id(self) -> str:
        fields = (int(self.started), self.step, self.queue_position, self.hold_since_ms, self.hold_delays, self.ended)
        return ".".join([ID_FORMAT, *(NONE if value is None else str(value) for value in fields)])

    @classmethod
    def from_event_id(cls, event_id: str | None) -> Told | None:
        """The state an id names; None for no id or one this format cannot read."""
        parts = (event_id or "").split(".")
        if len(parts) != 7 or parts[0] != ID_FORMAT:
            return None
        started, step, position, since_ms, delays, ended = parts[1:]
        try:
            told = cls(
                started=bool(int(started)),
                step=int(step),
                queue_position=None if position == NONE else int(position),
                hold_since_ms=None if since_ms == NONE else int(since_ms),
                hold_delays=int(delays),
                ended=None if ended == NONE else JobStatus(ended).value,
            )
        except ValueError:
            return None
        sane = told.step >= 0 and told.hold_delays >= 0 and (told.ended is None or JobStatus(told.ended).is_terminal)
        return told if sane else None


@dataclass(frozen=True)
class Event:
    name: str
    data: Mapping[str, Any]
    id: str

    def encode(self) -> str:
        """The event on the wire: JSON data on one line, so no `data:` line needs splitting."""
        return f"id: {self.id}\nevent: {self.name}\ndata: {json.dumps(self.data, separators=(',', ':'))}\n\n"


@dataclass(frozen=True)
class Observation:
    """One poll. `live`: the router's view of the unfinished job (`JobRouter.progress`). `final`:
    the job as `GET /jobs/{id}` shows it, once ended. Neither: nothing is known now (the router is
    restarting, or has let go of the job before its final row is written); `note` says why."""

    live: Mapping[str, Any] | None = None
    final: Mapping[str, Any] | None = None
    note: str | None = None


def comment(text: str) -> str:
    return f": {text}\n\n"


def _since_ms(since: str) -> int:
    return round(datetime.fromisoformat(since).timestamp() * 1000)


def told_by(live: Mapping[str, Any]) -> Told:
    """What the router's live view would tell a client that had been told nothing."""
    started = live["state"] in STARTED_PLACES or live["step"] > 0
    held = live.get("held")
    return Told(
        started=started,
        step=live["step"],
        queue_position=None if started else live["queue_position"],
        hold_since_ms=_since_ms(held["since"]) if held else None,
        hold_delays=int(held["delays"]) if held else 0,
    )


class JobEvents:
    """Successive observations of one job in, the events they make out; `told` is where it stands."""

    def __init__(self, last_event_id: str | None = None) -> None:
        self.told: Told | None = Told.from_event_id(last_event_id)
        self.finished = False

    def observe(self, observation: Observation) -> list[Event]:
        if observation.final is not None:
            self.finished = True
            return self._ended(observation.final)
        if observation.live is None:
            return []
        return self._live(observation.live)

    def _live(self, live: Mapping[str, Any]) -> list[Event]:
        now = told_by(live)
        # Nothing told of this run yet: a new stream, or a reconnect after the end of a job retried since.
        fresh = self.told is None or self.told.ended is not None
        if fresh:
            self.told = Told()
        before = self._current()
        total = {"total_steps": live["total_steps"]}
        events: list[Event] = []
        held = live.get("held")
        if held and (now.hold_since_ms, now.hold_delays) != (before.hold_since_ms, before.hold_delays):
            detail = {key: held.get(key) for key in ("reason", "retry_after_seconds", "since", "delays")}
            events.append(self._tell("held", detail, hold_since_ms=now.hold_since_ms, hold_delays=now.hold_delays))
        if not held and before.hold_since_ms is not None:
            events.append(self._tell("resumed", {}, hold_since_ms=None, hold_delays=0))
        if not now.started and (fresh or before.started or now.queue_position != before.queue_position):
            position = now.queue_position
            events.append(self._tell("queued", {"queue_position": position}, started=False, step=0, queue_position=position))
        # A step behind the one told: the run began again from the start (a router restart, a failure).
        restarted = now.started and before.started and now.step < before.step
        if now.started and (not before.started or restarted):
            replica = {"replica_id": live.get("replica_id"), **total}
            events.append(self._tell("started", replica, started=True, step=0, queue_position=None))
        if now.started and now.step != self._current().step:
            events.append(self._tell("progress", {"step": now.step, **total}, step=now.step))
        self.told = now
        return events

    def _ended(self, job: Mapping[str, Any]) -> list[Event]:
        status, before = job["status"], self.told
        if before is not None and before.ended == status:
            return []  # told already: a reconnect after the end
        events: list[Event] = []
        # A run the client watched shows through to its last step; a fresh stream gets the end alone.
        if status == JobStatus.COMPLETED.value and before is not None and before.ended is None:
            total = job["num_inference_steps"]
            if not before.started:
                events.append(self._tell("started", {"replica_id": None, "total_steps": total}, started=True, step=0))
            if self._current().step < total:
                events.append(self._tell("progress", {"step": total, "total_steps": total}, step=total))
        events.append(self._tell(status, job, queue_position=None, hold_since_ms=None, hold_delays=0, ended=status))
        return events

    def _current(self) -> Told:
        return self.told or Told()

    def _tell(self, name: str, data: Mapping[str, Any], **changes: Any) -> Event:
        """An event, and the state the client is in once it has it."""
        self.told = replace(self._current(), **changes)
        return Event(name, data, self.told.event_id())


async def stream(
    observe: Callable[[], Awaitable[Observation]],
    last_event_id: str | None = None,
    *,
    poll_interval_s: float = POLL_INTERVAL_S,
    keepalive_interval_s: float = KEEPALIVE_INTERVAL_S,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> AsyncIterator[str]:
    """The event stream's text: events as they happen, a comment when quiet, until the job ends."""
    events = JobEvents(last_event_id)
    yield f"retry: {RECONNECT_DELAY_MS}\n\n"
    quiet_since = clock()
    while True:
        try:
            observation = await observe()
        except JobGone:
            return
        told = events.observe(observation)
        for event in told:
            yield event.encode()
        if events.finished:
            return
        if told:
            quiet_since = clock()
        elif clock() - quiet_since >= keepalive_interval_s:
            yield comment(observation.note or "keep-alive")
            quiet_since = clock()
        await sleep(poll_interval_s)


def shown_progress(
    status: str, ever_started: bool, total_steps: int, live: Mapping[str, Any] | None
) -> tuple[dict[str, int] | None, int | None]:
    """`progress` and `queue_position` of `GET /jobs/{id}`: from the router's live view while it
    holds the job; else what the row tells (completed: every step; never started: none). The step
    a failed or cancelled job had reached is not stored: null, as while the router restarts."""
    if live is not None:
        return {"step": live["step"], "total_steps": live["total_steps"]}, live["queue_position"]
    if status == JobStatus.COMPLETED.value:
        return {"step": total_steps, "total_steps": total_steps}, None
    if not ever_started:
        return {"step": 0, "total_steps": total_steps}, None
    return None, None
