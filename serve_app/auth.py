"""Who is calling: `Authorization: Bearer <API key>` checked against the database, or nobody to check.

With `SEIDRA_AUTH=off` (loopback only, `build_app` and `seidra up` refuse it otherwise) every
request comes from one local user who is an admin and has no per-user quota.

A key's check is one primary-key read; its answer is kept for `cache_s`, so a busy client costs the
database one read every few seconds and a revoked key stops working within that time. While the
database is unreachable, an answer up to `outage_grace_s` old still stands: operators keep their
`/status` through an outage (a revocation then waits for the database). The check is
an ASGI middleware: FastAPI reads and decodes a body before it resolves a route's dependencies, and
a caller without a key must cost no more than its headers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Annotated, Literal

from fastapi import Depends, HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from storage.api_keys import LOCAL_USER, ApiKeyStore, KeyLimits, Principal, key_hash
from storage.database import DATABASE_OUTAGES

LOCAL_PRINCIPAL = Principal(user=LOCAL_USER, admin=True, key_id=None, limits=KeyLimits())
AUTH_CACHE_S = 2.0
OUTAGE_GRACE_S = 300.0
# Answers for this many different keys at most; a client spraying random keys cannot grow it further.
MAX_CACHED_KEYS = 10_000

# Documents the scheme in OpenAPI; its own refusal (403, no WWW-Authenticate) is replaced by ours.
bearer_scheme = HTTPBearer(auto_error=False, description="An API key made with `seidra keys create`.")


class Authenticator:
    def __init__(
        self,
        mode: Literal["keys", "off"],
        keys: ApiKeyStore,
        cache_s: float = AUTH_CACHE_S,
        outage_grace_s: float = OUTAGE_GRACE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._mode = mode
        self._keys = keys
        self._cache_s = cache_s
        self._outage_grace_s = outage_grace_s
        self._clock = clock
        self._answers: dict[str, tuple[Principal | None, float]] = {}  # key hash -> (answer, checked at)

    async def principal(self, credentials: HTTPAuthorizationCredentials | None) -> Principal:
        """The caller, or 401 for a missing, malformed, unknown, revoked or expired key."""
        if self._mode == "off":
            return LOCAL_PRINCIPAL
        if credentials is None:
            raise unauthorized("missing API key: send `Authorization: Bearer <key>`")
        principal = await self._check(credentials.credentials)
        if principal is None:
            raise unauthorized("the API key is not valid (unknown, revoked or expired)")
        return principal

    async def _check(self, key: str) -> Principal | None:
        # Keyed by the key's hash: the cache holds no key a memory dump could reuse.
        digest, now = key_hash(key), self._clock()
        cached = self._answers.get(digest)
        if cached is not None and now - cached[1] < self._cache_s:
            return cached[0]
        try:
            principal = await asyncio.to_thread(self._keys.authenticate, key)
        except DATABASE_OUTAGES:
            if cached is not None and now - cached[1] < self._outage_grace_s:
                return cached[0]
            raise
        if len(self._answers) >= MAX_CACHED_KEYS:
            self._answers.clear()
        self._answers[digest] = (principal, now)
        return principal


def unauthorized(reason: str) -> HTTPException:
    return HTTPException(401, reason, headers={"WWW-Authenticate": "Bearer"})


class AuthMiddleware:
    """Finds the principal of every request but those to `public_paths`, before the body is read.

    The replica puts its Authenticator on the app (`app.state.authenticator`); the principal goes to
    the request's state, where `caller` finds it. A database outage during the check is answered by
    `on_outage` (the app's own exception handlers run further in).
    """

    def __init__(
        self,
        app: ASGIApp,
        public_paths: frozenset[str],
        outages: tuple[type[Exception], ...],
        on_outage: Callable[[Exception], Response],
    ) -> None:
        self._app = app
        self._public_paths = public_paths
        self._outages = outages
        self._on_outage = on_outage

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self._public_paths:
            await self._app(scope, receive, send)
            return
        authenticator: Authenticator = scope["app"].state.authenticator
        try:
            principal = await authenticator.principal(_credentials(scope))
        except HTTPException as refused:
            await JSONResponse({"detail": refused.detail}, refused.status_code, refused.headers)(scope, receive, send)
            return
        except self._outages as outage:
            await self._on_outage(outage)(scope, receive, send)
            return
        scope.setdefault("state", {})["principal"] = principal
        await self._app(scope, receive, send)


def _credentials(scope: Scope) -> HTTPAuthorizationCredentials | None:
    """The Bearer credentials of the request's headers, as FastAPI's HTTPBearer reads them."""
    headers = dict(scope["headers"])
    scheme, credentials = get_authorization_scheme_param(headers.get(b"authorization", b"").decode("latin-1"))
    if scheme.lower() != "bearer" or not credentials:
        return None
    return HTTPAuthorizationCredentials(scheme=scheme, credentials=credentials)


async def caller(
    request: Request, _documented: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]
) -> Principal:
    """FastAPI dependency: the request's principal, found by AuthMiddleware (the Bearer scheme is a
    dependency only so that OpenAPI documents it)."""
    principal: Principal | None = getattr(request.state, "principal", None)
    if principal is None:  # a public path's route asking for a caller: a bug, refused all the same
        raise unauthorized("missing API key: send `Authorization: Bearer <key>`")
    return principal


async def admin(principal: Annotated[Principal, Depends(caller)]) -> Principal:
    """FastAPI dependency: the principal, when an admin; 403 for a user."""
    if not principal.admin:
        raise HTTPException(403, "this route needs an admin key")
    return principal


def owner_scope(principal: Principal, owner: str | None = None) -> str | None:
    """Whose rows a request may see: an admin's, everyone's (or `owner`'s); a user's, their own."""
    if principal.admin:
        return owner
    if owner not in (None, principal.user):
        raise HTTPException(403, "owner: only admins see other users' work")
    return principal.user
