"""Request bodies over `SEIDRA_MAX_BODY_BYTES` are refused with 413 before anything parses them.

A pure ASGI middleware: a declared `Content-Length` over the limit is refused before the body is
read; a chunked body (or one whose length is not declared) is cut off as soon as the bytes received
pass the limit, so no more than the limit is ever handed on, let alone decoded. A 30 MB body of ten
million empty batch items would otherwise become about 1 GB of Python objects before the schema's
`max_batch_items` refuses it.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

STATUS_TOO_LARGE = 413


class _BodyTooLarge(Exception):
    """Raised into the application by `receive` once the body passes the limit."""


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared_bytes = _content_length(scope)
        if declared_bytes is not None and declared_bytes > self.max_body_bytes:
            await self._refuse(send)
            return
        await self._guarded(scope, receive, send)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        received_bytes = 0
        exceeded = False
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received_bytes, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received_bytes += len(message.get("body", b""))
                if received_bytes > self.max_body_bytes:
                    exceeded = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            # Whatever the application makes of a body cut short (FastAPI answers 400 "error
            # parsing the body") is replaced by the 413 that says why.
            if exceeded and not response_started:
                return
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            # The application may let `_BodyTooLarge` through as it is or wrapped in its own error.
            if not exceeded or response_started:
                raise
        if exceeded and not response_started:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        detail = f"request body larger than {self.max_body_bytes} bytes (SEIDRA_MAX_BODY_BYTES)"
        body = json.dumps({"detail": detail}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            # The rest of the body is never read: the connection cannot carry another request.
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": STATUS_TOO_LARGE, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _content_length(scope: Scope) -> int | None:
    """The declared length, or None where there is none (chunked) or it is not a number."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None
