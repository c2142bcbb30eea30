"""The trace of a job, span by span, with an in-memory exporter; exporters chosen by `OTEL_*`."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from scheduling import tracing

_EXPORTER = InMemorySpanExporter()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """This process's tracer provider, exporting to memory (a provider can be set once per process)."""
    if not getattr(trace.get_tracer_provider(), "_seidra_unit_test", False):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        provider._seidra_unit_test = True  # type: ignore[attr-defined]
        trace.set_tracer_provider(provider)
    if not getattr(trace.get_tracer_provider(), "_seidra_unit_test", False):
        pytest.fail("another tracer provider was installed in this process first")
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


@pytest.fixture
def otel_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(tracing.environment()):
        monkeypatch.delenv(name)
    return monkeypatch


def named(exported: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [span for span in exported.get_finished_spans() if span.name == name]


def test_a_lone_job_continues_the_submitters_trace_and_every_later_span_joins_it(spans: InMemorySpanExporter) -> None:
    with tracing.tracer().start_as_current_span("POST /generation/single") as request:
        submitter = tracing.carrier()
    with tracing.enqueue_spans(submitter, [{tracing.JOB_ID: "job-1", "seidra.lane": "realtime"}], batch=False) as [enqueue]:
        stored = tracing.job_trace(enqueue)

    # Later, in the router's dispatch task and then in a worker: only the stored context links them.
    with tracing.job_span("seidra.dispatch", "job-1", stored["trace_context"]):
        sent = tracing.carrier()
        with tracing.job_span("seidra.db.update", "job-1"):
            pass
    with tracing.job_span("seidra.inference", "job-1", sent):
        pass

    [enqueued] = named(spans, "seidra.enqueue")
    [dispatch], [update], [inference] = (named(spans, n) for n in ("seidra.dispatch", "seidra.db.update", "seidra.inference"))
    trace_id = request.get_span_context().trace_id
    assert stored["trace_id"] == trace.format_trace_id(trace_id)
    assert {s.context.trace_id for s in (enqueued, dispatch, update, inference)} == {trace_id}
    assert enqueued.parent.span_id == request.get_span_context().span_id
    assert dispatch.parent.span_id == enqueued.context.span_id
    assert update.parent.span_id == inference.parent.span_id == dispatch.context.span_id
    assert all(s.attributes[tracing.JOB_ID] == "job-1" for s in (enqueued, dispatch, update, inference))


@pytest.mark.parametrize("size", [1, 2])
def test_each_job_of_a_batch_starts_a_trace_linked_to_the_submitter(spans: InMemorySpanExporter, size: int) -> None:
    with tracing.tracer().start_as_current_span("POST /generation/batch") as request:
        submitter = tracing.carrier()
    with tracing.enqueue_spans(submitter, [{tracing.JOB_ID: str(i)} for i in range(size)], batch=True) as enqueued:
        ids = [tracing.job_trace(span)["trace_id"] for span in enqueued]

    assert len(set(ids)) == size and trace.format_trace_id(request.get_span_context().trace_id) not in ids
    enqueue_spans = named(spans, "seidra.enqueue")
    assert len(enqueue_spans) == size
    for span in enqueue_spans:
        assert span.parent is None
        assert [link.context.span_id for link in span.links] == [request.get_span_context().span_id]


def test_a_job_without_a_submitter_starts_its_own_trace(spans: InMemorySpanExporter) -> None:
    with tracing.tracer().start_as_current_span("unrelated"), tracing.enqueue_spans(None, [{tracing.JOB_ID: "a"}], batch=False):
        pass
    [enqueued] = named(spans, "seidra.enqueue")
    assert enqueued.parent is None and not enqueued.links


def test_a_refused_submission_ends_its_spans_as_errors(spans: InMemorySpanExporter) -> None:
    with pytest.raises(RuntimeError), tracing.enqueue_spans(None, [{tracing.JOB_ID: "a"}, {tracing.JOB_ID: "b"}], batch=True):
        raise RuntimeError("lane full")
    enqueued = named(spans, "seidra.enqueue")
    assert len(enqueued) == 2
    assert all(s.status.status_code is StatusCode.ERROR and "lane full" in s.status.description for s in enqueued)
    assert all([event.name for event in s.events] == ["exception"] for s in enqueued)


def test_log_lines_inside_a_jobs_span_carry_its_trace_id(spans: InMemorySpanExporter) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s%(trace)s"))
    handler.addFilter(tracing.TraceIdFilter())
    logger = logging.getLogger("tests.tracing")
    logger.addHandler(handler)
    try:
        with tracing.job_span("seidra.hold", "job-1") as span:
            logger.warning("Delaying job job-1 due to GPU unavailability")
        logger.warning("Router rebuilt its queue")
    finally:
        logger.removeHandler(handler)
    trace_id = trace.format_trace_id(span.get_span_context().trace_id)
    assert stream.getvalue().splitlines() == [
        f"Delaying job job-1 due to GPU unavailability trace_id={trace_id}",
        "Router rebuilt its queue",
    ]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, []),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://tempo:4318"}, [HttpExporter]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://tempo:4318/v1/traces"}, [HttpExporter]),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://tempo:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, [GrpcExporter]),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://tempo:4318", "OTEL_TRACES_EXPORTER": "none"}, []),
        ({"OTEL_TRACES_EXPORTER": "console, otlp"}, [ConsoleSpanExporter, HttpExporter]),
    ],
)
def test_exporters_follow_the_otel_variables(otel_env: pytest.MonkeyPatch, env: dict[str, str], expected: list[type]) -> None:
    for name, value in env.items():
        otel_env.setenv(name, value)
    assert [type(exporter) for exporter in tracing.span_exporters()] == expected


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("OTEL_TRACES_EXPORTER", "zipkin", "OTEL_TRACES_EXPORTER names 'zipkin'"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json", "OTEL_EXPORTER_OTLP_PROTOCOL is 'http/json'"),
    ],
)
def test_an_unsupported_exporter_is_named_and_the_service_still_starts(
    otel_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, name: str, value: str, message: str
) -> None:
    otel_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://tempo:4318")
    otel_env.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        tracing.span_exporters()
    with caplog.at_level(logging.ERROR, logger=tracing.__name__):
        provider = tracing.tracer_provider("router")
    assert f"Traces are not exported: {message}" in caplog.text
    assert provider.resource.attributes["service.name"] == "seidra-router"


def test_otel_service_name_names_every_process(otel_env: pytest.MonkeyPatch) -> None:
    assert tracing.tracer_provider("worker").resource.attributes["service.name"] == "seidra-worker"
    otel_env.setenv("OTEL_SERVICE_NAME", "seidra-prod")
    assert tracing.tracer_provider("worker").resource.attributes["service.name"] == "seidra-prod"
