"""The Serve application: a FastAPI ingress in front of the router actor and the worker deployment.

No `from __future__ import annotations` here: FastAPI must see real types on the route signatures
that `serve.ingress` rewrites.
"""

import asyncio
import hashlib
import json
import logging
import uuid
from collections.abc import Awaitable
from typing import Annotated, Any, TypeVar

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from opentelemetry import trace
from pydantic import BaseModel, Field
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from deployments.settings import WorkerSettings
from scheduling import metrics, tracing
from scheduling.directives import Health, InjectedFaults
from scheduling.job_queue import QueueFullError
from scheduling.lanes import Lane
from scheduling.quota import QuotaExceeded, SubmissionTooLarge
from scheduling.router import RouterUnavailable, get_or_create_router
from serve_app import events
from serve_app.auth import Authenticator, AuthMiddleware, admin, caller, owner_scope
from serve_app.body_limit import BodyLimitMiddleware
from serve_app.catalog import Catalog
from serve_app.openai_api import OpenAIErrorMiddleware, OpenAIRoutes
from serve_app.openai_api import router as openai_router
from serve_app.schemas import (
    LIMITS,
    MAX_IDEMPOTENCY_KEY_CHARS,
    BatchAccepted,
    BatchConflictBody,
    BatchName,
    BatchRequest,
    FaultRequest,
    GenerationRequest,
    JobView,
    LaneRequest,
    MaintenanceRequest,
    NotificationView,
)
from serve_app.settings import AppSettings, settings_from_args
from serve_app.webhooks import check_webhook
from storage.api_keys import ApiKeyStore, KeyLimits, Principal
from storage.batches import BatchConflict
from storage.database import DATABASE_OUTAGES
from storage.job_status import IllegalTransition, JobStatus
from storage.jobs import IdempotencyClaim, IdempotencyMismatch, JobNotFound, JobStore, Submission, as_utc
from storage.models import GenerationJob
from storage.notifications import Level, NotificationService
from storage.object_store import ObjectNotFound, open_object_store
from storage.webhooks import WebhookStore

logger = logging.getLogger(__name__)

APP_NAME = "seidra"
ROUTER_RESTART_RETRY_AFTER_S = 5
# Liveness probes carry no key; the route tells nothing.
PUBLIC_PATHS = frozenset({"/health"})
Caller = Annotated[Principal, Depends(caller)]
Admin = Annotated[Principal, Depends(admin)]
# What a user's GET /status shows of the router's view: no replica details, no other users' work.
USER_STATUS_FIELDS = ("queues", "paused_lanes", "recovering")
# A live view slower than this is treated as none: the router is busy restarting, say.
LIVE_VIEW_TIMEOUT_S = 2.0
# The router's refusals while it restarts or recovers: the live view is unknown for now.
ROUTER_DOWN = (RayActorError, RayTaskError, asyncio.TimeoutError)
MAX_EVENT_ID_CHARS = 200
EVENT_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy may buffer it
T = TypeVar("T")

# FastAPI's own telemetry opens each request's server span (the root of a job's trace), with the
# tracer provider that `tracing.configure` installs in the replica. It must not add exporters of
# its own (that provider's are set by `OTEL_*` already), and liveness probes are not worth a trace.
api = FastAPI(
    title="SEIDRA",
    description="Text-to-image generation on Ray Serve",
    version="0.1.0",
    telemetry={"auto_configure": False, "exclude": lambda scope: scope.get("path") == "/health"},
    # Served below, behind a key like every route but /health.
    openapi_url=None,
    docs_url=None,
    redoc_url=None,
)


def _database_unreachable(error: Exception) -> JSONResponse:
    """An outage is the client's cue to come back, not a 500."""
    logger.warning("Database unreachable: %s", type(error).__name__)
    return JSONResponse(
        status_code=503,
        content={"detail": "the database is unreachable; try again shortly"},
        headers={"Retry-After": str(ROUTER_RESTART_RETRY_AFTER_S)},
    )


# Innermost first: the key is checked once the body's size is known to be fine, before it is read;
# OpenAI's routes answer their refusals in OpenAI's shape; all run inside the request counter, so
# their 401s and 413s are counted too, with the status sent.
api.add_middleware(AuthMiddleware, public_paths=PUBLIC_PATHS, outages=DATABASE_OUTAGES, on_outage=_database_unreachable)
api.add_middleware(BodyLimitMiddleware, max_body_bytes=LIMITS.max_body_bytes)
api.add_middleware(OpenAIErrorMiddleware)
api.include_router(openai_router)


@api.middleware("http")
async def _count_requests(request: Request, call_next: Any) -> Response:
    response = await call_next(request)
    route = request.scope.get("route")
    # The route's template, not the raw path: one series per endpoint, not per job id.
    path = getattr(route, "path", "unmatched")
    metrics.http_requests().inc(tags={"route": path, "method": request.method, "status": str(response.status_code)})
    return response


for _outage in DATABASE_OUTAGES:  # reads that reach the database directly
    api.add_exception_handler(_outage, lambda _request, error: _database_unreachable(error))


@api.exception_handler(RequestValidationError)
async def _validation_error(_request: Request, error: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 body, plus one line that names each offending field."""
    errors = jsonable_encoder(error.errors())
    message = "; ".join(f"{'.'.join(str(part) for part in e['loc'][1:]) or e['loc'][0]}: {e['msg']}" for e in errors)
    return JSONResponse(status_code=422, content={"detail": errors, "message": message})


class ErrorBody(BaseModel):
    detail: Any
    message: str | None = Field(None, description="One line naming each offending field (422 only).")


ERROR_MEANINGS = {
    400: "The body could not be decoded (it is not text in a known encoding).",
    401: "Missing, unknown, revoked or expired API key (with `WWW-Authenticate: Bearer`).",
    403: "An admin route, or another user's rows asked for, with a user key.",
    404: "No such job, or not one of the caller's (the same answer: no existence oracle).",
    409: "The job is not in a state that allows this.",
    413: "The body is larger than SEIDRA_MAX_BODY_BYTES.",
    422: "A field is invalid; `message` names it.",
    429: "A queue is full or the caller's quota is spent; come back after `Retry-After`.",
    503: "The router is recovering or the database is unreachable; come back after `Retry-After`.",
}


@api.get("/openapi.json", include_in_schema=False)
async def openapi_schema(_principal: Caller) -> JSONResponse:
    return JSONResponse(api.openapi())


@api.get("/docs", include_in_schema=False)
async def swagger_ui(_principal: Caller) -> HTMLResponse:
    return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{api.title} API")


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses an operation can answer."""
    return {code: {"model": ErrorBody, "description": ERROR_MEANINGS[code]} for code in codes}


# Every authenticated operation can answer these (413: any request may come with a body); operations
# that take a body add 400.
READ_ERRORS = (401, 413, 422, 503)
WRITE_ERRORS = (400, *READ_ERRORS)


async def _router_call(call: Awaitable[T]) -> T:
    """Turn the router's refusals into HTTP errors."""
    try:
        return await call
    except RayTaskError as error:
        cause = error.cause
        if isinstance(cause, (QueueFullError, QuotaExceeded)):
            raise HTTPException(429, str(cause), headers={"Retry-After": str(cause.retry_after_s)}) from None
        if isinstance(cause, RouterUnavailable):
            raise HTTPException(503, str(cause), headers={"Retry-After": str(cause.retry_after_s)}) from None
        if isinstance(cause, BatchConflict):
            raise cause from None  # the route answers it: it knows each job's item
        if isinstance(cause, (IdempotencyMismatch, SubmissionTooLarge)):
            raise HTTPException(422, str(cause)) from None
        if isinstance(cause, IllegalTransition):
            raise HTTPException(409, str(cause)) from None
        if isinstance(cause, (JobNotFound, KeyError)):
            raise HTTPException(404, str(cause).strip("'\"")) from None
        raise
    except RayActorError:
        raise HTTPException(
            503, "the router is restarting; try again shortly", headers={"Retry-After": str(ROUTER_RESTART_RETRY_AFTER_S)}
        ) from None


def _claim(key: str | None, path: str, request: Any, batch_id: str | None, principal: Principal) -> IdempotencyClaim | None:
    """The idempotency claim for a request: its key, per user, and a hash of what it asks for.

    The hash covers the validated body (a seed left out is drawn later, so a replay gets the
    original seed back) and the path, so a key reused on the other endpoint is a mismatch.
    """
    if key is None:
        return None
    if not key.strip() or not key.isprintable():
        raise HTTPException(422, "Idempotency-Key: must be printable and not blank")
    body = json.dumps(request.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    request_hash = hashlib.sha256(f"{path}\n{body}".encode()).hexdigest()
    return IdempotencyClaim(owner=principal.user, key=key, request_hash=request_hash, batch_id=batch_id)


def _quota_limits(principal: Principal) -> KeyLimits | None:
    """The key's quota overrides; None (no per-user quota) for the one local user when auth is off."""
    return principal.limits if principal.key_id is not None else None


# The API only awaits the router and the database: many requests (long ?wait=true ones among them)
# share one replica without blocking /health.
@serve.deployment(name="SeidraAPI", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress(api)
class SeidraAPI(OpenAIRoutes):
    def __init__(self, worker: DeploymentHandle, settings: AppSettings) -> None:
        tracing.configure("api")
        self._settings = settings
        storage = settings.storage
        self._jobs = JobStore(storage.database_url)
        self._notifications = NotificationService(storage.database_url)
        self._store = open_object_store(storage)
        self._router = get_or_create_router(serve.get_replica_context().app_name, worker, settings.router, storage)
        self._catalog = Catalog(settings.worker)
        self._webhooks = WebhookStore(storage.database_url)
        api.state.authenticator = Authenticator(settings.api.auth, ApiKeyStore(storage.database_url))

    def _view(self, job: GenerationJob, principal: Principal, live: dict[str, Any] | None = None) -> JobView:
        """The job as the API shows it; `live`: the router's view of it (`JobRouter.progress`)."""
        fields = job.model_dump()
        image_url = None
        # Minted for the job's owner alone: an admin looking at it fetches the image through the API.
        mine = fields["owner"] == principal.user
        if mine and fields["status"] == JobStatus.COMPLETED.value and fields["result_key"] and "archived" not in fields["meta"]:
            image_url = self._image_url(fields["id"], fields["result_key"])
        times = {name: as_utc(fields[name]) for name in ("created_at", "updated_at", "started_at", "finished_at")}
        progress, position = events.shown_progress(job.status, job.started_at is not None, job.num_inference_steps, live)
        shown = {"metadata": fields["meta"], "image_url": image_url, "progress": progress, "queue_position": position}
        return JobView(**{**fields, **times, **shown})

    def _image_url(self, job_id: uuid.UUID, key: str) -> str:
        location = self._store.location(key)
        return location if location.startswith("http") else f"/jobs/{job_id}/image"

    async def _get(self, job_id: uuid.UUID, principal: Principal) -> GenerationJob:
        try:
            return await asyncio.to_thread(self._jobs.get, job_id, owner=owner_scope(principal))
        except JobNotFound as error:
            raise HTTPException(404, str(error)) from None

    async def _live(self, job_id: uuid.UUID, principal: Principal) -> dict[str, Any] | None:
        """The router's view of the caller's unfinished job; None once it ended, or while the router
        cannot say (restarting, recovering): the database has the last word then."""
        try:
            call = self._router.progress.remote(str(job_id), owner_scope(principal))
            live: dict[str, Any] | None = await asyncio.wait_for(call, LIVE_VIEW_TIMEOUT_S)
        except ROUTER_DOWN:
            return None
        return live

    async def _observe(self, job_id: uuid.UUID, principal: Principal) -> events.Observation:
        """One poll of the event stream: the live view while the router holds the job, else the row."""
        live = await self._live(job_id, principal)
        if live is not None and live["state"] != "stopping":  # stopping: cancelled, its row says so soon
            return events.Observation(live=live)
        try:
            job = await self._get(job_id, principal)
        except HTTPException:
            raise events.JobGone from None
        except DATABASE_OUTAGES:
            return events.Observation(live=live, note="the database is unreachable; waiting for it")
        if JobStatus(job.status).is_terminal:
            return events.Observation(final=self._view(job, principal).model_dump(mode="json"))
        return events.Observation(live=live, note="waiting for the router's view of the job")

    @api.post(
        "/generation/single",
        status_code=202,
        response_model=JobView,
        responses={200: {"model": JobView, "description": "An Idempotency-Key replay, or ?wait=true and the job ended."}}
        | _errors(*WRITE_ERRORS, 429),
    )
    async def generate(
        self,
        principal: Caller,
        request: GenerationRequest,
        response: Response,
        wait: bool = False,
        idempotency_key: str | None = Header(None, max_length=MAX_IDEMPOTENCY_KEY_CHARS),
    ) -> JobView:
        """Queue one image (realtime lane by default). The same `Idempotency-Key` with the same body
        returns the job it created the first time (200); with another body, 422."""
        await check_webhook(request.webhook_url, principal, self._settings.router.webhook_allow_private)
        submission = await self._submit(principal, request, [request.to_job_fields()], "/generation/single", idempotency_key)
        [job] = submission.jobs
        if not submission.created:
            response.status_code = 200
        if not wait:
            return self._view(job, principal)
        final = await self._wait(job.id, LIMITS.wait_timeout_s)
        if final is not None and JobStatus(final).is_terminal:
            response.status_code = 200
        return self._view(await self._get(job.id, principal), principal)

    @api.post(
        "/generation/batch",
        status_code=202,
        response_model=BatchAccepted,
        responses={
            200: {"model": BatchAccepted, "description": "An Idempotency-Key replay, or every item's job stored already."},
            409: {"model": BatchConflictBody, "description": "Items ask for other images than their jobs stored already."},
        }
        | _errors(*WRITE_ERRORS, 429),
    )
    async def generate_batch(
        self,
        principal: Caller,
        request: BatchRequest,
        response: Response,
        idempotency_key: str | None = Header(None, max_length=MAX_IDEMPOTENCY_KEY_CHARS),
    ) -> BatchAccepted | JSONResponse:
        """Queue several images (batch lane by default), all or none; `Idempotency-Key` as for one image.

        Under a `batch_id` of the caller's used before, an item whose job is stored already is that
        job, not made again (`existing_job_ids`); one that asks for another image is refused (409),
        and then nothing of the request is stored.
        """
        name = request.batch_id or str(uuid.uuid4())
        jobs = request.to_job_fields(principal.user, name)
        await check_webhook(request.webhook_url, principal, self._settings.router.webhook_allow_private)
        try:
            submission = await self._submit(principal, request, jobs, "/generation/batch", idempotency_key, name)
        except BatchConflict as conflict:
            indexes = {job["id"]: index for index, job in enumerate(jobs, request.first_index)}
            return JSONResponse(status_code=409, content=BatchConflictBody.of(conflict, name, indexes).model_dump(mode="json"))
        await self._arm_batch_webhook(principal, request.webhook_url, submission.batch_id or name, submission)
        if not submission.created:
            response.status_code = 200
        views = [self._view(job, principal) for job in submission.jobs]
        return BatchAccepted(
            batch_id=submission.batch_id or name,
            job_ids=[view.id for view in views],
            jobs=views,
            existing_job_ids=[job.id for job in submission.jobs if job.id in submission.found],
        )

    async def _arm_batch_webhook(self, principal: Principal, url: str | None, batch_id: str, submission: Submission) -> None:
        """Arm the batch's delivery once its jobs are stored, if some are unfinished: a request that
        stores nothing of a batch that ended (a replay) arms nothing. Jobs that end before it is
        armed are caught by the router's sweep of the armed batches."""
        if url is None or principal.key_id is None:
            return
        if all(JobStatus(job.status).is_terminal for job in submission.jobs):
            return
        await asyncio.to_thread(self._webhooks.arm_batch, principal.user, batch_id, principal.key_id, url)

    async def _submit(
        self,
        principal: Principal,
        request: BaseModel,
        jobs: list[dict[str, Any]],
        path: str,
        idempotency_key: str | None,
        batch_id: str | None = None,
    ) -> Submission:
        """Store and queue the caller's jobs (`request`'s, as the router stores them), all or none, under
        their quota; with `batch_id`, as one batch. An `Idempotency-Key` is claimed for `path`."""
        span = trace.get_current_span()
        if batch_id is not None:
            span.set_attribute("seidra.batch_id", batch_id)
        # A batch's jobs are its `items`; any other request's (OpenAI's n images too) are the body itself.
        itemized = isinstance(request, BatchRequest)
        locations = [("body", "items", index) if itemized else ("body",) for index in range(len(jobs))]
        jobs = self._catalog.resolve(jobs, locations)
        # The key signs the jobs' webhooks, and its default webhook stands in for theirs.
        jobs = [{**job, "key_id": principal.key_id} for job in jobs]
        claim = _claim(idempotency_key, path, request, batch_id, principal)
        submission: Submission = await _router_call(
            self._router.submit.remote(
                jobs,
                batch_id,
                trace_context=tracing.carrier(),
                idempotency=claim,
                owner=principal.user,
                limits=_quota_limits(principal),
            )
        )
        if batch_id is None:
            span.set_attribute(tracing.JOB_ID, str(submission.jobs[0].id))
        return submission

    async def _wait(self, job_id: uuid.UUID, timeout_s: float) -> str | None:
        """The job's status once it ended or `timeout_s` passed; None when the router went away meanwhile."""
        try:
            status: str = await self._router.wait.remote(str(job_id), timeout_s)
        except RayActorError:
            return None  # the job is stored and queued; only the wait was lost with the router
        return status

    @api.get("/jobs/{job_id}", response_model=JobView, responses=_errors(*READ_ERRORS, 404))
    async def get_job(self, job_id: uuid.UUID, principal: Caller) -> JobView:
        """The job; while it is unfinished, `progress` and `queue_position` come from the router."""
        job = await self._get(job_id, principal)
        live = None if JobStatus(job.status).is_terminal else await self._live(job_id, principal)
        return self._view(job, principal, live)

    @api.get(
        "/jobs/{job_id}/events",
        response_class=Response,
        responses={
            200: {
                "content": {"text/event-stream": {"schema": {"type": "string"}}},
                "description": "Server-sent events until the job ends: `queued`, `started`, `progress`, `held`, "
                "`resumed`, then `completed`, `failed` or `cancelled` (the job as GET /jobs/{id} shows it), "
                "and the stream closes. Reconnect with `Last-Event-ID` to get only what came since.",
            }
        }
        | _errors(*READ_ERRORS, 404),
    )
    async def job_events(
        self,
        job_id: uuid.UUID,
        principal: Caller,
        last_event_id: str | None = Header(None, max_length=MAX_EVENT_ID_CHARS),
    ) -> StreamingResponse:
        """The job's life as server-sent events (see `serve_app/events.py` for what an event id means)."""
        await self._get(job_id, principal)  # someone else's job, or none: 404 before any streaming
        return StreamingResponse(
            events.stream(lambda: self._observe(job_id, principal), last_event_id),
            media_type="text/event-stream",
            headers=EVENT_STREAM_HEADERS,
        )

    @api.get("/jobs", response_model=list[JobView], responses=_errors(*READ_ERRORS, 403))
    async def list_jobs(
        self,
        principal: Caller,
        status: JobStatus | None = None,
        lane: Lane | None = None,
        batch_id: BatchName | None = None,
        owner: Annotated[str | None, Query(max_length=64, description="Admins: that user's jobs only.")] = None,
        after: Annotated[uuid.UUID | None, Query(description="The last job of the page before: the next page.")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    ) -> list[JobView]:
        """The caller's jobs, newest first (an admin's: everyone's, or `owner`'s); `batch_id` is a
        batch's name, which is the caller's own (an admin's listing shows each user's batch of that name)."""
        jobs = await asyncio.to_thread(
            self._jobs.list,
            status=status,
            lane=lane.value if lane else None,
            batch_id=batch_id,
            owner=owner_scope(principal, owner),
            after=after,
            limit=limit,
        )
        return [self._view(job, principal) for job in jobs]

    @api.get(
        "/jobs/{job_id}/image",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}} | _errors(*READ_ERRORS, 404, 409),
    )
    async def get_image(self, job_id: uuid.UUID, principal: Caller) -> Response:
        job = await self._get(job_id, principal)
        if job.status != JobStatus.COMPLETED.value or not job.result_key:
            raise HTTPException(409, f"job {job_id} is {job.status}; it has no image yet")
        try:
            data = await asyncio.to_thread(self._store.get, job.result_key)
        except ObjectNotFound:
            raise HTTPException(404, f"the image of job {job_id} is no longer in the object store") from None
        return Response(content=data, media_type="image/png")

    @api.delete("/jobs/{job_id}", response_model=JobView, responses=_errors(*READ_ERRORS, 404, 409))
    async def cancel_job(self, job_id: uuid.UUID, principal: Caller) -> JobView:
        cancelled = await _router_call(self._router.cancel.remote(str(job_id), owner_scope(principal)))
        return self._view(cancelled, principal)

    @api.post("/jobs/{job_id}/retry", status_code=202, response_model=JobView, responses=_errors(*READ_ERRORS, 404, 409, 429))
    async def retry_job(
        self,
        principal: Caller,
        job_id: uuid.UUID,
        countdown_s: Annotated[float, Query(ge=0, le=86_400)] = 0.0,
    ) -> JobView:
        """Queue a failed, cancelled or held job again at realtime priority, after `countdown_s`."""
        retried = await _router_call(
            self._router.retry.remote(str(job_id), countdown_s, owner_scope(principal), _quota_limits(principal))
        )
        return self._view(retried, principal)

    @api.get("/notifications", response_model=list[NotificationView], responses=_errors(*READ_ERRORS, 403))
    async def list_notifications(
        self,
        principal: Caller,
        job_id: uuid.UUID | None = None,
        level: Level | None = None,
        owner: Annotated[str | None, Query(max_length=64, description="Admins: that user's notifications only.")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    ) -> list[NotificationView]:
        """The caller's notifications, newest first (an admin's: everyone's, or `owner`'s)."""
        rows = await asyncio.to_thread(
            self._notifications.list, job_id=job_id, level=level, owner=owner_scope(principal, owner), limit=limit
        )
        return [NotificationView(**{**row.model_dump(), "created_at": as_utc(row.created_at)}) for row in rows]

    @api.post("/admin/maintenance", responses=_errors(*WRITE_ERRORS, 403, 404))
    async def maintenance(self, request: MaintenanceRequest, _admin: Admin) -> dict[str, Any]:
        """Drain one replica or all: running jobs finish, no new ones start there."""
        workers = await _router_call(self._router.set_maintenance.remote(request.replica_id, request.enabled))
        return {"workers": workers}

    @api.post("/admin/lanes/{lane}", responses=_errors(*WRITE_ERRORS, 403))
    async def pause_lane(self, lane: Lane, request: LaneRequest, _admin: Admin) -> dict[str, Any]:
        """Stop dispatching from a lane (its jobs keep their places) or start again."""
        return {"paused_lanes": await _router_call(self._router.set_lane_paused.remote(lane.value, request.paused))}

    @api.post("/admin/faults", responses=_errors(*WRITE_ERRORS, 403))
    async def inject_faults(self, request: FaultRequest, _admin: Admin) -> dict[str, Any]:
        """Drills and tests only: make replicas report faults. Off unless SEIDRA_FAULT_INJECTION=1."""
        self._require_fault_injection()
        faults = InjectedFaults(
            temperature_c=request.temperature_c,
            health=Health(request.health) if request.health else None,
            inference_delay_s=request.inference_delay_s,
            fail_inference=request.fail_inference,
        )
        return {"workers": await _router_call(self._router.set_faults.remote(request.replica_id, faults))}

    @api.delete("/admin/faults", responses=_errors(*READ_ERRORS, 403))
    async def clear_faults(self, _admin: Admin, replica_id: str | None = None) -> dict[str, Any]:
        self._require_fault_injection()
        return {"workers": await _router_call(self._router.set_faults.remote(replica_id, None))}

    def _require_fault_injection(self) -> None:
        if not self._settings.worker.fault_injection:
            raise HTTPException(403, "fault injection is disabled; it needs SEIDRA_FAULT_INJECTION=1 (drills and tests only)")

    @api.get("/health", responses=_errors(413))
    async def health(self) -> dict[str, str]:
        """Liveness, for load balancers and probes: the one route without a key, and it tells nothing."""
        return {"status": "ok"}

    @api.get("/status", responses=_errors(401, 413, 503))
    async def status(self, principal: Caller) -> dict[str, Any]:
        """Queue depths and the caller's job counts (null while the database is unreachable); an
        admin also sees the replicas, holds and everyone's counts."""
        router = await _router_call(self._router.status.remote())
        scope = owner_scope(principal)
        try:
            jobs, database = await asyncio.to_thread(self._jobs.count_by_status, owner=scope), "ok"
        except DATABASE_OUTAGES as error:
            jobs, database = None, f"unreachable ({type(error).__name__})"
        if not principal.admin:
            router = {name: router[name] for name in USER_STATUS_FIELDS}
        return {**router, "jobs": jobs, "database": database}


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Application builder for `serve deploy serve_app/serve_config.yaml`, `serve run` and `seidra up`.

    `args` are the application's settings, named as in the README without the `SEIDRA_` prefix
    (`{"model": "...", "num_gpus": 1}`); they win over `SEIDRA_*` environment variables and reach
    every replica and the router.
    """
    from deployments.worker import DiffusionWorker

    _refuse_secret_args(args or {})
    settings = AppSettings.resolve(args or {})
    _refuse_open_proxy_without_auth(settings.api.auth)
    worker = settings.worker.require_model()
    # The replicas get their settings as objects; the variables serve the request schemas, whose
    # bounds FastAPI needs when their module loads (`serve_app.schemas.LIMITS`).
    runtime_env = {"env_vars": {**tracing.environment(), **settings_from_args(args or {})}}
    workers = DiffusionWorker.options(
        **_replicas(worker),
        ray_actor_options={
            # Forced mock mode runs on the CPU: its replicas must not wait for GPUs that are down.
            "num_gpus": 0 if worker.force_mock else worker.num_gpus,
            "num_cpus": worker.worker_num_cpus,
            "runtime_env": runtime_env,
        },
        health_check_period_s=worker.health_check_period_s,
        health_check_timeout_s=worker.health_check_timeout_s,
    ).bind(settings.worker, settings.storage)
    api = SeidraAPI.options(ray_actor_options={"num_cpus": 0, "runtime_env": runtime_env})
    return api.bind(workers, settings)


def _refuse_secret_args(args: dict[str, Any]) -> None:
    """Serve shows an application's args to anyone who can read its config: secrets come from the
    environment of each process instead (`storage.settings`)."""
    from storage.settings import is_secret_variable

    for name in args:
        variable = f"SEIDRA_{name.upper()}"
        if is_secret_variable(variable):
            raise ValueError(
                f"{name} is a secret and must not be an application arg (`serve config` shows them): "
                f"set {variable} or {variable}_FILE in the environment of every Ray node instead"
            )


def _refuse_open_proxy_without_auth(auth: str) -> None:
    """`auth: off` only while Serve's HTTP proxy listens on loopback, so `serve deploy` of a config
    that opens it wider fails. The builder asks the Serve instance it is deploying into; with no
    instance to ask, it cannot know where the proxy will listen."""
    from serve_app.cluster import auth_off_refusal, is_loopback, serve_http_options

    if auth != "off":
        return
    options = serve_http_options()
    if options is None:
        raise ValueError(
            "SEIDRA_AUTH=off is allowed only while the HTTP proxy listens on loopback, and no running Serve "
            "instance says where it listens: deploy with `serve deploy` or `seidra up`, or set SEIDRA_AUTH=keys"
        )
    if not is_loopback(options.host):
        raise ValueError(auth_off_refusal(str(options.host)))


def _replicas(worker: WorkerSettings) -> dict[str, Any]:
    """A fixed replica count, or one that follows the router's backlog (SEIDRA_MAX_WORKERS)."""
    if worker.max_workers <= worker.num_workers:
        return {"num_replicas": worker.num_workers}
    return {
        "autoscaling_config": {
            "min_replicas": worker.num_workers,
            "max_replicas": worker.max_workers,
            "upscale_delay_s": worker.worker_upscale_delay_s,
            "downscale_delay_s": worker.worker_downscale_delay_s,
            "policy": {
                "policy_function": "scheduling.autoscaling_policy:RouterBacklogPolicy",
                "policy_kwargs": {"jobs_per_replica": worker.jobs_per_worker},
            },
        }
    }
