"""The priority router: one named Ray actor, the shell around the scheduling core.

`scheduling.scheduler` decides everything about a job's life; this actor carries the decisions out
(database writes through `JobWriter`, worker calls through `WorkerCalls`, spans, metrics, logs) and
feeds back what happened. The database is the source of truth: the router rebuilds the core from it
when it starts (in the background, retrying while the database is down: until then the API answers
503 with Retry-After), and a reconciler compares the two every `reconcile_interval_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import timedelta
from typing import Any, TypeVar

import ray
from opentelemetry import trace
from ray.serve.handle import DeploymentHandle

from scheduling import metrics, tracing
from scheduling.background import BackgroundTasks
from scheduling.directives import InjectedFaults, ReplicaDirectives, ReplicaSnapshot
from scheduling.hold import Backoff
from scheduling.job_writer import JobWriter
from scheduling.lanes import Lane, lane_for
from scheduling.quota import Quota
from scheduling.retry_later import RetryLater
from scheduling.router_lookup import ROUTER_NAMESPACE, get_router, router_name
from scheduling.scheduler import (
    Action,
    CancelCall,
    DeleteImage,
    ErrorKind,
    Finish,
    HoldJobs,
    JobSpec,
    JobWrite,
    Persist,
    Resumed,
    Scheduler,
    SchedulerConfig,
    Start,
    UnknownJob,
    YieldCall,
)
from scheduling.settings import RouterSettings
from scheduling.webhook_sender import WebhookConfig, WebhookSender
from scheduling.work import GenerationParams, WorkBatch, WorkResult
from scheduling.worker_calls import CallFailed, WorkerCalls
from storage.api_keys import ApiKeyStore, KeyLimits
from storage.database import DATABASE_OUTAGES
from storage.job_status import JobStatus
from storage.jobs import IdempotencyClaim, JobNotFound, JobStore, Submission, as_utc
from storage.models import GenerationJob, utcnow
from storage.notifications import Level, NotificationService
from storage.object_store import ObjectStore, image_key, open_object_store
from storage.settings import StorageSettings
from storage.webhooks import WebhookStore

__all__ = ["JobRouter", "RouterUnavailable", "get_or_create_router", "get_router"]

logger = logging.getLogger(__name__)

# Bumped when the router's methods change so that an older router could not serve the new API (a
# new argument, a new method): the router is detached and outlives deployments, so the
# application replaces one left running by an older release.
ROUTER_API_VERSION = 7
ROUTER_VERSION_TIMEOUT_S = 60.0
# Short enough that the API answers soon after the database is back.
RECOVERY_RETRY_MAX_S = 10.0
GAUGE_INTERVAL_S = 1.0
ANSWER_TIMEOUT_S = 10.0
T = TypeVar("T")


class RouterUnavailable(RetryLater):
    """The router cannot take requests yet (recovering) or its database is unreachable: come back later."""


def scheduler_config(settings: RouterSettings) -> SchedulerConfig:
    return SchedulerConfig(
        queue_limits={Lane.REALTIME: settings.max_realtime_queue, Lane.BATCH: settings.max_batch_queue},
        queue_full_retry_after_s=settings.queue_full_retry_after_s,
        steps_per_dispatch=settings.steps_per_dispatch,
        max_batch_size=settings.max_batch_size,
        queue_policy=settings.queue_policy,
        max_attempts=settings.max_attempts,
        degraded_cooldown_s=settings.degraded_cooldown_s,
        worker_ttl_s=settings.worker_ttl_s,
        hold_backoff=Backoff(settings.hold_base_s, settings.hold_cap_s, settings.hold_jitter),
        storage_backoff=Backoff(settings.hold_base_s, settings.hold_cap_s, settings.hold_jitter),
        max_storage_faults=settings.max_storage_faults,
    )


def _span_attributes(job: GenerationJob) -> dict[str, Any]:
    batch = {"seidra.batch_id": str(job.batch_id)} if job.batch_id else {}
    return {tracing.JOB_ID: str(job.id), "seidra.lane": job.lane, "seidra.priority": job.priority, **batch}


def _specs(rows: Sequence[GenerationJob]) -> list[JobSpec]:
    """The jobs the core can take; a row it cannot read (edited by hand, say) is logged and left
    alone rather than keep the router from starting."""
    specs = []
    for row in rows:
        try:
            specs.append(job_spec(row).check())
        except Exception:
            logger.exception("Job %s cannot be read back from the database; left as it is", row.id)
            metrics.reconciler_repairs().inc(tags={"repair": "unreadable"})
    return specs


def _without_prompt(action: Action) -> str:
    """An action for the log: a start's work item carries the job's prompt, which logs must not."""
    if isinstance(action, Start):
        return f"Start(job_ids={action.batch.job_ids!r}, call_id={action.call_id}, writes={action.writes!r})"
    return repr(action)


def job_spec(job: GenerationJob) -> JobSpec:
    arrival = as_utc(job.created_at).timestamp()
    return JobSpec(str(job.id), job.priority, arrival, GenerationParams.of(job), JobStatus(job.status), job.meta, job.owner)


def user_quota(settings: RouterSettings, limits: KeyLimits) -> Quota:
    """The settings' per-user limits, with the overrides of the key the request came with."""
    realtime, batch, rate = limits.max_waiting_realtime, limits.max_waiting_batch, limits.submissions_per_minute
    return Quota(
        max_unfinished={
            Lane.REALTIME: realtime or settings.user_max_waiting_realtime,
            Lane.BATCH: batch or settings.user_max_waiting_batch,
        },
        submissions_per_minute=rate or settings.user_submissions_per_minute,
    )


class JobRouter:
    def __init__(self, worker: DeploymentHandle[Any], settings: RouterSettings, storage: StorageSettings) -> None:
        tracing.configure("router")
        tracing.configure_logging()
        self._settings = settings
        self._storage = storage
        self._core = Scheduler(scheduler_config(settings), clock=time.time)
        self._jobs = JobStore(storage.database_url)
        self._writer = JobWriter(self._jobs, NotificationService(storage.database_url), retry_max_s=RECOVERY_RETRY_MAX_S)
        self._calls = WorkerCalls(worker, settings.inference_timeout_s, storage.upload_timeout_s)
        # Reads each key's webhook secret from the database itself: no secret is an actor argument.
        keys = ApiKeyStore(storage.database_url)
        self._webhooks = WebhookSender(WebhookStore(storage.database_url), keys, WebhookConfig.of(settings))
        self._media: ObjectStore | None = None  # opened on first use: S3 may be down as the router starts
        self._waiters: dict[str, asyncio.Event] = {}
        self._ready = asyncio.Event()
        self._wake = asyncio.Event()
        self._replica_states: set[tuple[str, str]] = set()  # (mode, health) pairs the gauge has shown
        self._gauges_due = 0.0
        self._tasks = BackgroundTasks("Router")
        loops = (self._writer.run(), self._recover(), self._dispatch_loop(), self._reconcile_loop(), self._webhooks.run())
        for loop_task in loops:
            self._tasks.spawn(loop_task)

    # ----- start-up: the core rebuilt from the database -----

    async def _recover(self) -> None:
        delay_s = 0.5
        while True:
            try:
                rows = await asyncio.to_thread(self._jobs.unfinished)
                break
            except Exception as error:  # the constructor must never fail: Ray would not restart the actor
                logger.warning("Cannot read the queue from the database (%s); retrying in %.1f s", error, delay_s)
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, RECOVERY_RETRY_MAX_S)
        self._execute(self._core.recover(_specs(rows), reason="router restarted"))
        self._ready.set()
        self._wake.set()
        logger.info("Router rebuilt its queue from the database: %d unfinished jobs", len(rows))

    def _require_ready(self) -> None:
        if not self._ready.is_set():
            raise RouterUnavailable(
                "the router is rebuilding its queue from the database", self._settings.unavailable_retry_after_s
            )

    # ----- public methods (called through the actor handle) -----

    async def submit(
        self,
        requests: list[dict[str, Any]],
        batch_id: str | None = None,
        trace_context: tracing.Carrier | None = None,
        idempotency: IdempotencyClaim | None = None,
        owner: str = "",
        limits: KeyLimits | None = None,
    ) -> Submission:
        """Store and enqueue `owner`'s jobs, all or none. Raises QueueFullError when a lane is full,
        QuotaExceeded when `owner` would go beyond their quota (the settings' per-user limits with the
        overrides of their key, `limits`; None: no per-user quota, as when authentication is off).

        With `idempotency`, a request replayed under the same key returns the jobs it created the
        first time (`created` False), and costs no room or quota.

        A request may give its jobs' ids (`id`: a named batch's items, `storage.batches`). A job
        stored already under its id is answered as stored (`found`), at no cost; BatchConflict, and
        nothing stored, when it asks for another image.
        """
        self._require_ready()
        if idempotency is not None:
            replayed = await self._stored_call(self._jobs.replay, idempotency)
            if replayed is not None:
                return replayed
        jobs = [self._new_job(request, batch_id, owner) for request in requests]
        found = await self._stored_call(self._jobs.stored_already, jobs)
        new = [job for job in jobs if job.id not in found]
        with tracing.enqueue_spans(trace_context, [_span_attributes(job) for job in new], batch=batch_id is not None) as spans:
            for job, span in zip(new, spans, strict=True):
                job.meta = {**job.meta, **tracing.job_trace(span)}
            quota = None if limits is None else user_quota(self._settings, limits)
            reservation = self._core.reserve([Lane(job.lane) for job in new], owner, quota)
            submission = None
            try:
                submission = await self._stored_call(self._jobs.submit, jobs, idempotency)
            finally:
                self._core.release(reservation, stored=submission is not None and submission.created)
            self._core.submit([job_spec(job) for job in submission.new])
        for job in submission.new:
            metrics.job_events()["submitted"].inc(tags={"lane": job.lane})
        self._wake.set()
        return submission

    async def cancel(self, job_id: str, owner: str | None = None) -> GenerationJob:
        """End a job `cancelled`; a running one stops at its next step boundary. Finished jobs refuse.

        With `owner`, another owner's job is JobNotFound, as a missing one.
        """
        self._require_ready()
        try:
            actions = self._core.cancel(job_id, owner)
        except UnknownJob:  # not in the router's hands: the database decides (ended, gone, or diverged)
            if owner is not None:
                await asyncio.to_thread(self._jobs.get, job_id, owner=owner)
            unfinished = frozenset({JobStatus.PENDING, JobStatus.RUNNING})
            job = await self._answer(
                self._writer.transition(JobWrite(job_id, unfinished, JobStatus.CANCELLED, mark_finished=True))
            )
            self._finished(job)
            return job
        [written, *_] = self._execute(actions)
        self._wake.set()
        return await self._answer(written)

    async def retry(
        self, job_id: str, countdown_s: float = 0.0, owner: str | None = None, limits: KeyLimits | None = None
    ) -> GenerationJob:
        """Queue a failed, cancelled or held job again at realtime priority, after `countdown_s`.

        Raises IllegalTransition for a running (between two slices too) or completed job, or one
        already waiting normally; with `owner`, JobNotFound for another owner's job. A retry is a
        submission: QueueFullError or QuotaExceeded (with the caller's key `limits`) when it does not fit.
        """
        self._require_ready()
        job = await asyncio.to_thread(self._jobs.get, job_id, owner=owner)
        quota = None if limits is None else user_quota(self._settings, limits)
        with tracing.job_span("seidra.retry", job_id, job.meta.get("trace_context"), {"seidra.countdown_s": countdown_s}):
            [written] = self._execute(self._core.retry(job_spec(job), countdown_s, quota))
            self._wake.set()
            job = await self._answer(written)
        logger.info("Job %s re-queued at priority %d (countdown %.0f s)", job_id, job.priority, countdown_s)
        return job

    async def _stored_call(self, call: Callable[..., T], *args: Any) -> T:
        """A database call on the request path; an outage is the caller's cue to come back (503)."""
        try:
            return await asyncio.to_thread(call, *args)
        except DATABASE_OUTAGES as outage:
            metrics.storage_errors().inc(tags={"call": getattr(call, "__name__", "database")})
            raise RouterUnavailable(
                f"the database is unreachable ({type(outage).__name__})", self._settings.unavailable_retry_after_s
            ) from None

    async def _answer(self, written: asyncio.Future[GenerationJob]) -> GenerationJob:
        """A user's change, once stored; during a database outage the caller hears 503 (the change
        is decided and lands when the database is back) instead of waiting for the outage to end."""
        try:
            return await asyncio.wait_for(asyncio.shield(written), ANSWER_TIMEOUT_S)
        except asyncio.TimeoutError:
            reason = "the database is unreachable; the change is recorded as soon as it is back"
            raise RouterUnavailable(reason, self._settings.unavailable_retry_after_s) from None

    async def wait(self, job_id: str, timeout_s: float) -> str:
        """Wait until the job ends or `timeout_s` passes; returns its status then."""
        # Registered before the read, so an end between the read and the wait is not missed.
        event = self._waiters.setdefault(job_id, asyncio.Event())
        try:
            job = await asyncio.to_thread(self._jobs.get, job_id)
        except JobNotFound:
            self._waiters.pop(job_id, None)
            raise
        if not JobStatus(job.status).is_terminal:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(event.wait(), timeout_s)
            job = await asyncio.to_thread(self._jobs.get, job_id)
        if JobStatus(job.status).is_terminal:
            self._waiters.pop(job_id, None)
        return job.status

    async def report_progress(self, call_id: int, step: int) -> None:
        """A replica's word between two slices of a call: where its jobs stand, and that it is alive."""
        self._core.progress_report(call_id, step)
        self._calls.alive(call_id)

    async def heartbeat(self, replica_id: str, slots: int, snapshot: ReplicaSnapshot) -> ReplicaDirectives:
        directives = self._core.heartbeat(replica_id, slots, snapshot)
        self._wake.set()  # a report may bring capacity back: held jobs then run at once
        return directives

    async def set_maintenance(self, replica_id: str | None, enabled: bool) -> list[dict[str, Any]]:
        """Drain one replica (or all, with None): running jobs finish, no new ones start there."""
        workers = self._core.set_maintenance(replica_id, enabled)
        logger.warning("Maintenance %s for %s", "on" if enabled else "off", replica_id or "all replicas")
        self._wake.set()
        return workers

    async def set_lane_paused(self, lane: str, paused: bool) -> list[str]:
        """Stop or restart dispatching from a lane (what `celery control cancel_consumer` did).

        Its jobs keep their places; the pause lives in this actor and ends if it restarts.
        """
        paused_lanes = self._core.set_lane_paused(Lane(lane), paused)
        logger.warning("Lane %s %s", lane, "paused" if paused else "resumed")
        self._wake.set()
        return paused_lanes

    async def set_faults(self, replica_id: str | None, faults: InjectedFaults | None) -> list[dict[str, Any]]:
        """Drills and tests: what replicas started with SEIDRA_FAULT_INJECTION=1 should pretend."""
        logger.warning("Injected faults for %s: %s", replica_id or "all replicas", faults)
        return self._core.set_faults(replica_id, faults)

    async def status(self) -> dict[str, Any]:
        return {**self._core.status(), "recovering": not self._ready.is_set()}

    async def progress(self, job_id: str, owner: str | None = None) -> dict[str, Any] | None:
        """The job's live state (JSON), or None once it has ended or when it is not `owner`'s: the
        database then has the last word."""
        progress = self._core.progress(job_id, owner)
        if progress is None:
            return None
        return {
            "state": progress.place.value,
            "step": progress.step,
            "total_steps": progress.total_steps,
            "queue_position": progress.queue_position,
            "replica_id": progress.replica_id,
            "held": None if progress.hold is None else progress.hold.document(),
        }

    async def api_version(self) -> int:
        return ROUTER_API_VERSION

    async def autoscaling_load(self) -> int:
        """Jobs that want a worker slot: waiting (held included) and running. Read by the autoscaler."""
        return self._core.load()

    def _new_job(self, request: dict[str, Any], batch_id: str | None, owner: str) -> GenerationJob:
        return GenerationJob(
            **request,
            owner=owner,
            lane=lane_for(request["priority"]).value,
            batch_id=batch_id,
            status=JobStatus.PENDING.value,
        )

    # ----- the loops -----

    async def _dispatch_loop(self) -> None:
        await self._ready.wait()
        while True:
            try:
                self._execute(self._core.tick())
                if time.monotonic() >= self._gauges_due:
                    self._record_gauges()
            except Exception:  # the loop must outlive any one failure
                logger.exception("Dispatch failed; retrying")
            timeout_s = min(self._core.next_wakeup() - time.time(), self._settings.worker_ttl_s / 2)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(timeout_s, 0.01))
            self._wake.clear()

    async def _reconcile_loop(self) -> None:
        await self._ready.wait()
        while True:
            await asyncio.sleep(self._settings.reconcile_interval_s)
            try:
                await self._reconcile()
            except Exception:
                logger.exception("Reconciler round failed; next round in %.0f s", self._settings.reconcile_interval_s)

    async def _reconcile(self) -> None:
        """Compare the database with the core and repair what two rounds in a row agree is wrong."""
        known = self._core.job_ids()
        view = await asyncio.to_thread(self._jobs.unfinished_view)
        gone_or_ended = [job_id for job_id in known if job_id not in view]
        if gone_or_ended:
            view.update(await asyncio.to_thread(self._jobs.statuses, gone_or_ended))
        divergence = self._core.reconcile({job_id: (JobStatus(s), at) for job_id, (s, at) in view.items()})
        for job_id in sorted(divergence.drop):
            logger.warning(
                "Reconciler: job %s is %s in the database; the router lets it go", job_id, view.get(job_id, ("gone",))[0]
            )
            metrics.reconciler_repairs().inc(tags={"repair": "dropped"})
            self._execute(self._core.forget(job_id))
        if divergence.adopt:
            rows = await asyncio.to_thread(self._jobs.get_many, divergence.adopt)
            for row in rows:
                logger.warning("Reconciler: job %s is %s in the database but was not queued; queueing it", row.id, row.status)
                metrics.reconciler_repairs().inc(tags={"repair": "adopted"})
            self._execute(self._core.recover(_specs(rows), reason="reconciled"))
        cutoff = utcnow() - timedelta(seconds=self._settings.idempotency_ttl_s)
        await asyncio.to_thread(self._jobs.delete_idempotency_keys, cutoff)
        self._wake.set()

    # ----- carrying out the core's actions -----

    def _execute(self, actions: Sequence[Action]) -> list[asyncio.Future[GenerationJob]]:
        """Enqueue every write now, in order; the rest runs in tasks. Returns the job writes' futures.

        One action that cannot be carried out must not cost the others theirs: it is logged, and the
        reconciler repairs what the database and the core then disagree on.
        """
        written = []
        for action in actions:
            try:
                future = self._carry_out(action)
            except Exception:
                logger.exception("Could not carry out %s", _without_prompt(action))
                continue
            if future is not None and isinstance(action, (Persist, Finish)):
                written.append(future)
        return written

    def _carry_out(self, action: Action) -> asyncio.Future[GenerationJob] | None:
        if isinstance(action, Start):
            metrics.call_batch_size().observe(len(action.batch.items), tags={"lane": action.lane.value})
            futures = [self._writer.transition(write) for write in action.writes]
            self._tasks.spawn(self._run(action, futures))
            return None
        if isinstance(action, (Persist, Finish)):
            future = self._writer.transition(action.write)
            self._tasks.spawn(self._after_write(action, future))
            return future
        if isinstance(action, HoldJobs):
            self._hold(action)
        elif isinstance(action, Resumed):
            message = f"Your image is running again after {action.hold.delays} delay(s): a GPU is available."
            self._notify([(action.job_id, Level.INFO, message)])
        elif isinstance(action, CancelCall):
            self._calls.cancel(action.call_id)
        elif isinstance(action, YieldCall):
            metrics.calls_yielded().inc(tags={"reason": action.reason})
            self._tasks.spawn(self._calls.request_yield(action.request))
        elif isinstance(action, DeleteImage):
            self._tasks.spawn(self._delete_image(action.job_id))
        return None

    async def _run(self, start: Start, written: list[asyncio.Future[GenerationJob]]) -> None:
        """Call, and meanwhile write: whatever happens, the core hears how the call ended for each of
        its jobs (a task that died would leave them running in the core for good, their slot taken).

        The call does not wait for the database to say `running`: the writes are queued in order (a
        job's start lands before its end), and a database round trip per call would idle the GPU
        between calls. A start the database refuses (the row changed behind the router) stops the
        job's part of the call; whatever it computed is dropped.
        """
        batch = start.batch
        items = tuple(item for item in batch.items if self._core.is_running(item.job_id, batch.call_id))
        for item in batch.items:
            if item not in items:  # cancelled before its call could leave: never sent
                self._execute(self._core.error(item.job_id, batch.call_id, ErrorKind.JOB_ERROR, "not sent"))
        call = asyncio.ensure_future(self._call(replace(batch, items=items))) if items else None
        for write, future in zip(start.writes, written, strict=True):
            try:
                job = await future
            except Exception as refused:
                self._let_go(write.job_id, refused)
                continue
            if write.mark_started:
                self._started(job)
        if call is not None:
            await call
        self._wake.set()

    async def _call(self, batch: WorkBatch) -> None:
        attributes = {"seidra.replica_id": batch.replica_id, "seidra.step": batch.step, "seidra.batch_size": len(batch.items)}
        traces = {item.job_id: item.trace_context for item in batch.items}
        with tracing.job_spans("seidra.dispatch", traces, attributes) as spans:
            carriers = {job_id: tracing.carrier(trace.set_span_in_context(span)) for job_id, span in spans.items()}
            try:
                results = await self._calls.advance(batch, carriers)
            except CallFailed as failed:
                failure = failed
            except Exception as error:  # a bug of the router's own, not the jobs'
                logger.exception("Dispatching call %d (%s) failed in the router", batch.call_id, ", ".join(batch.job_ids))
                failure = CallFailed(ErrorKind.JOB_ERROR, f"router error: {error!r}")
            else:
                for result in results:
                    with trace.use_span(spans[result.job_id]):  # the job's final write is a child of its call
                        self._execute(self._outcome(batch.call_id, result))
                return
            for job_id, span in spans.items():
                if failure.kind is not ErrorKind.REPLICA_UNAVAILABLE:  # a hold is no failure
                    tracing.mark_failed(span, failure.detail)
                with trace.use_span(span):
                    self._execute(self._core.error(job_id, batch.call_id, failure.kind, failure.detail, failure.snapshot))

    def _outcome(self, call_id: int, result: WorkResult) -> list[Action]:
        if result.storage_error is not None:
            return self._core.error(result.job_id, call_id, ErrorKind.STORAGE, result.storage_error)
        return self._core.result(result.job_id, call_id, result)

    @staticmethod
    def _started(job: GenerationJob) -> None:
        metrics.job_events()["started"].inc(tags={"lane": job.lane})
        assert job.started_at is not None  # the write that started it set it
        wait_s = (as_utc(job.started_at) - as_utc(job.created_at)).total_seconds()
        metrics.job_histograms()["queue_wait"].observe(wait_s, tags={"lane": job.lane})

    async def _after_write(self, action: Persist | Finish, written: asyncio.Future[GenerationJob]) -> None:
        write = action.write
        try:
            if isinstance(action, Finish):
                job = await self._traced(action, written)
                self._finished(job)
            else:
                await written
        except Exception as refused:
            self._let_go(write.job_id, refused)

    @staticmethod
    async def _traced(finish: Finish, written: asyncio.Future[GenerationJob]) -> GenerationJob:
        """A job's final write, as a span of its trace: under the slice that ended it, when there is one."""
        in_a_slice = trace.get_current_span().get_span_context().is_valid
        parent = None if in_a_slice else finish.trace_context
        attributes = {"seidra.status": finish.write.to_status.value}
        with tracing.job_span("seidra.db.update", finish.write.job_id, parent, attributes):
            return await written

    def _let_go(self, job_id: str, refused: Exception) -> None:
        """The database refused a write (the row changed or vanished): the reconciler has the last word."""
        logger.warning("Job %s changed behind the router (%s); letting it go", job_id, refused)
        self._execute(self._core.forget(job_id))
        self._wake.set()

    def _finished(self, job: GenerationJob) -> None:
        logger.info("Job %s %s", job.id, job.status)
        metrics.job_events()[job.status].inc(tags={"lane": job.lane})
        if job.started_at is not None and job.finished_at is not None:
            duration_s = (as_utc(job.finished_at) - as_utc(job.started_at)).total_seconds()
            metrics.job_histograms()["duration"].observe(duration_s, tags={"lane": job.lane})
        event = self._waiters.pop(str(job.id), None)
        if event is not None:
            event.set()
        self._webhooks.job_ended(job)

    def _hold(self, action: HoldJobs) -> None:
        self._watch(self._writer.holds([(held.job_id, held.hold.document()) for held in action.jobs]))
        self._notify([
            (held.job_id, Level.WARNING, f"Your image is delayed: no GPU is available ({held.hold.last.reason}). "
             f"It will run as soon as one is; next retry in {held.hold.last.retry_after_s} s.")
            for held in action.jobs if held.new_episode
        ])  # fmt: skip
        for held in action.jobs:
            delay = held.hold.last
            attributes = {"seidra.reason": delay.reason, "seidra.retry_after_s": delay.retry_after_s}
            with tracing.job_span("seidra.hold", held.job_id, held.trace_context, attributes):
                logger.warning(
                    "Delaying job %s due to GPU unavailability: %s (retry in %d s)",
                    held.job_id,
                    delay.reason,
                    delay.retry_after_s,
                )
            metrics.job_events()["delayed"].inc(tags={"lane": held.lane.value})

    def _notify(self, notifications: list[tuple[str | None, Level, str]]) -> None:
        if notifications:
            self._watch(self._writer.notify(notifications))
            for _job_id, level, _message in notifications:
                metrics.notifications_sent().inc(tags={"level": level.value})

    async def _delete_image(self, job_id: str) -> None:
        try:
            if self._media is None:
                self._media = await asyncio.to_thread(open_object_store, self._storage)
            await asyncio.to_thread(self._media.delete, image_key(job_id))
        except Exception:
            logger.exception("Could not delete the image of cancelled job %s", job_id)

    @staticmethod
    def _watch(future: asyncio.Future[Any]) -> None:
        future.add_done_callback(lambda done: done.cancelled() or done.exception())

    def _record_gauges(self) -> None:
        # Scraped every few seconds: counting every record on each of many wake-ups a second would
        # only cost the dispatch loop time.
        self._gauges_due = time.monotonic() + GAUGE_INTERVAL_S
        status = self._core.status()
        gauges = metrics.queue_gauges()
        for lane in Lane:
            gauges["depth"].set(status["queues"][lane.value], tags={"lane": lane.value})
            gauges["held"].set(status["held"][lane.value], tags={"lane": lane.value})
        gauges["running"].set(status["running"])
        counts: dict[tuple[str, str], int] = dict.fromkeys(self._replica_states, 0)
        for row in status["workers"]:
            counts[(row["mode"], row["health"])] = counts.get((row["mode"], row["health"]), 0) + 1
        for (mode, health), count in counts.items():  # states that emptied go back to 0
            gauges["replicas"].set(count, tags={"mode": str(mode), "health": str(health)})
        self._replica_states = set(counts)


def get_or_create_router(app_name: str, worker: DeploymentHandle[Any], settings: RouterSettings, storage: StorageSettings) -> Any:
    """The application's router, created on first use; it outlives its creator and restarts after a crash.

    One left running by an older release is replaced: its queue is rebuilt from the database.
    """
    router = _router_actor(app_name).remote(worker, settings, storage)
    if router_is_outdated(router):
        logger.warning("Replacing the router %s left running by an older release", router_name(app_name))
        ray.kill(router, no_restart=True)
        router = _router_actor(app_name).remote(worker, settings, storage)
    return router


def router_is_outdated(router: Any) -> bool:
    """`router` is an actor handle: Ray types its methods' results as Any."""
    if not hasattr(router, "api_version"):
        return True  # older than the versions themselves
    try:
        version: int = ray.get(router.api_version.remote(), timeout=ROUTER_VERSION_TIMEOUT_S)
        return version < ROUTER_API_VERSION
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
