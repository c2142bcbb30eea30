"""What the router tells a worker replica in answer to its heartbeat, and what a replica reports.

Maintenance and injected faults reach a replica this way within one heartbeat interval.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


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
    return Mode(mode) not in UNAVAILABLE_MODES and Health(health) not in UNAVAILABLE_HEALTH


@dataclass(frozen=True)
class InjectedFaults:
    """Drills and tests only: honoured by replicas started with SEIDRA_FAULT_INJECTION=1."""

    temperature_c: float | None = None
    health: Health | None = None
    inference_delay_s: float = 0.0


@dataclass(frozen=True)
class ReplicaDirectives:
    maintenance: bool = False
    faults: InjectedFaults | None = None
