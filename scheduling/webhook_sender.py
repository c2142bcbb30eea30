"""Webhook deliveries, carried out from the router's event loop; `scheduling/webhooks.py` decides.

The router hands over each job that reached its final status, once its write landed (`job_ended`);
everything else happens in tasks of this sender's own, never on the dispatch path: a slow or dead
receiver delays no job and no write of the core's. Attempts wait in one heap by due time, started
by one loop at most `concurrency` at a time, each bounded by `timeout_s`. The database is read and
written in two threads of the sender's own, so deliveries never take the threads the router's
database calls run in.

Deliveries live in the database (`storage/webhooks.py`): a restarted router resumes the pending ones
at their due time, and makes those its predecessor died before storing (after their jobs' final
writes). A delivery is sent at least once: an attempt cut short by a crash, whose answer was not
recorded, is made again. Every `sweep_interval_s` the armed batch deliveries are looked at,
and those whose batch ended unseen (before the API armed it, or while no router ran) are fired.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import socket
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx

from scheduling.background import BackgroundTasks
from scheduling.hold import Backoff, utc
from scheduling.settings import RouterSettings
from scheduling.webhooks import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
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
    signature,
)
from storage.api_keys import ApiKeyStore
from storage.database import DATABASE_OUTAGES
from storage.delivery import DeliveryStatus, job_event
from storage.jobs import as_utc
from storage.models import GenerationJob, WebhookDelivery
from storage.webhooks import WebhookStore

logger = logging.getLogger(__name__)

USER_AGENT = "SEIDRA-Webhooks/1"
DATABASE_THREADS = 2
DATABASE_RETRY_MAX_S = 10.0
RETRY_JITTER = 0.2
# A bug of the sender's own in an attempt (not the receiver's failure) is tried again this much later.
AFTER_A_BUG_S = 60.0
T = TypeVar("T")


@dataclass(frozen=True)
class WebhookConfig:
    policy: RetryPolicy
    timeout_s: float
    concurrency: int
    allow_private: bool
    sweep_interval_s: float

    @classmethod
    def of(cls, settings: RouterSettings) -> WebhookConfig:
        backoff = Backoff(settings.webhook_retry_base_s, settings.webhook_retry_cap_s, RETRY_JITTER)
        return cls(
            RetryPolicy(backoff, settings.webhook_max_attempts, settings.webhook_retry_for_s),
            settings.webhook_timeout_s,
            settings.webhook_concurrency,
            settings.webhook_allow_private,
            settings.reconcile_interval_s,
        )


class WebhookSender:
    def __init__(
        self, store: WebhookStore, keys: ApiKeyStore, config: WebhookConfig, clock: Callable[[], float] = time.time
    ) -> None:
        self._store = store
        self._keys = keys
        self._config = config
        self._clock = clock
        self._started_s = clock()  # jobs that ended before it were a previous router's
        self._due: list[tuple[float, uuid.UUID]] = []
        self._held: set[uuid.UUID] = set()  # in the heap or being attempted: never twice at once
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(config.concurrency)
        self._executor = ThreadPoolExecutor(DATABASE_THREADS, thread_name_prefix="seidra-webhooks")
        # Address lookups in threads of their own: a receiver's DNS that never answers must not hold
        # the event loop's default threads, which carry the router's job writes.
        self._resolver = ThreadPoolExecutor(config.concurrency, thread_name_prefix="seidra-webhooks-dns")
        self._client: httpx.AsyncClient | None = None  # made in the event loop that uses it
        self._tasks = BackgroundTasks("Webhook")

    # ----- what the router hands over -----

    def job_ended(self, job: GenerationJob) -> None:
        """`job` reached its final status, as stored: deliver its webhook, and its batch's if it
        ended the batch. Returns at once. A job without a key (authentication off) has none: there
        is no secret to sign with."""
        if job.key_id is not None:
            self._tasks.spawn(self._job_ended(job, job.key_id))

    async def run(self) -> None:
        """Take up the pending deliveries a previous router left, then start each attempt when it is
        due and a slot is free; meanwhile, sweep the armed batches."""
        self._tasks.spawn(self._sweep_batches())
        self._tasks.spawn(self._deliver_unstored())
        pending = await self._db(self._store.pending)
        for delivery_id, due in pending:
            self._schedule(delivery_id, self._clock() if due is None else due.timestamp())
        if pending:
            logger.info("Webhooks: %d pending deliveries resumed", len(pending))
        while True:
            await self._until_due()
            _, delivery_id = heapq.heappop(self._due)
            await self._slots.acquire()
            self._tasks.spawn(self._attempt_in_slot(delivery_id))

    # ----- deliveries made -----

    async def _job_ended(self, job: GenerationJob, key_id: str) -> None:
        target = job_webhook(job.webhook_url, await self._db(self._keys.webhook, key_id))
        if target is not None:
            url, from_key_default = target
            now_s, delivery_id = self._clock(), uuid.uuid4()
            delivery = WebhookDelivery(
                id=delivery_id,
                event=job_event(job.status),
                owner=job.owner,
                key_id=key_id,
                url=url,
                from_key_default=from_key_default,
                job_id=job.id,
                body=job_body(str(delivery_id), job, now_s),
                status=DeliveryStatus.PENDING.value,
                created_at=utc(now_s),
                next_attempt_at=utc(now_s),
            )
            if await self._db(self._store.add_job_delivery, delivery):
                self._schedule(delivery_id, now_s)
        if job.batch_id is not None:
            await self._batch_ended(job.owner, job.batch_id)

    async def _deliver_unstored(self) -> None:
        """Make the deliveries of the jobs that a previous router ended but died before it stored
        their deliveries, among those that ended within the retry window."""
        since = utc(self._started_s - self._config.policy.retry_for_s)
        jobs = await self._db(self._store.ended_without_delivery, since, utc(self._started_s))
        if jobs:
            logger.warning("Webhooks: %d jobs ended without their deliveries stored (a router stopped); making them", len(jobs))
        for job in jobs:
            self.job_ended(job)

    async def _batch_ended(self, owner: str, batch_id: str) -> None:
        """Fire the batch's armed delivery if none of its jobs is unfinished; of the jobs that end
        together, the first to look fires it, the others find it fired."""
        ended = await self._db(self._store.ended_batch, owner, batch_id)
        if ended is None:
            return
        now_s = self._clock()
        body = batch_body(str(ended.delivery_id), owner, batch_id, ended.counts, now_s)
        if await self._db(self._store.fire_batch, ended.delivery_id, ended.last_ended, body, utc(now_s)):
            self._schedule(ended.delivery_id, now_s)

    async def _sweep_batches(self) -> None:
        while True:
            try:
                for owner, batch_id in await self._db(self._store.armed_batches):
                    await self._batch_ended(owner, batch_id)
            except Exception:  # the sweep must outlive any one failure
                logger.exception("Webhooks: sweeping the armed batches failed")
            await asyncio.sleep(self._config.sweep_interval_s)

    # ----- attempts -----

    def _schedule(self, delivery_id: uuid.UUID, due_s: float) -> None:
        if delivery_id not in self._held:
            self._held.add(delivery_id)
            heapq.heappush(self._due, (due_s, delivery_id))
            self._wake.set()

    async def _until_due(self) -> None:
        while True:
            self._wake.clear()
            wait_s = self._due[0][0] - self._clock() if self._due else None
            if wait_s is not None and wait_s <= 0:
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait_s)

    async def _attempt_in_slot(self, delivery_id: uuid.UUID) -> None:
        try:
            due_s = await self._attempt(delivery_id)
        except Exception:
            logger.exception("Webhook delivery %s: the attempt failed in the router; again in %.0f s", delivery_id, AFTER_A_BUG_S)
            due_s = self._clock() + AFTER_A_BUG_S
        finally:
            self._slots.release()
            self._held.discard(delivery_id)
        if due_s is not None:
            self._schedule(delivery_id, due_s)

    async def _attempt(self, delivery_id: uuid.UUID) -> float | None:
        """One attempt at a delivery still pending; when the next one is due (None: it is over)."""
        delivery = await self._db(self._store.get, delivery_id)
        if delivery is None or delivery.status != DeliveryStatus.PENDING.value:
            return None  # its job was deleted, or it was superseded
        key = await self._db(self._keys.webhook, delivery.key_id)
        reason = cancelled_because(delivery.url, delivery.from_key_default, key)
        if reason is not None:
            progress = cancelled(delivery.attempts, delivery.last_status, delivery.last_attempt_at, reason, self._clock())
        else:
            assert key is not None  # cancelled_because says why when the key is gone
            attempt = await self._post(delivery, key.secret)
            progress = attempted(delivery.attempts, as_utc(delivery.created_at).timestamp(), attempt, self._config.policy)
        recorded = await self._db(self._store.record, delivery.id, progress.columns())
        # The host alone: a URL's query may carry the receiver's own token.
        logger.info(
            "Webhook delivery %s (%s) to %s: %s after %d attempt(s) (%s)",
            delivery.id,
            delivery.event,
            urlsplit(delivery.url).hostname,
            progress.status.value,
            progress.attempts,
            progress.last_error or f"HTTP {progress.last_status}",
        )
        if recorded is None or progress.next_attempt_at is None:
            return None
        return progress.next_attempt_at.timestamp()

    async def _post(self, delivery: WebhookDelivery, secret: str) -> Attempt:
        at_s = self._clock()
        try:
            status = await asyncio.wait_for(self._send(delivery, secret, at_s), self._config.timeout_s)
        except asyncio.TimeoutError:
            return Attempt(at_s, error=f"no answer within {self._config.timeout_s:g} s")
        except (ValueError, httpx.InvalidURL) as refused:  # the URL, or an address it resolves to
            return Attempt(at_s, error=f"refused: {refused}")
        except (httpx.HTTPError, OSError) as error:
            return Attempt(at_s, error=f"{type(error).__name__}: {error}".rstrip(": "))
        return Attempt(at_s, status)

    async def _send(self, delivery: WebhookDelivery, secret: str, at_s: float) -> int:
        """POST the delivery, signed now; the receiver's status. Its answer's body is never read."""
        assert delivery.body is not None  # a pending delivery has its body
        target, headers, extensions = await self._pinned(delivery.url)
        headers.update({
            SIGNATURE_HEADER: signature(secret, int(at_s), delivery.body),
            DELIVERY_HEADER: str(delivery.id),
            EVENT_HEADER: delivery.event,
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
        })  # fmt: skip
        request = self._http().build_request(
            "POST", target, content=delivery.body.encode(), headers=headers, extensions=extensions
        )
        response = await self._http().send(request, stream=True)
        await response.aclose()
        return response.status_code

    async def _pinned(self, url: str) -> tuple[httpx.URL, dict[str, str], dict[str, Any]]:
        """Where to connect: the URL's host resolved and checked now, and connected to at the address
        checked, so that a DNS answer that changes in between cannot send the delivery elsewhere.
        The request still names the host (Host header, TLS server name and certificate)."""
        parsed = httpx.URL(check_url(url))
        host = parsed.raw_host.decode("ascii")
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        lookup = asyncio.get_running_loop().run_in_executor(self._resolver, _addresses_of, host, port)
        found = await asyncio.wait_for(lookup, self._config.timeout_s)
        addresses = list(dict.fromkeys(str(info[4][0]) for info in found))
        check_addresses(host, addresses, self._config.allow_private)
        extensions = {"sni_hostname": host} if parsed.scheme == "https" else {}
        return parsed.copy_with(host=addresses[0]), {"Host": parsed.netloc.decode("ascii")}, extensions

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            # No proxies from the environment: a proxy would reach addresses the checks refuse.
            self._client = httpx.AsyncClient(
                follow_redirects=False,
                trust_env=False,
                timeout=self._config.timeout_s,
                # No connection kept: the pool matches connections by address, not by host name, so a
                # kept one would carry another host's delivery over a TLS session checked for the first.
                limits=httpx.Limits(max_connections=self._config.concurrency, max_keepalive_connections=0),
            )
        return self._client

    # ----- machinery -----

    async def _db(self, call: Callable[..., T], *args: Any) -> T:
        """A database call in the sender's threads; an outage is waited out, as the router's writer does."""
        delay_s = 0.5
        while True:
            try:
                return await asyncio.get_running_loop().run_in_executor(self._executor, call, *args)
            except DATABASE_OUTAGES as outage:
                logger.warning("Webhooks: database call failed (%s); retrying in %.1f s", type(outage).__name__, delay_s)
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, DATABASE_RETRY_MAX_S)


def _addresses_of(host: str, port: int) -> list[tuple[Any, ...]]:
    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
