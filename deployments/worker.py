"""The GPU worker: a Serve deployment whose replicas each hold one diffusers pipeline.

The job router reserves a slot on a replica before it sends work there (`AssignedReplicaRouter`),
and each replica reports its status snapshot every `heartbeat_interval_s`; the answer carries the
router's directives (maintenance, injected faults). The router drops a replica after
`SEIDRA_WORKER_TTL_S` of silence, so its view of a replica is at most that stale.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import replace
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig

from deployments.model_manager import ModelManager
from deployments.nvml import NoGpu, open_gpu_reader
from deployments.settings import WorkerSettings
from scheduling import metrics, tracing
from scheduling.assigned_replica import AssignedReplicaRouter
from scheduling.directives import Health, ReplicaSnapshot, ReplicaUnavailable, StorageUnavailable
from scheduling.hold import Backoff
from scheduling.router_lookup import get_router
from scheduling.work import WorkItem, WorkResult
from storage.object_store import ObjectStore, image_key, open_object_store
from storage.settings import StorageSettings

logger = logging.getLogger(__name__)

# One pipeline, one job at a time: a second request would only wait on the pipeline's lock.
SLOTS_PER_REPLICA = 1
UPLOAD_BACKOFF = Backoff(base_s=0.5, cap_s=8.0, jitter=0.2)


@serve.deployment(
    name="DiffusionWorker",
    max_ongoing_requests=SLOTS_PER_REPLICA,
    graceful_shutdown_timeout_s=120,
    request_router_config=RequestRouterConfig(request_router_class=AssignedReplicaRouter),
)
class DiffusionWorker:
    def __init__(self, settings: WorkerSettings, storage: StorageSettings) -> None:
        # Imported here so that building the application does not import torch in the driver.
        from deployments.pipeline import DiffusionRunner

        tracing.configure("worker")
        tracing.configure_logging()
        self._settings = settings
        gpu_reader = NoGpu() if self._settings.force_mock else open_gpu_reader()
        self.model_manager = ModelManager(self._settings, gpu_reader, lambda: DiffusionRunner(self._settings))
        self._storage = storage
        self._store: ObjectStore | None = None  # opened on first upload: S3 may be down as the replica starts
        context = serve.get_replica_context()
        self._replica_id, self._app_name = context.replica_id.unique_id, context.app_name
        # Reported, so that a restarted router neither overbooks this replica nor runs a job twice.
        self._running_jobs: set[str] = set()  # pipeline calls, until their thread ends
        self._uploading: set[str] = set()
        self._reporter = asyncio.get_event_loop().create_task(self._report_forever())

    async def advance(self, item: WorkItem, trace_context: tracing.Carrier | None = None) -> WorkResult:
        """Run one step slice of `item`; `trace_context` is the router's dispatch span."""
        snapshot = self.model_manager.get_status_snapshot()
        if not snapshot.can_run:
            raise ReplicaUnavailable(self._replica_id, snapshot)
        attributes = {"seidra.replica_id": self._replica_id, "seidra.step": item.step}
        with tracing.job_span("seidra.inference", item.job_id, trace_context, attributes) as span:
            try:
                result = await self._advance(item)
            except asyncio.CancelledError:  # not an Exception: OpenTelemetry would not mark it
                tracing.mark_failed(span, "given up by the router (a timeout or a cancelled job)")
                raise
            span.set_attribute("seidra.step_reached", result.step)
            return result

    async def _advance(self, item: WorkItem) -> WorkResult:
        from deployments.pipeline import StepControl

        if item.may_be_stored and await asyncio.to_thread(self._already_stored, item.job_id):
            # An earlier run stored it already (its answer was lost with its router, or its upload only seemed to fail): not twice.
            return WorkResult(item.job_id, self._replica_id, item.params.num_inference_steps, 0.0, object_key=image_key(item.job_id))
        faults = self.model_manager.faults
        started = time.perf_counter()
        deadline = time.monotonic() + item.timeout_s if item.timeout_s else None
        control = StepControl(step_delay_s=faults.inference_delay_s if faults else 0.0, deadline=deadline)
        try:
            if faults and faults.fail_inference:
                raise RuntimeError("injected inference failure")
            output = await asyncio.shield(self._start_inference(item, control))
        except asyncio.CancelledError:
            # The router gave up on this call (a timeout, a cancelled job): stop at the next step boundary.
            control.cancelled.set()
            self.model_manager.record_cancelled()
            raise
        except Exception:
            self.model_manager.record_failure(item.job_id)
            raise
        duration_s = time.perf_counter() - started
        self.model_manager.record_success(duration_s)
        # After the GPU's part: an object store that fails is a storage fault, not a sick GPU.
        object_key = await self._store_image(item.job_id, output.png)
        if output.step > item.step:
            step_s = duration_s / (output.step - item.step)
            metrics.worker_metrics()["step"].observe(step_s, tags={"replica": self._replica_id})
        return WorkResult(
            job_id=item.job_id,
            replica_id=self._replica_id,
            step=output.step,
            duration_s=duration_s,
            latents=output.latents,
            object_key=object_key,
        )

    def _start_inference(self, item: WorkItem, control: Any) -> asyncio.Future[Any]:
        """The pipeline call in a thread; the job counts as running here until the thread ends,
        even after the router gave up on it, so that nobody sends this replica more work meanwhile."""
        self._running_jobs.add(item.job_id)
        work = asyncio.ensure_future(asyncio.to_thread(self.model_manager.runner.advance, item, control))

        def ended(finished: asyncio.Future[Any]) -> None:
            self._running_jobs.discard(item.job_id)
            self.model_manager.record_call_ended()
            if not finished.cancelled():
                finished.exception()  # seen: a call given up on ends in Interrupted, which nobody awaits

        work.add_done_callback(ended)
        return work

    async def _store_image(self, job_id: str, png: bytes | None) -> str | None:
        """Put the image, retrying with backoff for `upload_timeout_s`; then StorageUnavailable."""
        if png is None:
            return None
        key = image_key(job_id)
        self._uploading.add(job_id)  # still running here: a restarted router must not send it elsewhere
        try:
            return await self._upload(job_id, key, png)
        finally:
            self._uploading.discard(job_id)

    async def _upload(self, job_id: str, key: str, png: bytes) -> str:
        deadline = time.monotonic() + self._storage.upload_timeout_s
        with tracing.job_span("seidra.upload", job_id, attributes={"seidra.object_key": key, "seidra.bytes": len(png)}) as span:
            attempt = 0
            while True:
                attempt += 1
                put = asyncio.ensure_future(asyncio.to_thread(self._put, key, png))
                try:
                    await asyncio.shield(put)
                    return key
                except asyncio.CancelledError:
                    tracing.mark_failed(span, "given up by the router during the upload")
                    await self._withdraw(put, key)
                    raise
                except Exception as error:
                    delay_s = UPLOAD_BACKOFF.delay_s(attempt)
                    if time.monotonic() + delay_s > deadline:
                        tracing.mark_failed(span, f"{type(error).__name__}: {error}")
                        raise StorageUnavailable(job_id, f"{type(error).__name__}: {error}") from error
                    logger.warning("Storing %s failed (%s: %s); retry %d in %d s", key, type(error).__name__, error, attempt, delay_s)
                    await asyncio.sleep(delay_s)

    async def _withdraw(self, put: asyncio.Future[None], key: str) -> None:
        """The router gave up on this call (a cancelled job) while its image was being stored: the
        put runs on in its thread, so wait for it, then remove what it stored. The job's image is
        stored again by the run that completes it, if any."""
        with contextlib.suppress(Exception):
            await put
        try:
            await asyncio.to_thread(self._object_store().delete, key)
        except Exception:
            logger.exception("Could not remove %s after its call was cancelled", key)

    def _already_stored(self, job_id: str) -> bool:
        try:
            return self._object_store().exists(image_key(job_id))
        except Exception:  # the store is down: compute, and let the upload say so
            return False

    def _object_store(self) -> ObjectStore:
        if self._store is None:
            self._store = open_object_store(self._storage)
        return self._store

    def _put(self, key: str, png: bytes) -> None:
        self._object_store().put(key, png, "image/png")

    def get_status_snapshot(self) -> ReplicaSnapshot:
        running = self._running_jobs | self._uploading
        return replace(self.model_manager.get_status_snapshot(), running_jobs=tuple(sorted(running)))

    def check_health(self) -> None:
        """Serve replaces a replica whose health check raises."""
        snapshot = self.model_manager.get_status_snapshot()
        if snapshot.health is Health.UNHEALTHY:
            raise RuntimeError(f"replica {self._replica_id} is unhealthy: {snapshot.reason}")

    def _record_gpu(self, gpu: dict[str, Any] | None) -> None:
        if gpu is None:
            return
        gauges, tags = metrics.worker_metrics(), {"replica": self._replica_id}
        gauges["temperature"].set(gpu["temperature_c"], tags=tags)
        gauges["utilization"].set(gpu["utilization_pct"], tags=tags)
        gauges["memory"].set(gpu["memory_used_mb"] * 2**20, tags=tags)

    async def _report_forever(self) -> None:
        while True:
            try:
                snapshot = self.get_status_snapshot()
                self._record_gpu(snapshot.gpu)
                self.model_manager.directives = await get_router(self._app_name).heartbeat.remote(
                    self._replica_id, SLOTS_PER_REPLICA, snapshot
                )
            except ValueError:
                pass  # the router is not up yet; the ingress creates it
            except Exception:
                logger.exception("Could not report to the router")
            await asyncio.sleep(self._settings.heartbeat_interval_s)
