"""Replica health and models: the assessment rules and the manager's bookkeeping, with a fake
clock and fake model loads."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import pytest

from deployments.model_manager import ModelLoadFailed, ModelManager, ReplicaFacts, Thresholds, assess
from deployments.nvml import GpuLost, GpuReading
from deployments.settings import ModelSpec, NotServed, WorkerSettings
from scheduling.directives import (
    Health,
    InjectedFaults,
    Mode,
    ReplicaDirectives,
    is_available,
)

LIMITS = Thresholds(max_temperature_c=85, unhealthy_after_failures=3, stuck_after_s=60)
COOL = GpuReading(index=0, name="H100", temperature_c=60, utilization_pct=90, memory_used_mb=1, memory_total_mb=2)
FINE = ReplicaFacts(
    base_mode=Mode.CUDA, loaded=True, load_error=None, gpu=COOL, gpu_error=None, maintenance=False,
    consecutive_failures=0, seconds_stuck=None, injected_health=None,
)  # fmt: skip


# fmt: off
@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, (Mode.CUDA, Health.HEALTHY, "")),
        ({"base_mode": Mode.MOCK, "gpu": None}, (Mode.MOCK, Health.HEALTHY, "")),
        ({"gpu": replace(COOL, temperature_c=84.9)}, (Mode.CUDA, Health.HEALTHY, "")),
        ({"gpu": replace(COOL, temperature_c=85)}, (Mode.DEGRADED, Health.DEGRADED, "GPU temperature 85 °C >= 85 °C")),
        ({"gpu": replace(COOL, throttle_reasons=("hw_thermal_slowdown",))}, (Mode.DEGRADED, Health.DEGRADED, "GPU throttled: hw_thermal_slowdown")),
        ({"gpu": replace(COOL, throttle_reasons=("sw_thermal_slowdown",))}, (Mode.CUDA, Health.HEALTHY, "")),
        ({"gpu": replace(COOL, ecc_uncorrected_errors=2)}, (Mode.DEGRADED, Health.UNHEALTHY, "2 uncorrectable ECC errors")),
        ({"consecutive_failures": 2}, (Mode.CUDA, Health.HEALTHY, "")),
        ({"consecutive_failures": 3}, (Mode.DEGRADED, Health.UNHEALTHY, "3 jobs in a row failed here")),
        ({"maintenance": True}, (Mode.MAINTENANCE, Health.HEALTHY, "maintenance: finishing running jobs, taking no new ones")),
        ({"maintenance": True, "consecutive_failures": 3}, (Mode.DEGRADED, Health.UNHEALTHY, "3 jobs in a row failed here")),
        ({"maintenance": True, "gpu": replace(COOL, temperature_c=95)}, (Mode.DEGRADED, Health.DEGRADED, "GPU temperature 95 °C >= 85 °C")),
        ({"seconds_stuck": 59.0}, (Mode.CUDA, Health.HEALTHY, "")),
        ({"seconds_stuck": 60.0}, (Mode.DEGRADED, Health.UNHEALTHY, "an inference still runs 60 s after it was cancelled")),
        ({"loaded": False, "load_error": "OSError: no such model"}, (Mode.OFFLINE, Health.UNHEALTHY, "model not loaded: OSError: no such model")),
        ({"gpu": None, "gpu_error": "NVML cannot read GPU 0"}, (Mode.OFFLINE, Health.UNHEALTHY, "NVML cannot read GPU 0")),
        ({"injected_health": Health.DEGRADED}, (Mode.DEGRADED, Health.DEGRADED, "injected fault: degraded")),
        ({"injected_health": Health.UNHEALTHY}, (Mode.DEGRADED, Health.UNHEALTHY, "injected fault: unhealthy")),
    ],
)
def test_assessment_rules(changes: dict, expected: tuple[Mode, Health, str]) -> None:
    assert assess(replace(FINE, **changes), LIMITS) == expected
# fmt: on


def test_availability_follows_the_runbook() -> None:
    usable = {(m, h) for m in Mode for h in Health if is_available(m.value, h.value)}
    assert usable == {(m, Health.HEALTHY) for m in (Mode.CUDA, Mode.CPU, Mode.MOCK)}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeReader:
    def __init__(self, reading: GpuReading | None) -> None:
        self.reading: GpuReading | Exception | None = reading

    def read(self) -> GpuReading | None:
        if isinstance(self.reading, Exception):
            raise self.reading
        return self.reading


class FakeRunner:
    def __init__(self, name: str) -> None:
        self.name, self.device, self.dtype = name, "cuda", "torch.float16"
        self.adapters: tuple[str, ...] = ()
        self.released = False

    def release(self) -> None:
        self.released = True


class FakeLoader:
    """Loads take LOAD_S on the clock; it notes which models were held as each load began."""

    LOAD_S = 2.5

    def __init__(self, clock: FakeClock, failing: frozenset[str] = frozenset()) -> None:
        self.clock, self.failing = clock, failing
        self.manager: ModelManager | None = None
        self.loads: list[tuple[str, tuple[str, ...]]] = []  # (model, models held as it began)

    def __call__(self, name: str) -> FakeRunner:
        held = tuple(self.manager.held()) if self.manager else ()
        self.loads.append((name, held))
        self.clock.now += self.LOAD_S
        if name in self.failing:
            raise OSError(f"no model in /models/{name}")
        return FakeRunner(name)


class RecordedEvents:
    def __init__(self) -> None:
        self.loads: list[tuple[str, float]] = []
        self.evictions: list[str] = []

    def loaded(self, model: str, seconds: float) -> None:
        self.loads.append((model, seconds))

    def evicted(self, model: str) -> None:
        self.evictions.append(model)


def manager(clock: FakeClock, reader: FakeReader, **settings: object) -> ModelManager:
    return ModelManager(WorkerSettings(model="m", **settings), reader, FakeRunner, clock, RecordedEvents())


MODELS = {"a": "/models/a", "b": {"path": "/models/b", "dtype": "float16"}, "c": "/models/c"}


def multi(
    limit: int = 1, failing: frozenset[str] = frozenset(), **settings: object
) -> tuple[ModelManager, FakeLoader, RecordedEvents]:
    """A replica serving models a (the default), b and c, holding `limit` at once."""
    clock, events = FakeClock(), RecordedEvents()
    loader = FakeLoader(clock, failing)
    worker = WorkerSettings(models=MODELS, models_per_replica=limit, **settings)
    replica = ModelManager(worker, FakeReader(None), loader, clock, events)
    loader.manager = replica
    return replica, loader, events


def test_a_cancelled_call_that_stops_says_nothing_about_the_gpu() -> None:
    clock = FakeClock()
    replica = manager(clock, FakeReader(COOL), stuck_inference_after_s=30)
    replica.record_cancelled()  # a user's cancel, or the router's timeout: the router judges which
    replica.record_call_ended()  # the call stopped at its next step
    clock.now += 1000
    assert (replica.get_status_snapshot().mode, replica.get_status_snapshot().health) == (Mode.CUDA, Health.HEALTHY)


def test_failures_of_distinct_jobs_count_until_a_success() -> None:
    replica = manager(FakeClock(), FakeReader(None), unhealthy_after_failures=2)
    replica.record_failure("a")
    replica.record_success(1.5)
    replica.record_failure("b")
    replica.record_failure("b")  # the same broken job again says nothing more about the GPU
    assert replica.get_status_snapshot().health == "healthy"
    replica.record_failure("c")
    snapshot = replica.get_status_snapshot()
    assert (snapshot.health, snapshot.consecutive_failures, snapshot.last_inference_s) == (Health.UNHEALTHY, 2, 1.5)


def test_an_inference_that_outlives_its_timeout_makes_the_replica_unhealthy() -> None:
    clock = FakeClock()
    replica = manager(clock, FakeReader(COOL), stuck_inference_after_s=30)
    replica.record_cancelled()
    clock.now += 29.9
    assert replica.get_status_snapshot().health is Health.HEALTHY
    clock.now += 0.1
    assert replica.get_status_snapshot().health is Health.UNHEALTHY  # Serve replaces it
    replica.record_call_ended()
    assert replica.get_status_snapshot().health is Health.HEALTHY


def test_a_lost_gpu_makes_the_replica_offline() -> None:
    reader = FakeReader(COOL)
    replica = manager(FakeClock(), reader)
    reader.reading = GpuLost("NVML cannot read GPU 0: GPU is lost")
    assert (replica.get_status_snapshot().mode, replica.get_status_snapshot().health) == ("offline", "unhealthy")


def test_a_model_that_fails_to_load_is_offline() -> None:
    def broken() -> None:
        raise OSError("no such model")

    replica = ModelManager(WorkerSettings(model="m"), FakeReader(None), lambda _name: broken(), FakeClock(), RecordedEvents())
    snapshot = replica.get_status_snapshot()
    assert (snapshot.mode, snapshot.health, snapshot.reason) == (
        "offline",
        "unhealthy",
        "model not loaded: OSError: no such model",
    )


def test_injected_faults_count_only_when_enabled() -> None:
    faults = ReplicaDirectives(faults=InjectedFaults(temperature_c=95))
    disabled = manager(FakeClock(), FakeReader(None))
    disabled.directives = faults
    assert disabled.get_status_snapshot().health == "healthy"

    enabled = manager(FakeClock(), FakeReader(None), fault_injection=True)
    enabled.directives = faults
    snapshot = enabled.get_status_snapshot()
    assert (snapshot.mode, snapshot.gpu["temperature_c"], snapshot.faults_injected) == ("degraded", 95, True)


def test_forced_mock_mode() -> None:
    replica = manager(FakeClock(), FakeReader(None), force_mock=True)
    assert replica.get_status_snapshot().mode == "mock"


def test_a_replica_in_maintenance_still_runs_what_it_was_sent() -> None:
    from scheduling.directives import can_run

    assert can_run("maintenance", "healthy") and not is_available("maintenance", "healthy")
    assert not can_run("maintenance", "degraded") and not can_run("degraded", "degraded")
    assert can_run("cuda", "healthy")


def test_the_default_model_loads_at_start_and_is_reported() -> None:
    replica, loader, events = multi(limit=2)
    snapshot = replica.get_status_snapshot()
    assert (snapshot.model, snapshot.device, snapshot.dtype, snapshot.models) == ("a", "cuda", "float16", {"a": ()})
    assert (loader.loads, events.loads) == ([("a", ())], [("a", FakeLoader.LOAD_S)])


def test_a_held_model_is_not_loaded_again() -> None:
    replica, loader, _ = multi(limit=2)
    assert replica.runner_for("a") is replica.runner_for("") is replica.runner_for("a")  # "": the default
    assert [model for model, _ in loader.loads] == ["a"]


def test_models_load_on_demand_and_the_least_recently_used_goes_at_the_limit() -> None:
    replica, _, events = multi(limit=2)
    b = replica.runner_for("b")
    assert list(replica.held()) == ["a", "b"]
    replica.runner_for("a")  # a is now the most recently used
    assert list(replica.held()) == ["b", "a"]
    replica.runner_for("c")
    assert list(replica.get_status_snapshot().models) == ["a", "c"]
    assert b.released and events.evictions == ["b"]
    assert events.loads == [(model, FakeLoader.LOAD_S) for model in ("a", "b", "c")]


def test_at_one_model_per_replica_each_other_model_evicts_the_held_one_before_it_loads() -> None:
    replica, loader, events = multi(limit=1)
    for model in ("b", "a", "a", "b"):
        assert replica.runner_for(model).name == model
    # Never two models in memory at once: the held one goes before the next one loads.
    assert loader.loads == [("a", ()), ("b", ()), ("a", ()), ("b", ())]
    assert events.evictions == ["a", "b", "a"]
    assert replica.get_status_snapshot().models == {"b": ()}


def test_a_leased_model_is_evicted_only_once_given_back() -> None:
    replica, loader, events = multi(limit=2)
    a = replica.lease("a")
    replica.runner_for("b")
    replica.runner_for("c")  # a, leased, is the least recently used: b goes instead
    assert list(replica.held()) == ["a", "c"] and events.evictions == ["b"] and not a.released

    replica, loader, events = multi(limit=1)
    a = replica.lease("a")
    loading = threading.Thread(target=replica.runner_for, args=("b",))
    loading.start()
    loading.join(timeout=0.2)
    assert loading.is_alive() and not a.released and list(replica.held()) == ["a"]  # the call on a goes on
    replica.give_back(a)
    loading.join(timeout=10)
    assert not loading.is_alive() and a.released and list(replica.held()) == ["b"]
    assert [model for model, _ in loader.loads] == ["a", "b"]


def test_the_snapshot_names_the_adapters_loaded_into_each_model(tmp_path: Path) -> None:
    replica, _, _ = multi(limit=2, lora_dir=str(tmp_path))
    replica.runner_for("b").adapters = ("ink", "chalk")  # as the runner loads them for its calls
    assert replica.get_status_snapshot().models == {"a": (), "b": ("ink", "chalk")}


def test_an_unknown_model_or_adapter_is_the_jobs_error_not_the_replicas(tmp_path: Path) -> None:
    (tmp_path / "ink").mkdir()
    replica, loader, _ = multi(lora_dir=str(tmp_path))
    with pytest.raises(NotServed, match="unknown model 'zz'; served: a, b, c"):
        replica.runner_for("zz")
    with pytest.raises(NotServed, match="unknown LoRA adapter 'chalk'; served: ink"):
        replica.runner_for("b", ["ink", "chalk"])
    assert replica.runner_for("b", ["ink"]).name == "b"
    assert [model for model, _ in loader.loads] == ["a", "b"]  # nothing loaded for a job that cannot run
    snapshot = replica.get_status_snapshot()
    assert (snapshot.mode, snapshot.health, snapshot.consecutive_failures) == (Mode.CUDA, Health.HEALTHY, 0)


def test_a_model_that_fails_to_load_on_demand_fails_its_job_and_the_replica_stays_healthy() -> None:
    replica, _, events = multi(limit=1, failing=frozenset({"b"}))
    with pytest.raises(ModelLoadFailed, match="model 'b' did not load: OSError: no model in /models/b"):
        replica.runner_for("b")
    snapshot = replica.get_status_snapshot()
    assert (snapshot.mode, snapshot.health, snapshot.models) == (Mode.CUDA, Health.HEALTHY, {})  # a made room in vain
    assert [model for model, _ in events.loads] == ["a"]  # only loads that succeeded count
    assert replica.runner_for("a").name == "a"


def test_a_default_model_that_fails_to_load_makes_the_replica_offline() -> None:
    replica, _, _ = multi(failing=frozenset({"a"}))
    snapshot = replica.get_status_snapshot()
    assert (snapshot.mode, snapshot.health, snapshot.models) == (Mode.OFFLINE, Health.UNHEALTHY, {})
    assert snapshot.reason == "model not loaded: OSError: no model in /models/a"


def test_the_catalog_names_a_single_model_by_its_last_path_component() -> None:
    assert WorkerSettings(model="stabilityai/sd-turbo").check_served("") == "sd-turbo"
    assert WorkerSettings(model="/srv/models/tiny/", dtype="float16").catalog() == {
        "tiny": ModelSpec(path="/srv/models/tiny/", dtype="float16")
    }
    assert WorkerSettings(models=MODELS).default_model() == "a"
