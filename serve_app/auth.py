"""Who is calling: `Authorization: Bearer <API key>` checked against the database, or nobody to check.

With `SEIDRA_AUTH=off` (loopback only, `build_app` and `seidra up` refuse it otherwise) every
request comes from one local user who is an admin and has no per-user quota.

A key's check is one primary-key read; its answer is kept for `cache_s`, so a busy client costs the
database one read every few seconds and a revoked key stops working within that time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Annotated, Literal

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from storage.api_keys import ApiKeyStore, KeyLimits, Principal, key_hash

LOCAL_USER = "local"
LOCAL_PRINCIPAL = Principal(user=LOCAL_USER, admin=True, key_id=None, limits=KeyLimits())
AUTH_CACHE_S = 2.0
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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._mode = mode
        self._keys = keys
        self._cache_s = cache_s
        self._clock = clock
        self._answers: dict[str, tuple[Principal | None, float]] = {}

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
        if cached is not None and cached[1] > now:
            return cached[0]
        principal = await asyncio.to_thread(self._keys.authenticate, key)
        if len(self._answers) >= MAX_CACHED_KEYS:
            self._answers.clear()
        self._answers[digest] = (principal, now + self._cache_s)
        return principal


def unauthorized(reason: str) -> HTTPException:
    return HTTPException(401, reason, headers={"WWW-Authenticate": "Bearer"})


async def caller(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]
) -> Principal:
    """FastAPI dependency: the request's principal (the replica put its Authenticator on the app)."""
    authenticator: Authenticator = request.app.state.authenticator
    return await authenticator.principal(credentials)


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
