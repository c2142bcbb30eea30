"""A short version of `make load` (docs/reliability.md): realtime clients over a batch backlog."""

from __future__ import annotations

import asyncio

from bench.load import LoadPlan, run
from tests.ray_app import RunningApp


def test_concurrent_realtime_clients_over_a_batch_backlog(app: RunningApp) -> None:
    plan = LoadPlan(realtime_clients=8, requests_per_client=2, batch_jobs=30, steps=2, size=32, timeout_s=300, batch_chunk=10)
    report = asyncio.run(run(app.url, plan, router_pid=None, api_key=app.admin_key))
    assert report["responses_5xx"] == 0, report["errors"]
    assert report["realtime_jobs"] == {"completed": 16}
    assert report["batch_jobs"] == {"completed": 30}  # more than the lane holds: 429s waited out
    assert report["responses_by_status"].get(429, 0) >= 1
    assert report["submission_latency_ms"]["/generation/single"]["count"] == 16
