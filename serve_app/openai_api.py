"""OpenAI's Images API on SEIDRA, for the official `openai` clients and the tools built on them:
`POST /v1/images/generations` and `GET /v1/models`.

A request is `n` jobs of one submission, through what `POST /generation/single?wait=true` goes
through: each image is a `GenerationRequest` (the same bounds), under the caller's key, quota and
`Idempotency-Key`, queued by the router, recorded as a job, and waited for up to
SEIDRA_WAIT_TIMEOUT_S. SEIDRA's own fields travel in the `seidra` object
(`extra_body={"seidra": {...}}` with the openai client). Every answer under `/v1/` is in OpenAI's
shape, errors included, whichever layer refused (`OpenAIErrorMiddleware`); the native routes keep
theirs.

No `from __future__ import annotations` here: FastAPI must see real types on the route signatures
that `serve.ingress` rewrites.
"""

import asyncio
import base64
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, ValidationError, create_model
from pydantic_core import ErrorDetails
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.auth import caller
from serve_app.schemas import LIMITS, MAX_IDEMPOTENCY_KEY_CHARS, REQUEST_CONFIG, GenerationFields, GenerationRequest
from serve_app.settings import AppSettings, served_models
from storage.api_keys import Principal
from storage.job_status import JobStatus
from storage.jobs import JobStore, Submission, as_utc
from storage.models import GenerationJob
from storage.object_store import ObjectStore

logger = logging.getLogger(__name__)

PREFIX = "/v1"
GENERATIONS_PATH = f"{PREFIX}/images/generations"
MAX_IMAGES = 10  # OpenAI's own bound on `n`
MAX_END_USER_CHARS = 256
# Five digits at most: a size of a million digits must not become an integer before it is refused.
SIZE_PATTERN = r"^(auto|[0-9]{1,5}x[0-9]{1,5})$"
# The native request's fields a `seidra` object may set; the prompt and the size are OpenAI's own.
EXTENSION_FIELDS = ("negative_prompt", "num_inference_steps", "guidance_scale", "seed", "priority", "loras")
IGNORED = "OpenAI's; accepted and ignored: a diffusers pipeline has no such setting."
# The openai client retries 5xx answers: jobs that failed or are still running must not be submitted again.
NO_RETRY = {"x-should-retry": "false"}
# OpenAI's `type` and `code` for the statuses that have their own; other 4xx are invalid requests, 5xx server errors.
ERROR_KINDS: dict[int, tuple[str, str | None]] = {
    401: ("invalid_request_error", "invalid_api_key"),
    429: ("requests", "rate_limit_exceeded"),
}
Caller = Annotated[Principal, Depends(caller)]

SeidraOptions: type[BaseModel] = create_model(
    "SeidraOptions",
    __config__=REQUEST_CONFIG,
    __doc__="SEIDRA's own generation fields, with the bounds and defaults of `POST /generation/single`.",
    **{name: (GenerationFields.model_fields[name].annotation, GenerationFields.model_fields[name]) for name in EXTENSION_FIELDS},
)


class ImageGenerationRequest(BaseModel):
    """OpenAI's image generation body: the fields that fit a diffusers pipeline, and `seidra`.

    A field OpenAI does not have is refused as OpenAI refuses it ("Unrecognized request argument").
    """

    model_config = REQUEST_CONFIG

    prompt: str = GenerationFields.model_fields["prompt"]
    model: str | None = Field(None, description="A name GET /v1/models lists; absent or null: the first one.")
    n: int | None = Field(1, ge=1, le=MAX_IMAGES, description="How many images: each is a job of its own.")
    size: str | None = Field(
        None,
        pattern=SIZE_PATTERN,
        description='"WIDTHxHEIGHT" in pixels, each a multiple of 8 within SEIDRA_MIN_IMAGE_SIZE..SEIDRA_MAX_IMAGE_SIZE; '
        'absent, null or "auto": SEIDRA_DEFAULT_IMAGE_SIZE square.',
    )
    response_format: Literal["url", "b64_json"] | None = Field(
        "url",
        description="`url` (default): a presigned S3 URL, or the API's GET /jobs/{id}/image, which needs the key; "
        "`b64_json`: the PNG itself.",
    )
    output_format: Literal["png"] | None = Field(None, description="SEIDRA makes PNG images only.")
    stream: Literal[False] | None = Field(None, description="Streaming is not supported.")
    user: str | None = Field(
        None, max_length=MAX_END_USER_CHARS, description="Your end user, kept in each job's `metadata.end_user`."
    )
    safety_identifier: str | None = Field(
        None, max_length=MAX_END_USER_CHARS, description="OpenAI's newer name for `user`; wins over it."
    )
    quality: str | None = Field(None, description=IGNORED)
    style: str | None = Field(None, description=IGNORED)
    background: str | None = Field(None, description=IGNORED)
    moderation: str | None = Field(None, description=IGNORED)
    output_compression: int | None = Field(None, description=IGNORED)
    partial_images: int | None = Field(None, description=IGNORED)
    seidra: SeidraOptions | None = Field(  # type: ignore[valid-type]  # a model built from GenerationFields
        None,
        description="SEIDRA's own fields: `priority` (0-4 or `high`/`normal`: the realtime lane, the default; "
        "5-9 or `low`: the batch lane), `negative_prompt`, `num_inference_steps`, `guidance_scale`, `seed` "
        "(image i gets seed + i), `loras` (`[{\"name\", \"scale\"}]`, adapters of SEIDRA_LORA_DIR).",
    )

    def dimensions(self) -> tuple[int, int]:
        """Width and height, as asked: GenerationRequest checks them against the bounds."""
        if self.size is None or self.size == "auto":
            return LIMITS.default_image_size, LIMITS.default_image_size
        width, height = self.size.split("x")
        return int(width), int(height)

    def to_job_fields(self) -> list[dict[str, Any]]:
        """What the router stores for each of the `n` images: a native request's fields, each checked
        as `POST /generation/single` checks them; a refusal names the OpenAI field."""
        width, height = self.dimensions()
        options = self.seidra.model_dump(exclude_unset=True) if self.seidra is not None else {}
        seed = options.pop("seed", None)
        end_user = self.safety_identifier or self.user
        # The router stores the fields as they come: `meta` is the job's metadata column.
        meta = {"meta": {"end_user": end_user}} if end_user else {}
        images = []
        for index in range(self.n or 1):
            seeded = {} if seed is None else {"seed": seed + index}
            asked = {"prompt": self.prompt, "model": self.model, "width": width, "height": height, **options, **seeded}
            image = _generation_request(asked)
            images.append({**image.to_job_fields(), **meta})
        return images


def _generation_request(fields: dict[str, Any]) -> GenerationRequest:
    try:
        return GenerationRequest.model_validate(fields)
    except ValidationError as refused:
        raise RequestValidationError(
            [_as_openai_field(error) for error in refused.errors(include_url=False, include_context=False)]
        ) from None


def _in_openai_body(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """The catalog's errors about the native body (`body.loras.0.name`), located in OpenAI's, once
    each: the `n` jobs of a request are one body."""
    located = (_as_openai_field({**error, "loc": error["loc"][1:]}) for error in errors)
    return list({(error["loc"], error["msg"]): error for error in located}.values())


def _as_openai_field(error: ErrorDetails) -> dict[str, Any]:
    """A native field's error, located where the OpenAI body has that field."""
    name, *inner = error["loc"]
    if name in ("width", "height"):
        return {**error, "loc": ("body", "size"), "msg": f"{name}: {error['msg']}"}
    where = ("body", name) if name in ("prompt", "model") else ("body", "seidra", name)
    return {**error, "loc": (*where, *inner)}


class ImageJob(BaseModel):
    """SEIDRA's record of an image: its job (GET /jobs/{id}) and the seed that makes it again."""

    job_id: uuid.UUID
    seed: int


class ImageData(BaseModel):
    url: str | None = None
    b64_json: str | None = None
    seidra: ImageJob


class ImagesResponse(BaseModel):
    created: int = Field(description="When the jobs were submitted (Unix seconds).")
    data: list[ImageData]
    size: str
    output_format: Literal["png"] = "png"


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "seidra"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIError(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorBody(BaseModel):
    error: OpenAIError


ERROR_MEANINGS = {
    400: "Invalid request; `param` names the field (an unknown field: `Unrecognized request argument supplied`).",
    401: "Missing, unknown, revoked or expired API key (`code: invalid_api_key`, with `WWW-Authenticate: Bearer`).",
    404: "`model` is not served (`code: model_not_found`).",
    413: "The body is larger than SEIDRA_MAX_BODY_BYTES.",
    429: "A queue is full or the caller's quota is spent (`code: rate_limit_exceeded`); come back after `Retry-After`.",
    409: "An image's job was cancelled (`code: cancelled`; `job_ids` names the jobs; `x-should-retry: false`).",
    500: "An image's job failed after SEIDRA_MAX_ATTEMPTS attempts (`code: generation_failed`; `job_ids` names the jobs; "
    "`x-should-retry: false`).",
    503: "The router is recovering or the database is unreachable; come back after `Retry-After`.",
    504: "The images were not ready within SEIDRA_WAIT_TIMEOUT_S (`code: timeout`): their jobs go on, `job_ids` names "
    "them (`x-should-retry: false`).",
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses an operation can answer."""
    return {code: {"model": OpenAIErrorBody, "description": ERROR_MEANINGS[code]} for code in codes}


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None, **extension: Any) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code, **extension}}


def refusal(
    status: int,
    message: str,
    kind: str,
    *,
    code: str,
    headers: dict[str, str] | None = None,
    param: str | None = None,
    **extension: Any,
) -> HTTPException:
    """An HTTPException in OpenAI's terms already: OpenAIErrorMiddleware passes its body on as it is."""
    return HTTPException(status, error_body(message, kind, param, code, **extension), headers)


def openai_error(status: int, body: bytes) -> tuple[int, dict[str, Any]]:
    """Any layer's error answer as OpenAI sends it: its status and body. FastAPI's 422 (field errors,
    or a route's refusal of a well-formed body) is OpenAI's 400."""
    detail = _detail(body)
    if isinstance(detail, dict) and "error" in detail:  # a `refusal`
        return status, detail
    status = 400 if status == 422 else status
    if isinstance(detail, list) and detail and all(isinstance(error, dict) for error in detail):
        message = "; ".join(_field_message(error) for error in detail)
        return status, error_body(message, "invalid_request_error", param=_param(detail[0]))
    kind, code = ERROR_KINDS.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
    return status, error_body(detail if isinstance(detail, str) else json.dumps(detail), kind, code=code)


def _detail(body: bytes) -> Any:
    """FastAPI's `detail`, or the body as text where it is not FastAPI's."""
    try:
        document = json.loads(body)
    except ValueError:
        return body.decode("utf-8", errors="replace")
    return document.get("detail", document) if isinstance(document, dict) else document


def _param(error: dict[str, Any]) -> str | None:
    """The field a FastAPI error names, as OpenAI's `param`: its location without `body` (or `header`),
    list positions included (`seidra.loras.0.name`)."""
    where = error.get("loc", [])[1:]
    if not where or not isinstance(where[0], str):  # `["body", 12]`: a position in a body that is no JSON
        return None
    return ".".join(str(part) for part in where) if all(isinstance(part, (str, int)) for part in where) else None


def _field_message(error: dict[str, Any]) -> str:
    field = _param(error)
    if error.get("type") == "extra_forbidden":
        return f"Unrecognized request argument supplied: {field}"
    return f"{field}: {error.get('msg')}" if field else str(error.get("msg"))


class OpenAIErrorMiddleware:
    """Every error answered under /v1/ in OpenAI's shape, whichever layer refused: the key check,
    the body limit, validation, a route, the router, or an unexpected exception (500). Outside the
    middlewares that refuse on their own; the answers of the native routes pass untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(f"{PREFIX}/"):
            await self._app(scope, receive, send)
            return
        refused: Message | None = None
        native = bytearray()
        started = False

        async def translating_send(message: Message) -> None:
            nonlocal refused, started
            if message["type"] == "http.response.start":
                started = True
                if message["status"] >= 400:
                    refused = message  # held until its body is read
                    return
            elif message["type"] == "http.response.body" and refused is not None:
                native.extend(message.get("body", b""))
                if not message.get("more_body", False):
                    status, body = openai_error(refused["status"], bytes(native))
                    kept = [
                        (name, value) for name, value in refused["headers"] if name not in (b"content-length", b"content-type")
                    ]
                    await _send_json(send, status, body, kept)
                return
            await send(message)

        try:
            await self._app(scope, receive, translating_send)
        except Exception:
            if started:
                raise
            logger.exception("Unexpected error answering %s %s", scope["method"], scope["path"])
            await _send_json(send, 500, error_body("The server had an error while processing the request.", "server_error"), [])


async def _send_json(send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]]) -> None:
    content = json.dumps(body).encode()
    length = [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": [*headers, *length]})
    await send({"type": "http.response.body", "body": content})


router = APIRouter(prefix=PREFIX)


class OpenAIRoutes:
    """The `/v1/` routes. SeidraAPI inherits them (Serve's ingress takes inherited routes) and gives
    them what the native routes use: its submission, its wait and its image locations."""

    _settings: AppSettings
    _jobs: JobStore
    _store: ObjectStore
    _submit: Callable[[Principal, BaseModel, list[dict[str, Any]], str, str | None, str | None], Awaitable[Submission]]
    _wait: Callable[[uuid.UUID, float], Awaitable[str | None]]
    _image_url: Callable[[uuid.UUID, str], str]

    @router.post(
        "/images/generations",
        response_model=ImagesResponse,
        response_model_exclude_none=True,
        responses=_errors(400, 401, 404, 409, 413, 429, 500, 503, 504),
    )
    async def generate_images(
        self,
        principal: Caller,
        request: ImageGenerationRequest,
        http_request: Request,
        idempotency_key: str | None = Header(None, max_length=MAX_IDEMPOTENCY_KEY_CHARS),
    ) -> ImagesResponse:
        """OpenAI's image generation: `n` jobs, in the realtime lane unless `seidra.priority` says
        otherwise, waited for up to SEIDRA_WAIT_TIMEOUT_S. The same `Idempotency-Key` with the same
        body answers with the jobs of the first request."""
        self._require_served(request.model)
        jobs = request.to_job_fields()
        batch_id = str(uuid.uuid4()) if len(jobs) > 1 else None  # one submission: GET /jobs?batch_id= lists its images
        try:
            submission = await self._submit(principal, request, jobs, GENERATIONS_PATH, idempotency_key, batch_id)
        except RequestValidationError as refused:  # an unknown adapter, named where the native body has it
            raise RequestValidationError(_in_openai_body(refused.errors())) from None
        job_ids = [job.id for job in submission.jobs]
        await asyncio.gather(*(self._wait(job_id, LIMITS.wait_timeout_s) for job_id in job_ids))
        ended = await asyncio.to_thread(_stored, self._jobs, job_ids, principal.user)
        _require_completed(ended, submission.batch_id)
        images = await asyncio.gather(*(self._image(job, request.response_format, http_request) for job in ended))
        width, height = request.dimensions()
        created = int(as_utc(ended[0].created_at).timestamp())
        return ImagesResponse(created=created, data=list(images), size=f"{width}x{height}")

    @router.get("/models", response_model=ModelList, responses=_errors(401, 413, 503))
    async def list_models(self, _principal: Caller) -> ModelList:
        """The served models, the default first."""
        # When a model was made is unknown here; OpenAI-compatible servers (vLLM) give the time of the answer.
        now = int(time.time())
        return ModelList(data=[ModelCard(id=name, created=now) for name in served_models(self._settings.worker)])

    def _require_served(self, model: str | None) -> None:
        if model is not None and model not in served_models(self._settings.worker):
            message = f"The model `{model}` does not exist or is not served here; GET /v1/models lists those that are."
            raise refusal(404, message, "invalid_request_error", code="model_not_found", param="model")

    async def _image(self, job: GenerationJob, response_format: str | None, http_request: Request) -> ImageData:
        assert job.result_key is not None  # a completed job's
        made = ImageJob(job_id=job.id, seed=job.seed)
        if response_format == "b64_json":
            png = await asyncio.to_thread(self._store.get, job.result_key)
            return ImageData(b64_json=base64.b64encode(png).decode("ascii"), seidra=made)
        location = self._image_url(job.id, job.result_key)
        # A presigned S3 URL stands alone; the API's own image route is made absolute, as OpenAI's URLs are.
        url = location if location.startswith("http") else f"{str(http_request.base_url).rstrip('/')}{location}"
        return ImageData(url=url, seidra=made)


def _stored(jobs: JobStore, job_ids: Sequence[uuid.UUID], owner: str) -> list[GenerationJob]:
    return [jobs.get(job_id, owner=owner) for job_id in job_ids]


def _require_completed(jobs: Sequence[GenerationJob], batch_id: str | None) -> None:
    """Refuse, naming the jobs, unless every image is made. The jobs stay on record either way, and
    those still running go on: the caller fetches them later rather than submit them again."""
    job_ids = [str(job.id) for job in jobs]
    found_at = f"GET /jobs?batch_id={batch_id}" if batch_id else f"GET /jobs/{job_ids[0]}"
    where = {"job_ids": job_ids, "batch_id": batch_id}
    if any(not JobStatus(job.status).is_terminal for job in jobs):
        message = (
            f"The images were not ready within {LIMITS.wait_timeout_s:g} s (SEIDRA_WAIT_TIMEOUT_S); their jobs go on: "
            f"{', '.join(job_ids)} ({found_at})."
        )
        raise refusal(504, message, "server_error", code="timeout", headers=NO_RETRY, **where)
    failed = [job for job in jobs if job.status == JobStatus.FAILED.value]
    if failed:
        reasons = "; ".join(f"job {job.id} failed: {job.error}" for job in failed)
        message = f"Image generation failed after every attempt: {reasons} (all the jobs: {found_at})."
        raise refusal(500, message, "server_error", code="generation_failed", headers=NO_RETRY, **where)
    cancelled = [str(job.id) for job in jobs if job.status == JobStatus.CANCELLED.value]
    if cancelled:  # by their owner or an admin, meanwhile or before an Idempotency-Key replay
        message = f"Job(s) {', '.join(cancelled)} were cancelled (all the jobs: {found_at})."
        raise refusal(409, message, "invalid_request_error", code="cancelled", headers=NO_RETRY, **where)
