"""Worker settings, read from `SEIDRA_*` environment variables."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SEIDRA_", extra="ignore", protected_namespaces=())

    model: str = Field("", description="diffusers model: a local folder or a hub id (e.g. stabilityai/sd-turbo).")
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto: CUDA when available, else CPU.")
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="auto: float16 on CUDA, float32 on CPU."
    )
    num_gpus: float = Field(0, ge=0, description="GPUs reserved by each worker replica (1 on GPU clusters).")
    worker_num_cpus: float = Field(1, ge=0, description="CPUs reserved by each worker replica.")
    num_workers: int = Field(1, ge=0, description="Worker replicas; with max_workers, the fewest.")
    max_workers: int = Field(
        0, ge=0, description="Above num_workers: replicas follow the router's backlog up to this many (0: fixed)."
    )
    jobs_per_worker: float = Field(1.0, gt=0, description="Backlog (waiting + running jobs) per replica to aim for.")
    worker_upscale_delay_s: float = Field(10.0, ge=0, description="How long a bigger backlog lasts before replicas are added.")
    worker_downscale_delay_s: float = Field(300.0, ge=0, description="How long a smaller backlog lasts before replicas go.")
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads per replica on CPU; 0 keeps torch's default.")
    heartbeat_interval_s: float = Field(2.0, gt=0, le=60, description="How often a replica reports to the router.")
    force_mock: bool = Field(
        False, description="Last resort during a GPU outage: start workers on the CPU without touching CUDA or NVML."
    )
    max_gpu_temperature_c: float = Field(85.0, gt=0, description="At or above this GPU temperature a replica is degraded.")
    unhealthy_after_failures: int = Field(3, ge=1, description="Consecutive inference failures that make a replica unhealthy.")
    stuck_inference_after_s: float = Field(
        60.0, gt=0, description="A cancelled inference still running this long makes its replica unhealthy (Serve replaces it)."
    )
    health_check_period_s: float = Field(10.0, gt=0, description="Serve health-check period of worker replicas.")
    health_check_timeout_s: float = Field(30.0, gt=0, description="Serve health-check timeout of worker replicas.")
    fault_injection: bool = Field(
        False, description="Drills and tests only: let the admin fault endpoint change what replicas report."
    )

    def require_model(self) -> "WorkerSettings":
        if not self.model:
            raise ValueError(
                "SEIDRA_MODEL is not set: export SEIDRA_MODEL=<diffusers model folder or hub id> "
                "(for a quick try: seidra make-tiny-model DIR, then SEIDRA_MODEL=DIR)"
            )
        return self
