"""Following a job's event stream from the client, and drawing its progress (no server)."""

from __future__ import annotations

import io
from collections.abc import Callable

import httpx
import pytest

from serve_app.cli import progress_text
from serve_app.client import ApiError, SeidraClient, ServerEvent, parse_events
from serve_app.progress import StatusLine, bar

QUEUED = 'retry: 1000\n\nid: a\nevent: queued\ndata: {"queue_position":2}\n\n'
STARTED = 'id: b\nevent: started\ndata: {"replica_id":"r1","total_steps":8}\n\n: keep-alive\n\n'
PROGRESS = 'id: c\nevent: progress\ndata: {"step":4,"total_steps":8}\n\n'
COMPLETED = 'id: d\nevent: completed\ndata: {"id":"j1","status":"completed"}\n\n'


def test_parse_events_skips_comments_and_joins_data_lines() -> None:
    text = QUEUED + STARTED + "event: message\ndata: [1,\ndata: 2]\n\n"
    assert list(parse_events(text.split("\n"))) == [
        ServerEvent("queued", {"queue_position": 2}, "a"),
        ServerEvent("started", {"replica_id": "r1", "total_steps": 8}, "b"),
        ServerEvent("message", [1, 2], "b"),  # an event without an id keeps the last one
    ]


def client(handler: Callable[[httpx.Request], httpx.Response]) -> SeidraClient:
    return SeidraClient("http://seidra.test", transport=httpx.MockTransport(handler), sleep=lambda _s: None)


def test_follow_job_resumes_a_dropped_stream_from_the_last_event_it_got() -> None:
    """The first connection ends after `progress` without the final event (the API replica went
    away); the second asks for what came after it and gets the end."""
    answers = [QUEUED + STARTED + PROGRESS, COMPLETED]
    asked: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(request.headers.get("last-event-id"))
        return httpx.Response(200, text=answers.pop(0), headers={"content-type": "text/event-stream"})

    events = list(client(handler).follow_job("j1", timeout_s=60))
    assert [event.name for event in events] == ["queued", "started", "progress", "completed"]
    assert asked == [None, "c"]


def test_follow_job_waits_out_a_503_and_stops_at_a_404() -> None:
    answers = [httpx.Response(503, json={"detail": "the database is unreachable"}, headers={"Retry-After": "1"}),
               httpx.Response(200, text=COMPLETED)]  # fmt: skip
    assert [e.name for e in client(lambda _request: answers.pop(0)).follow_job("j1", 60)] == ["completed"]
    with pytest.raises(ApiError, match="HTTP 404"):
        list(client(lambda _request: httpx.Response(404, json={"detail": "job j1 not found"})).follow_job("j1", 60))


def test_follow_job_gives_up_at_its_timeout() -> None:
    with pytest.raises(TimeoutError, match="job j1 has not ended after 0 s"):
        list(client(lambda _request: httpx.Response(200, text=QUEUED)).follow_job("j1", timeout_s=0))


def test_a_status_line_redraws_on_a_terminal_and_writes_a_line_per_state_elsewhere() -> None:
    shown = [("queued", "q 2"), ("queued", "q 1"), ("running", "r 0/8"), ("running", "r 4/8"), ("completed", "done")]
    log = io.StringIO()
    with StatusLine(log, interactive=False) as line:
        for state, text in shown:
            line.show(state, text)
    assert log.getvalue() == "q 2\nr 0/8\ndone\n"
    terminal = io.StringIO()
    with StatusLine(terminal, interactive=True) as line:
        for state, text in shown:
            line.show(state, text)
    assert terminal.getvalue() == "".join(f"\r{text}\x1b[K" for _, text in shown) + "\n"


def test_bars_and_progress_lines() -> None:
    assert bar(6, 8, "steps") == f"[{'#' * 18}{'-' * 6}] 6/8 steps"
    assert bar(0, 0) == f"[{'-' * 24}] 0/0"
    assert progress_text("0123456789", ServerEvent("queued", {"queue_position": 3}, "x")) == (
        "queued",
        "01234567 queued, 3 job(s) ahead",
    )
    held = ServerEvent("held", {"reason": "GPU too hot", "retry_after_seconds": 4}, "x")
    assert progress_text("0123456789", held) == ("held", "01234567 held: GPU too hot (retry in 4 s)")
    state, text = progress_text("0123456789", ServerEvent("progress", {"step": 4, "total_steps": 8}, "x"))
    assert state == "running" and text.endswith("4/8 steps")
    assert progress_text("0123456789", ServerEvent("failed", {}, "x")) == ("failed", "01234567 failed")
