"""The priority router: one named Ray actor that owns the waiting queue and dispatches jobs.

It dispatches only into free slots of usable replicas, so jobs never wait inside a replica where a
later realtime job could not overtake them. When no healthy GPU can take work, waiting jobs are
put on hold (still `pending`, in their place, with `metadata.degraded`) and run again by
themselves once a replica reports healthy. The database is the source of truth: on (re)start the
queue is rebuilt from the pending and running jobs.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import ray
import sqlalchemy.exc
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.handle import DeploymentHandle

from scheduling import metrics, tracing
from scheduling.directives import InjectedFaults, ReplicaDirectives, ReplicaUnavailable
from scheduling.hold import Backoff, delays_so_far, held, is_held, resumed
from scheduling.job_queue import LaneQueues, QueuedJob
from scheduling.lanes import (
    DEFAULT_REALTIME_PRIORITY,
    MAX_REALTIME_PRIORITY,
    Lane,
    lane_for,
)
from scheduling.names import ROUTER_NAMESPACE, router_name
from scheduling.replicas import ReplicaPool
from scheduling.settings import RouterSettings
from scheduling.work import GenerationParams, WorkItem, WorkResult
from storage.job_status import IllegalTransition, JobStatus
from storage.jobs import JobNotFound, JobStore, as_utc
from storage.models import GenerationJob, utcnow
from storage.notifications import Level, NotificationService
from storage.settings import StorageSettings

if TYPE_CHECKING:
    from opentelemetry.trace import Span

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Bumped when the router's methods change so that an older router could not serve the new API (a
# new argument, a new method): the router is detached and outlives deployments, so the
# application replaces one left running by an older release.
ROUTER_API_VERSION = 2
ROUTER_VERSION_TIMEOUT_S = 60.0
STORAGE_RETRY_MAX_S = 30.0
STORAGE_OUTAGES = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)
GPU_TIMEOUT_REASON = "GPU inference timeout"


def queued_job(job: GenerationJob) -> QueuedJob:
    return QueuedJob(job.priority, as_utc(job.created_at).timestamp(), str(job.id))


def job_params(job: GenerationJob) -> GenerationParams:
    return GenerationParams(
        prompt=job.prompt,
        negative_prompt=job.negative_prompt,
        width=job.width,
        height=job.height,
        num_inference_steps=job.num_inference_steps,
        guidance_scale=job.guidance_scale,
        seed=job.seed,
    )


def _cause(error: BaseException) -> BaseException:
    """The exception raised inside the replica, for errors that come back wrapped by Ray."""
    return error.cause if isinstance(error, RayTaskError) and error.cause is not None else error


def _span_attributes(job: GenerationJob) -> dict[str, Any]:
    batch = {"seidra.batch_id": str(job.batch_id)} if job.batch_id else {}
    return {tracing.JOB_ID: str(job.id), "seidra.lane": job.lane, "seidra.priority": job.priority, **batch}


def _count_failure(error: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda meta: {**meta, "failures": meta.get("failures", 0) + 1, "last_error": error}


class JobRouter:
    def __init__(self, worker: DeploymentHandle, settings_env: dict[str, str]) -> None:
        # The application's settings (Serve application args), before any settings are read.
        os.environ.update(settings_env)
        tracing.configure("router")
        tracing.configure_logging()
        self._settings = RouterSettings()
        storage = StorageSettings()
        self._jobs = JobStore(storage.database_url)
        self._notifications = NotificationService(storage.database_url)
        self._queue = LaneQueues(
            {Lane.REALTIME: self._settings.max_realtime_queue, Lane.BATCH: self._settings.max_batch_queue},
            retry_after_s=self._settings.queue_full_retry_after_s,
        )
        self._backoff = Backoff(self._settings.hold_base_s, self._settings.hold_cap_s, self._settings.hold_jitter)
        self._pool = ReplicaPool(self._settings.worker_ttl_s)
        self._worker = worker
        self._running: dict[str, asyncio.Task[None]] = {}
        # Jobs between two step slices: their next WorkItem, latents included.
        self._resume: dict[str, WorkItem] = {}
        # Of those, the ones a hold set back to `pending` in the database.
        self._paused: set[str] = set()
        # Held jobs (still in the queue): when the router next delays them if the outage goes on.
        self._next_delay_at: dict[str, float] = {}
        # Retries with a countdown: not in the queue until their timer fires.
        self._deferred: dict[str, asyncio.TimerHandle] = {}
        self._finished: dict[str, asyncio.Event] = {}
        # Calls in flight, and those cancelled because their replica vanished.
        self._responses: dict[str, Any] = {}
        self._lost: set[str] = set()
        self._replica_states: set[tuple[str, str]] = set()  # (mode, health) pairs the gauge has shown
        self._wake = asyncio.Event()
        self._admission = asyncio.Lock()
        self._recover()
        # Held in an attribute: the event loop keeps only weak references to its tasks.
        self._loop = asyncio.get_event_loop().create_task(self._dispatch_loop())

    # ----- rebuilding from the database -----

    def _recover(self) -> None:
        for job in self._jobs.unfinished():
            if job.status == JobStatus.RUNNING.value:
                # Its worker's answer went to the router that died; running it again overwrites the
                # same object key, so nothing is duplicated.
                job = self._jobs.transition(job.id, JobStatus.PENDING, metadata_patch={"requeued": "router restarted"})
            retry_at = job.meta.get("retry", {}).get("not_before")
            if retry_at and datetime.fromisoformat(retry_at) > utcnow():
                self._defer(job, (datetime.fromisoformat(retry_at) - utcnow()).total_seconds())
            else:
                self._queue.push(queued_job(job))
        logger.info("Router rebuilt its queue from the database: %d jobs waiting", len(self._queue))

    # ----- public methods (called through the actor handle) -----

    async def submit(
        self,
        requests: list[dict[str, Any]],
        batch_id: str | None = None,
        job_ids: list[str] | None = None,
        trace_context: tracing.Carrier | None = None,
    ) -> list[dict[str, Any]]:
        """Store and enqueue jobs, all or none; returns the new ones. Raises QueueFullError when a lane is full.

        With `job_ids` (one per request) a submission is idempotent: jobs that exist already are
        left as they are, so a batch submitted again creates nothing twice. `trace_context` is the
        submitter's span (see `tracing.enqueue_spans`).
        """
        jobs = [self._new_job(request, batch_id, job_id) for request, job_id in zip(requests, job_ids or [None] * len(requests))]
        if job_ids:
            existing = await asyncio.to_thread(self._jobs.existing_ids, job_ids)
            jobs = [job for job in jobs if str(job.id) not in existing]
        attributes = [_span_attributes(job) for job in jobs]
        with tracing.enqueue_spans(trace_context, attributes, batch=batch_id is not None) as spans:
            for job, span in zip(jobs, spans):
                job.meta = {**job.meta, **tracing.job_trace(span)}
            async with self._admission:  # so two submissions cannot both take the last room in a lane
                for lane in Lane:
                    count = sum(1 for job in jobs if job.lane == lane.value)
                    if count:
                        self._queue.check_room(lane, count)
                await asyncio.to_thread(self._jobs.add_all, jobs)
                for job in jobs:
                    self._queue.push(queued_job(job))
                    metrics.job_events()["submitted"].inc(tags={"lane": job.lane})
        self._wake.set()
        return [job.model_dump() for job in jobs]

    async def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a waiting job. Raises IllegalTransition for running or finished jobs."""
        job = await asyncio.to_thread(self._jobs.transition, job_id, JobStatus.CANCELLED, finished_at=utcnow())
        metrics.job_events()["cancelled"].inc(tags={"lane": job.lane})
        self._forget_waiting(job_id)
        self._mark_finished(job_id)
        return job.model_dump()

    async def retry(self, job_id: str, countdown_s: float = 0.0) -> dict[str, Any]:
        """Queue a failed, cancelled or held job again at realtime priority, after `countdown_s`.

        Raises IllegalTransition for a running or completed job, or one already waiting normally.
        """
        job = await asyncio.to_thread(self._jobs.get, job_id)
        with tracing.job_span("seidra.retry", job_id, job.meta.get("trace_context"), {"seidra.countdown_s": countdown_s}):
            return await self._retry(job, countdown_s)

    async def _retry(self, job: GenerationJob, countdown_s: float) -> dict[str, Any]:
        job_id = str(job.id)
        priority = job.priority if job.priority <= MAX_REALTIME_PRIORITY else DEFAULT_REALTIME_PRIORITY
        not_before = utcnow() + timedelta(seconds=countdown_s)
        changes: dict[str, Any] = {
            "priority": priority,
            "lane": lane_for(priority).value,
            "edit_metadata": lambda meta: {
                **meta,
                "failures": 0,
                "retry": {"requested_at": utcnow().isoformat(), "not_before": not_before.isoformat()},
            },
        }
        waiting = job_id in self._queue or job_id in self._deferred
        if job.status == JobStatus.PENDING.value and is_held(job.meta) and waiting:
            job = await asyncio.to_thread(self._jobs.annotate, job_id, while_status=JobStatus.PENDING, **changes)
            if job is None:
                raise IllegalTransition(job_id, JobStatus.RUNNING, JobStatus.PENDING)
            self._forget_waiting(job_id)
        else:
            job = await asyncio.to_thread(
                self._jobs.transition, job_id, JobStatus.PENDING, error=None, finished_at=None, **changes
            )
        if countdown_s > 0:
            self._defer(job, countdown_s)
        else:
            self._queue.push(queued_job(job))
            self._wake.set()
        logger.info("Job %s re-queued at priority %d (countdown %.0f s)", job_id, priority, countdown_s)
        return job.model_dump()

    async def wait(self, job_id: str, timeout_s: float) -> str:
        """Wait until the job ends or `timeout_s` passes; returns its status then."""
        # Registered before the read, so an end between the read and the wait is not missed.
        event = self._finished.setdefault(job_id, asyncio.Event())
        try:
            job = await asyncio.to_thread(self._jobs.get, job_id)
        except JobNotFound:
            self._finished.pop(job_id, None)
            raise
        if not JobStatus(job.status).is_terminal:
            try:
                await asyncio.wait_for(event.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass
            job = await asyncio.to_thread(self._jobs.get, job_id)
        if JobStatus(job.status).is_terminal:
            self._finished.pop(job_id, None)
        return job.status

    async def heartbeat(self, replica_id: str, slots: int, snapshot: dict[str, Any]) -> ReplicaDirectives:
        if self._pool.report(replica_id, slots, snapshot):
            logger.info("Worker replica %s joined with %d slot(s): %s/%s", replica_id, slots, snapshot["mode"], snapshot["health"])
            if snapshot["mode"] == "maintenance":  # set before this router (re)started: keep draining
                self._pool.set_maintenance(replica_id, True)
        # A report may bring capacity back: held jobs then run at once, not at their retry time.
        self._wake.set()
        return self._pool.directives(replica_id)

    async def set_maintenance(self, replica_id: str | None, enabled: bool) -> list[dict[str, Any]]:
        """Drain one replica (or all, with None): running jobs finish, no new ones start there."""
        if replica_id is not None and replica_id not in self._pool:
            raise KeyError(f"no worker replica {replica_id}")
        self._pool.set_maintenance(replica_id, enabled)
        logger.warning("Maintenance %s for %s", "on" if enabled else "off", replica_id or "all replicas")
        self._wake.set()
        return self._pool.describe()

    async def api_version(self) -> int:
        return ROUTER_API_VERSION

    async def autoscaling_load(self) -> int:
        """Jobs that want a worker slot: waiting (held included) and running. Read by the autoscaler."""
        return len(self._queue) + len(self._running)

    async def storage_settings(self) -> dict[str, Any]:
        """Where this application keeps jobs and images, for batch drivers running in the cluster."""
        return StorageSettings().model_dump()

    async def set_lane_paused(self, lane: str, paused: bool) -> list[str]:
        """Stop or restart dispatching from a lane (what `celery control cancel_consumer` did).

        Its jobs keep their places; the pause lives in this actor and ends if it restarts.
        """
        (self._queue.paused.add if paused else self._queue.paused.discard)(Lane(lane))
        logger.warning("Lane %s %s", lane, "paused" if paused else "resumed")
        self._wake.set()
        return sorted(lane.value for lane in self._queue.paused)

    async def set_faults(self, replica_id: str | None, faults: InjectedFaults | None) -> list[dict[str, Any]]:
        """Drills and tests: what replicas started with SEIDRA_FAULT_INJECTION=1 should pretend."""
        self._pool.set_faults(replica_id, faults)
        logger.warning("Injected faults for %s: %s", replica_id or "all replicas", faults)
        return self._pool.describe()

    async def status(self) -> dict[str, Any]:
        # No expiry here: the dispatch loop expires replicas, and it alone cancels their calls.
        return {
            "queues": {lane.value: self._queue.depth(lane) for lane in Lane},
            "paused_lanes": sorted(lane.value for lane in self._queue.paused),
            "held": {lane.value: count for lane, count in self._held_by_lane().items()},
            "deferred": len(self._deferred),
            "running": len(self._running),
            "usable_slots": self._pool.usable_slots(),
            "outage": self._pool.outage_reason(),
            "workers": self._pool.describe(),
        }

    # ----- dispatching -----

    def _new_job(self, request: dict[str, Any], batch_id: str | None, job_id: str | None) -> GenerationJob:
        return GenerationJob(
            **request,
            **({"id": uuid.UUID(job_id)} if job_id else {}),
            lane=lane_for(request["priority"]).value,
            batch_id=uuid.UUID(batch_id) if batch_id else None,
            status=JobStatus.PENDING.value,
        )

    def _forget_waiting(self, job_id: str) -> None:
        self._queue.remove(job_id)
        self._resume.pop(job_id, None)
        self._paused.discard(job_id)
        self._next_delay_at.pop(job_id, None)
        timer = self._deferred.pop(job_id, None)
        if timer is not None:
            timer.cancel()

    def _defer(self, job: GenerationJob, countdown_s: float) -> None:
        def release() -> None:
            self._deferred.pop(str(job.id), None)
            self._queue.push(queued_job(job))
            self._wake.set()

        self._deferred[str(job.id)] = asyncio.get_event_loop().call_later(countdown_s, release)

    async def _dispatch_loop(self) -> None:
        while True:
            try:
                gone = self._pool.expire()
                for replica in gone:
                    logger.warning("Worker replica %s stopped reporting; it no longer counts", replica.replica_id)
                self._cancel_calls({job_id for replica in gone for job_id in replica.running})
                await self._delay_waiting_jobs()
                await self._dispatch()
                self._record_gauges()
            except Exception:  # the loop must outlive any one failure
                logger.exception("Dispatch failed; retrying")
            try:
                await asyncio.wait_for(self._wake.wait(), self._settings.worker_ttl_s / 2)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()

    def _held_by_lane(self) -> dict[Lane, int]:
        held = dict.fromkeys(Lane, 0)
        for queued in self._queue:
            held[queued.lane] += queued.job_id in self._next_delay_at
        return held

    def _record_gauges(self) -> None:
        gauges = metrics.queue_gauges()
        held = self._held_by_lane()
        for lane in Lane:
            gauges["depth"].set(self._queue.depth(lane), tags={"lane": lane.value})
            gauges["held"].set(held[lane], tags={"lane": lane.value})
        gauges["running"].set(len(self._running))
        counts: dict[tuple[str, str], int] = dict.fromkeys(self._replica_states, 0)
        for row in self._pool.describe():
            counts[(row["mode"], row["health"])] = counts.get((row["mode"], row["health"]), 0) + 1
        for (mode, health), count in counts.items():  # states that emptied go back to 0
            gauges["replicas"].set(count, tags={"mode": mode, "health": health})
        self._replica_states = set(counts)

    async def _dispatch(self) -> None:
        await self._continue_draining_jobs()
        while self._pool.usable_slots() > 0:
            queued = self._queue.pop()
            if queued is None:
                return
            replica_id = self._pool.assign(queued.job_id)
            assert replica_id is not None  # there was a usable slot
            try:
                await self._start(queued, replica_id)
            except BaseException:
                self._pool.release(replica_id, queued.job_id)
                self._queue.push(queued)
                raise

    async def _continue_draining_jobs(self) -> None:
        """Maintenance drains a replica: jobs it started finish there, slice after slice."""
        for job_id, item in list(self._resume.items()):
            if job_id in self._queue and item.replica_id and self._pool.assign_draining(job_id, item.replica_id):
                queued = self._queue.remove(job_id)
                assert queued is not None
                try:
                    await self._start(queued, item.replica_id)
                except BaseException:
                    self._pool.release(item.replica_id, job_id)
                    self._queue.push(queued)
                    raise

    async def _delay_waiting_jobs(self) -> None:
        """With no usable replica, put waiting jobs on hold, each again when its retry time comes."""
        reason = self._pool.outage_reason()
        if reason is None:
            return
        now = time.monotonic()
        for queued in list(self._queue):
            reason = self._pool.outage_reason()
            if reason is None:
                return  # a replica came back meanwhile: dispatch instead
            draining = queued.job_id in self._resume and self._pool.is_draining(self._resume[queued.job_id].replica_id)
            if not draining and self._next_delay_at.get(queued.job_id, 0.0) <= now:
                await self._hold(queued.job_id, reason, replica_id=None)

    async def _hold(self, job_id: str, reason: str, replica_id: str | None, failure: str | None = None) -> None:
        """Record a delay on the job (and a failed run, when `failure` is given), notify, and log it."""

        def delay(meta: dict[str, Any]) -> dict[str, Any]:
            if failure is not None:
                meta = _count_failure(failure)(meta)
            retry_after_s = self._backoff.delay_s(delays_so_far(meta) + 1)
            return held(meta, reason=reason, replica_id=replica_id, retry_after_s=retry_after_s, now=utcnow())

        job = await self._persist(self._jobs.annotate, job_id, while_status=JobStatus.PENDING, edit_metadata=delay)
        if job is None:
            try:  # running, or between two slices: back to pending while it waits
                job = await self._persist(
                    self._jobs.transition, job_id, JobStatus.PENDING, edit_metadata=delay, from_status=JobStatus.RUNNING
                )
            except IllegalTransition:
                self._forget_waiting(job_id)  # it ended meanwhile (cancelled): nothing to hold
                return
            if job_id in self._resume:
                self._paused.add(job_id)
        retry_after_s = job.meta["degraded"]["retry_after_seconds"]
        self._next_delay_at[job_id] = time.monotonic() + retry_after_s
        metrics.job_events()["delayed"].inc(tags={"lane": job.lane})
        metrics.notifications_sent().inc(tags={"level": Level.WARNING.value})
        attributes = {"seidra.reason": reason, "seidra.retry_after_s": retry_after_s}
        with tracing.job_span("seidra.hold", job_id, job.meta.get("trace_context"), attributes):
            logger.warning("Delaying job %s due to GPU unavailability: %s (retry in %d s)", job_id, reason, retry_after_s)
            await self._persist(
                self._notifications.notify,
                job_id,
                Level.WARNING,
                f"Your image is delayed: no GPU is available ({reason}). It will run as soon as one is; "
                f"next retry in {retry_after_s} s.",
            )

    async def _start(self, queued: QueuedJob, replica_id: str) -> None:
        item = self._resume.pop(queued.job_id, None)
        if item is None or queued.job_id in self._paused:
            self._paused.discard(queued.job_id)
            try:
                job = await self._persist(
                    self._jobs.transition,
                    queued.job_id,
                    JobStatus.RUNNING,
                    count_attempt=item is None,
                    edit_metadata=lambda meta: resumed(meta, utcnow()),
                    **({"started_at": utcnow()} if item is None else {}),
                )
            except IllegalTransition:
                self._pool.release(replica_id, queued.job_id)
                return  # cancelled while it waited
            if item is None:
                metrics.job_events()["started"].inc(tags={"lane": job.lane})
                wait_s = (as_utc(job.started_at) - as_utc(job.created_at)).total_seconds()
                metrics.job_histograms()["queue_wait"].observe(wait_s, tags={"lane": job.lane})
            item = item or WorkItem(
                queued.job_id, job_params(job), max_steps=self._settings.steps_per_dispatch,
                trace_context=job.meta.get("trace_context"),
            )  # fmt: skip
        self._next_delay_at.pop(queued.job_id, None)
        item = replace(item, replica_id=replica_id)
        self._running[queued.job_id] = asyncio.get_event_loop().create_task(self._run(item, queued))

    async def _run(self, item: WorkItem, queued: QueuedJob) -> None:
        assert item.replica_id is not None
        attributes = {"seidra.replica_id": item.replica_id, "seidra.step": item.step}
        with tracing.job_span("seidra.dispatch", item.job_id, item.trace_context, attributes) as span:
            await self._call_worker(item, queued, span)

    async def _call_worker(self, item: WorkItem, queued: QueuedJob, span: Span) -> None:
        assert item.replica_id is not None
        response = None
        try:
            # Called outside any span: the handle's first call starts its background tasks, which
            # would otherwise keep this job's span as theirs for good.
            response = contextvars.Context().run(self._worker.advance.remote, item, tracing.carrier())
            self._responses[item.job_id] = response
            result: WorkResult = await asyncio.wait_for(response, self._settings.inference_timeout_s)
        except asyncio.TimeoutError:
            response.cancel()  # type: ignore[union-attr]  # the replica stops at its next step boundary
            tracing.mark_failed(span, GPU_TIMEOUT_REASON)
            self._pool.mark_degraded(item.replica_id, GPU_TIMEOUT_REASON, self._settings.degraded_cooldown_s)
            await self._after_failure(item, queued, GPU_TIMEOUT_REASON, hold=True)
        except Exception as raised:
            if not isinstance(_cause(raised), ReplicaUnavailable):  # a hold is no failure
                tracing.mark_failed(span, f"{type(_cause(raised)).__name__}: {_cause(raised)}")
            if item.job_id in self._lost:
                await self._requeue_lost(item, queued)
            else:
                await self._after_error(item, queued, _cause(raised))
        else:
            await self._after_result(item, queued, result)
        finally:
            self._responses.pop(item.job_id, None)
            self._lost.discard(item.job_id)
            self._running.pop(item.job_id, None)
            self._pool.release(item.replica_id, item.job_id)
            self._wake.set()

    def _cancel_calls(self, job_ids: set[str]) -> None:
        """Calls to a replica that stopped reporting will not be answered: their jobs go back."""
        for job_id in job_ids & self._responses.keys():
            self._lost.add(job_id)
            self._responses[job_id].cancel()

    async def _requeue_lost(self, item: WorkItem, queued: QueuedJob) -> None:
        """Not the job's fault: it goes back to its place, from its last good state, uncounted."""
        logger.warning("Job %s lost its replica %s; re-queued", item.job_id, item.replica_id)
        if item.step:
            self._resume[item.job_id] = item
        elif not await self._back_to_pending(item.job_id, {"requeued": f"replica {item.replica_id} stopped reporting"}):
            return
        self._queue.push(queued)

    async def _back_to_pending(self, job_id: str, patch: dict[str, Any]) -> bool:
        try:
            await self._persist(
                self._jobs.transition, job_id, JobStatus.PENDING, metadata_patch=patch, from_status=JobStatus.RUNNING
            )
        except IllegalTransition:
            return False
        return True

    async def _after_error(self, item: WorkItem, queued: QueuedJob, error: BaseException) -> None:
        if isinstance(error, ReplicaUnavailable):
            self._pool.note_snapshot(error.replica_id, error.snapshot)
            await self._hold_running(item, queued, error.snapshot.get("reason") or str(error))
            return
        if isinstance(error, RayActorError):
            self._pool.forget(item.replica_id)  # type: ignore[arg-type]  # its process is gone
        await self._after_failure(item, queued, f"{type(error).__name__}: {error}")

    async def _after_result(self, item: WorkItem, queued: QueuedJob, result: WorkResult) -> None:
        if result.done:
            await self._finish(
                item.job_id,
                JobStatus.COMPLETED,
                result_key=result.object_key,
                metadata_patch={"replica_id": result.replica_id, "inference_s": round(result.duration_s, 3)},
            )
            return
        # Keeps the replica it ran on: a replica draining for maintenance finishes what it started.
        self._resume[item.job_id] = replace(item, step=result.step, latents=result.latents)
        self._queue.push(queued)

    async def _hold_running(self, item: WorkItem, queued: QueuedJob, reason: str, failure: str | None = None) -> None:
        # The state before this slice is still good: keep it, so the job resumes where it was.
        if item.step:
            self._resume[item.job_id] = item
        await self._hold(item.job_id, reason, replica_id=item.replica_id, failure=failure)
        self._queue.push(queued)

    async def _after_failure(self, item: WorkItem, queued: QueuedJob, error: str, hold: bool = False) -> None:
        """A failed run counts against the job; at `max_attempts` failures the job ends `failed`.

        With `hold` (an inference timeout) the job waits on hold like any job facing a sick GPU.
        """
        job = await self._persist(self._jobs.get, item.job_id)
        failures = job.meta.get("failures", 0) + 1
        if failures >= self._settings.max_attempts:
            self._resume.pop(item.job_id, None)
            await self._finish(
                item.job_id, JobStatus.FAILED, error=f"failed {failures} times; last: {error}",
                edit_metadata=_count_failure(error),
            )  # fmt: skip
        elif hold:
            await self._hold_running(item, queued, error, failure=error)
        else:
            self._resume.pop(item.job_id, None)  # a run that raised may have left bad state: start over
            logger.warning("Job %s failed (%d of %d): %s; re-queued", item.job_id, failures, self._settings.max_attempts, error)
            await self._persist(
                self._jobs.transition, item.job_id, JobStatus.PENDING,
                edit_metadata=_count_failure(error), from_status=JobStatus.RUNNING,
            )  # fmt: skip
            self._queue.push(queued)

    async def _finish(self, job_id: str, status: JobStatus, **changes: Any) -> None:
        with tracing.job_span("seidra.db.update", job_id, attributes={"seidra.status": status.value}):
            job = await self._persist(
                self._jobs.transition, job_id, status, finished_at=utcnow(), from_status=JobStatus.RUNNING, **changes
            )
        metrics.job_events()[status.value].inc(tags={"lane": job.lane})
        if job.started_at is not None:
            duration_s = (as_utc(job.finished_at) - as_utc(job.started_at)).total_seconds()
            metrics.job_histograms()["duration"].observe(duration_s, tags={"lane": job.lane})
        logger.info("Job %s %s", job_id, status.value)
        self._mark_finished(job_id)

    def _mark_finished(self, job_id: str) -> None:
        event = self._finished.pop(job_id, None)
        if event is not None:
            event.set()

    async def _persist(self, write: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a storage call off the event loop, retrying through outages so no outcome is dropped.

        Only lost connections and locked databases are retried; refusals (an illegal transition, an
        unknown job) and bugs propagate.
        """
        delay_s = 0.5
        while True:
            try:
                return await asyncio.to_thread(write, *args, **kwargs)
            except STORAGE_OUTAGES:
                metrics.storage_errors().inc(tags={"call": write.__name__})
                logger.exception("Storage call %s failed; retrying in %.1f s", write.__name__, delay_s)
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, STORAGE_RETRY_MAX_S)


def get_or_create_router(app_name: str, worker: DeploymentHandle, settings_env: dict[str, str]) -> ray.actor.ActorHandle:
    """The application's router, created on first use; it outlives its creator and restarts after a crash.

    One left running by an older release is replaced: its queue is rebuilt from the database.
    """
    router = _router_actor(app_name).remote(worker, settings_env)
    if router_is_outdated(router):
        logger.warning("Replacing the router %s left running by an older release", router_name(app_name))
        ray.kill(router, no_restart=True)
        router = _router_actor(app_name).remote(worker, settings_env)
    return router


def router_is_outdated(router: ray.actor.ActorHandle) -> bool:
    if not hasattr(router, "api_version"):
        return True  # older than the versions themselves
    try:
        return ray.get(router.api_version.remote(), timeout=ROUTER_VERSION_TIMEOUT_S) < ROUTER_API_VERSION
    except ray.exceptions.GetTimeoutError:
        logger.warning("The router did not tell its version within %.0f s; keeping it", ROUTER_VERSION_TIMEOUT_S)
        return False


def _router_actor(app_name: str) -> Any:
    return ray.remote(JobRouter).options(
        name=router_name(app_name),
        namespace=ROUTER_NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        num_cpus=0,
        # Every ?wait=true request holds one call open; heartbeats must still get through.
        max_concurrency=10_000,
        runtime_env={"env_vars": tracing.environment()},
    )


def get_router(app_name: str) -> ray.actor.ActorHandle:
    """The application's running router; raises ValueError when there is none."""
    return ray.get_actor(router_name(app_name), namespace=ROUTER_NAMESPACE)
