"""API settings (request bounds, waits), read from `SEIDRA_*` environment variables."""

from __future__ import annotations

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


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

    @model_validator(mode="after")
    def _consistent(self) -> "ApiSettings":
        if not self.min_image_size <= self.default_image_size <= self.max_image_size:
            raise ValueError("default_image_size must lie between min_image_size and max_image_size")
        if self.default_inference_steps > self.max_inference_steps:
            raise ValueError("default_inference_steps must not exceed max_inference_steps")
        if self.default_guidance_scale > self.max_guidance_scale:
            raise ValueError("default_guidance_scale must not exceed max_guidance_scale")
        return self
