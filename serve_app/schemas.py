"""Request and response bodies. Bounds come from `ApiSettings`, read once at import.

Request bodies are validated strictly: a number is a JSON number, never a boolean or a string
(`"seed": false` is not seed 0, `"width": "64"` is not 64); a float field also takes a JSON integer.
"""

from __future__ import annotations

import secrets
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal, get_type_hints

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    WithJsonSchema,
    create_model,
    field_validator,
)

from scheduling.lanes import (
    DEFAULT_BATCH_PRIORITY,
    DEFAULT_REALTIME_PRIORITY,
    MAX_PRIORITY,
    MIN_PRIORITY,
    NAMED_PRIORITIES,
)
from scheduling.webhooks import check_url
from scheduling.work import GenerationParams
from serve_app.settings import ApiSettings
from storage.batches import (
    DRAWN_SEEDS,
    NAME_PATTERN,
    NAME_RULE,
    BatchConflict,
    ChangedJob,
    batch_job_id,
    batch_name,
    drawn_seed,
)
from storage.delivery import MAX_URL_CHARS

LIMITS = ApiSettings()
MAX_SEED = 2**63 - 1
MAX_BATCH_INDEX = 2**31 - 1
# A 409's message for a batch item changed names this many items, each value this long at most.
SHOWN_CHANGES = 10
SHOWN_VALUE_CHARS = 60
MAX_NAME_CHARS = 128  # a model's or an adapter's name: the width of the job's `model` column
MAX_LORAS = 8
MAX_LORA_SCALE = 10.0
# An `Idempotency-Key` header's longest value: the width of the column that keeps it.
MAX_IDEMPOTENCY_KEY_CHARS = 255
# Strict: pydantic's lax mode would take `false` as 0 and `"64"` as 64.
REQUEST_CONFIG = ConfigDict(extra="forbid", strict=True)
PRIORITY_HELP = (
    f"an integer {MIN_PRIORITY}-{MAX_PRIORITY} or one of {', '.join(NAMED_PRIORITIES)} "
    f"({', '.join(f'{name} = {number}' for name, number in NAMED_PRIORITIES.items())})"
)
PRIORITY_NUMBER = 'A number is a JSON integer: "3" and true are refused.'


def _priority(value: object) -> int:
    # `type(...) is int`: a boolean is an int to isinstance. A digit string ("3") is not a name.
    if isinstance(value, str) and value in NAMED_PRIORITIES:
        return NAMED_PRIORITIES[value]
    if type(value) is int and MIN_PRIORITY <= value <= MAX_PRIORITY:
        return value
    raise ValueError(f"must be {PRIORITY_HELP}, got {value!r}")


Priority = Annotated[
    int,
    PlainValidator(_priority),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": MIN_PRIORITY, "maximum": MAX_PRIORITY},
                {"type": "string", "enum": list(NAMED_PRIORITIES)},
            ]
        }
    ),
]

WebhookUrl = Annotated[
    str,
    AfterValidator(check_url),
    WithJsonSchema({"type": "string", "maxLength": MAX_URL_CHARS, "description": "An http:// or https:// URL."}),
]

BatchName = Annotated[
    str,
    AfterValidator(batch_name),
    WithJsonSchema({"type": "string", "pattern": f"^{NAME_PATTERN}$", "description": f"A batch name: {NAME_RULE}."}),
]


class LoraRequest(BaseModel):
    model_config = REQUEST_CONFIG

    name: str = Field(min_length=1, max_length=MAX_NAME_CHARS, description="An adapter of SEIDRA_LORA_DIR (GET /v1/models).")
    scale: float = Field(1.0, ge=-MAX_LORA_SCALE, le=MAX_LORA_SCALE, description="The weight of its layers.")


class GenerationFields(BaseModel):
    model_config = REQUEST_CONFIG

    prompt: str = Field(min_length=1, max_length=LIMITS.max_prompt_chars)
    negative_prompt: str | None = Field(None, max_length=LIMITS.max_prompt_chars)
    width: int = Field(LIMITS.default_image_size, ge=LIMITS.min_image_size, le=LIMITS.max_image_size)
    height: int = Field(LIMITS.default_image_size, ge=LIMITS.min_image_size, le=LIMITS.max_image_size)
    num_inference_steps: int = Field(LIMITS.default_inference_steps, ge=1, le=LIMITS.max_inference_steps)
    guidance_scale: float = Field(LIMITS.default_guidance_scale, ge=0, le=LIMITS.max_guidance_scale)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    priority: Priority | None = Field(None, description=f"{PRIORITY_HELP.capitalize()}. {PRIORITY_NUMBER}")
    model: str | None = Field(
        None, min_length=1, max_length=MAX_NAME_CHARS, description="One of the served models (GET /v1/models); default: the first."
    )
    loras: list[LoraRequest] = Field(
        default_factory=list, max_length=MAX_LORAS, description="LoRA adapters applied to the model, each once."
    )

    @field_validator("loras")
    @classmethod
    def _each_adapter_once(cls, value: list[LoraRequest]) -> list[LoraRequest]:
        names = [lora.name for lora in value]
        if len(set(names)) != len(names):
            raise ValueError("names an adapter twice")
        return value

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _no_nul(cls, value: str | None) -> str | None:
        if value is not None and "\x00" in value:
            raise ValueError("must not contain NUL characters")
        return value

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"must be a multiple of 8, got {value}")
        return value

    def to_job_fields(self, default_priority: int, default_seed: int | None = None) -> dict[str, Any]:
        """What the router stores; a missing seed is `default_seed`, else drawn here, so every job can
        be reproduced."""
        fields = self.model_dump()
        fields["priority"] = default_priority if self.priority is None else self.priority
        fields["model"] = self.model or ""  # "": the default, which the API names at submission
        if fields["seed"] is None:
            fields["seed"] = secrets.randbelow(DRAWN_SEEDS) if default_seed is None else default_seed
        return fields


class GenerationRequest(GenerationFields):
    webhook_url: WebhookUrl | None = Field(
        None,
        description="Where to POST the job, signed, when it completes, fails or is cancelled (docs/webhooks.md); "
        "default: the API key's webhook, if it has one.",
    )

    def to_job_fields(self, default_priority: int = DEFAULT_REALTIME_PRIORITY) -> dict[str, Any]:
        return super().to_job_fields(default_priority)


class BatchRequest(BaseModel):
    model_config = REQUEST_CONFIG

    items: list[GenerationFields] = Field(min_length=1, max_length=LIMITS.max_batch_items)
    priority: Priority = Field(
        DEFAULT_BATCH_PRIORITY, description=f"Default for items without their own: {PRIORITY_HELP}. {PRIORITY_NUMBER}"
    )
    batch_id: BatchName | None = Field(
        None,
        description=f"The batch's name, the caller's own ({NAME_RULE}); default: a new UUID. Its items submitted again "
        "under it are the jobs they made the first time: nothing is made twice, and an item that asks for "
        "another image than its job is refused (409).",
    )
    first_index: int = Field(
        0, ge=0, le=MAX_BATCH_INDEX, description="The index in the batch of the first item, for a batch sent in several requests."
    )
    webhook_url: WebhookUrl | None = Field(
        None,
        description="Where to POST the batch, signed, once none of its jobs is unfinished (docs/webhooks.md). Each "
        "request that gives it arms one such delivery. Its jobs' own deliveries go to the API key's webhook, if any.",
    )

    def to_job_fields(self, owner: str, name: str) -> list[dict[str, Any]]:
        """Each item's job, its id derived from `owner`'s batch `name` and the item's index, and so is a
        seed it left out: an item submitted again is the same job, asking for the same image."""
        jobs = []
        for index, item in enumerate(self.items, self.first_index):
            job_id = batch_job_id(owner, name, index)
            jobs.append({**item.to_job_fields(self.priority, drawn_seed(job_id)), "id": job_id})
        return jobs


# The generation fields of a job as the API shows them: GenerationParams' own, as they are stored.
GenerationView: type[BaseModel] = create_model(
    "GenerationView", **{name: (kind, ...) for name, kind in get_type_hints(GenerationParams).items()}
)


class JobProgress(BaseModel):
    step: int = Field(description="Denoising steps done (where its last step slice ended).")
    total_steps: int


class JobView(GenerationView):  # type: ignore[valid-type,misc]  # a model built from GenerationParams
    id: uuid.UUID
    owner: str
    status: str
    lane: str
    priority: int
    batch_id: str | None
    metadata: dict[str, Any]
    error: str | None
    attempts: int
    result_key: str | None
    image_url: str | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    webhook_url: str | None = Field(None, description="The job's own webhook; its deliveries are in `metadata.webhook`.")
    progress: JobProgress | None = Field(
        None,
        description="GET /jobs/{id}: the router's live view while the job is unfinished; every step once completed, "
        "none before it started; null when unknown (the router restarting, a failed or cancelled job). "
        "Listings know only the stored row.",
    )
    queue_position: int | None = Field(
        None, description="GET /jobs/{id}: jobs ahead of it while it waits (held too), up to 1 s old; else null."
    )


class BatchAccepted(BaseModel):
    batch_id: str
    job_ids: list[uuid.UUID]
    jobs: list[JobView]
    existing_job_ids: list[uuid.UUID] = Field(
        description="Those of `job_ids` stored before this request (items of the batch submitted again, a repeated "
        "`Idempotency-Key`): shown as they are, not made again."
    )


class ChangedItem(BaseModel):
    index: int = Field(description="The item's index in the batch (`first_index` + its position in `items`).")
    job_id: uuid.UUID = Field(description="The job stored for it already.")
    fields: list[str] = Field(description="The fields in which the item differs from its job.")
    message: str = Field(description="What each of them was, and is now (long values shortened).")

    @classmethod
    def of(cls, job: ChangedJob, index: int) -> ChangedItem:
        message = "; ".join(f"{field} was {_shown(was)}, now {_shown(now)}" for field, (was, now) in job.changes.items())
        return cls(index=index, job_id=job.job_id, fields=list(job.changes), message=message)


class BatchConflictBody(BaseModel):
    """409 from `/generation/batch`: items that ask for other images than their jobs stored already."""

    detail: str
    changed: list[ChangedItem]

    @classmethod
    def of(cls, conflict: BatchConflict, name: str, indexes: dict[uuid.UUID, int]) -> BatchConflictBody:
        """`indexes`: each job id's item index."""
        changed = sorted((ChangedItem.of(job, indexes[job.job_id]) for job in conflict.changed), key=lambda item: item.index)
        named = "; ".join(f"item {item.index}: {item.message}" for item in changed[:SHOWN_CHANGES])
        more = f"; and {len(changed) - SHOWN_CHANGES} more" if len(changed) > SHOWN_CHANGES else ""
        detail = (
            f"batch {name}: {len(changed)} item(s) ask for other images than their jobs stored already, and nothing "
            f"of this request was stored ({named}{more}). Send them as they were, or under another batch name."
        )
        return cls(detail=detail, changed=changed)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= SHOWN_VALUE_CHARS else f"{text[: SHOWN_VALUE_CHARS - 3]}..."


class MaintenanceRequest(BaseModel):
    model_config = REQUEST_CONFIG

    enabled: bool
    replica_id: str | None = Field(None, description="One replica; all of them (and new ones) when absent.")


class LaneRequest(BaseModel):
    model_config = REQUEST_CONFIG

    paused: bool


class FaultRequest(BaseModel):
    """Drills and tests only (SEIDRA_FAULT_INJECTION=1): what the replicas should pretend."""

    model_config = REQUEST_CONFIG

    replica_id: str | None = Field(None, description="One replica; all of them when absent.")
    temperature_c: float | None = Field(None, ge=0, le=200)
    health: Literal["degraded", "unhealthy"] | None = None
    inference_delay_s: float = Field(0.0, ge=0, le=3600, description="Added to every denoising step.")
    fail_inference: bool = Field(False, description="Every inference raises an error.")


class NotificationView(BaseModel):
    id: uuid.UUID
    job_id: uuid.UUID | None
    level: str
    message: str
    created_at: datetime
