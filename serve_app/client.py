"""A small typed client for SEIDRA's HTTP API, used by the `seidra` CLI, `make demo` and `make drill`.

Errors, HTTP or network, become one `ApiError` whose text is one line for the operator; it keeps the
status code and `Retry-After` for callers that want to act on them. With an API key, every request
carries `Authorization: Bearer <key>`; the key is never part of an error's text.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx

from storage.job_status import JobStatus

DEFAULT_URL = "http://127.0.0.1:8000"
# A 503 with Retry-After (the router restarting) is retried this many times on GETs; longer waits
# than RETRY_AFTER_CAP_S are the caller's to decide on.
GET_RETRIES = 3
RETRY_AFTER_CAP_S = 30.0
# What to do about a refused key, after the server's own message.
# An event stream sends a comment at least every few seconds (serve_app/events.py): silence this long
# means the connection is dead, and the client reconnects with the last event's id.
STREAM_READ_TIMEOUT_S = 30.0
RECONNECT_DELAY_S = 1.0
FINAL_EVENTS = frozenset(status.value for status in JobStatus if status.is_terminal)
AUTH_HINTS = {
    401: "set SEIDRA_API_KEY (or SEIDRA_API_KEY_FILE) to a valid API key; an admin makes one with `seidra keys create`",
    403: "this needs an admin API key: set SEIDRA_API_KEY (or SEIDRA_API_KEY_FILE) to one",
}


class KeyFileError(ValueError):
    """An API key that cannot be read: one line for the operator."""


def read_key_file(path: Path, what: str) -> str:
    """The key a file holds, surrounding whitespace stripped; `what` names the setting in errors."""
    try:
        key = path.read_text(encoding="utf-8").strip()
    except OSError as error:
        raise KeyFileError(f"{what}: cannot read {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise KeyFileError(f"{what}: {path} is not a text file") from None
    if not key:
        raise KeyFileError(f"{what}: {path} is empty")
    return key


def api_key_from_environment() -> str | None:
    """The key in SEIDRA_API_KEY, or in the file SEIDRA_API_KEY_FILE names; None without either."""
    key, key_file = os.environ.get("SEIDRA_API_KEY"), os.environ.get("SEIDRA_API_KEY_FILE")
    if key and key_file:
        raise KeyFileError("SEIDRA_API_KEY and SEIDRA_API_KEY_FILE are both set: set one of them")
    return read_key_file(Path(key_file), "SEIDRA_API_KEY_FILE") if key_file else (key or None)


class ApiError(Exception):
    """A request that failed: `status_code` is None when SEIDRA could not be reached at all; `body`:
    the answer's JSON, if it was any."""

    def __init__(
        self, text: str, status_code: int | None = None, message: str = "", retry_after_s: float | None = None, body: Any = None
    ) -> None:
        super().__init__(text)
        self.status_code = status_code
        self.message = message or text
        self.retry_after_s = retry_after_s
        self.body = body


@dataclass(frozen=True)
class ServerEvent:
    """One server-sent event: its name, its data (JSON, decoded) and its id."""

    name: str
    data: Any
    id: str | None


def parse_events(lines: Iterable[str]) -> Iterator[ServerEvent]:
    """Server-sent events from the stream's lines (the WHATWG rules SEIDRA's streams need: comments
    and `retry:` skipped, `data:` lines joined, a blank line ends an event)."""
    name, data, event_id = "message", [], None
    for line in lines:
        if not line:
            if data:
                yield ServerEvent(name, json.loads("\n".join(data)), event_id)
            name, data = "message", []
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            name = value
        elif field == "data":
            data.append(value)
        elif field == "id":
            event_id = value


class SeidraClient:
    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        timeout_s: float = 30.0,
        get_retries: int = GET_RETRIES,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        api_key: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._get_retries = get_retries
        self._sleep = sleep
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout_s, transport=transport, headers=headers)

    def __enter__(self) -> SeidraClient:
        return self

    def __exit__(self, *_exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def get(self, path: str, *, params: dict[str, Any] | None = None) -> Any:
        return self._send("GET", path, params=params).json()

    def get_bytes(self, path: str) -> bytes:
        return self._send("GET", path).content

    def post(
        self, path: str, *, json: Any = None, params: dict[str, Any] | None = None, headers: dict[str, str] | None = None
    ) -> Any:
        return self._send("POST", path, json=json, params=params, headers=headers).json()

    def delete(self, path: str, *, params: dict[str, Any] | None = None) -> Any:
        return self._send("DELETE", path, params=params).json()

    def wait_for_job(self, job_id: str, timeout_s: float, poll_s: float = 0.5) -> dict[str, Any]:
        """The job once it reached a terminal status; TimeoutError when it has not within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            job: dict[str, Any] = self.get(f"/jobs/{job_id}")
            if JobStatus(job["status"]).is_terminal:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {job['status']} after {timeout_s:.0f} s")
            self._sleep(poll_s)

    def follow_job(self, job_id: str, timeout_s: float) -> Iterator[ServerEvent]:
        """The job's events (`GET /jobs/{id}/events`) up to and including its final one, whose data
        is the job. A dropped connection, or a 503, is resumed with `Last-Event-ID`: nothing comes
        twice. TimeoutError when the job has not ended within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        late = f"job {job_id} has not ended after {timeout_s:.0f} s"
        last_id: str | None = None
        while True:
            try:
                for event in self._event_stream(job_id, last_id, deadline, late):
                    last_id = event.id or last_id
                    yield event
                    if event.name in FINAL_EVENTS:
                        return
            except httpx.TransportError:
                pass  # the API replica restarted, a proxy dropped the connection: resume
            except ApiError as error:
                if error.status_code != 503:
                    raise
            if time.monotonic() > deadline:
                raise TimeoutError(late)
            self._sleep(RECONNECT_DELAY_S)

    def _event_stream(self, job_id: str, last_id: str | None, deadline: float, late: str) -> Iterator[ServerEvent]:
        path = f"/jobs/{job_id}/events"
        headers = {"Last-Event-ID": last_id} if last_id else {}
        timeout = httpx.Timeout(self._http.timeout.connect, read=STREAM_READ_TIMEOUT_S)
        with self._http.stream("GET", path, headers=headers, timeout=timeout) as response:
            if response.status_code >= 400:
                response.read()
                raise _api_error("GET", path, response)
            yield from parse_events(_until(response.iter_lines(), deadline, late))

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        retries_left = self._get_retries if method == "GET" else 0
        while True:
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.HTTPError as error:
                raise ApiError(f"SEIDRA is not reachable at {self.base_url} ({error}); start it with `seidra up`") from None
            if response.status_code < 400:
                return response
            failure = _api_error(method, path, response)
            wait_s = failure.retry_after_s
            if response.status_code != 503 or wait_s is None or wait_s > RETRY_AFTER_CAP_S or retries_left == 0:
                raise failure
            retries_left -= 1
            self._sleep(wait_s)


def _until(lines: Iterator[str], deadline: float, late: str) -> Iterator[str]:
    """The lines of a stream until `deadline`: keep-alive comments come often enough to notice it."""
    for line in lines:
        if time.monotonic() > deadline:
            raise TimeoutError(late)
        yield line


def _api_error(method: str, path: str, response: httpx.Response) -> ApiError:
    try:
        body = response.json()
    except ValueError:
        body = None
    message = _server_message(response, body)
    hint = f"; {AUTH_HINTS[response.status_code]}" if response.status_code in AUTH_HINTS else ""
    return ApiError(
        f"{method} {path} failed with HTTP {response.status_code}: {message}{hint}",
        status_code=response.status_code,
        message=message,
        retry_after_s=_retry_after_s(response.headers.get("retry-after")),
        body=body,
    )


def _server_message(response: httpx.Response, body: Any) -> str:
    """Our API's one-line `message`, else FastAPI's `detail`, else the start of the body."""
    if body is None:
        return response.text[:300]
    if not isinstance(body, dict):
        return str(body)[:300]
    return str(body.get("message") or body.get("detail") or body)


def _retry_after_s(value: str | None) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP date (RFC 9110)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # "-0000": a date in UTC whose sender did not say so
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())
