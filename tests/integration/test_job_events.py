"""Live progress (issue 11): `GET /jobs/{id}` with `progress` and `queue_position`, and the job's
server-sent events, on the session's cluster (one worker slot, 4-step slices)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import httpx
import pytest

from serve_app.client import ServerEvent, parse_events
from tests.ray_app import RunningApp

SMALL = {"width": 64, "height": 64}
STEP_DELAY_S = 0.1  # a 4-step slice takes 0.4 s: longer than a poll, far within the inference timeout


@pytest.fixture
def slow_steps(app: RunningApp) -> Iterator[None]:
    """Every denoising step slowed down, so that slices are seen one by one."""
    app.inject(inference_delay_s=STEP_DELAY_S)
    try:
        yield
    finally:
        app.clear_faults()


@pytest.fixture
def ann(app: RunningApp) -> Iterator[httpx.Client]:
    with app.client(app.key_for("ann-events")) as client:
        yield client


class Reader:
    """A job's event stream read on a thread of its own: `events` as they come, until it closes or
    `stop_after` names the event to hang up after."""

    def __init__(self, client: httpx.Client, job_id: str, last_event_id: str | None = None, stop_after: str | None = None):
        self.events: list[ServerEvent] = []
        self.comments = 0
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        self._pool = ThreadPoolExecutor(1)
        self.done: Future[int] = self._pool.submit(self._read, client, f"/jobs/{job_id}/events", headers, stop_after)
        self._seen = threading.Condition()

    def _read(self, client: httpx.Client, path: str, headers: dict[str, str], stop_after: str | None) -> int:
        with client.stream("GET", path, headers=headers, timeout=httpx.Timeout(10, read=60)) as response:
            if response.status_code != 200:
                return response.status_code
            assert response.headers["content-type"].startswith("text/event-stream")
            for event in parse_events(self._counted(response.iter_lines())):
                with self._seen:
                    self.events.append(event)
                    self._seen.notify_all()
                if event.name == stop_after:
                    break
        return 200

    def _counted(self, lines: Iterator[str]) -> Iterator[str]:
        for line in lines:
            self.comments += line.startswith(":")
            yield line

    def wait_for(self, name: str, timeout_s: float = 60) -> ServerEvent:
        with self._seen:
            found = self._seen.wait_for(lambda: [e for e in self.events if e.name == name], timeout_s)
        assert found, f"no {name!r} event within {timeout_s} s: {[(e.name, e.data) for e in self.events]}"
        return found[0]

    def result(self, timeout_s: float = 180) -> list[ServerEvent]:
        """Every event, once the server closed the stream (or it was hung up on)."""
        assert self.done.result(timeout_s) == 200
        self._pool.shutdown()
        return self.events


def paused(app: RunningApp, lane: str, paused: bool) -> None:
    app.http.post(f"/admin/lanes/{lane}", json={"paused": paused}).raise_for_status()


def submit(client: httpx.Client, steps: int, batch: bool = False) -> str:
    fields = {"prompt": "a lighthouse, step by step", "num_inference_steps": steps, **SMALL}
    if batch:
        response = client.post("/generation/batch", json={"items": [fields]})
        assert response.status_code == 202, response.text
        return str(response.json()["job_ids"][0])
    response = client.post("/generation/single", json=fields)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def steps_of(events: list[ServerEvent]) -> list[int]:
    return [event.data["step"] for event in events if event.name == "progress"]


def test_a_job_is_followed_from_the_queue_to_its_end(app: RunningApp, ann: httpx.Client, slow_steps: None) -> None:
    paused(app, "realtime", True)
    try:
        job_id = submit(ann, steps=16)
        reader = Reader(ann, job_id)
        reader.wait_for("queued")
        # The position comes from a walk of the queue at most once a second: a new job gets one soon.
        waiting = app.eventually(
            lambda: (job := ann.get(f"/jobs/{job_id}").json())["queue_position"] is not None and job, "a queue position"
        )
    finally:
        paused(app, "realtime", False)
    assert (waiting["status"], waiting["progress"]) == ("pending", {"step": 0, "total_steps": 16})
    assert isinstance(waiting["queue_position"], int)
    reader.wait_for("progress")
    running = ann.get(f"/jobs/{job_id}").json()
    assert 0 < running["progress"]["step"] < 16 and running["queue_position"] in (None, 0)

    events = reader.result()  # the server closes the stream after the final event
    names = [event.name for event in events]
    assert names[0] == "queued" and names[-1] == "completed"
    assert names.count("started") == 1 and names.index("started") < names.index("progress")
    steps = steps_of(events)
    assert steps == sorted(set(steps)) and len(steps) >= 3 and steps[-1] == 16  # every slice, through to the end
    final = events[-1].data
    assert final == ann.get(f"/jobs/{job_id}").json()  # the job as GET /jobs/{id} shows it
    assert (final["status"], final["progress"], final["queue_position"]) == ("completed", {"step": 16, "total_steps": 16}, None)
    assert len({event.id for event in events}) == len(events)


def test_a_reconnect_with_last_event_id_gets_nothing_twice(app: RunningApp, ann: httpx.Client, slow_steps: None) -> None:
    job_id = submit(ann, steps=24)
    first = Reader(ann, job_id, stop_after="progress").result()
    assert first[-1].name == "progress"
    rest = Reader(ann, job_id, last_event_id=first[-1].id).result()
    assert rest[-1].name == "completed"
    assert not {"queued", "started"} & {event.name for event in rest}  # told already: the run went on
    assert min(steps_of(rest)) > first[-1].data["step"]
    assert not {event.id for event in first} & {event.id for event in rest}
    # After the end, a reconnect gets nothing more: the stream closes at once.
    assert Reader(ann, job_id, last_event_id=rest[-1].id).result(timeout_s=30) == []


def test_a_batch_lane_job_streams_too(app: RunningApp, ann: httpx.Client) -> None:
    job_id = submit(ann, steps=8, batch=True)
    events = Reader(ann, job_id).result()
    assert events[-1].name == "completed" and events[-1].data["lane"] == "batch"
    assert "started" in [event.name for event in events]


def test_another_users_job_and_an_unknown_one_are_404_at_once(app: RunningApp, ann: httpx.Client) -> None:
    job_id = submit(ann, steps=4)
    missing = "00000000-0000-4000-8000-000000000000"
    with app.client(app.key_for("bob-events")) as bob, app.client(None) as nobody:
        assert bob.get(f"/jobs/{job_id}/events").status_code == 404
        assert bob.get(f"/jobs/{missing}/events").status_code == 404
        assert nobody.get(f"/jobs/{job_id}/events").status_code == 401
    assert app.http.get(f"/jobs/{job_id}/events", timeout=60).text.rstrip().endswith("}")  # an admin sees it through


def test_the_stream_outlives_a_router_restart(app: RunningApp, ann: httpx.Client, slow_steps: None) -> None:
    import ray

    from scheduling.router import get_router
    from serve_app.app import APP_NAME

    job_id = submit(ann, steps=40)
    reader = Reader(ann, job_id)
    reader.wait_for("progress")
    told_before = len(reader.events)
    ray.kill(get_router(APP_NAME), no_restart=False)  # Ray restarts it; it rebuilds its queue from the database

    events = reader.result()  # the same connection: kept open through the restart
    assert events[-1].name == "completed" and events[-1].data["metadata"].get("requeued") == "router restarted"
    after = [event.name for event in events[told_before:]]
    assert "started" in after  # the run began again from step 0: the client is told so
    assert steps_of(events)[-1] == 40


def test_seidra_submit_wait_draws_progress_on_stderr(
    app: RunningApp, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], slow_steps: None
) -> None:
    from serve_app.cli import main

    monkeypatch.setenv("SEIDRA_API_KEY", app.key_for("cli-events"))
    assert main(["submit", "a paper boat", "--url", app.url, "--wait", "--steps", "12", "--width", "64", "--height", "64"]) == 0
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    # Not a terminal: one line per state, no carriage returns.
    assert "\r" not in captured.err
    assert [line.split()[1] for line in lines][-2:] == ["running", "completed"]
    assert "steps" in lines[-2]
    assert captured.out.split()[1] == "completed"
