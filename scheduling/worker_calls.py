"""Every call the router makes to worker replicas, and what a failed one means for the core.

Like Ray Serve's `ActorReplicaWrapper`, this is the one place that touches Ray on the dispatch
path, so the router's decisions (in `scheduling.scheduler`) never see a Ray exception.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from dataclasses import replace
from typing import Any

from ray.exceptions import RayActorError, RayTaskError, TaskCancelledError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
    RequestCancelledError,
)
from ray.serve.handle import DeploymentHandle

from scheduling import tracing
from scheduling.directives import InferenceTimeout, ReplicaSnapshot, ReplicaUnavailable
from scheduling.scheduler import ErrorKind
from scheduling.work import WorkBatch, WorkResult, YieldRequest
from storage.object_store import PUT_ATTEMPT_MAX_S

logger = logging.getLogger(__name__)


class CallFailed(Exception):
    def __init__(self, kind: ErrorKind, detail: str, snapshot: ReplicaSnapshot | None = None) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.snapshot = snapshot


# Replicas enforce the inference timeout themselves at step boundaries; the router waits this much
# longer before it concludes that a replica cannot even reach one (a hung GPU).
STEP_BOUNDARY_GRACE_S = 10.0


class WorkerCalls:
    def __init__(self, worker: DeploymentHandle[Any], timeout_s: float, upload_timeout_s: float) -> None:
        self._worker = worker
        self._timeout_s = timeout_s
        self._upload_timeout_s = upload_timeout_s
        self._responses: dict[int, Any] = {}  # Ray's DeploymentResponse, whose methods are untyped
        self._heard_at: dict[int, float] = {}  # call id -> when its replica last reported progress

    async def advance(self, batch: WorkBatch, traces: dict[str, tracing.Carrier]) -> list[WorkResult]:
        """One call on `batch.replica_id`; raises CallFailed with the failure's kind.

        A replica enforces the inference timeout per slice itself, and reports progress between
        slices; the router gives up only on a call it has not heard of for a slice's timeout and
        some grace (a hung GPU that cannot even reach a step boundary).
        """
        batch = replace(batch, timeout_s=self._timeout_s)
        # Called outside any span: the handle's first call starts its background tasks, which would
        # otherwise keep this job's span as theirs for good.
        response = contextvars.Context().run(self._worker.advance.remote, batch, traces)
        self._responses[batch.call_id] = response
        self.alive(batch.call_id)
        try:
            return await self._answer(batch.call_id, response)
        except CallFailed:
            raise
        except Exception as error:
            raise classify(error) from error
        finally:
            self._responses.pop(batch.call_id, None)
            self._heard_at.pop(batch.call_id, None)

    async def _answer(self, call_id: int, response: Any) -> list[WorkResult]:
        silence_s = self._timeout_s + STEP_BOUNDARY_GRACE_S + self._upload_timeout_s + PUT_ATTEMPT_MAX_S
        answer = asyncio.ensure_future(_await(response))
        while True:
            wait_s = self._heard_at[call_id] + silence_s - time.monotonic()
            if wait_s <= 0:
                response.cancel()  # Ray's; the replica stops at its next step boundary
                answer.cancel()
                raise CallFailed(ErrorKind.GPU_TIMEOUT, f"no word from the replica for {silence_s:.0f} s")
            done, _ = await asyncio.wait({answer}, timeout=wait_s)
            if done:
                results: list[WorkResult] = answer.result()
                return results

    def alive(self, call_id: int) -> None:
        """The call's replica reported progress: it can still reach step boundaries."""
        if call_id in self._responses:
            self._heard_at[call_id] = time.monotonic()

    async def request_yield(self, request: YieldRequest) -> None:
        """Ask a running call to stop at its next slice boundary. Best effort: a call that ends
        first, or a replica that cannot be reached, just goes on to its end."""
        if request.call_id not in self._responses:
            return
        try:
            await contextvars.Context().run(self._worker.request_yield.remote, request)
        except Exception as error:
            logger.warning("Could not ask call %d on %s to yield: %s", request.call_id, request.replica_id, error)

    def cancel(self, call_id: int) -> None:
        response = self._responses.get(call_id)
        if response is not None:
            response.cancel()


async def _await(response: Any) -> Any:
    return await response


def classify(error: BaseException) -> CallFailed:
    cause = error.cause if isinstance(error, RayTaskError) and error.cause is not None else error
    if isinstance(cause, InferenceTimeout):
        return CallFailed(ErrorKind.GPU_TIMEOUT, str(cause))
    if isinstance(cause, ReplicaUnavailable):
        return CallFailed(ErrorKind.REPLICA_UNAVAILABLE, str(cause), cause.snapshot)
    if isinstance(cause, (BackPressureError, DeploymentUnavailableError)):
        return CallFailed(ErrorKind.REPLICA_UNAVAILABLE, f"{type(cause).__name__}: {cause}")
    if isinstance(cause, (RayActorError, ReplicaUnavailableError)):
        return CallFailed(ErrorKind.REPLICA_LOST, f"{type(cause).__name__}: {cause}")
    if isinstance(cause, (RequestCancelledError, TaskCancelledError, asyncio.CancelledError)):
        # Only the router cancels calls, after it stopped waiting for them (a cancelled job, a
        # silent replica): the core ignores what they end with.
        return CallFailed(ErrorKind.JOB_ERROR, "call cancelled by the router")
    return CallFailed(ErrorKind.JOB_ERROR, f"{type(cause).__name__}: {cause}")
