"""Every call the router makes to worker replicas, and what a failed one means for the core.

Like Ray Serve's `ActorReplicaWrapper`, this is the one place that touches Ray on the dispatch
path, so the router's decisions (in `scheduling.scheduler`) never see a Ray exception.
"""

from __future__ import annotations

import asyncio
import contextvars
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
from scheduling.directives import InferenceTimeout, ReplicaSnapshot, ReplicaUnavailable, StorageUnavailable
from scheduling.scheduler import ErrorKind
from scheduling.work import WorkItem, WorkResult
from storage.object_store import PUT_ATTEMPT_MAX_S


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

    async def advance(self, call_id: int, item: WorkItem) -> WorkResult:
        """One step slice on `item.replica_id`; raises CallFailed with the failure's kind."""
        item = replace(item, timeout_s=self._timeout_s)
        # Called outside any span: the handle's first call starts its background tasks, which would
        # otherwise keep this job's span as theirs for good.
        response = contextvars.Context().run(self._worker.advance.remote, item, tracing.carrier())
        self._responses[call_id] = response
        try:
            return await asyncio.wait_for(response, self._deadline_s(item))
        except asyncio.TimeoutError:
            response.cancel()  # type: ignore[no-untyped-call]  # Ray's; the replica stops at its next step boundary
            raise CallFailed(ErrorKind.GPU_TIMEOUT, f"no answer within {self._deadline_s(item):.0f} s") from None
        except Exception as error:
            raise classify(error) from error
        finally:
            self._responses.pop(call_id, None)

    def _deadline_s(self, item: WorkItem) -> float:
        """The inference timeout and its grace, plus the upload's own budget on a job's last slice
        (an attempt begun just before that budget ends may take PUT_ATTEMPT_MAX_S more)."""
        last = item.max_steps == 0 or item.step + item.max_steps >= item.params.num_inference_steps
        upload_s = self._upload_timeout_s + PUT_ATTEMPT_MAX_S if last else 0.0
        return self._timeout_s + STEP_BOUNDARY_GRACE_S + upload_s

    def cancel(self, call_id: int) -> None:
        response = self._responses.get(call_id)
        if response is not None:
            response.cancel()


def classify(error: BaseException) -> CallFailed:
    cause = error.cause if isinstance(error, RayTaskError) and error.cause is not None else error
    if isinstance(cause, InferenceTimeout):
        return CallFailed(ErrorKind.GPU_TIMEOUT, str(cause))
    if isinstance(cause, ReplicaUnavailable):
        return CallFailed(ErrorKind.REPLICA_UNAVAILABLE, str(cause), cause.snapshot)
    if isinstance(cause, StorageUnavailable):
        return CallFailed(ErrorKind.STORAGE, str(cause))
    if isinstance(cause, (BackPressureError, DeploymentUnavailableError)):
        return CallFailed(ErrorKind.REPLICA_UNAVAILABLE, f"{type(cause).__name__}: {cause}")
    if isinstance(cause, (RayActorError, ReplicaUnavailableError)):
        return CallFailed(ErrorKind.REPLICA_LOST, f"{type(cause).__name__}: {cause}")
    if isinstance(cause, (RequestCancelledError, TaskCancelledError, asyncio.CancelledError)):
        # Only the router cancels calls, after it stopped waiting for them (a cancelled job, a
        # silent replica): the core ignores what they end with.
        return CallFailed(ErrorKind.JOB_ERROR, "call cancelled by the router")
    return CallFailed(ErrorKind.JOB_ERROR, f"{type(cause).__name__}: {cause}")
