"""The priority router: one named Ray actor that owns the waiting queue and dispatches jobs.

It dispatches only into free worker capacity, so jobs never wait inside a replica where a later
realtime job could not overtake them. The database is the source of truth: on (re)start the queue
is rebuilt from the pending and running jobs.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import ray
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from scheduling.job_queue import LaneQueues, QueuedJob
from scheduling.lanes import Lane, lane_for
from scheduling.settings import RouterSettings
from scheduling.work import GenerationParams, WorkItem, WorkResult
from storage.job_status import IllegalTransition, JobStatus
from storage.jobs import JobNotFound, JobStore, as_utc
from storage.models import GenerationJob, utcnow
from storage.settings import StorageSettings

logger = logging.getLogger(__name__)
T = TypeVar("T")

ROUTER_NAME = "seidra-router"
ROUTER_NAMESPACE = "seidra"
# The worker, not the job, is at fault: the job goes back to its lane.
WORKER_FAULTS = (RayActorError, BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError)
STORAGE_RETRY_MAX_S = 30.0


@dataclass
class WorkerInfo:
    replica_id: str
    slots: int
    last_seen: float
    details: dict[str, Any] = field(default_factory=dict)


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


class JobRouter:
    def __init__(self, worker: DeploymentHandle) -> None:
        self._settings = RouterSettings()
        self._jobs = JobStore(StorageSettings().database_url)
        self._queue = LaneQueues(
            {Lane.REALTIME: self._settings.max_realtime_queue, Lane.BATCH: self._settings.max_batch_queue},
            retry_after_s=self._settings.queue_full_retry_after_s,
        )
        self._worker = worker
        self._workers: dict[str, WorkerInfo] = {}
        self._running: dict[str, asyncio.Task[None]] = {}
        # Jobs between two step slices: their next WorkItem, latents included.
        self._resume: dict[str, WorkItem] = {}
        self._finished: dict[str, asyncio.Event] = {}
        self._wake = asyncio.Event()
        self._recover()
        self._loop = asyncio.get_event_loop().create_task(self._dispatch_loop())

    # ----- rebuilding from the database -----

    def _recover(self) -> None:
        for job in self._jobs.unfinished():
            if job.status == JobStatus.RUNNING.value:
                # Its worker's answer went to the router that died; running it again overwrites the
                # same object key, so nothing is duplicated.
                job = self._jobs.transition(job.id, JobStatus.PENDING, metadata_patch={"requeued": "router restarted"})
            self._queue.push(queued_job(job))
        logger.info("Router rebuilt its queue from the database: %d jobs waiting", len(self._queue))

    # ----- public methods (called through the actor handle) -----

    async def submit(self, requests: list[dict[str, Any]], batch_id: str | None = None) -> list[dict[str, Any]]:
        """Store and enqueue jobs, all or none. Raises QueueFullError when a lane is full."""
        jobs = [self._new_job(request, batch_id) for request in requests]
        for lane in Lane:
            count = sum(1 for job in jobs if job.lane == lane.value)
            if count:
                self._queue.check_room(lane, count)
        await asyncio.to_thread(self._jobs.add_all, jobs)
        for job in jobs:
            self._queue.push(queued_job(job))
        self._wake.set()
        return [job.model_dump() for job in jobs]

    async def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a waiting job. Raises IllegalTransition for running or finished jobs."""
        job = await asyncio.to_thread(self._jobs.transition, job_id, JobStatus.CANCELLED, finished_at=utcnow())
        self._queue.remove(job_id)
        self._mark_finished(job_id)
        return job.model_dump()

    async def wait(self, job_id: str, timeout_s: float) -> str:
        """Wait until the job ends or `timeout_s` passes; returns its status then."""
        event = self._finished.setdefault(job_id, asyncio.Event())
        job = await asyncio.to_thread(self._jobs.get, job_id)
        if not JobStatus(job.status).is_terminal:
            try:
                await asyncio.wait_for(event.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass
            job = await asyncio.to_thread(self._jobs.get, job_id)
        if JobStatus(job.status).is_terminal:
            self._finished.pop(job_id, None)
        return job.status

    async def heartbeat(self, replica_id: str, slots: int, details: dict[str, Any]) -> None:
        known = replica_id in self._workers
        self._workers[replica_id] = WorkerInfo(replica_id, slots, time.monotonic(), details)
        if not known:
            logger.info("Worker replica %s joined with %d slot(s)", replica_id, slots)
            self._wake.set()

    async def status(self) -> dict[str, Any]:
        self._expire_workers()
        return {
            "queues": {lane.value: self._queue.depth(lane) for lane in Lane},
            "running": len(self._running),
            "capacity": self._capacity(),
            "workers": [
                {"replica_id": w.replica_id, "slots": w.slots, "seen_s_ago": round(time.monotonic() - w.last_seen, 1), **w.details}
                for w in self._workers.values()
            ],
        }

    async def queued_order(self) -> list[str]:
        """Waiting job ids in dispatch order (for operators and tests)."""
        return [queued.job_id for queued in self._queue]

    # ----- dispatching -----

    def _new_job(self, request: dict[str, Any], batch_id: str | None) -> GenerationJob:
        return GenerationJob(
            **request,
            lane=lane_for(request["priority"]).value,
            batch_id=uuid.UUID(batch_id) if batch_id else None,
            status=JobStatus.PENDING.value,
        )

    def _capacity(self) -> int:
        return sum(worker.slots for worker in self._workers.values())

    def _expire_workers(self) -> None:
        deadline = time.monotonic() - self._settings.worker_ttl_s
        for replica_id in [r for r, w in self._workers.items() if w.last_seen < deadline]:
            logger.warning("Worker replica %s stopped reporting; it no longer counts as capacity", replica_id)
            del self._workers[replica_id]

    async def _dispatch_loop(self) -> None:
        while True:
            try:
                self._expire_workers()
                while len(self._running) < self._capacity():
                    queued = self._queue.pop()
                    if queued is None:
                        break
                    await self._start(queued)
            except Exception:  # the loop must outlive any one failure
                logger.exception("Dispatch failed; retrying")
            try:
                await asyncio.wait_for(self._wake.wait(), self._settings.worker_ttl_s / 2)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()

    async def _start(self, queued: QueuedJob) -> None:
        item = self._resume.pop(queued.job_id, None)
        if item is None:
            try:
                job = await self._persist(
                    self._jobs.transition, queued.job_id, JobStatus.RUNNING, started_at=utcnow(), count_attempt=True
                )
            except IllegalTransition:
                return  # cancelled while it waited
            item = WorkItem(job_id=queued.job_id, params=job_params(job), max_steps=self._settings.steps_per_dispatch)
        self._running[queued.job_id] = asyncio.get_event_loop().create_task(self._run(item, queued))

    async def _persist(self, write: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a storage call off the event loop, retrying through outages so no outcome is dropped.

        Refusals (an illegal transition, an unknown job) are answers, not outages: they propagate.
        """
        delay_s = 0.5
        while True:
            try:
                return await asyncio.to_thread(write, *args, **kwargs)
            except (IllegalTransition, JobNotFound):
                raise
            except Exception:
                logger.exception("Storage call %s failed; retrying in %.1f s", write.__name__, delay_s)
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, STORAGE_RETRY_MAX_S)

    async def _run(self, item: WorkItem, queued: QueuedJob) -> None:
        try:
            result: WorkResult = await self._worker.advance.remote(item)
        except WORKER_FAULTS as error:
            await self._requeue_or_fail(queued, f"{type(error).__name__}: {error}")
        except Exception as error:
            await self._finish(item.job_id, JobStatus.FAILED, error=f"{type(error).__name__}: {error}")
        else:
            if result.done:
                await self._finish(
                    item.job_id,
                    JobStatus.COMPLETED,
                    result_key=result.object_key,
                    metadata_patch={"replica_id": result.replica_id, "inference_s": round(result.duration_s, 3)},
                )
            else:
                self._resume[item.job_id] = WorkItem(
                    item.job_id, item.params, step=result.step, latents=result.latents, max_steps=item.max_steps
                )
                self._queue.push(queued)
        finally:
            self._running.pop(item.job_id, None)
            self._wake.set()

    async def _requeue_or_fail(self, queued: QueuedJob, reason: str) -> None:
        self._resume.pop(queued.job_id, None)
        job = await self._persist(self._jobs.get, queued.job_id)
        if job.attempts >= self._settings.max_attempts:
            await self._finish(queued.job_id, JobStatus.FAILED, error=f"gave up after {job.attempts} attempts; {reason}")
            return
        logger.warning("Re-queueing job %s: %s", queued.job_id, reason)
        await self._persist(self._jobs.transition, queued.job_id, JobStatus.PENDING, metadata_patch={"requeued": reason})
        self._queue.push(queued)

    async def _finish(self, job_id: str, status: JobStatus, **changes: Any) -> None:
        await self._persist(self._jobs.transition, job_id, status, finished_at=utcnow(), **changes)
        logger.info("Job %s %s", job_id, status.value)
        self._mark_finished(job_id)

    def _mark_finished(self, job_id: str) -> None:
        event = self._finished.pop(job_id, None)
        if event is not None:
            event.set()


def get_or_create_router(worker: DeploymentHandle) -> ray.actor.ActorHandle:
    """The router, created on first use; it outlives its creator and restarts after a crash."""
    return (
        ray.remote(JobRouter)
        .options(
            name=ROUTER_NAME,
            namespace=ROUTER_NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            max_restarts=-1,
            num_cpus=0,
        )
        .remote(worker)
    )


def get_router() -> ray.actor.ActorHandle:
    """The running router; raises ValueError when there is none."""
    return ray.get_actor(ROUTER_NAME, namespace=ROUTER_NAMESPACE)
