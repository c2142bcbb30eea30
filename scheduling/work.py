"""What travels between the router and a worker: a job's resumable state, and a worker's answer.

Latents are NumPy arrays rather than tensors so that the router can hold them without torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the router holds latents without importing NumPy itself
    import numpy as np


@dataclass(frozen=True)
class GenerationParams:
    """What a job asks the pipeline for: the one definition of the generation fields.

    The names are those of a diffusers text-to-image call. The job table, the API's request and
    response bodies declare the same fields with their own column types and bounds
    (tests/unit/test_generation_fields.py keeps them in step).
    """

    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    seed: int

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(field.name for field in fields(cls))

    @classmethod
    def of(cls, record: Any) -> GenerationParams:
        """The generation fields of anything that has them as attributes (a stored job, a request)."""
        return cls(**{name: getattr(record, name) for name in cls.names()})

    def pipeline_arguments(self) -> dict[str, Any]:
        """The diffusers call's own arguments; the seed becomes a generator, the steps a schedule."""
        arguments = asdict(self)
        del arguments["seed"], arguments["num_inference_steps"]
        return arguments


@dataclass(frozen=True)
class WorkItem:
    """Advance `job_id` from denoising step `step` by at most `max_steps` steps (0: to the end).

    `replica_id` is the replica the router reserved a slot on; `AssignedReplicaRouter` sends it there.
    `trace_context` carries the job's trace (`metadata.trace_context`) from slice to slice.
    `timeout_s` is the inference timeout the replica enforces at step boundaries (0: none).
    `may_be_stored`: an earlier run's image may be in the store already (that run's answer was lost
    with its router, or its upload failed as far as it knew): the replica looks before it computes.
    """

    job_id: str
    params: GenerationParams
    step: int = 0
    latents: np.ndarray | None = None
    max_steps: int = 0
    replica_id: str | None = None
    trace_context: dict[str, str] | None = None
    timeout_s: float = 0.0
    may_be_stored: bool = False


@dataclass(frozen=True)
class WorkResult:
    job_id: str
    replica_id: str
    step: int
    duration_s: float
    # Set while the job is unfinished; the router hands them back in the next WorkItem.
    latents: np.ndarray | None = None
    # Set once the image is in the object store.
    object_key: str | None = None

    @property
    def done(self) -> bool:
        return self.object_key is not None
