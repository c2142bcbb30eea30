"""Who is calling (serve_app/auth.py): keys checked against a real (SQLite) key table, a fake clock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fastapi import HTTPException
from fastapi.security import HTTPAuthorizationCredentials

from serve_app.auth import LOCAL_PRINCIPAL, Authenticator, owner_scope
from storage.api_keys import ApiKeyStore, KeyLimits, Principal
from storage.database import upgrade
from tests.unit.scheduler_harness import Clock


@pytest.fixture
def keys(tmp_path: Path) -> ApiKeyStore:
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    upgrade(url)
    return ApiKeyStore(url)


def bearer(key: str) -> HTTPAuthorizationCredentials:
    return HTTPAuthorizationCredentials(scheme="Bearer", credentials=key)


def principal_of(authenticator: Authenticator, credentials: HTTPAuthorizationCredentials | None) -> Principal:
    return asyncio.run(authenticator.principal(credentials))


def refusal(authenticator: Authenticator, credentials: HTTPAuthorizationCredentials | None) -> HTTPException:
    with pytest.raises(HTTPException) as refused:
        principal_of(authenticator, credentials)
    return refused.value


def test_a_valid_key_is_its_user_with_its_scope_and_limits(keys: ApiKeyStore) -> None:
    made = keys.create("ann", limits=KeyLimits(submissions_per_minute=7))
    found = principal_of(Authenticator("keys", keys), bearer(made.key))
    assert (found.user, found.admin, found.key_id, found.limits.submissions_per_minute) == ("ann", False, made.record.key_id, 7)


@pytest.mark.parametrize("credentials", [None, bearer("not-a-key"), bearer("seidra_0123456789ab_" + "x" * 43)])
def test_missing_malformed_or_unknown_keys_get_401_with_the_bearer_challenge(
    keys: ApiKeyStore, credentials: HTTPAuthorizationCredentials | None
) -> None:
    refused = refusal(Authenticator("keys", keys), credentials)
    assert refused.status_code == 401
    assert refused.headers == {"WWW-Authenticate": "Bearer"}


def test_a_revoked_key_works_until_its_cached_answer_expires_then_never(keys: ApiKeyStore) -> None:
    clock = Clock()
    authenticator = Authenticator("keys", keys, cache_s=2.0, clock=clock)
    made = keys.create("ann")
    assert principal_of(authenticator, bearer(made.key)).user == "ann"
    keys.revoke(made.record.key_id)
    clock.advance(1.9)
    assert principal_of(authenticator, bearer(made.key)).user == "ann"  # the cached answer
    clock.advance(0.2)
    assert refusal(authenticator, bearer(made.key)).status_code == 401


def test_with_auth_off_everyone_is_the_local_admin_without_a_quota(keys: ApiKeyStore) -> None:
    assert principal_of(Authenticator("off", keys), None) == LOCAL_PRINCIPAL
    assert LOCAL_PRINCIPAL.admin and LOCAL_PRINCIPAL.key_id is None


def test_users_are_scoped_to_their_own_rows_admins_to_any() -> None:
    ann = Principal("ann", False, "k1", KeyLimits())
    root = Principal("root", True, "k2", KeyLimits())
    assert owner_scope(ann) == "ann" and owner_scope(ann, "ann") == "ann"
    with pytest.raises(HTTPException) as refused:
        owner_scope(ann, "bob")
    assert refused.value.status_code == 403
    assert owner_scope(root) is None and owner_scope(root, "bob") == "bob"


def test_the_key_is_checked_before_the_body_is_read(keys: ApiKeyStore) -> None:
    """FastAPI decodes a body before a route's dependencies run: the middleware answers first."""
    import httpx

    from serve_app.app import api

    api.state.authenticator = Authenticator("keys", keys)
    body_reads = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal body_reads
        body_reads += 1
        yield b'{"prompt": not json'

    async def call() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://seidra") as client:
            return [
                await client.post("/generation/single", content=body()),
                await client.get("/openapi.json"),
            ]

    refused, schema = asyncio.run(call())
    assert (refused.status_code, refused.headers["www-authenticate"], body_reads) == (401, "Bearer", 0)
    assert schema.status_code == 401


def test_during_a_database_outage_a_recently_checked_key_still_works(
    keys: ApiKeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlalchemy.exc

    clock = Clock()
    authenticator = Authenticator("keys", keys, cache_s=2.0, outage_grace_s=300.0, clock=clock)
    known, unseen = keys.create("ann").key, keys.create("bob").key
    assert principal_of(authenticator, bearer(known)).user == "ann"

    def unreachable(_key: str) -> Principal | None:
        raise sqlalchemy.exc.OperationalError("SELECT", {}, ConnectionRefusedError())

    monkeypatch.setattr(keys, "authenticate", unreachable)
    clock.advance(299)
    assert principal_of(authenticator, bearer(known)).user == "ann"
    with pytest.raises(sqlalchemy.exc.OperationalError):  # never checked: the API answers 503
        principal_of(authenticator, bearer(unseen))
    clock.advance(2)
    with pytest.raises(sqlalchemy.exc.OperationalError):  # checked too long ago
        principal_of(authenticator, bearer(known))
