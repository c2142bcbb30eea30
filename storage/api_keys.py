"""API keys: made, checked and revoked here; stored as a hash in the `api_keys` table.

A key's text is `seidra_<key_id>_<secret>`: `key_id` (12 lowercase hex characters) is the public
look-up prefix, the primary key of its row; `secret` is 32 random bytes, URL-safe base64. Only the
sha256 of the whole text is stored, so the table cannot be used to sign in; a key is shown once, by
`create`, and never logged.

Each key also has a webhook secret (`whsec_` and 32 random bytes, URL-safe base64), which signs the
webhook deliveries of the jobs it submits, and may have a default webhook URL for them. The secret
is stored as it is, since the router signs with it: it is shown once, by `rotate_webhook_secret`,
read by the router alone, and never logged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import math
import re
import secrets
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlmodel import col, select

from storage.database import Store
from storage.jobs import as_utc
from storage.models import ApiKey, utcnow

# The one user while authentication is off (loopback only); no key may be made for it.
LOCAL_USER = "local"
USER_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
KEY_PREFIX = "seidra_"
KEY_ID_BYTES = 6  # 12 hex characters: 48 bits, enough to look a key up, never to guess one
SECRET_BYTES = 32  # 256 bits
# token_urlsafe: base64 without padding.
_SECRET_CHARS = math.ceil(SECRET_BYTES * 4 / 3)
_KEY_PATTERN = re.compile(rf"{KEY_PREFIX}([0-9a-f]{{{2 * KEY_ID_BYTES}}})_[A-Za-z0-9_-]{{{_SECRET_CHARS}}}")
# A new key id that is taken already is drawn again; 48 bits make a second clash all but impossible.
KEY_ID_DRAWS = 3
WEBHOOK_SECRET_PREFIX = "whsec_"


@dataclass(frozen=True)
class KeyLimits:
    """Per-key quota overrides; None: the service's per-user setting applies."""

    max_waiting_realtime: int | None = None
    max_waiting_batch: int | None = None
    submissions_per_minute: int | None = None

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            # bool is an int: True would pass as a limit of 1.
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{field.name} must be a whole number >= 1, not {value!r}")


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: `key_id` is None when authentication is off."""

    user: str
    admin: bool
    key_id: str | None
    limits: KeyLimits


@dataclass(frozen=True)
class CreatedKey:
    key: str  # the key's text: shown once, never stored
    record: ApiKey


@dataclass(frozen=True)
class KeyWebhook:
    """What the router needs of a key to deliver its jobs' webhooks."""

    key_id: str
    url: str | None  # the key's default webhook URL
    secret: str = dataclasses.field(repr=False)  # never in a log line
    revoked: bool


class KeyNotFound(LookupError):
    def __init__(self, key_id: str) -> None:
        super().__init__(f"API key {key_id!r} does not exist")
        self.key_id = key_id


def new_webhook_secret() -> str:
    return WEBHOOK_SECRET_PREFIX + secrets.token_urlsafe(SECRET_BYTES)


def key_hash(key_text: str) -> str:
    return hashlib.sha256(key_text.encode()).hexdigest()


def check_user(user: str) -> str:
    if not USER_PATTERN.fullmatch(user):
        raise ValueError(
            f"user {user!r} is not a user name: 1 to 64 letters, digits or _.@- characters, starting with a letter or digit"
        )
    if user == LOCAL_USER:
        raise ValueError(f"user {user!r} is reserved: it owns the jobs submitted while authentication was off")
    return user


def _expiry(created_at: datetime, expires_in_days: float | None) -> datetime | None:
    if expires_in_days is None:
        return None
    if not (math.isfinite(expires_in_days) and expires_in_days > 0):
        raise ValueError(f"expires_in_days must be a number of days > 0, not {expires_in_days!r}")
    return created_at + timedelta(days=expires_in_days)


def _limits(key: ApiKey) -> KeyLimits:
    return KeyLimits(key.max_waiting_realtime, key.max_waiting_batch, key.submissions_per_minute)


def _usable(key: ApiKey, now: datetime) -> bool:
    return key.revoked_at is None and (key.expires_at is None or as_utc(key.expires_at) > now)


class ApiKeyStore(Store):
    def create(
        self,
        user: str,
        *,
        admin: bool = False,
        expires_in_days: float | None = None,
        limits: KeyLimits = KeyLimits(),
        webhook_url: str | None = None,
        now: datetime | None = None,
    ) -> CreatedKey:
        """A new key for `user`: its text (to hand over once) and its stored record. It gets a webhook
        secret of its own, shown nowhere (`rotate_webhook_secret` makes one to hand over), and
        `webhook_url` as its default webhook (the caller has checked it)."""
        created_at = as_utc(now or utcnow())
        columns = {
            "user": check_user(user),
            "admin": admin,
            "created_at": created_at,
            "expires_at": _expiry(created_at, expires_in_days),
            "max_waiting_realtime": limits.max_waiting_realtime,
            "max_waiting_batch": limits.max_waiting_batch,
            "submissions_per_minute": limits.submissions_per_minute,
            "webhook_url": webhook_url,
            "webhook_url_since": created_at,
        }
        for _ in range(KEY_ID_DRAWS - 1):
            with contextlib.suppress(sa.exc.IntegrityError):  # the key id drawn is taken
                return self._insert_new_key(columns)
        return self._insert_new_key(columns)

    def _insert_new_key(self, columns: dict[str, Any]) -> CreatedKey:
        key_id = secrets.token_hex(KEY_ID_BYTES)
        key_text = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(SECRET_BYTES)}"
        record = ApiKey(key_id=key_id, secret_hash=key_hash(key_text), webhook_secret=new_webhook_secret(), **columns)
        with self._write_session() as session:
            session.add(record)
            session.commit()
        return CreatedKey(key_text, record)

    def authenticate(self, key_text: str, now: datetime | None = None) -> Principal | None:
        """The key's principal, or None if it is malformed, unknown, wrong, revoked or expired.

        One primary-key read; the secret's hash is compared in constant time.
        """
        parsed = _KEY_PATTERN.fullmatch(key_text)
        if parsed is None:
            return None
        with self._session() as session:
            key = session.get(ApiKey, parsed.group(1))
        if key is None or not hmac.compare_digest(key.secret_hash, key_hash(key_text)):
            return None
        if not _usable(key, as_utc(now or utcnow())):
            return None
        return Principal(user=key.user, admin=key.admin, key_id=key.key_id, limits=_limits(key))

    def list(self) -> list[ApiKey]:
        """Every key, revoked and expired ones included, oldest first."""
        query = select(ApiKey).order_by(col(ApiKey.created_at), col(ApiKey.key_id))
        with self._session() as session:
            return list(session.exec(query))

    def revoke(self, key_id: str, now: datetime | None = None) -> ApiKey:
        """Revoke a key from `now` on; a key revoked already keeps its first revocation time."""
        with self._write_session() as session:
            key = session.exec(select(ApiKey).where(ApiKey.key_id == key_id).with_for_update()).first()
            if key is None:
                raise KeyNotFound(key_id)
            if key.revoked_at is None:
                key.revoked_at = as_utc(now or utcnow())
                session.add(key)
                session.commit()
            return key

    def rotate_webhook_secret(self, key_id: str) -> str:
        """A new webhook secret for the key, returned to be shown once: deliveries are signed with it
        from the next attempt on, and the old one stops at once."""
        secret = new_webhook_secret()
        self._edit(key_id, webhook_secret=secret)
        return secret

    def set_webhook(self, key_id: str, url: str | None) -> ApiKey:
        """The key's default webhook URL (the caller has checked it); None removes it. Deliveries of
        the old default that are still pending are not sent (`scheduling.webhooks.cancelled_because`)."""
        return self._edit(key_id, webhook_url=url, webhook_url_since=utcnow())

    def webhook(self, key_id: str) -> KeyWebhook | None:
        """The key's webhook URL and secret, for the router; None for a key that no longer exists."""
        with self._session() as session:
            key = session.get(ApiKey, key_id)
        if key is None or key.webhook_secret is None:
            return None
        return KeyWebhook(key.key_id, key.webhook_url, key.webhook_secret, key.revoked_at is not None)

    def _edit(self, key_id: str, **changes: Any) -> ApiKey:
        with self._write_session() as session:
            key = session.exec(select(ApiKey).where(ApiKey.key_id == key_id).with_for_update()).first()
            if key is None:
                raise KeyNotFound(key_id)
            for name, value in changes.items():
                setattr(key, name, value)
            session.add(key)
            session.commit()
            return key
