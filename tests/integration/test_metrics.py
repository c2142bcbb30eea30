"""SEIDRA's metrics appear on the node's Ray metrics endpoint, next to Ray Serve's own."""

from __future__ import annotations

import time

import httpx

from tests.ray_app import RunningApp

EXPECTED = [
    'ray_seidra_jobs_submitted_total{',
    'ray_seidra_jobs_started_total{',
    'ray_seidra_jobs_completed_total{',
    'ray_seidra_queue_depth{',
    'ray_seidra_jobs_held{',
    'ray_seidra_jobs_running{',
    'ray_seidra_worker_replicas{',
    'ray_seidra_job_duration_seconds_bucket{',
    'ray_seidra_queue_wait_seconds_bucket{',
    'ray_seidra_inference_step_seconds_bucket{',
    'ray_seidra_model_loads_total{',  # the default model, as the replica started
    'ray_seidra_model_load_seconds_bucket{',
    'ray_seidra_http_requests_total{',
    'ray_serve_',
]


def test_job_queue_worker_and_http_metrics_are_exported(app: RunningApp) -> None:
    import ray

    response = app.http.post("/generation/single?wait=true", json={"prompt": "a metered kite", "width": 64, "height": 64})
    assert response.status_code == 200
    port = ray._private.worker._global_node.metrics_export_port
    deadline = time.monotonic() + 90
    while True:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        missing = [name for name in EXPECTED if name not in text]
        if not missing:
            break
        assert time.monotonic() < deadline, f"not exported: {missing}"
        time.sleep(2)
    assert 'route="/generation/single"' in text and 'lane="realtime"' in text
