"""The GPU worker: a Serve deployment whose replicas each hold one diffusers pipeline.

The router calls `advance` only when a replica has a free slot, and each replica reports its
capacity to the router every `heartbeat_interval_s` (the router drops a replica after
`SEIDRA_WORKER_TTL_S` of silence).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ray import serve

from deployments.settings import WorkerSettings
from scheduling.router import get_router
from scheduling.work import WorkItem, WorkResult
from storage.object_store import image_key, open_object_store
from storage.settings import StorageSettings

logger = logging.getLogger(__name__)

# One pipeline, one job at a time: a second request would only wait on the pipeline's lock.
SLOTS_PER_REPLICA = 1


@serve.deployment(
    name="DiffusionWorker",
    max_ongoing_requests=SLOTS_PER_REPLICA,
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=120,
)
class DiffusionWorker:
    def __init__(self) -> None:
        # Imported here so that building the application does not import torch in the driver.
        from deployments.pipeline import DiffusionRunner

        self._settings = WorkerSettings()
        self._runner = DiffusionRunner(self._settings)
        self._store = open_object_store(StorageSettings())
        self._replica_id = serve.get_replica_context().replica_id.unique_id
        self._reporter = asyncio.get_event_loop().create_task(self._report_forever())

    async def advance(self, item: WorkItem) -> WorkResult:
        started = time.perf_counter()
        output = await asyncio.to_thread(self._runner.advance, item)
        object_key = None
        if output.png is not None:
            object_key = image_key(item.job_id)
            await asyncio.to_thread(self._store.put, object_key, output.png, "image/png")
        return WorkResult(
            job_id=item.job_id,
            replica_id=self._replica_id,
            step=output.step,
            total_steps=output.total_steps,
            duration_s=time.perf_counter() - started,
            latents=output.latents,
            object_key=object_key,
        )

    def describe(self) -> dict[str, Any]:
        return {"model": self._runner.model, "device": self._runner.device, "dtype": str(self._runner.dtype).removeprefix("torch.")}

    async def _report_forever(self) -> None:
        while True:
            try:
                await get_router().heartbeat.remote(self._replica_id, SLOTS_PER_REPLICA, self.describe())
            except ValueError:
                pass  # the router is not up yet; the ingress creates it
            except Exception:
                logger.exception("Could not report to the router")
            await asyncio.sleep(self._settings.heartbeat_interval_s)
