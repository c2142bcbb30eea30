"""One diffusers text-to-image pipeline, denoising a batch of jobs per call, yielding between slices.

A call is one self-contained pipeline call for up to `SEIDRA_MAX_BATCH_SIZE` compatible jobs, each
with its own prompt and seeded generator. It runs to the end unless the router asks it to yield,
which it does at the next slice boundary (`callback_on_step_end`): the jobs' latents go back to the
router, and any replica resumes them exactly. With an Euler scheduler a run stopped after step K
resumes by calling the pipeline again with the remaining timesteps and the saved latents divided by
that schedule's `init_noise_sigma` (the pipeline multiplies them back). Schedulers that cannot
resume this way never yield.

Prompt embeddings are computed once per prompt and adapters (and kept for the prompts seen last), so
a job that yields and comes back does not pay for its text encoder again.

A runner holds one served model. LoRA adapters are loaded into its pipeline the first time a call
asks for them (`load_lora_weights`, from `lora_dir/<name>`) and stay; each call then activates
exactly its own (`set_adapters` with its scales), or none, so that no call inherits another's.
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, EulerDiscreteScheduler, StableDiffusionPipeline

from deployments.settings import NotServed, WorkerSettings
from scheduling.directives import InferenceTimeout
from scheduling.work import Lora, WorkBatch, WorkItem

logger = logging.getLogger(__name__)

# Prompts whose embeddings a replica keeps: a few hundred kilobytes each for SD 1.5.
EMBEDDINGS_KEPT = 256


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
    def __init__(self, settings: WorkerSettings, name: str = "") -> None:
        """Load the served model `name` of the settings' catalog ("": the default one)."""
        self.name = name or settings.require_model().default_model()
        spec = settings.catalog()[self.name]
        # Forced mock mode must not touch CUDA at all, not even to ask whether it is there.
        self.device = "cpu" if settings.force_mock else resolve_device(settings.device)
        dtype = settings.dtype if spec.dtype == "auto" else spec.dtype
        self.dtype = torch.float32 if settings.force_mock else resolve_dtype(dtype, self.device)
        if self.device == "cpu" and settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.pipeline = DiffusionPipeline.from_pretrained(spec.path, dtype=self.dtype).to(self.device)
        self.pipeline.set_progress_bar_config(disable=True)
        self.resumable = self._use_euler_scheduler()
        self._lora_dir = Path(settings.lora_dir)
        self.adapters: tuple[str, ...] = ()  # loaded into the pipeline, first loaded first
        # One pipeline holds one scheduler state and one set of active adapters: calls must not overlap.
        self._lock = threading.Lock()
        self._embeddings: OrderedDict[tuple[str, str, bool, tuple[Lora, ...]], tuple[Any, Any]] = OrderedDict()
        self._schedules: dict[tuple[int, int], tuple[list[float], float]] = {}
        logger.info("Loaded %s (%s) on %s (%s), resumable=%s", self.name, spec.path, self.device, self.dtype, self.resumable)

    def release(self) -> None:
        """Give the model's memory back (it was evicted); waits for a call still running on it."""
        with self._lock:
            del self.pipeline
            self._embeddings.clear()
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()
        logger.info("Released %s", self.name)

    def _use_euler_scheduler(self) -> bool:
        scheduler = self.pipeline.scheduler
        if not isinstance(scheduler, EulerDiscreteScheduler):
            if EulerDiscreteScheduler not in getattr(scheduler, "compatibles", []):
                return False
            self.pipeline.scheduler = scheduler = EulerDiscreteScheduler.from_config(scheduler.config)
        return _resumes_exactly(scheduler.config)

    def advance(self, batch: WorkBatch, control: StepControl | None = None) -> list[SliceOutput]:
        """Denoise `batch`'s jobs together from their step to the end, or to the slice boundary where
        `control` asks them to yield; decode and encode a PNG per job at the end.

        Raises `Interrupted` when `control` is cancelled first, and `InferenceTimeout` when a
        slice's deadline passes first.
        """
        control = control or StepControl()
        items, step, total = batch.items, batch.step, batch.total_steps
        if len({item.batch_key() for item in items}) != 1:
            raise ValueError("the jobs of one call must share size, steps, guidance, step, model and adapters")
        if step and not self.resumable:
            raise ValueError(f"{self.name} cannot resume a job at step {step}")
        with self._lock:
            if control.cancelled.is_set():  # given up on before it began (while its model loaded, say)
                raise Interrupted(f"call {batch.call_id} was cancelled before it began")
            # Outside inference mode: activating an adapter sets requires_grad on its weights, which
            # tensors made in inference mode refuse.
            self._use_adapters(items[0].params.loras)
            with torch.inference_mode():
                kwargs = self._call_arguments(batch)
                control.begin(step, total, batch.slice_steps if self.resumable else None, batch.timeout_s)
                images = self.pipeline(**kwargs, callback_on_step_end=control).images
        if control.cancelled.is_set():
            raise Interrupted(f"call {batch.call_id} was cancelled at a step boundary")
        if control.timed_out:
            raise InferenceTimeout(",".join(batch.job_ids), batch.timeout_s)
        if control.yielded is not None:
            at, latents = control.yielded
            return [SliceOutput(at, total, latents=latents[i : i + 1].numpy()) for i in range(len(items))]
        return [SliceOutput(total, total, png=_png(image)) for image in images]

    def _use_adapters(self, loras: tuple[Lora, ...]) -> None:
        """Activate exactly `loras` at their scales, loading each the first time; without any, turn
        LoRA off."""
        for lora in loras:
            if lora.name not in self.adapters:
                self._load_adapter(lora.name)
        if loras:
            self.pipeline.set_adapters([lora.name for lora in loras], adapter_weights=[lora.scale for lora in loras])
            self.pipeline.enable_lora()  # set_adapters leaves LoRA layers that disable_lora turned off, off
        elif self.adapters:
            self.pipeline.disable_lora()

    def _load_adapter(self, name: str) -> None:
        if not hasattr(self.pipeline, "load_lora_weights"):
            raise NotServed(f"model {self.name!r} ({type(self.pipeline).__name__}) takes no LoRA adapters")
        started = time.perf_counter()
        try:
            self.pipeline.load_lora_weights(str(self._lora_dir / name), adapter_name=name)
        except Exception as error:  # made for another architecture, say: the job's error, not the GPU's
            with contextlib.suppress(Exception):  # half loaded, it would refuse the next try
                self.pipeline.delete_adapters([name])
            raise NotServed(f"LoRA adapter {name!r} does not load into {self.name!r}: {type(error).__name__}: {error}") from error
        self.adapters = (*self.adapters, name)
        logger.info("Loaded LoRA adapter %s into %s in %.1f s", name, self.name, time.perf_counter() - started)

    def _call_arguments(self, batch: WorkBatch) -> dict[str, Any]:
        items, params = batch.items, batch.items[0].params
        return {
            "width": params.width,
            "height": params.height,
            "guidance_scale": params.guidance_scale,
            **self._prompts(items),
            # Seeded on the CPU so a seed gives the same image whatever the device; one per job, so
            # each job's image is the one it would be alone.
            "generator": [torch.Generator("cpu").manual_seed(item.params.seed) for item in items],
            **self._schedule_arguments(batch),
        }

    def _schedule_arguments(self, batch: WorkBatch) -> dict[str, Any]:
        """All the steps from the start, or the steps left with the latents where the jobs stand."""
        if not batch.step:
            return {"num_inference_steps": batch.total_steps}
        remaining, init_sigma = self._remaining_schedule(batch.total_steps, batch.step)
        # Divided in float32: the pipeline multiplies back, and two fp16 roundings would drift.
        latents = torch.cat([torch.from_numpy(item.latents) for item in batch.items if item.latents is not None])
        return {"timesteps": remaining, "latents": (latents / init_sigma).to(self.device, self.dtype)}

    def _prompts(self, items: tuple[WorkItem, ...]) -> dict[str, Any]:
        """Embeddings for Stable Diffusion pipelines, computed once per prompt; the text for others."""
        if not isinstance(self.pipeline, StableDiffusionPipeline):
            return {
                "prompt": [item.params.prompt for item in items],
                "negative_prompt": [item.params.negative_prompt or "" for item in items],
            }
        guided = items[0].params.guidance_scale > 1 and self.pipeline.unet.config.time_cond_proj_dim is None
        loras = items[0].params.loras  # an adapter may change the text encoder too
        pairs = [self._embedding((item.params.prompt, item.params.negative_prompt or "", guided, loras)) for item in items]
        return {
            "prompt_embeds": torch.cat([positive for positive, _ in pairs]),
            "negative_prompt_embeds": torch.cat([negative for _, negative in pairs]) if guided else None,
        }

    def _embedding(self, key: tuple[str, str, bool, tuple[Lora, ...]]) -> tuple[Any, Any]:
        """The embeddings of (prompt, negative prompt, guided, adapters), with those adapters active."""
        if key in self._embeddings:
            self._embeddings.move_to_end(key)
            return self._embeddings[key]
        prompt, negative_prompt, guided, _ = key
        with torch.inference_mode():
            pair = self.pipeline.encode_prompt(prompt, self.device, 1, guided, negative_prompt)
        self._embeddings[key] = pair
        if len(self._embeddings) > EMBEDDINGS_KEPT:
            self._embeddings.popitem(last=False)
        return pair

    def _remaining_schedule(self, total: int, step: int) -> tuple[list[float], float]:
        """The timesteps left after `step` of `total`, and the `init_noise_sigma` of that schedule."""
        key = (total, step)
        if key not in self._schedules:
            remaining = self._schedule(num_inference_steps=total).timesteps[step:].tolist()
            self._schedules[key] = (remaining, float(self._schedule(timesteps=remaining).init_noise_sigma))
        return self._schedules[key]

    def _schedule(self, **kwargs: Any) -> EulerDiscreteScheduler:
        scheduler = EulerDiscreteScheduler.from_config(self.pipeline.scheduler.config)
        scheduler.set_timesteps(**kwargs)
        return scheduler


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
    """The `callback_on_step_end` hook of one call.

    It stops the call at the next slice boundary once a yield is requested (keeping the latents
    there), at the next step once cancelled, and at a step boundary past the slice's deadline (the
    inference timeout counts per slice; per call with slicing off). `on_step` hears the number of
    steps done after each one (progress reports). `step_delay_s` slows each step down; it exists
    for fault-injection drills only.
    """

    def __init__(self, step_delay_s: float = 0.0, on_step: Callable[[int], None] | None = None) -> None:
        self.step_delay_s = step_delay_s
        self.on_step = on_step
        self.cancelled = threading.Event()
        self.yield_requested = threading.Event()
        self.timed_out = False
        self.yielded: tuple[int, torch.Tensor] | None = None  # the step and the latents there
        self._first_step = 0
        self._total = 0
        self._slice_steps: int | None = 0
        self._timeout_s = 0.0
        self._deadline: float | None = None

    def begin(self, first_step: int, total: int, slice_steps: int | None, timeout_s: float) -> None:
        """A call from `first_step` of `total`; `slice_steps` None: it cannot yield (0: at any step)."""
        self._first_step, self._total, self._slice_steps, self._timeout_s = first_step, total, slice_steps, timeout_s
        self._deadline = time.monotonic() + timeout_s if timeout_s else None

    def __call__(self, pipeline: Any, index: int, _timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        if self.step_delay_s:
            self.cancelled.wait(self.step_delay_s)
        done = self._first_step + index + 1
        if done < self._total:
            self._between_steps(pipeline, done, callback_kwargs)
        if self.cancelled.is_set():
            pipeline._interrupt = True  # the pipelines' own flag: the remaining steps are skipped
        if self.on_step is not None:
            self.on_step(done)
        return callback_kwargs

    def _between_steps(self, pipeline: Any, done: int, callback_kwargs: dict[str, Any]) -> None:
        slice_steps = self._slice_steps
        at_boundary = slice_steps is not None and (slice_steps == 0 or done % slice_steps == 0)
        if at_boundary and self.yield_requested.is_set() and self.yielded is None:
            self.yielded = (done, callback_kwargs["latents"].detach().float().cpu())
            pipeline._interrupt = True
            return
        if self._deadline is not None and time.monotonic() >= self._deadline:
            self.timed_out = True
            pipeline._interrupt = True
        elif at_boundary and slice_steps and self._timeout_s:
            self._deadline = time.monotonic() + self._timeout_s  # a new slice begins


def _png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
