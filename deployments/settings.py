"""Worker settings, read from `SEIDRA_*` environment variables."""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

Dtype = Literal["auto", "float16", "bfloat16", "float32"]


class ModelSpec(BaseModel):
    """One served model: a diffusers folder or hub id, and its dtype (auto: the replica's `dtype`)."""

    model_config = {"frozen": True, "extra": "forbid", "protected_namespaces": ()}

    path: str = Field(min_length=1)
    dtype: Dtype = "auto"


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SEIDRA_", extra="ignore", protected_namespaces=())

    model: str = Field("", description="diffusers model: a local folder or a hub id (e.g. stabilityai/sd-turbo).")
    models: dict[str, ModelSpec | str] = Field(
        default_factory=dict,
        description='Several named models, the first the default (JSON: {"name": "folder or hub id"} or '
        '{"name": {"path": ..., "dtype": ...}}); replaces model.',
    )
    models_per_replica: int = Field(
        1, ge=1, description="Models a replica holds at once; loading one more evicts the least recently used."
    )
    lora_dir: str = Field(
        "", description="Folder of LoRA adapters, one sub-folder per adapter name (diffusers save_lora_weights)."
    )
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto: CUDA when available, else CPU.")
    dtype: Dtype = Field("auto", description="auto: float16 on CUDA, float32 on CPU.")
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

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Settings given (the application's args) replace their variables whole: pydantic-settings
        would merge `models` from both into one catalog."""
        return init_settings, _Unless(settings_cls, env_settings, init_settings), dotenv_settings, file_secret_settings

    @field_validator("models", mode="before")
    @classmethod
    def _json_text(cls, value: Any) -> Any:
        """Application args arrive as the text of their SEIDRA_* variable (`seidra up`, the tests)."""
        if isinstance(value, str):
            return json.loads(value) if value.strip() else {}
        return value

    def catalog(self) -> dict[str, ModelSpec]:
        """The served models by name, the default first. With `model` alone, its name is its last
        path component (`stabilityai/sd-turbo` is `sd-turbo`)."""
        if self.models:
            return {name: ModelSpec(path=spec) if isinstance(spec, str) else spec for name, spec in self.models.items()}
        if not self.model:
            return {}
        return {Path(self.model.rstrip("/")).name or self.model: ModelSpec(path=self.model, dtype=self.dtype)}

    def default_model(self) -> str:
        return next(iter(self.catalog()), "")

    def adapters(self) -> list[str]:
        """The LoRA adapters a job may ask for: the sub-folders of `lora_dir`."""
        folder = Path(self.lora_dir) if self.lora_dir else None
        if folder is None or not folder.is_dir():
            return []
        return sorted(entry.name for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith("."))

    def check_served(self, model: str, adapters: Collection[str] = ()) -> str:
        """The catalog name of `model` ("": the default one); NotServed naming an unknown model or adapter."""
        catalog = self.catalog()
        name = model or self.default_model()
        if name not in catalog:
            raise NotServed(f"unknown model {name!r}; served: {', '.join(catalog)}")
        served = self.adapters() if adapters else []
        unknown = sorted(set(adapters).difference(served))
        if unknown:
            raise NotServed(f"unknown LoRA adapter {', '.join(map(repr, unknown))}; served: {', '.join(served) or 'none'}")
        return name

    def require_model(self) -> WorkerSettings:
        if not self.catalog():
            raise ValueError(
                "SEIDRA_MODEL is not set: export SEIDRA_MODEL=<diffusers model folder or hub id> (or SEIDRA_MODELS) "
                "(for a quick try: seidra make-tiny-model DIR, then SEIDRA_MODEL=DIR)"
            )
        return self


class _Unless(PydanticBaseSettingsSource):
    """`source`'s values but those that `given` (the settings passed in) has."""

    def __init__(
        self, settings_cls: type[BaseSettings], source: PydanticBaseSettingsSource, given: PydanticBaseSettingsSource
    ) -> None:
        super().__init__(settings_cls)
        self._source, self._given = source, given

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # __call__ answers for the whole source

    def __call__(self) -> dict[str, Any]:
        given = self._given()
        return {name: value for name, value in self._source().items() if name not in given}


class NotServed(LookupError):
    """A job asks for a model or LoRA adapter this deployment does not serve: its own error, not the GPU's."""
