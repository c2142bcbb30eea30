"""Router settings, read from `SEIDRA_*` environment variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class RouterSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SEIDRA_", extra="ignore")

    max_realtime_queue: int = Field(1000, ge=1, description="Waiting realtime jobs before submissions get 429.")
    max_batch_queue: int = Field(10_000, ge=1, description="Waiting batch jobs before submissions get 429.")
    queue_full_retry_after_s: int = Field(5, ge=1, le=3600, description="Retry-After sent with a 429.")
    steps_per_dispatch: int = Field(
        0, ge=0, description="Denoising steps per worker call; 0 runs a job in one call. Smaller slices let "
        "realtime jobs overtake batch jobs sooner."
    )
    worker_ttl_s: float = Field(10.0, gt=0, description="A replica silent for this long no longer counts as capacity.")
    max_attempts: int = Field(3, ge=1, description="Dispatches of a job whose worker died before it is failed.")
