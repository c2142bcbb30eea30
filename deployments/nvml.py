"""GPU readings through NVML (`pynvml`, from the nvidia-ml-py package).

Where NVML is absent (a CPU machine, forced mock mode) there are no readings: that is not an error.
Once a GPU has been read, failing to read it again is: the device fell off the bus or the driver died.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from typing import Any, Protocol

logger = logging.getLogger(__name__)

# Clock-event reasons that mean the hardware is protecting itself, not idling.
THROTTLE_REASONS = {
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
}


@dataclass(frozen=True)
class GpuReading:
    index: int
    name: str
    temperature_c: float
    utilization_pct: float
    memory_used_mb: float
    memory_total_mb: float
    power_w: float | None = None
    ecc_uncorrected_errors: int | None = None
    throttle_reasons: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "throttle_reasons": list(self.throttle_reasons)}


class GpuLost(RuntimeError):
    """NVML answered before and does not any more."""


class GpuReader(Protocol):
    def read(self) -> GpuReading | None: ...


class NoGpu:
    def read(self) -> GpuReading | None:
        return None


class NvmlReader:
    def __init__(self, pynvml: Any, handle: Any, index: int) -> None:
        self._nvml = pynvml
        self._handle = handle
        self._index = index
        self._name = _text(pynvml.nvmlDeviceGetName(handle))

    def read(self) -> GpuReading:
        nvml, handle = self._nvml, self._handle
        try:
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            return GpuReading(
                index=self._index,
                name=self._name,
                temperature_c=float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)),
                utilization_pct=float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                memory_used_mb=memory.used / 2**20,
                memory_total_mb=memory.total / 2**20,
                power_w=_optional(lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000),
                ecc_uncorrected_errors=_optional(
                    lambda: int(
                        nvml.nvmlDeviceGetTotalEccErrors(
                            handle, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_VOLATILE_ECC
                        )
                    )
                ),
                throttle_reasons=self._throttle_reasons(),
            )
        except nvml.NVMLError as error:
            raise GpuLost(f"NVML cannot read GPU {self._index}: {error}") from error

    def _throttle_reasons(self) -> tuple[str, ...]:
        mask = _optional(lambda: self._nvml.nvmlDeviceGetCurrentClocksEventReasons(self._handle)) or 0
        return tuple(name for bit, name in THROTTLE_REASONS.items() if mask & bit)


def _optional(read: Any) -> Any:
    """Some boards do not support a query (ECC on consumer GPUs, power on some VMs)."""
    try:
        return read()
    except Exception:
        return None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def open_gpu_reader() -> GpuReader:
    """The reader for this replica's GPU: the first device in CUDA_VISIBLE_DEVICES, which Ray sets."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    if not visible:
        return NoGpu()
    try:
        import pynvml

        pynvml.nvmlInit()
        if visible.startswith(("GPU-", "MIG-")):
            handle, index = pynvml.nvmlDeviceGetHandleByUUID(visible), 0
        else:
            handle, index = pynvml.nvmlDeviceGetHandleByIndex(int(visible)), int(visible)
        return NvmlReader(pynvml, handle, index)
    except Exception as error:  # no driver, no library: run without readings
        logger.warning("No NVML readings for GPU %s: %s", visible, error)
        return NoGpu()
