"""OpenTelemetry traces: one trace per job, from the HTTP request to the last database write.

The trace crosses three processes (API replica, router actor, worker replica) as W3C `traceparent`
carriers sent along with each call. A job keeps its own carrier in `metadata.trace_context`, so
every step slice, hold and retry joins the same trace, even after the router restarted; people
find the trace by `metadata.trace_id`, which log lines written inside a job's span also print.

Every process records spans, so that every job has a trace id; they leave the process only when
the standard `OTEL_*` variables ask for it:

- `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`: export over OTLP, in
  http/protobuf (Tempo's port 4318) unless `OTEL_EXPORTER_OTLP_PROTOCOL=grpc` (port 4317);
- `OTEL_TRACES_EXPORTER`: `otlp`, `console` or `none`, comma-separated; wins over the above;
- `OTEL_SDK_DISABLED=true`: no tracing at all (and no trace ids on jobs).

The exporters read the other `OTEL_EXPORTER_OTLP_*` variables (headers, timeouts) themselves, and
the batch processor reads `OTEL_BSP_*` (its flush delay: `OTEL_BSP_SCHEDULE_DELAY`, 5000 ms).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, Status, StatusCode

from storage.settings import is_secret_variable

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

logger = logging.getLogger(__name__)

Carrier = dict[str, str]

TRACER_NAME = "seidra"
JOB_ID = "seidra.job_id"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s -- %(message)s%(trace)s"
OTLP_PROTOCOLS = ("http/protobuf", "grpc")

_configured = False


# ----- set-up, once per process -----


def configure(component: str) -> None:
    """Record spans in this process (service `seidra-<component>`), exported as `OTEL_*` say."""
    global _configured
    if _configured or _is_true(os.environ.get("OTEL_SDK_DISABLED", "")):
        return
    trace.set_tracer_provider(tracer_provider(component))
    _configured = True


def tracer_provider(component: str) -> TracerProvider:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # OTEL_SERVICE_NAME, when set, names every process alike; Resource.create reads it.
    service = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": f"seidra-{component}"}
    provider = TracerProvider(resource=Resource.create({**service, "service.namespace": "seidra"}))
    try:
        exporters = span_exporters()
    except ValueError as error:  # tracing must never keep the service from starting
        logger.error("Traces are not exported: %s", error)
        exporters = []
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def span_exporters() -> list[SpanExporter]:
    """The exporters `OTEL_TRACES_EXPORTER` names; OTLP alone when only an endpoint is set; else none."""
    names = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if not names:
        endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        names = "otlp" if endpoint else "none"
    exporters = []
    for name in filter(None, (part.strip() for part in names.split(","))):
        if name not in EXPORTERS:
            raise ValueError(f"OTEL_TRACES_EXPORTER names {name!r}; supported here: {', '.join(EXPORTERS)}")
        exporter = EXPORTERS[name]()
        if exporter is not None:
            exporters.append(exporter)
    return exporters


def _otlp_exporter() -> SpanExporter:
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
    )
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        return HttpExporter()
    raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL is {protocol!r}; supported here: {', '.join(OTLP_PROTOCOLS)}")


def _console_exporter() -> SpanExporter:
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    return ConsoleSpanExporter()


EXPORTERS: dict[str, Callable[[], SpanExporter | None]] = {
    "otlp": _otlp_exporter,
    "console": _console_exporter,
    "none": lambda: None,
}


def environment() -> dict[str, str]:
    """This process's `OTEL_*` variables, for the processes it starts (replicas, the router).

    Not the OTLP headers: they carry credentials, and a runtime env is shown to anyone who can read
    the dashboard. Every process's exporter reads them from its own environment.
    """
    return {name: value for name, value in os.environ.items() if name.startswith("OTEL_") and not is_secret_variable(name)}


def _is_true(text: str) -> bool:
    return text.strip().lower() == "true"


# ----- logging -----


class TraceIdFilter(logging.Filter):
    """Gives each record `trace`: ` trace_id=<32 hex>` inside a span, empty outside."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        record.trace = f" trace_id={trace.format_trace_id(context.trace_id)}" if context.is_valid else ""
        return True


def configure_logging() -> None:
    """Log lines with a time, level, source and, inside a job's span, its trace id.

    Ray actors start without a root handler; one that has its own keeps its format.
    """
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    for existing_handler in root.handlers:
        if not any(isinstance(existing, TraceIdFilter) for existing in existing_handler.filters):
            existing_handler.addFilter(TraceIdFilter())


# ----- spans -----


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


def carrier(context: Context | None = None) -> Carrier:
    """The current span's context (or `context`'s) as W3C headers, to send along with a call."""
    headers: Carrier = {}
    propagate.inject(headers, context=context)
    return headers


@contextmanager
def job_span(
    name: str, job_id: str, parent: Carrier | None = None, attributes: Mapping[str, Any] | None = None
) -> Iterator[Span]:
    """A span of job `job_id`'s trace: a child of the span `parent` carries, else of the current one."""
    context = propagate.extract(parent) if parent else None
    with tracer().start_as_current_span(name, context=context, attributes={JOB_ID: job_id, **(attributes or {})}) as span:
        yield span


@contextmanager
def job_spans(name: str, jobs: Mapping[str, Carrier | None], attributes: Mapping[str, Any]) -> Iterator[dict[str, Span]]:
    """One span per job of a call that serves several (`jobs`: id -> its trace), none of them current:
    each job keeps its own trace. `use_span` one to make it the parent of what follows for its job."""
    spans = {
        job_id: tracer().start_span(
            name, context=propagate.extract(parent) if parent else None, attributes={JOB_ID: job_id, **attributes}
        )
        for job_id, parent in jobs.items()
    }
    try:
        yield spans
    except BaseException as error:
        for span in spans.values():
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        raise
    finally:
        for span in spans.values():
            span.end()


@contextmanager
def enqueue_spans(submitter: Carrier | None, jobs: list[dict[str, Any]], batch: bool) -> Iterator[list[Span]]:
    """One `seidra.enqueue` span per job (`jobs` are their attributes, `seidra.job_id` included).

    A job submitted on its own continues the submitter's trace (its HTTP request's); the jobs of a
    `batch` each start a trace of their own, linked to the submitter's span, so that each job has
    one trace however many a batch holds.
    """
    parent = propagate.extract(submitter or {})
    context, links = parent, []
    if batch:
        submitted_by = trace.get_current_span(parent).get_span_context()
        context, links = Context(), [Link(submitted_by)] if submitted_by.is_valid else []
    spans = [tracer().start_span("seidra.enqueue", context=context, links=links, attributes=job) for job in jobs]
    try:
        yield spans
    except BaseException as error:
        for span in spans:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        raise
    finally:
        for span in spans:
            span.end()


def job_trace(span: Span) -> dict[str, Any]:
    """What a job stores of its trace: the id, for people, and the context, for later spans."""
    context = span.get_span_context()
    if not context.is_valid:
        return {}
    return {"trace_id": trace.format_trace_id(context.trace_id), "trace_context": carrier(trace.set_span_in_context(span))}


def mark_failed(span: Span, reason: str) -> None:
    span.set_status(Status(StatusCode.ERROR, reason))
