"""What the router tells a worker replica in answer to its heartbeat, and what a replica reports.

Maintenance and injected faults reach a replica this way within one heartbeat interval.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Mode(str, Enum):
    CUDA = "cuda"
    CPU = "cpu"
    MOCK = "mock"
    DEGRADED = "degraded"
    MAINTENANCE = "maintenance"
    OFFLINE = "offline"


class Health(str, Enum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"


# The runbook's rule: these modes and healths mean "do not send work here".
UNAVAILABLE_MODES = frozenset({Mode.DEGRADED, Mode.MAINTENANCE, Mode.OFFLINE})
UNAVAILABLE_HEALTH = frozenset({Health.DEGRADED, Health.UNHEALTHY})


def is_available(mode: str, health: str) -> bool:
    """May the router send new work here?"""
    return Mode(mode) not in UNAVAILABLE_MODES and Health(health) not in UNAVAILABLE_HEALTH


def can_run(mode: str, health: str) -> bool:
    """May a replica run what it was sent? In maintenance it still finishes the jobs it started."""
    return is_available(mode, health) or (Mode(mode) is Mode.MAINTENANCE and Health(health) is Health.HEALTHY)


@dataclass(frozen=True)
class ReplicaSnapshot:
    """What a replica says of itself with each heartbeat (and with a refusal)."""

    mode: Mode
    health: Health
    reason: str = ""
    model: str | None = None
    device: str | None = None
    dtype: str | None = None
    last_inference_s: float | None = None
    consecutive_failures: int = 0
    gpu: dict[str, Any] | None = None  # the NVML reading, when there is a GPU
    faults_injected: bool = False
    running_jobs: tuple[str, ...] = ()  # calls still running here, a previous router's included
    # The models this replica holds in memory (least recently used first), each with the LoRA
    # adapters loaded into it: the router sends a job where its model is already.
    models: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def can_run(self) -> bool:
        return can_run(self.mode, self.health)


@dataclass(frozen=True)
class InjectedFaults:
    """Drills and tests only: honoured by replicas started with SEIDRA_FAULT_INJECTION=1."""

    temperature_c: float | None = None
    health: Health | None = None
    inference_delay_s: float = 0.0
    fail_inference: bool = False  # every inference raises, as a job that breaks the pipeline would


@dataclass(frozen=True)
class ReplicaDirectives:
    maintenance: bool = False
    faults: InjectedFaults | None = None


class ReplicaUnavailable(Exception):
    """A replica refused work: its own snapshot says it must not take any (raised inside the replica)."""

    def __init__(self, replica_id: str, snapshot: ReplicaSnapshot) -> None:
        super().__init__(f"replica {replica_id} is {snapshot.mode.value}/{snapshot.health.value}: {snapshot.reason}")
        self.replica_id = replica_id
        self.snapshot = snapshot

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return type(self), (self.replica_id, self.snapshot)


class InferenceTimeout(Exception):
    """A slice did not finish within its `WorkItem.timeout_s` (raised inside the replica, at a step boundary)."""

    def __init__(self, job_id: str, timeout_s: float) -> None:
        super().__init__(f"job {job_id}: the slice did not finish within {timeout_s:g} s")
        self.job_id = job_id
        self.timeout_s = timeout_s

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return type(self), (self.job_id, self.timeout_s)


class StorageUnavailable(Exception):
    """A replica computed an image but could not store it, even after retrying (raised inside the replica).

    A storage fault, not a GPU one: the replica stays healthy and the job costs no attempt.
    """

    def __init__(self, job_id: str, reason: str) -> None:
        super().__init__(f"the image of job {job_id} could not be stored: {reason}")
        self.job_id = job_id
        self.reason = reason

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return type(self), (self.job_id, self.reason)
