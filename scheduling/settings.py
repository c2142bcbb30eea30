"""Router settings, read from `SEIDRA_*` environment variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from scheduling.job_queue import QueuePolicy


class RouterSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SEIDRA_", extra="ignore")

    max_realtime_queue: int = Field(1000, ge=1, description="Waiting realtime jobs before submissions get 429.")
    max_batch_queue: int = Field(10_000, ge=1, description="Waiting batch jobs before submissions get 429.")
    queue_full_retry_after_s: int = Field(5, ge=1, le=3600, description="Retry-After sent with a 429.")
    steps_per_dispatch: int = Field(
        2,
        ge=0,
        description="Slice length in denoising steps: a running batch call stops at a multiple of it when a "
        "realtime job needs its slot (a worker call otherwise runs its jobs to the end: slices cost nothing "
        "unless one is taken). 0: slicing off, a realtime job waits for a running batch job to end.",
    )
    max_batch_size: int = Field(
        1,
        ge=1,
        le=64,
        description="Jobs of one lane with the same size, steps and guidance denoised together in one worker "
        "call (batched denoising); never waited for: a call takes the compatible jobs waiting then.",
    )
    queue_policy: QueuePolicy = Field(
        QueuePolicy.LANES,
        description="lanes: realtime before batch, by priority, users taking turns. fifo: one queue, oldest "
        "first, no preemption (a baseline for benchmarks).",
    )
    worker_ttl_s: float = Field(
        10.0,
        gt=0,
        description="A replica silent for this long no longer counts as capacity. A restarted router also waits this "
        "long before it runs the unfinished jobs it took over, so that every live replica has said which of them it still runs.",
    )
    max_attempts: int = Field(
        3, ge=1, description="Failed runs (errors, timeouts, dead workers) after which a job ends `failed`."
    )
    inference_timeout_s: float = Field(
        300.0, gt=0, description="A worker call slower than this is a GPU inference timeout: the job is put on hold."
    )
    degraded_cooldown_s: float = Field(60.0, ge=0, description="How long an inference timeout keeps a replica degraded.")
    hold_base_s: float = Field(5.0, gt=0, description="First retry_after_seconds of a held job; doubles with each delay.")
    hold_cap_s: float = Field(300.0, gt=0, description="Largest retry_after_seconds of a held job.")
    hold_jitter: float = Field(0.2, ge=0, lt=1, description="retry_after_seconds is spread by +/- this fraction.")
    max_storage_faults: int = Field(
        20, ge=1, description="Failed attempts to store a job's image after which it ends `failed` (no GPU attempt is counted)."
    )
    reconcile_interval_s: float = Field(
        30.0, gt=0, description="How often the router compares its queue with the database and repairs what differs."
    )
    idempotency_ttl_s: float = Field(
        86_400.0, ge=86_400, description="How long an Idempotency-Key is remembered (at least 24 h)."
    )
    unavailable_retry_after_s: int = Field(
        5, ge=1, le=3600, description="Retry-After sent with a 503 while the router recovers or the database is down."
    )
    user_max_waiting_realtime: int = Field(
        100, ge=1, description="Unfinished realtime jobs one user may have before submissions get 429 (per-key override)."
    )
    user_max_waiting_batch: int = Field(
        5_000, ge=1, description="Unfinished batch jobs one user may have before submissions get 429 (per-key override)."
    )
    user_submissions_per_minute: int = Field(
        120,
        ge=1,
        description="Submissions (a batch is one) one user may make per minute, in bursts of as many (per-key override).",
    )
    webhook_timeout_s: float = Field(
        10.0, gt=0, le=300, description="How long one webhook attempt may take, from resolving its host to the answer's status."
    )
    webhook_retry_base_s: float = Field(
        5.0, gt=0, description="Delay before a failed webhook attempt is tried again; doubles with each failure."
    )
    webhook_retry_cap_s: float = Field(3600.0, gt=0, description="Longest delay between two webhook attempts.")
    webhook_max_attempts: int = Field(12, ge=1, le=100, description="Webhook attempts after which a delivery is given up.")
    webhook_retry_for_s: float = Field(
        86_400.0, gt=0, description="No webhook attempt is made later than this after the delivery was first due."
    )
    webhook_concurrency: int = Field(16, ge=1, le=1000, description="Webhook attempts the router makes at once.")
    webhook_allow_private: bool = Field(
        False,
        description="Let webhooks go to private, loopback and link-local addresses (tests, a receiver on the same "
        "network). Off: such URLs are refused at submission and at each attempt.",
    )
