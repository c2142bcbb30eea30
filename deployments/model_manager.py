"""One replica's models and its health: what `get_status_snapshot()` reports to the router.

`assess` is the policy, a pure function of the replica's facts, so it is unit-tested with a fake
clock; `ModelManager` gathers the facts (pipelines, NVML, inference outcomes, directives).

A replica loads its default model as it starts, and the others when a call asks for them, holding
up to `models_per_replica`: one more evicts the least recently used first (as Ray Serve's model
multiplexing does), so that the memory of both is never needed at once. The snapshot says which
models (and adapters) it holds, so that the router sends a job where its model is already.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from typing import Any, Protocol

from deployments.nvml import GpuLost, GpuReader, GpuReading
from deployments.settings import WorkerSettings
from scheduling import metrics
from scheduling.directives import Health, InjectedFaults, Mode, ReplicaDirectives, ReplicaSnapshot

logger = logging.getLogger(__name__)

HARDWARE_THROTTLES = frozenset({"hw_thermal_slowdown", "hw_power_brake_slowdown"})


@dataclass(frozen=True)
class ReplicaFacts:
    base_mode: Mode  # cuda, cpu or mock: what the replica runs on when all is well
    loaded: bool
    load_error: str | None
    gpu: GpuReading | None
    gpu_error: str | None
    maintenance: bool
    consecutive_failures: int
    seconds_stuck: float | None  # a cancelled call whose pipeline thread still runs
    injected_health: Health | None


@dataclass(frozen=True)
class Thresholds:
    max_temperature_c: float
    unhealthy_after_failures: int
    stuck_after_s: float


def assess(facts: ReplicaFacts, limits: Thresholds) -> tuple[Mode, Health, str]:
    """Mode, health and the reason, first matching rule wins: the gravest condition is reported."""
    if not facts.loaded:
        return Mode.OFFLINE, Health.UNHEALTHY, f"model not loaded: {facts.load_error}"
    if facts.gpu_error:
        return Mode.OFFLINE, Health.UNHEALTHY, facts.gpu_error
    if facts.injected_health is Health.UNHEALTHY:
        return Mode.DEGRADED, Health.UNHEALTHY, "injected fault: unhealthy"
    if facts.gpu and facts.gpu.ecc_uncorrected_errors:
        return Mode.DEGRADED, Health.UNHEALTHY, f"{facts.gpu.ecc_uncorrected_errors} uncorrectable ECC errors"
    if facts.consecutive_failures >= limits.unhealthy_after_failures:
        return Mode.DEGRADED, Health.UNHEALTHY, f"{facts.consecutive_failures} jobs in a row failed here"
    if facts.seconds_stuck is not None and facts.seconds_stuck >= limits.stuck_after_s:
        return Mode.DEGRADED, Health.UNHEALTHY, f"an inference still runs {facts.seconds_stuck:.0f} s after it was cancelled"
    if facts.gpu and facts.gpu.temperature_c >= limits.max_temperature_c:
        return (
            Mode.DEGRADED,
            Health.DEGRADED,
            f"GPU temperature {facts.gpu.temperature_c:.0f} °C >= {limits.max_temperature_c:.0f} °C",
        )
    throttles = HARDWARE_THROTTLES.intersection(facts.gpu.throttle_reasons) if facts.gpu else set()
    if throttles:
        return Mode.DEGRADED, Health.DEGRADED, f"GPU throttled: {', '.join(sorted(throttles))}"
    if facts.injected_health is Health.DEGRADED:
        return Mode.DEGRADED, Health.DEGRADED, "injected fault: degraded"
    # After the sicknesses: maintenance drains only a replica that can still run its jobs.
    if facts.maintenance:
        return Mode.MAINTENANCE, Health.HEALTHY, "maintenance: finishing running jobs, taking no new ones"
    return facts.base_mode, Health.HEALTHY, ""


class ModelLoadFailed(RuntimeError):
    """A model a job asked for did not load here: the job's error, not the GPU's."""


class ModelEvents(Protocol):
    def loaded(self, model: str, seconds: float) -> None: ...

    def evicted(self, model: str) -> None: ...


class ModelMetrics:
    """Model loads, evictions and load times, to Prometheus."""

    def loaded(self, model: str, seconds: float) -> None:
        metrics.model_loads().inc(tags={"model": model})
        metrics.model_load_seconds().observe(seconds, tags={"model": model})

    def evicted(self, model: str) -> None:
        metrics.model_evictions().inc(tags={"model": model})


class ModelManager:
    def __init__(
        self,
        settings: WorkerSettings,
        gpu_reader: GpuReader,
        load_runner: Callable[[str], Any],
        clock: Callable[[], float] = time.monotonic,
        events: ModelEvents | None = None,
    ) -> None:
        """`load_runner(name)` loads served model `name` (slowly); the default one is loaded here."""
        self._settings = settings
        self._gpu_reader = gpu_reader
        self._load_runner = load_runner
        self._clock = clock
        self._events = events or ModelMetrics()
        self._limits = Thresholds(
            settings.max_gpu_temperature_c, settings.unhealthy_after_failures, settings.stuck_inference_after_s
        )
        self.directives = ReplicaDirectives()
        self.default_model = settings.default_model()
        # Held models, least recently used first. Changed in calls' threads, read by the heartbeat.
        self._runners: OrderedDict[str, Any] = OrderedDict()
        self._leases: Counter[str] = Counter()  # calls between `lease` and `give_back`, per model
        self._held = threading.Condition()
        self._loading = threading.Lock()  # one load at a time: two would need the memory of both
        self._load_error: str | None = None
        # As the default model loaded at start: the replica's device, and that model's dtype.
        self.device: str | None = None
        self._dtype: str | None = None
        self._last_inference_s: float | None = None
        # Distinct jobs that failed in a row: one broken job retried here must not condemn the GPU.
        self._failing_jobs: set[str] = set()
        self._cancelled_call_at: float | None = None
        try:
            runner = self._load(self.default_model)
        except Exception as error:  # reported as `offline`; Serve replaces the unhealthy replica
            self._load_error = f"{type(error).__name__}: {error}"
        else:
            self.device, self._dtype = runner.device, str(runner.dtype).removeprefix("torch.")

    def runner_for(self, model: str, adapters: Collection[str] = ()) -> Any:
        """The runner of served model `model` ("": the default), loaded first if it is not held here.

        Slow when it loads: call it from the call's thread, never on the event loop. Raises
        NotServed for a model or adapter the settings do not serve, ModelLoadFailed when the model
        does not load.
        """
        return self._runner(model, adapters, leased=False)

    def lease(self, model: str, adapters: Collection[str] = ()) -> Any:
        """`runner_for`, and the runner stays here until `give_back(runner)`: a call between the two
        uses it, so no other call's load evicts it meanwhile."""
        return self._runner(model, adapters, leased=True)

    def give_back(self, runner: Any) -> None:
        with self._held:
            self._leases[runner.name] -= 1
            self._held.notify_all()

    def _runner(self, model: str, adapters: Collection[str], leased: bool) -> Any:
        name = self._settings.check_served(model, adapters)
        with self._loading:
            with self._held:
                runner = self._runners.get(name)
                if runner is not None:
                    self._runners.move_to_end(name)
                    self._leases[name] += leased
                    return runner
            try:
                return self._load(name, leased)
            except Exception as error:
                raise ModelLoadFailed(f"model {name!r} did not load: {type(error).__name__}: {error}") from error

    def _load(self, name: str, leased: bool = False) -> Any:
        self._evict(keep=self._settings.models_per_replica - 1)
        started = self._clock()
        runner = self._load_runner(name)
        self._events.loaded(name, self._clock() - started)
        with self._held:
            self._runners[name] = runner
            self._leases[name] += leased
        return runner

    def _evict(self, keep: int) -> None:
        """Let go of the least recently used models until `keep` are left; a leased one only once
        it is given back (a call running on it ends within a step once cancelled). Other calls'
        look-ups wait meanwhile: they wait for the load anyway, which comes after."""
        while True:
            with self._held:
                if len(self._runners) <= keep:
                    return
                name = self._held.wait_for(self._idle_model)
                runner = self._runners.pop(name)
            runner.release()
            self._events.evicted(name)
            logger.info("Evicted model %s to make room for another", name)

    def _idle_model(self) -> str | None:
        """The least recently used model that no call holds a lease on."""
        return next((name for name in self._runners if self._leases[name] <= 0), None)

    def held(self) -> dict[str, tuple[str, ...]]:
        """The models held here, least recently used first, each with the adapters loaded into it."""
        with self._held:
            return {name: tuple(runner.adapters) for name, runner in self._runners.items()}

    @property
    def base_mode(self) -> Mode:
        if self._settings.force_mock:
            return Mode.MOCK
        return Mode.CUDA if self.device == "cuda" else Mode.CPU

    @property
    def faults(self) -> InjectedFaults | None:
        return self.directives.faults if self._settings.fault_injection else None

    def record_success(self, duration_s: float) -> None:
        self._last_inference_s = duration_s
        self._failing_jobs.clear()

    def record_failure(self, job_id: str) -> None:
        self._failing_jobs.add(job_id)

    def record_cancelled(self) -> None:
        """The router gave up on the running call (a timeout, a cancelled job): it should stop within a step.

        Whether it timed out is the router's to judge (it keeps such a replica out of rotation for a
        while); here only a call that does not stop says something about the GPU.
        """
        self._cancelled_call_at = self._clock()

    def record_call_ended(self) -> None:
        self._cancelled_call_at = None

    def _gpu(self) -> tuple[GpuReading | None, str | None]:
        try:
            reading = self._gpu_reader.read()
        except GpuLost as error:
            return None, str(error)
        faults = self.faults
        if faults and faults.temperature_c is not None:
            reading = replace(reading or _placeholder_gpu(), temperature_c=faults.temperature_c)
        return reading, None

    def get_status_snapshot(self) -> ReplicaSnapshot:
        gpu, gpu_error = self._gpu()
        faults = self.faults
        now = self._clock()
        facts = ReplicaFacts(
            base_mode=self.base_mode,
            loaded=self._load_error is None,
            load_error=self._load_error,
            gpu=gpu,
            gpu_error=gpu_error,
            maintenance=self.directives.maintenance,
            consecutive_failures=len(self._failing_jobs),
            seconds_stuck=None if self._cancelled_call_at is None else now - self._cancelled_call_at,
            injected_health=faults.health if faults else None,
        )
        mode, health, reason = assess(facts, self._limits)
        return ReplicaSnapshot(
            mode=mode,
            health=health,
            reason=reason,
            model=self.default_model or None,
            device=self.device,
            dtype=self._dtype,
            last_inference_s=self._last_inference_s,
            consecutive_failures=len(self._failing_jobs),
            gpu=gpu.as_dict() if gpu else None,
            faults_injected=faults is not None,
            models=self.held(),
        )


def _placeholder_gpu() -> GpuReading:
    """What an injected temperature attaches to on a machine without a GPU."""
    return GpuReading(index=-1, name="injected", temperature_c=0.0, utilization_pct=0.0, memory_used_mb=0, memory_total_mb=0)
