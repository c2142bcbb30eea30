"""CLI mistakes end in one line and a non-zero exit code, without a traceback; the API client; the
waits of `seidra up` against canned answers."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from serve_app.cli import format_jobs_table, main
from serve_app.client import GET_RETRIES, ApiError, SeidraClient
from serve_app.cluster import (
    STARTING,
    ClusterError,
    ServeAppState,
    UpState,
    forwarded_env,
    process_started_ticks,
    wait_for_workers,
    wait_until_healthy,
)


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SEIDRA_HOME", str(tmp_path))
    monkeypatch.delenv("SEIDRA_API_URL", raising=False)
    monkeypatch.delenv("SEIDRA_DEBUG", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # `seidra up` would otherwise make a token and choose it for Ray
    return tmp_path


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


def test_down_without_up(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["down"]) == 1
    assert "nothing to stop" in one_error_line(capsys)


def test_up_without_a_model(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("SEIDRA_MODEL", raising=False)
    assert main(["up"]) == 1
    assert "SEIDRA_MODEL is not set" in one_error_line(capsys)


@pytest.mark.parametrize("argv", [["jobs"], ["status"], ["submit", "a cat"]])
def test_unreachable_api(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    # Port 9 (discard) has no HTTP server behind it on a test machine.
    assert main([*argv, "--url", "http://127.0.0.1:9"]) == 1
    assert "not reachable at http://127.0.0.1:9" in one_error_line(capsys)


def test_bad_arguments_exit_non_zero(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["up", "--http-port", "70000"])
    assert exited.value.code == 2
    assert "70000 is not a TCP port" in capsys.readouterr().err


def test_jobs_table_shows_lane_priority_status_seconds_and_image() -> None:
    table = format_jobs_table(
        [
            {
                "id": "j1", "lane": "realtime", "priority": 2, "status": "completed",
                "started_at": "2026-01-01T00:00:00+00:00", "finished_at": "2026-01-01T00:00:01.5+00:00",
                "image_url": "/jobs/j1/image",
            },
            {"id": "j2", "lane": "batch", "priority": 8, "status": "pending", "started_at": None, "finished_at": None},
        ]
    )  # fmt: skip
    lines = table.splitlines()
    assert lines[0].split() == ["id", "lane", "priority", "status", "seconds", "image"]
    assert lines[1].split() == ["j1", "realtime", "2", "completed", "1.50", "/jobs/j1/image"]
    assert lines[2].split() == ["j2", "batch", "8", "pending", "-", "-"]


# ----- `seidra up` and `seidra down` without Ray -----


def test_an_unknown_setting_is_named_with_the_nearest_one(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SEIDRA_MODEL", "/models/tiny")
    monkeypatch.setenv("SEIDRA_MAX_REALTIME_QUEUEE", "5")
    monkeypatch.setenv("SEIDRA_FROM_A_NEWER_RELEASE", "1")
    assert main(["up"]) == 1
    line = one_error_line(capsys)
    assert "SEIDRA_MAX_REALTIME_QUEUEE (did you mean SEIDRA_MAX_REALTIME_QUEUE?)" in line
    assert "SEIDRA_FROM_A_NEWER_RELEASE," in line  # nothing near it: no suggestion


def test_the_clis_own_variables_stay_in_the_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEIDRA_API_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("SEIDRA_DEBUG", "1")
    assert not {"SEIDRA_API_URL", "SEIDRA_DEBUG"} & set(forwarded_env())


def test_up_refuses_while_an_earlier_up_is_still_starting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SEIDRA_MODEL", "/models/tiny")
    # A live process stands in for the head; this test never runs `seidra down`, which would stop it.
    me = os.getpid()
    UpState("http://127.0.0.1:8000", "127.0.0.1:6379", None, me, process_started_ticks(me), STARTING).save()
    assert main(["up"]) == 1
    line = one_error_line(capsys)
    assert f"SEIDRA is still starting, or its `seidra up` was interrupted (its Ray head, pid {me}, is running" in line
    assert UpState.load() is not None


def stale_state() -> UpState:
    # Our own pid with other start ticks: what a head's pid looks like once reused by another process.
    return UpState("http://127.0.0.1:8000", "127.0.0.1:6379", None, os.getpid(), "0", STARTING)


def test_down_forgets_the_state_of_a_head_that_is_gone(capsys: pytest.CaptureFixture[str]) -> None:
    stale_state().save()
    assert main(["down"]) == 0
    assert f"(pid {os.getpid()}) is no longer running; forgot its state" in capsys.readouterr().out
    assert UpState.load() is None


def test_up_replaces_the_state_of_a_head_that_is_gone(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SEIDRA_MODEL", "/models/tiny")
    stale_state().save()
    with socket.socket() as busy:  # so that this `seidra up` stops before starting Ray
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["up", "--gcs-port", str(busy.getsockname()[1])]) == 1
    captured = capsys.readouterr()
    assert f"Forgetting an earlier `seidra up`: the Ray head it started (pid {os.getpid()}) is no longer running" in captured.out
    assert "GCS port" in captured.err and "is in use" in captured.err
    assert UpState.load() is None


def test_a_state_file_from_before_the_status_field_reads_as_up() -> None:
    UpState.path().parent.mkdir(parents=True)
    UpState.path().write_text('{"url": "u", "address": "a", "dashboard_url": null, "head_pid": null}')
    assert UpState.load() == UpState("u", "a", None, None, None, "up")


# ----- the API client -----


Handler = Callable[[httpx.Request], httpx.Response]


def client(handler: Handler, sleeps: list[float] | None = None) -> SeidraClient:
    return SeidraClient(
        "http://seidra.test", transport=httpx.MockTransport(handler), sleep=(sleeps if sleeps is not None else []).append
    )


def test_requests_and_json_answers() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"method": request.method, "url": str(request.url), "body": request.content.decode()})

    api = client(handler)
    assert api.get("/jobs", params={"limit": 2}) == {"method": "GET", "url": "http://seidra.test/jobs?limit=2", "body": ""}
    assert api.post("/generation/single", json={"prompt": "p"})["body"] == '{"prompt":"p"}'
    assert api.delete("/admin/faults")["method"] == "DELETE"


def test_a_get_answered_503_with_retry_after_is_tried_again() -> None:
    answers = [httpx.Response(503, headers={"Retry-After": "5"}, json={"detail": "the router is restarting"})] * 2
    answers.append(httpx.Response(200, json={"status": "ok"}))
    sleeps: list[float] = []
    assert client(lambda _request: answers.pop(0), sleeps).get("/status") == {"status": "ok"}
    assert sleeps == [5.0, 5.0]


def test_retries_are_bounded_and_the_last_answer_is_the_error() -> None:
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(503, headers={"Retry-After": "1"}, json={"detail": "the router is restarting; try again shortly"})

    with pytest.raises(ApiError) as raised:
        client(handler).get("/status")
    assert len(requests) == 1 + GET_RETRIES
    assert (raised.value.status_code, raised.value.retry_after_s) == (503, 1.0)
    assert raised.value.message == "the router is restarting; try again shortly"
    assert str(raised.value) == "GET /status failed with HTTP 503: the router is restarting; try again shortly"


@pytest.mark.parametrize(
    ("method", "status", "retry_after"),
    [
        ("POST", 503, "1"),  # not idempotent
        ("GET", 503, None),  # no word on when
        ("GET", 429, "1"),  # a full queue is for the caller to wait out
        ("GET", 503, format_datetime(datetime.now(timezone.utc) + timedelta(hours=1), usegmt=True)),  # too long
    ],
)
def test_what_is_not_retried(method: str, status: int, retry_after: str | None) -> None:
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(status, headers={"Retry-After": retry_after} if retry_after else {}, json={})

    with pytest.raises(ApiError) as raised:
        client(handler).post("/jobs") if method == "POST" else client(handler).get("/jobs")
    assert len(requests) == 1
    if retry_after and ":" in retry_after:  # an HTTP date, an hour from now
        assert 3500 < (raised.value.retry_after_s or 0) <= 3600


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (httpx.Response(422, json={"detail": [{"loc": ["body", "width"]}], "message": "width: bad"}), "width: bad"),
        (httpx.Response(404, json={"detail": "job 42 not found"}), "job 42 not found"),
        (httpx.Response(502, text="Bad Gateway"), "Bad Gateway"),
    ],
)  # fmt: skip
def test_errors_carry_the_servers_message(answer: httpx.Response, message: str) -> None:
    with pytest.raises(ApiError) as raised:
        client(lambda _request: answer).get("/jobs/42")
    assert (raised.value.status_code, raised.value.message) == (answer.status_code, message)
    assert str(raised.value) == f"GET /jobs/42 failed with HTTP {answer.status_code}: {message}"


def test_an_unreachable_api_is_one_error_without_a_status() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(ApiError, match=r"^SEIDRA is not reachable at http://seidra.test \(connection refused\)") as raised:
        client(handler).get("/health")
    assert raised.value.status_code is None


def test_wait_for_job_until_it_ends_or_the_timeout() -> None:
    statuses = ["pending", "running", "completed"]
    api = client(lambda _request: httpx.Response(200, json={"id": "j1", "status": statuses.pop(0)}))
    assert api.wait_for_job("j1", timeout_s=60)["status"] == "completed"

    pending = client(lambda _request: httpx.Response(200, json={"id": "j1", "status": "pending"}))
    with pytest.raises(TimeoutError, match="job j1 is still pending after 0 s"):
        pending.wait_for_job("j1", timeout_s=0)


# ----- `seidra up` waiting for the application -----


def worker(replica_id: str, usable: bool, reason: str = "") -> dict[str, Any]:
    mode, health = ("cpu", "healthy") if usable else ("offline", "unhealthy")
    return {"replica_id": replica_id, "mode": mode, "health": health, "reason": reason, "usable": usable}


def status_answers(*answers: httpx.Response) -> SeidraClient:
    """The API answering /status with `answers` in turn, then with the last one."""
    queue = list(answers)
    return client(lambda _request: queue.pop(0) if len(queue) > 1 else queue[0])


def router_says(*answers: dict[str, Any] | None) -> Callable[[], dict[str, Any] | None]:
    """The router's status in turn, then the last one again; None: it does not answer (yet)."""
    queue = list(answers)
    return lambda: queue.pop(0) if len(queue) > 1 else queue[0]


def status(*workers: dict[str, Any]) -> dict[str, Any]:
    return {"usable_slots": sum(w["usable"] for w in workers), "workers": list(workers)}


def serve_says(state: ServeAppState | None) -> Callable[[], ServeAppState | None]:
    return lambda: state


DEPLOYING = ServeAppState("DEPLOYING", "")
NOT_LOADED = "model not loaded: OSError: Error no file named model_index.json found in directory /m."


def test_a_usable_worker_ends_the_wait() -> None:
    restarting = None  # not ready yet, not a failure
    router = router_says(restarting, status(worker("r1", False, NOT_LOADED)), status(worker("r1", False), worker("r2", True)))
    wait_for_workers(router, serve_says(DEPLOYING), timeout_s=10, poll_s=0)


def test_workers_that_never_become_usable_are_named_with_their_reasons() -> None:
    router = router_says(status(worker("r1", False, NOT_LOADED), worker("r2", False, "")))
    with pytest.raises(ClusterError) as raised:
        wait_for_workers(router, serve_says(DEPLOYING), timeout_s=0.2, poll_s=0.01)
    assert str(raised.value) == (
        f"no worker replica became usable within 0 s: replica r1 offline/unhealthy: {NOT_LOADED}; "
        "replica r2 offline/unhealthy: no reason given"
    )


def test_no_worker_at_all_is_explained_with_what_serve_says() -> None:
    unscheduled = "DiffusionWorker: Deployment 'DiffusionWorker' has 1 replicas that have taken more than 30s to be scheduled."
    with pytest.raises(ClusterError) as raised:
        wait_for_workers(router_says(status()), serve_says(ServeAppState("DEPLOYING", unscheduled)), timeout_s=0.1, poll_s=0.01)
    assert str(raised.value).startswith("no worker replica reported within 0 s (not enough GPUs or CPUs")
    assert str(raised.value).endswith(f"; Serve says: {unscheduled}; see `serve status`")


def test_serve_giving_up_ends_the_wait_at_once() -> None:
    failed = serve_says(ServeAppState("DEPLOY_FAILED", "DiffusionWorker: RuntimeError: replica r1 is unhealthy"))
    serve_reason = (
        "Serve could not deploy the application (DEPLOY_FAILED): DiffusionWorker: RuntimeError: replica r1 is unhealthy"
    )
    with pytest.raises(ClusterError) as raised:
        wait_for_workers(router_says(status(worker("r1", False, NOT_LOADED))), failed, timeout_s=60, poll_s=0)
    assert str(raised.value) == f"no worker replica is usable: replica r1 offline/unhealthy: {NOT_LOADED} (Serve: DEPLOY_FAILED)"
    with pytest.raises(ClusterError) as raised:
        wait_for_workers(router_says(None), failed, timeout_s=60, poll_s=0)
    assert str(raised.value) == serve_reason
    with pytest.raises(ClusterError) as raised:
        wait_until_healthy(status_answers(httpx.Response(503)), failed, timeout_s=60, poll_s=0)
    assert str(raised.value) == serve_reason


def test_serves_reason_is_the_last_exception_of_its_traceback_on_one_line() -> None:
    message = (
        "The deployment failed to start 3 times in a row. This may be due to a problem with its constructor or "
        "initial health check failing. See controller logs for details. Error:\n"
        "Traceback (most recent call last):\n"
        '  File "/app/serve_app/app.py", line 113, in __init__\n'
        "    self._router = get_or_create_router(...)\n"
        "pydantic_core._pydantic_core.ValidationError: 1 validation error for RouterSettings\n"
        "max_realtime_queue\n"
        "  Input should be greater than or equal to 1 [type=greater_than_equal, input_value='0', input_type=str]\n"
    )
    app = {
        "status": "DEPLOY_FAILED",
        "message": "Failed to update the deployments ['SeidraAPI'].",
        "deployments": {
            "SeidraAPI": {"status": "DEPLOY_FAILED", "message": message},
            "DiffusionWorker": {"status": "UPDATING", "message": "A replica is starting"},
        },
    }
    state = ServeAppState.from_details(app)
    assert state.failed
    assert state.message == (
        "SeidraAPI: pydantic_core._pydantic_core.ValidationError: 1 validation error for RouterSettings "
        "max_realtime_queue Input should be greater than or equal to 1 "
        "[type=greater_than_equal, input_value='0', input_type=str]"
    )
    building = {"status": "DEPLOY_FAILED", "message": "Traceback ...\nImportError: cannot import name 'x'", "deployments": {}}
    assert ServeAppState.from_details(building).message == "ImportError: cannot import name 'x'"


def test_a_dead_process_not_yet_reaped_is_not_running() -> None:
    """A killed Ray head that nothing has reaped yet keeps its /proc entry: `seidra down` must not
    take it for a live head (it would try to reach its dead GCS)."""
    import subprocess
    import time

    child = subprocess.Popen(["sleep", "60"])
    assert process_started_ticks(child.pid) is not None
    child.kill()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":  # dead, unreaped
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert process_started_ticks(child.pid) is None
    child.wait()
    assert process_started_ticks(child.pid) is None


def test_status_while_the_database_is_down_says_so(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from serve_app import cli
    from serve_app.client import SeidraClient

    body = {
        "queues": {"realtime": 1, "batch": 0}, "paused_lanes": [], "held": {"realtime": 0, "batch": 0}, "deferred": 0,
        "running": 0, "usable_slots": 1, "outage": None, "workers": [], "recovering": True,
        "jobs": None, "database": "unreachable (OperationalError)",
    }  # fmt: skip
    transport = httpx.MockTransport(lambda _request: httpx.Response(200, json=body))
    monkeypatch.setattr(cli, "api_client", lambda _url: SeidraClient("http://seidra.test", transport=transport))
    assert cli.main(["status", "--url", "http://seidra.test"]) == 0
    out = capsys.readouterr().out
    assert "jobs:    unknown: the database is unreachable (OperationalError)" in out
    assert "RECOVERING: the router is rebuilding its queue" in out


def test_status_with_a_user_key_shows_queues_and_the_users_own_counts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from serve_app import cli
    from serve_app.client import SeidraClient

    body = {"queues": {"realtime": 3, "batch": 40}, "paused_lanes": [], "recovering": False, "jobs": {"completed": 2},
            "database": "ok"}  # fmt: skip
    transport = httpx.MockTransport(lambda _request: httpx.Response(200, json=body))
    monkeypatch.setattr(cli, "api_client", lambda _url: SeidraClient("http://seidra.test", transport=transport))
    assert cli.main(["status", "--url", "http://seidra.test"]) == 0
    out = capsys.readouterr().out
    assert "queues:  realtime 3, batch 40" in out and "jobs (yours):    completed 2" in out
    assert "running:" not in out and "held:" not in out
