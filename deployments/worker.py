"""The GPU worker: a Serve deployment whose replicas each hold diffusers pipelines (see ModelManager).

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
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span
from ray import serve
from ray.serve.config import RequestRouterConfig

from deployments.model_manager import ModelLoadFailed, ModelManager
from deployments.nvml import NoGpu, open_gpu_reader
from deployments.settings import NotServed, WorkerSettings
from scheduling import metrics, tracing
from scheduling.assigned_replica import AssignedReplicaRouter
from scheduling.directives import Health, ReplicaSnapshot, ReplicaUnavailable, StorageUnavailable
from scheduling.hold import Backoff
from scheduling.router_lookup import get_router
from scheduling.work import WorkBatch, WorkItem, WorkResult, YieldRequest
from storage.object_store import ObjectStore, image_key, open_object_store
from storage.settings import StorageSettings

logger = logging.getLogger(__name__)

# One call at a time per pipeline (a call advances a batch of jobs); one more request may be in
# flight beside it: the router's request that it yield.
SLOTS_PER_REPLICA = 1
UPLOAD_BACKOFF = Backoff(base_s=0.5, cap_s=8.0, jitter=0.2)
# Progress goes to the router at most this often per call: enough for a progress bar, and the
# router's proof that the call still reaches step boundaries.
PROGRESS_INTERVAL_S = 0.25
# While a call waits for its model to load (seconds to minutes), it tells the router this often
# that it lives, as it would between slices: the router gives up on calls it does not hear from.
LOAD_REPORT_INTERVAL_S = 5.0


@serve.deployment(
    name="DiffusionWorker",
    max_ongoing_requests=SLOTS_PER_REPLICA + 1,
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
        self.model_manager = ModelManager(self._settings, gpu_reader, lambda name: DiffusionRunner(self._settings, name))
        self._storage = storage
        self._store: ObjectStore | None = None  # opened on first upload: S3 may be down as the replica starts
        context = serve.get_replica_context()
        self._replica_id, self._app_name = context.replica_id.unique_id, context.app_name
        # Reported, so that a restarted router neither overbooks this replica nor runs a job twice:
        # a job runs here from its call's arrival until both the call (uploads included) and its
        # pipeline thread ended (the thread outlives a call the router gave up on).
        self._in_calls: Counter[str] = Counter()
        self._running_jobs: set[str] = set()  # pipeline threads, until they end
        self._controls: dict[int, Any] = {}  # call id -> its StepControl, while its pipeline runs
        self._reporter = asyncio.get_event_loop().create_task(self._report_forever())

    async def advance(self, batch: WorkBatch, traces: dict[str, tracing.Carrier] | None = None) -> list[WorkResult]:
        """Run `batch` to its end or to the slice boundary where it is asked to yield; `traces` are
        the router's dispatch spans, per job."""
        snapshot = self.model_manager.get_status_snapshot()
        if not snapshot.can_run:
            raise ReplicaUnavailable(self._replica_id, snapshot)
        attributes = {"seidra.replica_id": self._replica_id, "seidra.step": batch.step, "seidra.batch_size": len(batch.items)}
        parents = {item.job_id: (traces or {}).get(item.job_id) for item in batch.items}
        with self._in_call(batch.job_ids), tracing.job_spans("seidra.inference", parents, attributes) as spans:
            try:
                results = await self._advance(batch, spans)
            except asyncio.CancelledError:  # not an Exception: OpenTelemetry would not mark it
                for span in spans.values():
                    tracing.mark_failed(span, "given up by the router (a timeout or a cancelled job)")
                raise
            for result in results:
                spans[result.job_id].set_attribute("seidra.step_reached", result.step)
            return results

    @contextlib.contextmanager
    def _in_call(self, job_ids: tuple[str, ...]) -> Iterator[None]:
        self._in_calls.update(job_ids)
        try:
            yield
        finally:
            self._in_calls.subtract(job_ids)
            self._in_calls = +self._in_calls  # without the jobs no call holds any more

    def request_yield(self, request: YieldRequest) -> None:
        """The router wants this call's slot: stop it at its next slice boundary."""
        control = self._controls.get(request.call_id)
        if control is not None:
            control.yield_requested.set()

    async def _advance(self, batch: WorkBatch, spans: dict[str, Span]) -> list[WorkResult]:
        stored = await self._already_stored(batch)
        results = [
            WorkResult(item.job_id, self._replica_id, batch.total_steps, 0.0, object_key=image_key(item.job_id))
            for item in stored
        ]
        batch = replace(batch, items=tuple(item for item in batch.items if item not in stored))
        if batch.items:
            results += await self._denoise(batch, spans)
        return results

    async def _already_stored(self, batch: WorkBatch) -> list[WorkItem]:
        """Jobs whose image an earlier run stored already (its answer was lost with its router, or its
        upload only seemed to fail): not twice."""
        maybe = [item for item in batch.items if item.may_be_stored]
        found = await asyncio.gather(*(asyncio.to_thread(self._is_stored, item.job_id) for item in maybe))
        return [item for item, is_stored in zip(maybe, found, strict=True) if is_stored]

    async def _denoise(self, batch: WorkBatch, spans: dict[str, Span]) -> list[WorkResult]:
        from deployments.pipeline import StepControl

        faults = self.model_manager.faults
        control = StepControl(
            step_delay_s=faults.inference_delay_s if faults else 0.0, on_step=self._progress_reporter(batch.call_id)
        )
        self._controls[batch.call_id] = control
        try:
            if faults and faults.fail_inference:
                raise RuntimeError("injected inference failure")
            outputs, duration_s = await asyncio.shield(self._start_inference(batch, control))
        except asyncio.CancelledError:
            # The router gave up on this call (a timeout, a cancelled job): stop at the next step boundary.
            control.cancelled.set()
            self.model_manager.record_cancelled()
            raise
        except (NotServed, ModelLoadFailed):
            raise  # about the model or adapters the jobs asked for, not this GPU
        except Exception:
            self.model_manager.record_failure(",".join(batch.job_ids))
            raise
        finally:
            self._controls.pop(batch.call_id, None)
        self.model_manager.record_success(duration_s)
        if outputs[0].step > batch.step:
            step_s = duration_s / (outputs[0].step - batch.step)
            metrics.worker_metrics()["step"].observe(step_s, tags={"replica": self._replica_id})
        # After the GPU's part: an object store that fails is a storage fault, not a sick GPU.
        results = [
            self._result(item.job_id, output, duration_s, spans[item.job_id])
            for item, output in zip(batch.items, outputs, strict=True)
        ]
        return list(await asyncio.gather(*results))

    async def _result(self, job_id: str, output: Any, duration_s: float, span: Span) -> WorkResult:
        result = WorkResult(job_id, self._replica_id, output.step, duration_s, latents=output.latents)
        if output.png is None:
            return result
        with trace.use_span(span):  # the upload is a child of the job's inference span
            return await self._stored(result, output.png)

    async def _stored(self, result: WorkResult, png: bytes) -> WorkResult:
        job_id = result.job_id
        try:
            return replace(result, object_key=await self._store_image(job_id, image_key(job_id), png))
        except StorageUnavailable as unavailable:
            return replace(result, storage_error=unavailable.reason)

    def _progress_reporter(self, call_id: int) -> Any:
        """What the pipeline thread calls after each step: at most every PROGRESS_INTERVAL_S, it
        hands a report to the event loop, which sends it (fire and forget: the GPU thread never
        waits for the router, nor for the lookup of its actor)."""
        loop = asyncio.get_running_loop()
        last_s = time.monotonic()

        def report(step: int) -> None:
            nonlocal last_s
            now = time.monotonic()
            if now - last_s >= PROGRESS_INTERVAL_S:
                last_s = now
                loop.call_soon_threadsafe(self._send_progress, call_id, step)

        return report

    def _send_progress(self, call_id: int, step: int) -> None:
        try:
            get_router(self._app_name).report_progress.remote(call_id, step)
        except Exception:  # the router is restarting: the next report may get through
            logger.debug("Could not report progress of call %d", call_id, exc_info=True)

    def _start_inference(self, batch: WorkBatch, control: Any) -> asyncio.Future[tuple[list[Any], float]]:
        """The model's load if needed, then the pipeline call, in threads; its jobs count as running
        here until they end, even after the router gave up on the call, so that nobody sends this
        replica more work meanwhile."""
        self._running_jobs.update(batch.job_ids)
        work = asyncio.ensure_future(self._infer(batch, control))

        def ended(finished: asyncio.Future[Any]) -> None:
            self._running_jobs.difference_update(batch.job_ids)
            self.model_manager.record_call_ended()
            if not finished.cancelled():
                finished.exception()  # seen: a call given up on ends in Interrupted, which nobody awaits

        work.add_done_callback(ended)
        return work

    async def _infer(self, batch: WorkBatch, control: Any) -> tuple[list[Any], float]:
        """The call's outputs, and how long its pipeline ran (its model's load not included)."""
        runner = await self._runner(batch)
        try:
            started = time.perf_counter()
            outputs = await asyncio.to_thread(runner.advance, batch, control)
            return outputs, time.perf_counter() - started
        finally:
            self.model_manager.give_back(runner)

    async def _runner(self, batch: WorkBatch) -> Any:
        """The runner of the batch's model, leased (ModelManager.lease), with its adapters known."""
        params = batch.items[0].params  # the jobs of a call share model and adapters
        adapters = [lora.name for lora in params.loras]
        load = asyncio.ensure_future(asyncio.to_thread(self.model_manager.lease, params.model, adapters))
        while not (await asyncio.wait({load}, timeout=LOAD_REPORT_INTERVAL_S))[0]:
            self._send_progress(batch.call_id, batch.step)
        return load.result()

    async def _store_image(self, job_id: str, key: str, png: bytes) -> str:
        """Put the image, retrying with backoff for `upload_timeout_s`; then StorageUnavailable."""
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
                    logger.warning(
                        "Storing %s failed (%s: %s); retry %d in %d s", key, type(error).__name__, error, attempt, delay_s
                    )
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

    def _is_stored(self, job_id: str) -> bool:
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
        running = self._running_jobs.union(self._in_calls)
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
