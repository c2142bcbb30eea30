"""CLI mistakes end in one line and a non-zero exit code, without a traceback; the API client."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path

import httpx
import pytest

from serve_app.cli import format_jobs_table, main
from serve_app.client import GET_RETRIES, ApiError, SeidraClient


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SEIDRA_HOME", str(tmp_path))
    monkeypatch.delenv("SEIDRA_API_URL", raising=False)
    monkeypatch.delenv("SEIDRA_DEBUG", raising=False)
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
