"""A fake clock and a few builders for driving the scheduling core by hand (no Ray, no database)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from scheduling.directives import Health, Mode, ReplicaSnapshot
from scheduling.hold import Backoff
from scheduling.lanes import Lane, lane_for
from scheduling.scheduler import Action, JobSpec, Scheduler, SchedulerConfig, Start
from scheduling.work import GenerationParams, WorkResult
from storage.job_status import JobStatus

A = TypeVar("A")

HEALTHY = ReplicaSnapshot(Mode.CUDA, Health.HEALTHY)
HOT = ReplicaSnapshot(Mode.DEGRADED, Health.DEGRADED, "GPU temperature 95 °C >= 85 °C")
PARAMS = GenerationParams("a lighthouse", None, 64, 64, 8, 7.5, 1)
T0 = 1_800_000_000.0  # an epoch second, so that timestamps in records are readable


@dataclass
class Clock:
    now: float = T0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def config(**overrides: Any) -> SchedulerConfig:
    values: dict[str, Any] = {
        "queue_limits": {Lane.REALTIME: 100, Lane.BATCH: 100},
        "steps_per_dispatch": 4,
        "max_attempts": 3,
        "degraded_cooldown_s": 30.0,
        "worker_ttl_s": 10.0,
        "hold_backoff": Backoff(base_s=5, cap_s=40, jitter=0),
        "storage_backoff": Backoff(base_s=2, cap_s=8, jitter=0),
    }
    return SchedulerConfig(**{**values, **overrides})


def spec(job_id: str, priority: int = 2, arrival: float = 0.0, params: GenerationParams = PARAMS, **fields: Any) -> JobSpec:
    return JobSpec(job_id, priority, T0 + arrival, params, **fields)


@dataclass
class Core:
    """A scheduler with its clock; `actions` keeps everything it ever asked for."""

    clock: Clock = field(default_factory=Clock)
    overrides: dict[str, Any] = field(default_factory=dict)
    actions: list[Action] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.scheduler = Scheduler(config(**self.overrides), self.clock, rand=lambda: 0.5)

    def record(self, actions: Iterable[Action]) -> list[Action]:
        actions = list(actions)
        self.actions += actions
        return actions

    def tick(self) -> list[Action]:
        return self.record(self.scheduler.tick())

    def starts(self) -> list[Start]:
        return of_type(self.tick(), Start)

    def submit(self, *specs: JobSpec) -> None:
        self.scheduler.release(self.scheduler.reserve([lane_for(s.priority) for s in specs]))
        self.scheduler.submit(specs)

    def report(self, replica_id: str, snapshot: ReplicaSnapshot = HEALTHY, running: tuple[str, ...] = ()) -> None:
        self.scheduler.heartbeat(replica_id, 1, replace(snapshot, running_jobs=running))

    def finish_slice(self, start: Start, steps: int | None = None, key: str | None = None) -> list[Action]:
        """The worker answers `start` for each of its jobs: they yielded after `steps` more steps, or
        (None) ended with their images stored (`key` for a single job's)."""
        actions: list[Action] = []
        for item in start.batch.items:
            step = item.params.num_inference_steps if steps is None else item.step + steps
            done = step >= item.params.num_inference_steps
            result = WorkResult(
                item.job_id, start.batch.replica_id, step, 0.1,
                latents=None if done else f"latents@{step}", object_key=(key or f"images/{item.job_id}.png") if done else None,
            )  # fmt: skip
            actions += self.scheduler.result(item.job_id, start.call_id, result)
        return self.record(actions)


def of_type(actions: Iterable[Action], kind: type[A]) -> list[A]:
    return [action for action in actions if isinstance(action, kind)]


def job_ids(starts: Iterable[Start]) -> list[str]:
    """The jobs `starts` send, in order (one call's jobs together)."""
    return [job_id for start in starts for job_id in start.batch.job_ids]


def statuses(actions: Iterable[Action]) -> list[tuple[str, JobStatus]]:
    """(job, target status) of every write among `actions`, in order."""
    writes = []
    for action in actions:
        write = getattr(action, "write", None)
        if write is not None:
            writes.append((write.job_id, write.to_status))
    return writes
