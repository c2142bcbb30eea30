"""One diffusers text-to-image pipeline, driven step slice by step slice.

A slice is one self-contained pipeline call. With an Euler scheduler a run stopped after step K
(through `callback_on_step_end`) resumes exactly by calling the pipeline again with the remaining
timesteps and the saved latents divided by that schedule's `init_noise_sigma` (the pipeline
multiplies them back). Schedulers that cannot resume this way run each job in one slice.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, EulerDiscreteScheduler

from deployments.settings import WorkerSettings
from scheduling.directives import InferenceTimeout
from scheduling.work import GenerationParams, WorkItem

logger = logging.getLogger(__name__)


def resolve_device(setting: str) -> str:
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def resolve_dtype(setting: str, device: str) -> torch.dtype:
    if setting == "auto":
        return torch.float16 if device == "cuda" else torch.float32
    return getattr(torch, setting)


@dataclass(frozen=True)
class SliceOutput:
    step: int
    total_steps: int
    latents: np.ndarray | None = None
    png: bytes | None = None


class DiffusionRunner:
    def __init__(self, settings: WorkerSettings) -> None:
        self.model = settings.require_model().model
        # Forced mock mode must not touch CUDA at all, not even to ask whether it is there.
        self.device = "cpu" if settings.force_mock else resolve_device(settings.device)
        self.dtype = torch.float32 if settings.force_mock else resolve_dtype(settings.dtype, self.device)
        if self.device == "cpu" and settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.pipeline = DiffusionPipeline.from_pretrained(settings.model, dtype=self.dtype).to(self.device)
        self.pipeline.set_progress_bar_config(disable=True)
        self.resumable = self._use_euler_scheduler()
        # One pipeline holds one scheduler state: calls must not overlap.
        self._lock = threading.Lock()
        logger.info("Loaded %s on %s (%s), resumable=%s", self.model, self.device, self.dtype, self.resumable)

    def _use_euler_scheduler(self) -> bool:
        scheduler = self.pipeline.scheduler
        if not isinstance(scheduler, EulerDiscreteScheduler):
            if EulerDiscreteScheduler not in getattr(scheduler, "compatibles", []):
                return False
            self.pipeline.scheduler = scheduler = EulerDiscreteScheduler.from_config(scheduler.config)
        return _resumes_exactly(scheduler.config)

    def _schedule(self, **kwargs: Any) -> EulerDiscreteScheduler:
        scheduler = EulerDiscreteScheduler.from_config(self.pipeline.scheduler.config)
        scheduler.set_timesteps(**kwargs)
        return scheduler

    def advance(self, item: WorkItem, control: StepControl | None = None) -> SliceOutput:
        """Run up to `item.max_steps` denoising steps; decode and encode a PNG on the last one.

        Raises `Interrupted` when `control` is cancelled before the slice ends, and
        `InferenceTimeout` when its deadline passes first.
        """
        control = control or StepControl()
        params = item.params
        total = params.num_inference_steps
        if not self.resumable and item.step:
            raise ValueError(f"{self.model} cannot resume a job at step {item.step}")
        stop = total if not self.resumable or item.max_steps == 0 else min(total, item.step + item.max_steps)
        kwargs = self._call_arguments(params)
        if item.step:
            remaining = self._schedule(num_inference_steps=total).timesteps[item.step :].tolist()
            init_sigma = self._schedule(timesteps=remaining).init_noise_sigma
            kwargs["timesteps"] = remaining
            # Divided in float32: the pipeline multiplies back, and two fp16 roundings would drift.
            kwargs["latents"] = (torch.from_numpy(item.latents) / init_sigma).to(self.device, self.dtype)
        else:
            kwargs["num_inference_steps"] = total
        control.stop_after = stop - item.step
        kwargs["callback_on_step_end"] = control
        if stop < total:
            kwargs["output_type"] = "latent"
        with self._lock, torch.inference_mode():
            output = self.pipeline(**kwargs).images
        if control.cancelled.is_set():
            raise Interrupted(f"job {item.job_id} was cancelled at a step boundary")
        if control.timed_out:
            raise InferenceTimeout(item.job_id, item.timeout_s)
        if stop < total:
            return SliceOutput(step=stop, total_steps=total, latents=output.float().cpu().numpy())
        return SliceOutput(step=total, total_steps=total, png=_png(output[0]))

    def _call_arguments(self, params: GenerationParams) -> dict[str, Any]:
        # Seeded on the CPU so a seed gives the same image whatever the device.
        return {**params.pipeline_arguments(), "generator": torch.Generator("cpu").manual_seed(params.seed)}


def _resumes_exactly(config: Any) -> bool:
    """Euler's `set_timesteps(timesteps=...)` rebuilds the same sigmas only for plain discrete schedules.

    With karras/exponential/beta sigmas or continuous timesteps it refuses custom timesteps, and with
    log-linear interpolation it ignores them; such pipelines run each job in one call.
    """
    return not (
        config.get("use_karras_sigmas")
        or config.get("use_exponential_sigmas")
        or config.get("use_beta_sigmas")
        or config.get("timestep_type", "discrete") != "discrete"
        or config.get("interpolation_type", "linear") != "linear"
    )


class Interrupted(RuntimeError):
    """The slice was cancelled (its caller gave up on it); its output is incomplete."""


class StepControl:
    """The `callback_on_step_end` hook: ends a slice after `stop_after` steps, on cancellation, or
    at the first step boundary past `deadline` (a `time.monotonic()` value).

    `step_delay_s` slows each step down; it exists for fault-injection drills only.
    """

    def __init__(self, step_delay_s: float = 0.0, deadline: float | None = None) -> None:
        self.stop_after = 0
        self.step_delay_s = step_delay_s
        self.deadline = deadline
        self.cancelled = threading.Event()
        self.timed_out = False

    def __call__(self, pipeline: Any, index: int, _timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        if self.step_delay_s:
            self.cancelled.wait(self.step_delay_s)
        if self.deadline is not None and time.monotonic() >= self.deadline and index + 1 < self.stop_after:
            self.timed_out = True
        if index + 1 >= self.stop_after or self.cancelled.is_set() or self.timed_out:
            pipeline._interrupt = True  # the pipelines' own flag: the remaining steps are skipped
        return callback_kwargs


def _png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
