"""Replica health: the assessment rules and the manager's bookkeeping, with a fake clock."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest

from deployments.model_manager import ModelManager, ReplicaFacts, Thresholds, assess
from deployments.nvml import GpuLost, GpuReading
from deployments.settings import WorkerSettings
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
        self.reading: GpuReading | None | Exception = reading

    def read(self) -> GpuReading | None:
        if isinstance(self.reading, Exception):
            raise self.reading
        return self.reading


def manager(clock: FakeClock, reader: FakeReader, **settings: object) -> ModelManager:
    runner = SimpleNamespace(device="cuda", dtype="torch.float16")
    return ModelManager(WorkerSettings(model="m", **settings), reader, lambda: runner, clock)


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

    replica = ModelManager(WorkerSettings(model="m"), FakeReader(None), broken, FakeClock())
    snapshot = replica.get_status_snapshot()
    assert (snapshot.mode, snapshot.health, snapshot.reason) == ("offline", "unhealthy", "model not loaded: OSError: no such model")


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
