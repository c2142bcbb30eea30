"""Webhooks, decided (`scheduling/webhooks.py`): signatures, URLs and addresses, the retry schedule,
a delivery's life attempt by attempt on a fake clock, and what is delivered."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import uuid
from datetime import datetime, timezone

import pytest
from fastapi.exceptions import RequestValidationError

from scheduling.hold import Backoff
from scheduling.webhooks import (
    Attempt,
    RetryPolicy,
    attempted,
    batch_body,
    cancelled,
    cancelled_because,
    check_addresses,
    check_url,
    job_body,
    job_webhook,
    refused_address,
    signature,
)
from serve_app.auth import LOCAL_PRINCIPAL
from serve_app.webhooks import check_webhook
from storage.api_keys import KeyLimits, KeyWebhook, Principal
from storage.delivery import DeliveryStatus
from storage.models import GenerationJob

SECRET = "whsec_test-secret"
NO_JITTER = Backoff(base_s=5, cap_s=60, jitter=0.0)
POLICY = RetryPolicy(NO_JITTER, max_attempts=4, retry_for_s=3600)
T0 = 1_800_000_000.0


def at(seconds: float) -> datetime:
    return datetime.fromtimestamp(T0 + seconds, timezone.utc)


# ----- signatures -----


def test_the_signature_is_an_hmac_sha256_of_the_timestamp_and_the_body() -> None:
    body = '{"event":"job.completed"}'
    expected = hmac.new(SECRET.encode(), f"1700000000.{body}".encode(), hashlib.sha256).hexdigest()
    assert signature(SECRET, 1_700_000_000, body) == f"t=1700000000,v1={expected}"


def test_the_signature_changes_with_the_secret_the_time_and_every_byte_of_the_body() -> None:
    reference = signature(SECRET, 1, "{}")
    assert signature("whsec_other", 1, "{}") != reference
    assert signature(SECRET, 2, "{}") != reference
    assert signature(SECRET, 1, "{ }") != reference


def test_a_body_outside_ascii_is_signed_as_its_utf8_bytes() -> None:
    body = '{"prompt":"phare à l\'aube"}'
    expected = hmac.new(SECRET.encode(), b"5." + body.encode("utf-8"), hashlib.sha256).hexdigest()
    assert signature(SECRET, 5, body).endswith(expected)


# ----- URLs and addresses -----


@pytest.mark.parametrize(
    "url", ["https://hooks.example.com/seidra", "http://example.com:8080/a?b=c", "HTTPS://EXAMPLE.COM", "http://127.0.0.1:9/x"]
)
def test_http_and_https_urls_with_a_host_are_webhooks(url: str) -> None:
    assert check_url(url) == url


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://example.com/x", "http:// or https://"),
        ("file:///etc/passwd", "http:// or https://"),
        ("example.com/hook", "http:// or https://"),
        ("https://user:pass@example.com/", "credentials"),
        ("https://token@example.com/", "credentials"),
        ("https:///path-only", "host"),
        ("https://example.com:99999/", "port"),
        ("https://example.com/a b", "spaces"),
        ("https://example.com/\x00", "control"),
        ("https://example.com/" + "a" * 2048, "2048"),
    ],
)
def test_other_urls_are_refused_saying_why(url: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        check_url(url)


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.10", "private"),
        ("169.254.169.254", "link-local"),  # cloud metadata services
        ("fe80::1", "link-local"),
        ("fe80::1%eth0", "link-local"),
        ("fd00::1", "private"),
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped
        ("64:ff9b::a01:203", "private"),  # NAT64 of 10.1.2.3
        ("64:ff9b:1::a00:1", "private"),  # local-use NAT64 of 10.0.0.1
        ("::7f00:1", "loopback"),  # IPv4-compatible 127.0.0.1
        ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
        ("0.0.0.0", "private"),
        ("100.64.0.1", "not a public unicast"),  # carrier-grade NAT
        ("224.0.0.1", "not a public unicast"),  # multicast
    ],
)
def test_addresses_that_are_not_public_are_refused(address: str, kind: str) -> None:
    reason = refused_address(address)
    assert reason is not None and kind in reason


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_are_not(address: str) -> None:
    assert refused_address(address) is None


def test_one_private_address_among_public_ones_refuses_the_host() -> None:
    with pytest.raises(ValueError, match=r"hooks.example resolves to 10.0.0.5, a private address"):
        check_addresses("hooks.example", ["93.184.216.34", "10.0.0.5"], allow_private=False)
    check_addresses("hooks.example", ["93.184.216.34"], allow_private=False)


def test_allowing_private_addresses_allows_any_but_a_host_must_resolve() -> None:
    check_addresses("localhost", ["127.0.0.1", "::1"], allow_private=True)
    with pytest.raises(ValueError, match="does not resolve"):
        check_addresses("nowhere.example", [], allow_private=True)


# ----- where a delivery goes, and when it is no longer sent -----


def key(url: str | None = None, revoked: bool = False) -> KeyWebhook:
    return KeyWebhook("0123456789ab", url, SECRET, revoked)


def test_a_job_goes_to_its_own_url_else_to_its_keys_default() -> None:
    assert job_webhook("https://job.example/h", key("https://key.example/h")) == ("https://job.example/h", False)
    assert job_webhook(None, key("https://key.example/h")) == ("https://key.example/h", True)
    assert job_webhook(None, key()) is None


def test_a_job_whose_key_is_gone_or_revoked_has_no_webhook() -> None:
    assert job_webhook("https://job.example/h", None) is None
    assert job_webhook("https://job.example/h", key(revoked=True)) is None


def test_a_pending_delivery_is_cancelled_with_its_key_or_its_keys_default() -> None:
    url = "https://key.example/h"
    assert cancelled_because(url, True, key(url)) is None
    assert cancelled_because(url, False, key()) is None  # the job's own URL: the key's default is no matter
    assert cancelled_because(url, True, key()) == "its API key's default webhook was removed"
    assert cancelled_because(url, True, key("https://elsewhere.example/h")) == "its API key's default webhook changed"
    assert cancelled_because(url, False, key(url, revoked=True)) == "its API key was revoked"
    assert cancelled_because(url, False, None) == "its API key no longer exists"


# ----- the retry schedule -----


def test_delays_double_from_the_base_up_to_the_cap() -> None:
    policy = RetryPolicy(NO_JITTER, max_attempts=100, retry_for_s=10**9)
    delays = [policy.next_attempt_s(attempts, 0, 1000) - 1000 for attempts in range(1, 7)]  # type: ignore[operator]
    assert delays == [5, 10, 20, 40, 60, 60]


def test_retries_stop_after_max_attempts() -> None:
    assert POLICY.next_attempt_s(3, 0, 100) == 120
    assert POLICY.next_attempt_s(4, 0, 100) is None


def test_retries_stop_when_the_next_would_come_later_than_retry_for_s() -> None:
    policy = RetryPolicy(NO_JITTER, max_attempts=100, retry_for_s=100)
    assert policy.next_attempt_s(1, first_due_s=0, now_s=95) == 100
    assert policy.next_attempt_s(1, first_due_s=0, now_s=96) is None


def test_jitter_spreads_each_delay_both_ways() -> None:
    policy = RetryPolicy(Backoff(base_s=100, cap_s=1000, jitter=0.2), max_attempts=10, retry_for_s=10**6)
    assert policy.next_attempt_s(1, 0, 0, rand=lambda: 0.0) == 80
    assert policy.next_attempt_s(1, 0, 0, rand=lambda: 1.0) == 120


# ----- a delivery, attempt by attempt -----


def test_a_2xx_delivers_at_once() -> None:
    progress = attempted(0, T0, Attempt(T0 + 1, 204), POLICY)
    assert progress.status is DeliveryStatus.DELIVERED
    assert (progress.attempts, progress.last_status, progress.last_error) == (1, 204, None)
    assert progress.ended_at == progress.last_attempt_at == at(1)
    assert progress.next_attempt_at is None


def test_500s_are_tried_again_with_backoff_then_given_up_after_the_limit() -> None:
    attempts, now_s, log = 0, T0, []
    while True:
        progress = attempted(attempts, T0, Attempt(now_s, 500), POLICY)
        log.append((progress.status, progress.attempts, progress.next_attempt_at))
        if progress.next_attempt_at is None:
            break
        attempts, now_s = progress.attempts, progress.next_attempt_at.timestamp()
    assert log == [
        (DeliveryStatus.PENDING, 1, at(5)),
        (DeliveryStatus.PENDING, 2, at(15)),
        (DeliveryStatus.PENDING, 3, at(35)),
        (DeliveryStatus.FAILED, 4, None),
    ]
    assert progress.last_status == 500 and progress.ended_at == at(35)


def test_500s_then_a_200_deliver_with_every_attempt_counted() -> None:
    first = attempted(0, T0, Attempt(T0, 500), POLICY)
    second = attempted(first.attempts, T0, Attempt(T0 + 5, 503), POLICY)
    third = attempted(second.attempts, T0, Attempt(T0 + 15, 200), POLICY)
    assert [p.status for p in (first, second, third)] == [DeliveryStatus.PENDING] * 2 + [DeliveryStatus.DELIVERED]
    assert (third.attempts, third.last_status, third.last_error) == (3, 200, None)


def test_no_answer_is_a_failure_that_keeps_its_reason_short() -> None:
    progress = attempted(0, T0, Attempt(T0, error="ConnectError: " + "refused " * 100), POLICY)
    assert progress.status is DeliveryStatus.PENDING and progress.last_status is None
    assert progress.last_error is not None and progress.last_error.startswith("ConnectError") and len(progress.last_error) == 300


def test_a_redirect_is_a_failure() -> None:
    assert attempted(0, T0, Attempt(T0, 302), POLICY).status is DeliveryStatus.PENDING


def test_a_cancelled_delivery_keeps_its_attempts_and_says_why() -> None:
    progress = cancelled(2, 500, at(5), "its API key was revoked", T0 + 9)
    assert progress.columns() == {
        "status": "cancelled",
        "attempts": 2,
        "last_status": 500,
        "last_error": "its API key was revoked",
        "last_attempt_at": at(5),
        "next_attempt_at": None,
        "ended_at": at(9),
    }


# ----- what is delivered -----


def ended_job(**overrides: object) -> GenerationJob:
    fields: dict[str, object] = {
        "id": uuid.UUID("00000000-0000-4000-8000-000000000001"), "status": "completed", "lane": "realtime",
        "priority": 2, "owner": "alice", "key_id": "0123456789ab", "prompt": "un phare", "width": 64, "height": 64,
        "num_inference_steps": 4, "guidance_scale": 7.5, "seed": 3, "result_key": "images/x.png",
        "webhook_url": "https://hooks.example/h", "meta": {"trace_id": "ab", "webhook": {"status": "pending"}},
        "created_at": datetime(2026, 12, 3, 10, 0, 0),  # naive, as SQLite hands it back
        "finished_at": datetime(2026, 12, 3, 10, 0, 5, tzinfo=timezone.utc),
    }  # fmt: skip
    return GenerationJob(**{**fields, **overrides})


def test_a_job_delivery_is_the_job_in_an_envelope_naming_its_event() -> None:
    body = job_body("d-1", ended_job(), T0)
    document = json.loads(body)
    assert (document["id"], document["event"]) == ("d-1", "job.completed")
    job = document["job"]
    assert job["id"] == "00000000-0000-4000-8000-000000000001"
    assert (job["status"], job["owner"], job["prompt"], job["seed"]) == ("completed", "alice", "un phare", 3)
    assert job["image_url"] == "/jobs/00000000-0000-4000-8000-000000000001/image"
    assert job["metadata"] == {"trace_id": "ab"}  # the delivery log is not part of it
    assert job["created_at"] == "2026-12-03T10:00:00Z"  # as the API writes it
    assert job["finished_at"] == "2026-12-03T10:00:05Z"
    assert "key_id" not in job
    assert body == json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def test_a_failed_or_cancelled_job_has_no_image() -> None:
    for status in ("failed", "cancelled"):
        document = json.loads(job_body("d", ended_job(status=status, result_key=None), T0))
        assert document["event"] == f"job.{status}" and document["job"]["image_url"] is None


def test_a_batch_delivery_counts_its_jobs() -> None:
    document = json.loads(batch_body("d-2", "alice", "nightly", {"completed": 2, "cancelled": 1}, T0))
    assert document["event"] == "batch.ended"
    assert document["batch"] == {
        "batch_id": "nightly",
        "owner": "alice",
        "jobs": {"total": 3, "completed": 2, "failed": 0, "cancelled": 1},
    }


# ----- the API's check of where a URL leads -----

ALICE = Principal("alice", False, "0123456789ab", KeyLimits())


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1:9/h", "resolves to 127.0.0.1, a loopback address"),
        ("http://localhost/h", "a loopback address"),
        ("https://[::1]/h", "resolves to ::1, a loopback address"),
        ("http://10.0.0.8/h", "resolves to 10.0.0.8, a private address"),
        ("http://169.254.169.254/latest/meta-data", "a link-local address"),
    ],
)
def test_the_api_refuses_a_webhook_that_leads_to_a_private_address(url: str, reason: str) -> None:
    with pytest.raises(RequestValidationError) as refused:
        asyncio.run(check_webhook(url, ALICE, allow_private=False))
    [error] = refused.value.errors()
    assert error["loc"] == ("body", "webhook_url") and reason in error["msg"]
    asyncio.run(check_webhook(url, ALICE, allow_private=True))


def test_the_api_refuses_a_webhook_without_a_key_to_sign_it() -> None:
    with pytest.raises(RequestValidationError) as refused:
        asyncio.run(check_webhook("https://hooks.example/h", LOCAL_PRINCIPAL, allow_private=True))
    assert "needs API keys" in refused.value.errors()[0]["msg"]
    asyncio.run(check_webhook(None, LOCAL_PRINCIPAL, allow_private=False))  # no webhook: nothing to check
