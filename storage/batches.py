"""Batches: what a batch may be called, the ids of its jobs, and its items submitted again.

Whoever submits a batch may name it (`nightly-2026-12-01`); an unnamed one is called by a new UUID.
Names are per owner. A batch job's id derives from (owner, name, the item's index in the batch),
so an item submitted again under the same name is the job made the first time, never a second one;
one that asks for something else than that job is refused (`BatchConflict`) rather than answered
with an image of another prompt.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names and ids alone need no SQL: the batch driver and the CLI use them
    from storage.models import GenerationJob

MAX_NAME_CHARS = 64  # the width of the `batch_id` columns
NAME_RULE = f"1 to {MAX_NAME_CHARS} letters, digits, '.', '_' or '-', the first a letter or a digit"
NAME_PATTERN = rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_NAME_CHARS - 1}}}"
_NAME = re.compile(NAME_PATTERN)
# Fixed for good: the ids of the batch jobs stored already derive from it.
_JOB_IDS = uuid.UUID("d773aa6d-051f-4189-bbb7-b54bb14aff2b")
# Seeds drawn for items that gave none are below this, as the API draws them for single jobs.
DRAWN_SEEDS = 2**31
# What makes a job's image: its generation fields (`GenerationParams`'). Priority and lane are not
# compared: a retry raises a job's priority, and neither changes the image.
IMAGE_FIELDS = (
    "prompt", "negative_prompt", "width", "height", "num_inference_steps", "guidance_scale", "seed", "model", "loras",
)  # fmt: skip


def batch_name(text: str) -> str:
    """`text` as a batch name, or ValueError naming the rule. A UUID comes back in its canonical
    form: any spelling of one names the batch it named when batch ids were UUIDs."""
    if not _NAME.fullmatch(text):
        raise ValueError(f"{text!r} is not a batch name: {NAME_RULE}")
    try:
        return str(uuid.UUID(text))
    except ValueError:
        return text


def batch_job_id(owner: str, name: str, index: int) -> uuid.UUID:
    """The id of the job of item `index` (from 0) of `owner`'s batch `name`."""
    return uuid.uuid5(_JOB_IDS, json.dumps([owner, name, index]))


def drawn_seed(job_id: uuid.UUID) -> int:
    """The seed of a batch item that gave none, drawn from its job's id: submitted again, the item
    asks for the same image, and is the same job."""
    return job_id.int % DRAWN_SEEDS


@dataclass(frozen=True)
class ChangedJob:
    """A job stored already under the id of an item that asks for something else."""

    job_id: uuid.UUID
    changes: dict[str, tuple[Any, Any]]  # field: (stored, sent)


class BatchConflict(Exception):
    """Items of a batch submitted again that ask for other images than their jobs stored already."""

    def __init__(self, changed: list[ChangedJob]) -> None:
        super().__init__(
            "jobs stored already ask for something else: "
            + "; ".join(f"{job.job_id} ({', '.join(job.changes)})" for job in changed)
        )
        self.changed = changed

    def __reduce__(self):  # type: ignore[no-untyped-def]
        # Crosses Ray actor boundaries: rebuild from the fields, not from the message.
        return type(self), (self.changed,)


def image_changes(stored: GenerationJob, sent: GenerationJob) -> dict[str, tuple[Any, Any]]:
    """The image fields in which `sent` differs from `stored`: field -> (stored, sent)."""
    return {
        name: (getattr(stored, name), getattr(sent, name))
        for name in IMAGE_FIELDS
        if getattr(stored, name) != getattr(sent, name)
    }
