"""Webhooks, decided: what is POSTed when a job or a batch ends, how it is signed, which URLs it may
go to, when a failed attempt is tried again and when a delivery is given up or not sent at all.

Pure: no I/O and no clock of its own, so that each rule is tested event by event
(`scheduling/webhook_sender.py` is the machinery around it). Light: the API's request schemas check
URLs with it.

A delivery is signed Stripe's way: `SEIDRA-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of
"<t>.<body>" under the API key's webhook secret>`, so that a receiver can tell SEIDRA's requests from
anyone else's and refuse old ones replayed (docs/webhooks.md has a receiver).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from scheduling.hold import Backoff, utc
from scheduling.work import GenerationParams
from storage.delivery import BATCH_EVENT, MAX_URL_CHARS, DeliveryStatus, job_event

if TYPE_CHECKING:
    from storage.api_keys import KeyWebhook
    from storage.models import GenerationJob

SIGNATURE_HEADER = "SEIDRA-Signature"
DELIVERY_HEADER = "SEIDRA-Delivery"
EVENT_HEADER = "SEIDRA-Event"
SCHEMES = ("http", "https")
# A receiver's error as the delivery log keeps it: enough to tell a refused connection from a timeout.
MAX_ERROR_CHARS = 300
# Where an IPv6 address carries an IPv4 one in its last 32 bits that a receiver could reach through:
# NAT64's well-known and local-use prefixes, and the deprecated IPv4-compatible form (::a.b.c.d).
EMBEDDING_IPV4 = tuple(ipaddress.ip_network(net) for net in ("64:ff9b::/96", "64:ff9b:1::/48", "::/96"))
# The job's own delivery logs are not part of what is delivered: a delivery would describe itself.
LOG_KEYS = ("webhook", "batch_webhook")


def signature(secret: str, timestamp: int, body: str) -> str:
    """The `SEIDRA-Signature` header of `body` sent at `timestamp` (unix seconds)."""
    digest = hmac.new(secret.encode(), f"{timestamp}.{body}".encode(), hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


# ----- where a delivery may go -----


def check_url(url: str) -> str:
    """`url` if it may be a webhook: http or https, a host, no credentials; else ValueError saying why.

    Credentials are refused because the URL is shown in the job's metadata, and the signature is
    what tells a receiver the request is SEIDRA's.
    """
    if len(url) > MAX_URL_CHARS:
        raise ValueError(f"must be at most {MAX_URL_CHARS} characters")
    if any(char.isspace() or not char.isprintable() for char in url):
        raise ValueError("must not contain spaces or control characters")
    parts = urlsplit(url)
    if parts.scheme.lower() not in SCHEMES:
        raise ValueError("must be an http:// or https:// URL")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not carry credentials (user:password@): deliveries are signed instead")
    if not parts.hostname:
        raise ValueError("must name a host")
    try:
        parts.port  # noqa: B018  (urlsplit checks the port only when asked for it)
    except ValueError:
        raise ValueError("has an invalid port") from None
    return url


def refused_address(address: str) -> str | None:
    """Why a delivery must not go to `address` (an IP address), or None when it is public."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone (fe80::1%eth0) names no other host
    if isinstance(ip, ipaddress.IPv6Address) and not ip.is_loopback:  # ::1 is in ::/96, and itself
        low_32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if any(ip in net for net in EMBEDDING_IPV4) else None
        embedded = ip.ipv4_mapped or ip.sixtofour or low_32
        if embedded is not None:
            return refused_address(str(embedded))
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_private:
        return "a private address"
    if not ip.is_global or ip.is_multicast:
        return "not a public unicast address"
    return None


def check_addresses(host: str, addresses: Iterable[str], allow_private: bool) -> None:
    """ValueError when `host` resolves to nothing, or (unless `allow_private`) to any address that is
    not public: one private address among public ones is enough for a rebinding attack."""
    found = list(addresses)
    if not found:
        raise ValueError(f"host {host} does not resolve")
    if allow_private:
        return
    for address in found:
        reason = refused_address(address)
        if reason is not None:
            raise ValueError(f"host {host} resolves to {address}, {reason} (SEIDRA_WEBHOOK_ALLOW_PRIVATE is off)")


def job_webhook(job_url: str | None, key: KeyWebhook | None) -> tuple[str, bool] | None:
    """Where a job's delivery goes, and whether that is its key's default: the job's own URL, else the
    key's default; None when it has neither, or its key can sign nothing (gone or revoked)."""
    if key is None or key.revoked:
        return None
    if job_url is not None:
        return job_url, False
    return None if key.url is None else (key.url, True)


def cancelled_because(url: str, from_key_default: bool, key: KeyWebhook | None) -> str | None:
    """Why a pending delivery is no longer sent, or None when it still is: its key is gone or revoked,
    or it goes to its key's default webhook and the key's default is now another or none."""
    if key is None:
        return "its API key no longer exists"
    if key.revoked:
        return "its API key was revoked"
    if from_key_default and key.url != url:
        return "its API key's default webhook was removed" if key.url is None else "its API key's default webhook changed"
    return None


# ----- when to try again -----


@dataclass(frozen=True)
class RetryPolicy:
    """Failed attempts are tried again after `backoff`'s delays, at most `max_attempts` times in all
    and never later than `retry_for_s` after the delivery was due first."""

    backoff: Backoff
    max_attempts: int
    retry_for_s: float

    def next_attempt_s(
        self, attempts: int, first_due_s: float, now_s: float, rand: Callable[[], float] = random.random
    ) -> float | None:
        """When to try again after `attempts` failed attempts, or None: give up."""
        if attempts >= self.max_attempts:
            return None
        due_s = now_s + self.backoff.delay_s(attempts, rand)
        return due_s if due_s - first_due_s <= self.retry_for_s else None


@dataclass(frozen=True)
class Attempt:
    """One POST: the receiver's HTTP status, or why none came back."""

    at_s: float
    status_code: int | None = None
    error: str | None = None

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


@dataclass(frozen=True)
class Progress:
    """A delivery's columns after an attempt, or once it is not sent any more."""

    status: DeliveryStatus
    attempts: int
    last_status: int | None
    last_error: str | None
    last_attempt_at: datetime | None
    next_attempt_at: datetime | None
    ended_at: datetime | None

    def columns(self) -> dict[str, Any]:
        return {**asdict(self), "status": self.status.value}


def attempted(
    attempts: int, first_due_s: float, attempt: Attempt, policy: RetryPolicy, rand: Callable[[], float] = random.random
) -> Progress:
    """A pending delivery after one more attempt: delivered on 2xx; else pending again, or failed
    when the policy gives up (any other status counts as a failure: redirects are not followed)."""
    count = attempts + 1
    error = None if attempt.error is None else attempt.error[:MAX_ERROR_CHARS]
    at = utc(attempt.at_s)
    if attempt.delivered:
        return Progress(DeliveryStatus.DELIVERED, count, attempt.status_code, None, at, None, at)
    next_s = policy.next_attempt_s(count, first_due_s, attempt.at_s, rand)
    if next_s is None:
        return Progress(DeliveryStatus.FAILED, count, attempt.status_code, error, at, None, at)
    return Progress(DeliveryStatus.PENDING, count, attempt.status_code, error, at, utc(next_s), None)


def cancelled(attempts: int, last_status: int | None, last_attempt_at: datetime | None, reason: str, now_s: float) -> Progress:
    """A pending delivery not sent any more, its attempts so far on record."""
    return Progress(DeliveryStatus.CANCELLED, attempts, last_status, reason, last_attempt_at, None, utc(now_s))


# ----- what is delivered -----


def job_body(delivery_id: str, job: GenerationJob, now_s: float) -> str:
    """A job's delivery: the job as `GET /jobs/{id}` shows it, in an envelope naming the event."""
    return _body(delivery_id, job_event(job.status), now_s, job=job_document(job))


def batch_body(delivery_id: str, owner: str, batch_id: str, counts: Mapping[str, int], now_s: float) -> str:
    """A batch's delivery: its jobs counted by status, all ended."""
    jobs = {"total": sum(counts.values()), **{status: counts.get(status, 0) for status in ("completed", "failed", "cancelled")}}
    return _body(delivery_id, BATCH_EVENT, now_s, batch={"batch_id": batch_id, "owner": owner, "jobs": jobs})


def job_document(job: GenerationJob) -> dict[str, Any]:
    """The job's fields as the API shows them; its image as the API's path, which a key opens (a
    presigned URL would expire while a delivery is retried)."""
    fields = ("owner", "status", "lane", "priority", "batch_id", *GenerationParams.names(), "error", "attempts", "result_key")
    times = ("created_at", "updated_at", "started_at", "finished_at")
    completed = job.status == "completed" and job.result_key is not None and "archived" not in job.meta
    return {
        "id": str(job.id),
        **{name: getattr(job, name) for name in fields},
        "webhook_url": job.webhook_url,
        "metadata": {name: value for name, value in job.meta.items() if name not in LOG_KEYS},
        "image_url": f"/jobs/{job.id}/image" if completed else None,
        **{name: _iso(getattr(job, name)) for name in times},
    }


def _iso(moment: datetime | None) -> str | None:
    """In UTC, written as the API writes its timestamps (`...Z`)."""
    if moment is None:
        return None
    # SQLite hands back naive timestamps, written in UTC.
    in_utc = moment.astimezone(timezone.utc) if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
    return in_utc.isoformat().replace("+00:00", "Z")


def _body(delivery_id: str, event: str, now_s: float, **data: Any) -> str:
    # Compact and sorted: the text stored is the text signed and sent, byte for byte, at every attempt.
    envelope = {"id": delivery_id, "event": event, "created_at": _iso(utc(now_s)), **data}
    return json.dumps(envelope, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
