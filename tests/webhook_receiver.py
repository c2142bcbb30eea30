"""A webhook receiver for the tests: a threaded HTTP server on 127.0.0.1, started and stopped by the test.

It answers each POST with the next status of a script (the last one ever after) and keeps what it
received; `verify` checks a signature as docs/webhooks.md tells receivers to.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

SIGNATURE_TOLERANCE_S = 300


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes
    at: float

    @property
    def document(self) -> dict[str, Any]:
        return json.loads(self.body)  # type: ignore[no-any-return]


def verify(secret: str, header: str, body: bytes, now: float | None = None) -> bool:
    """docs/webhooks.md's recipe: HMAC-SHA256 of `<t>.<raw body>`, compared in constant time, and a
    timestamp no more than 5 minutes away."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    timestamp = int(fields.get("t", "0"))
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    fresh = abs((time.time() if now is None else now) - timestamp) <= SIGNATURE_TOLERANCE_S
    return fresh and hmac.compare_digest(expected, fields.get("v1", ""))


class Receiver:
    def __init__(self, statuses: Sequence[int] = (200,), delay_s: float = 0.0) -> None:
        self._statuses = list(statuses)
        self._delay_s = delay_s
        self._received: list[Received] = []
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def received(self) -> list[Received]:
        with self._lock:
            return list(self._received)

    def wait_for(self, count: int, timeout_s: float = 60, path: str | None = None) -> list[Received]:
        """The first `count` requests (to `path`, if given), once they arrived."""
        deadline = time.monotonic() + timeout_s
        with self._arrived:
            while len(matching := [r for r in self._received if path in (None, r.path)]) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{len(matching)} of {count} webhook requests arrived within {timeout_s} s")
                self._arrived.wait(left)
            return matching[:count]

    def _answer(self, request: Received) -> int:
        with self._arrived:
            status = self._statuses[min(len(self._received), len(self._statuses) - 1)]
            self._received.append(request)
            self._arrived.notify_all()
        return status

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                headers = {name.lower(): value for name, value in self.headers.items()}
                status = receiver._answer(Received(self.path, headers, body, time.time()))
                time.sleep(receiver._delay_s)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_args: Any) -> None:  # quiet
                pass

        return Handler

    @contextmanager
    def running(self) -> Iterator[Receiver]:
        self._thread.start()
        try:
            yield self
        finally:
            self._server.shutdown()
            self._server.server_close()


@contextmanager
def receiver(statuses: Sequence[int] = (200,), delay_s: float = 0.0) -> Iterator[Receiver]:
    with Receiver(statuses, delay_s).running() as running:
        yield running


def closed_port_url() -> str:
    """A URL nothing listens at: a receiver that is down."""
    with ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler) as server:
        port = server.server_address[1]
    return f"http://127.0.0.1:{port}/down"
