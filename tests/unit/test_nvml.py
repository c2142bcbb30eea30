"""NVML readings: what a GPU answers becomes a GpuReading; no GPU means no readings."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from deployments.nvml import GpuLost, NoGpu, NvmlReader, open_gpu_reader


class FakeNvml:
    """The handful of pynvml calls the reader makes (a GPU-less machine cannot answer them)."""

    NVML_TEMPERATURE_GPU = 0
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
    NVML_VOLATILE_ECC = 0

    class NVMLError(Exception):
        pass

    def __init__(self) -> None:
        self.lost = False

    def nvmlDeviceGetName(self, handle: object) -> bytes:
        return b"NVIDIA H100"

    def nvmlDeviceGetTemperature(self, handle: object, sensor: int) -> int:
        if self.lost:
            raise self.NVMLError("GPU is lost")
        return 71

    def nvmlDeviceGetUtilizationRates(self, handle: object) -> SimpleNamespace:
        return SimpleNamespace(gpu=93)

    def nvmlDeviceGetMemoryInfo(self, handle: object) -> SimpleNamespace:
        return SimpleNamespace(used=40 * 2**30, total=80 * 2**30)

    def nvmlDeviceGetPowerUsage(self, handle: object) -> int:
        return 350_500

    def nvmlDeviceGetTotalEccErrors(self, handle: object, kind: int, counter: int) -> int:
        raise self.NVMLError("Not Supported")  # consumer boards

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: object) -> int:
        return 0x40 | 0x1  # hardware thermal slowdown, and idle (not a fault)


def test_a_reading() -> None:
    reading = NvmlReader(FakeNvml(), handle=object(), index=3).read()
    assert reading.as_dict() == {
        "index": 3, "name": "NVIDIA H100", "temperature_c": 71.0, "utilization_pct": 93.0,
        "memory_used_mb": 40 * 1024, "memory_total_mb": 80 * 1024, "power_w": 350.5,
        "ecc_uncorrected_errors": None, "throttle_reasons": ["hw_thermal_slowdown"],
    }  # fmt: skip


def test_a_gpu_that_stops_answering_is_lost() -> None:
    nvml = FakeNvml()
    reader = NvmlReader(nvml, handle=object(), index=0)
    nvml.lost = True
    with pytest.raises(GpuLost, match="GPU is lost"):
        reader.read()


def test_no_visible_gpu_means_no_readings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    reader = open_gpu_reader()
    assert isinstance(reader, NoGpu) and reader.read() is None
