"""The application's settings: the API's own (request bounds, waits), and all of them together.

The application builder resolves every setting once (`AppSettings.resolve`: the Serve
application's args over `SEIDRA_*` environment variables) and hands each component its typed part.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from deployments.settings import WorkerSettings
from scheduling.settings import RouterSettings
from storage.settings import StorageSettings


class ApiSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SEIDRA_", extra="ignore")

    max_prompt_chars: int = Field(2000, ge=1, description="Longest prompt or negative prompt accepted.")
    min_image_size: int = Field(64, ge=8, description="Smallest width/height accepted (pixels).")
    max_image_size: int = Field(1024, ge=8, description="Largest width/height accepted (pixels).")
    default_image_size: int = Field(512, ge=8, description="Width and height when a request gives none.")
    max_inference_steps: int = Field(150, ge=1, description="Most denoising steps a request may ask for.")
    default_inference_steps: int = Field(30, ge=1, description="Denoising steps when a request gives none.")
    max_guidance_scale: float = Field(30.0, ge=0, description="Largest guidance_scale accepted.")
    default_guidance_scale: float = Field(7.5, ge=0, description="guidance_scale when a request gives none.")
    max_batch_items: int = Field(500, ge=1, description="Most items in one /generation/batch request.")
    wait_timeout_s: float = Field(60.0, gt=0, le=600, description="How long ?wait=true waits before answering 202.")
    auth: Literal["keys", "off"] = Field(
        "keys",
        description="`keys`: every request needs `Authorization: Bearer <API key>`; `off` (one local user, "
        "an admin) only while the HTTP proxy listens on loopback.",
    )
    max_body_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Request bodies larger than this are refused with 413 before they are read."
    )

    @model_validator(mode="after")
    def _consistent(self) -> ApiSettings:
        if not self.min_image_size <= self.default_image_size <= self.max_image_size:
            raise ValueError("default_image_size must lie between min_image_size and max_image_size")
        if self.default_inference_steps > self.max_inference_steps:
            raise ValueError("default_inference_steps must not exceed max_inference_steps")
        if self.default_guidance_scale > self.max_guidance_scale:
            raise ValueError("default_guidance_scale must not exceed max_guidance_scale")
        return self


SETTINGS_CLASSES: tuple[type[BaseSettings], ...] = (StorageSettings, WorkerSettings, RouterSettings, ApiSettings)


@dataclass(frozen=True)
class AppSettings:
    storage: StorageSettings
    worker: WorkerSettings
    router: RouterSettings
    api: ApiSettings

    @classmethod
    def resolve(cls, args: Mapping[str, Any]) -> AppSettings:
        """`args` (setting names without the `SEIDRA_` prefix) win over `SEIDRA_*` environment variables."""
        settings_from_args(args)  # refuses unknown names, naming the valid ones
        parts = [settings_class(**_own(settings_class, args)) for settings_class in SETTINGS_CLASSES]
        storage, worker, router, api = parts
        return cls(storage, worker, router, api)  # type: ignore[arg-type]  # in SETTINGS_CLASSES' order


def served_models(worker: WorkerSettings) -> list[str]:
    """The names a caller may pick a model by (`model`), the default first: SEIDRA_MODELS' names, or
    SEIDRA_MODEL's last path component (`stabilityai/sd-turbo` is `sd-turbo`)."""
    return list(worker.catalog())


def _own(settings_class: type[BaseSettings], args: Mapping[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in args.items() if name in settings_class.model_fields}


def settings_from_args(args: Mapping[str, Any]) -> dict[str, str]:
    """Application args as `SEIDRA_*` variables; unknown names are refused with the valid ones."""
    known = {name for cls in SETTINGS_CLASSES for name in cls.model_fields}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown SEIDRA setting(s) in the application args: {unknown}; known: {sorted(known)}")
    return {f"SEIDRA_{name.upper()}": _env_text(value) for name, value in args.items()}


def _env_text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
