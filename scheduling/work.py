"""What travels between the router and a worker: a job's resumable state, and a worker's answer.

Latents are NumPy arrays rather than tensors so that the router can hold them without torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the router holds latents without importing NumPy itself
    import numpy as np


@dataclass(frozen=True)
class Lora:
    """A LoRA adapter of the replica's adapter folder, and the weight of its layers in the call."""

    name: str
    scale: float = 1.0

    @classmethod
    def of(cls, value: Lora | Mapping[str, Any]) -> Lora:
        """From a stored or requested `{"name", "scale"}` (or a Lora already)."""
        return value if isinstance(value, Lora) else cls(str(value["name"]), float(value.get("scale", 1.0)))


@dataclass(frozen=True)
class GenerationParams:
    """What a job asks the pipeline for: the one definition of the generation fields.

    The names are those of a diffusers text-to-image call, then the model (a name of the served
    models; "" is the default one) and the LoRA adapters applied to it. The job table, the API's
    request and response bodies declare the same fields with their own column types and bounds
    (tests/unit/test_generation_fields.py keeps them in step).
    """

    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    model: str = ""
    loras: tuple[Lora, ...] = ()

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(field.name for field in fields(cls))

    @classmethod
    def of(cls, record: Any) -> GenerationParams:
        """The generation fields of anything that has them as attributes (a stored job, a request)."""
        values = {name: getattr(record, name) for name in cls.names()}
        values["model"] = values["model"] or ""
        values["loras"] = tuple(Lora.of(lora) for lora in values["loras"] or ())
        return cls(**values)

    def batch_key(self) -> tuple[Any, ...]:
        """What jobs denoised together in one pipeline call share: everything but the prompts and the
        seed (and, for the call, the step they stand at)."""
        return (self.model, self.loras, self.width, self.height, self.num_inference_steps, self.guidance_scale)

    def pipeline_arguments(self) -> dict[str, Any]:
        """The diffusers call's own arguments; the seed becomes a generator, the steps a schedule,
        the model and adapters the pipeline itself."""
        arguments = asdict(self)
        for name in ("seed", "num_inference_steps", "model", "loras"):
            del arguments[name]
        return arguments


@dataclass(frozen=True)
class WorkItem:
    """Advance `job_id` from denoising step `step` (with `latents`, the state its last call yielded).

    `trace_context` carries the job's trace (`metadata.trace_context`) from call to call.
    `may_be_stored`: an earlier run's image may be in the store already (that run's answer was lost
    with its router, or its upload failed as far as it knew): the replica looks before it computes.
    """

    job_id: str
    params: GenerationParams
    step: int = 0
    latents: np.ndarray | None = None
    trace_context: dict[str, str] | None = None
    may_be_stored: bool = False

    def batch_key(self) -> tuple[Any, ...]:
        """Jobs with equal keys can be denoised together in one pipeline call."""
        return (*self.params.batch_key(), self.step)


@dataclass(frozen=True)
class WorkBatch:
    """One worker call: denoise `items` together on `replica_id` to the end, unless asked to yield.

    A yield (see `YieldRequest`) takes effect at the next multiple of `slice_steps` steps (0: at the
    next step): that is where a running batch lets a waiting realtime job have its slot. Until then
    the job's latents and prompt embeddings stay where they are, on the replica: slices cost nothing
    unless one is asked for. `timeout_s` is the inference timeout per slice, enforced by the replica
    at step boundaries (0: none).
    """

    call_id: int
    replica_id: str
    items: tuple[WorkItem, ...]
    slice_steps: int = 0
    timeout_s: float = 0.0

    @property
    def job_ids(self) -> tuple[str, ...]:
        return tuple(item.job_id for item in self.items)

    @property
    def step(self) -> int:
        return self.items[0].step

    @property
    def total_steps(self) -> int:
        return self.items[0].params.num_inference_steps


@dataclass(frozen=True)
class YieldRequest:
    """Ask call `call_id` on `replica_id` to stop at its next slice boundary and hand its jobs back."""

    replica_id: str
    call_id: int


@dataclass(frozen=True)
class WorkResult:
    job_id: str
    replica_id: str
    step: int
    duration_s: float
    # Set when the call yielded before the end; the router hands them back in the job's next WorkItem.
    latents: np.ndarray | None = None
    # Set once the image is in the object store.
    object_key: str | None = None
    # Set when the image was made but could not be stored, even after retrying: no GPU fault.
    storage_error: str | None = None

    @property
    def done(self) -> bool:
        return self.object_key is not None
