"""One trace per job, across the API replica, the router actor and the worker replica, exported
over OTLP (as to Tempo) to an in-memory receiver."""

from __future__ import annotations

from collections import Counter

from tests.otlp import STATUS_ERROR, ReceivedSpan
from tests.ray_app import RunningApp

# A caller's own trace (W3C example ids): the job's trace continues it.
CALLER_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN_ID = "00f067aa0ba902b7"
JOB_SPANS = {"seidra.enqueue", "seidra.dispatch", "seidra.inference", "seidra.upload", "seidra.db.update"}


def only(spans: list[ReceivedSpan], name: str) -> ReceivedSpan:
    [span] = [span for span in spans if span.name == name]
    return span


def ancestors(span: ReceivedSpan, spans: list[ReceivedSpan]) -> list[str]:
    """Span ids from `span`'s parent up to the root of what `spans` hold."""
    by_id = {s.span_id: s for s in spans}
    chain = []
    while span.parent_span_id in by_id:
        span = by_id[span.parent_span_id]
        chain.append(span.span_id)
    return chain


def test_a_job_is_one_trace_from_the_http_request_to_the_database(app: RunningApp) -> None:
    response = app.http.post(
        "/generation/single",
        json={"prompt": "traced", "width": 64, "height": 64, "num_inference_steps": 8},  # one call: nothing makes it yield
        headers={"traceparent": f"00-{CALLER_TRACE_ID}-{CALLER_SPAN_ID}-01"},
    )
    assert response.status_code == 202, response.text
    job_id, trace_id = response.json()["id"], response.json()["metadata"]["trace_id"]
    assert trace_id == CALLER_TRACE_ID
    app.wait_for([job_id])

    def whole_trace() -> list[ReceivedSpan]:
        spans = app.traces.spans(trace_id)
        return spans if JOB_SPANS <= {span.name for span in spans} and any(s.service == "seidra-api" for s in spans) else []

    spans = app.eventually(whole_trace, "the job's spans from every process")
    names = Counter(span.name for span in spans)
    assert names["seidra.dispatch"] == names["seidra.inference"] == 1
    assert names["seidra.upload"] == names["seidra.db.update"] == 1

    http = only(spans, "POST /generation/single")
    enqueue, upload, update = (only(spans, name) for name in ("seidra.enqueue", "seidra.upload", "seidra.db.update"))
    assert (http.service, http.parent_span_id) == ("seidra-api", CALLER_SPAN_ID)
    assert (http.attributes["http.route"], http.attributes["http.response.status_code"]) == ("/generation/single", 202)
    assert enqueue.service == "seidra-router" and http.span_id in ancestors(enqueue, spans)  # through FastAPI's endpoint span
    dispatches = sorted((s for s in spans if s.name == "seidra.dispatch"), key=lambda s: s.attributes["seidra.step"])
    assert [d.attributes["seidra.step"] for d in dispatches] == [0]
    for dispatch in dispatches:
        assert (dispatch.service, dispatch.parent_span_id) == ("seidra-router", enqueue.span_id)
        inference = next(s for s in spans if s.name == "seidra.inference" and s.parent_span_id == dispatch.span_id)
        assert inference.service == "seidra-worker"
        assert inference.attributes["seidra.replica_id"] == dispatch.attributes["seidra.replica_id"]
    last_inference = next(s for s in spans if s.name == "seidra.inference" and s.parent_span_id == dispatches[-1].span_id)
    assert (upload.service, upload.parent_span_id) == ("seidra-worker", last_inference.span_id)
    assert upload.attributes["seidra.object_key"] == app.job(job_id)["result_key"]
    assert (update.service, update.parent_span_id) == ("seidra-router", dispatches[-1].span_id)
    assert update.attributes["seidra.status"] == "completed"
    assert all(span.attributes["seidra.job_id"] == job_id for span in spans if span.name in JOB_SPANS)
    assert not [span.name for span in spans if span.status_code == STATUS_ERROR]  # a job that went well


def test_each_job_of_a_batch_has_its_own_trace_linked_to_the_request(app: RunningApp) -> None:
    batch = app.submit_batch([{"prompt": f"traced batch {index}"} for index in range(2)])
    jobs = app.wait_for([str(job_id) for job_id in batch["job_ids"]])
    trace_ids = {job["metadata"]["trace_id"] for job in jobs}
    assert len(trace_ids) == 2

    def enqueues() -> list[ReceivedSpan]:
        spans = [s for trace_id in trace_ids for s in app.traces.spans(trace_id) if s.name == "seidra.enqueue"]
        return spans if len(spans) == 2 else []

    request = app.eventually(
        lambda: [s for s in app.traces.spans() if s.attributes.get("seidra.batch_id") == batch["batch_id"] and s.service == "seidra-api"],
        "the batch request's span",
    )[0]
    for enqueue in app.eventually(enqueues, "both jobs' enqueue spans"):
        assert enqueue.parent_span_id == "" and enqueue.trace_id != request.trace_id  # roots of their own traces
        assert enqueue.links == ((request.trace_id, request.span_id),)
        assert enqueue.attributes["seidra.batch_id"] == batch["batch_id"]
