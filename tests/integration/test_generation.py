"""The whole path on a local Ray cluster: HTTP -> router actor -> worker deployment -> storage."""

from __future__ import annotations

import io
import uuid

from PIL import Image

from tests.ray_app import RunningApp


def test_single_with_wait_stores_a_png_of_the_requested_size(app: RunningApp) -> None:
    response = app.http.post(
        "/generation/single?wait=true",
        json={"prompt": "a lighthouse", "width": 96, "height": 64, "num_inference_steps": 6, "seed": 11},
    )
    assert response.status_code == 200, response.text
    job = response.json()
    assert (job["status"], job["lane"], job["priority"], job["seed"], job["attempts"]) == ("completed", "realtime", 2, 11, 1)
    assert job["started_at"] and job["finished_at"] and job["image_url"]

    stored = app.media.get(job["result_key"])  # written by the worker, straight to the store
    assert Image.open(io.BytesIO(stored)).size == (96, 64)
    served = app.http.get(f"/jobs/{job['id']}/image")
    assert (served.status_code, served.headers["content-type"], served.content) == (200, "image/png", stored)
    row = app.jobs.get(job["id"])
    assert (row.status, row.result_key) == ("completed", f"images/{job['id']}.png")


def test_a_batch_runs_to_completion_in_the_batch_lane(app: RunningApp) -> None:
    accepted = app.submit_batch([{"prompt": f"tile {index}"} for index in range(3)])
    jobs = app.wait_for([str(job_id) for job_id in accepted["job_ids"]])
    assert {(job["lane"], job["priority"], job["batch_id"]) for job in jobs} == {("batch", 8, accepted["batch_id"])}
    assert all(app.media.exists(job["result_key"]) for job in jobs)
    listed = app.http.get("/jobs", params={"batch_id": accepted["batch_id"]}).json()
    assert sorted(job["id"] for job in listed) == sorted(accepted["job_ids"])


def test_bad_input_is_refused_with_the_field_named_and_nothing_stored(app: RunningApp) -> None:
    before = app.jobs.count_by_status()
    cases = [
        ("/generation/single", {"prompt": "x", "width": 100}, "width"),
        ("/generation/single", {"prompt": ""}, "prompt"),
        ("/generation/single", {"prompt": "x", "priority": "urgent"}, "priority"),
        ("/generation/batch", {"items": [{"prompt": "ok"}, {"prompt": "x", "num_inference_steps": 0}]}, "items.1.num_inference_steps"),
        ("/generation/batch", {"items": []}, "items"),
    ]
    for path, body, field in cases:
        response = app.http.post(path, json=body)
        assert response.status_code == 422, response.text
        assert response.json()["message"].startswith(f"{field}:"), response.json()
    assert app.http.get("/jobs", params={"status": "bogus"}).status_code == 422
    assert app.jobs.count_by_status() == before


def test_a_full_queue_answers_429_with_retry_after_and_stores_nothing(app: RunningApp) -> None:
    before = app.jobs.count_by_status()
    response = app.http.post("/generation/batch", json={"items": [{"prompt": "p", "width": 64, "height": 64}] * 21})
    assert response.status_code == 429
    assert int(response.headers["retry-after"]) >= 1
    assert "batch queue is full" in response.json()["detail"]
    assert app.jobs.count_by_status() == before


def test_unknown_jobs_and_cancelling(app: RunningApp) -> None:
    assert app.http.get(f"/jobs/{uuid.uuid4()}").status_code == 404
    assert app.http.delete(f"/jobs/{uuid.uuid4()}").status_code == 404
    assert app.http.get("/jobs/not-a-uuid").status_code == 422

    blocker = app.submit(prompt="keeps the worker busy", num_inference_steps=100)["id"]
    app.wait_for([blocker], statuses=("running",), timeout_s=60)
    waiting = app.submit(prompt="never runs", priority=4)["id"]
    cancelled = app.http.delete(f"/jobs/{waiting}")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert app.http.get(f"/jobs/{waiting}/image").status_code == 409

    app.wait_for([blocker])
    assert app.http.delete(f"/jobs/{blocker}").status_code == 409  # finished jobs stay finished
    assert app.job(waiting)["status"] == "cancelled"
    assert app.job(waiting)["started_at"] is None


def test_status_shows_queues_and_workers(app: RunningApp) -> None:
    status = app.http.get("/status").json()
    assert set(status["queues"]) == {"realtime", "batch"}
    [worker] = status["workers"]
    assert (worker["device"], worker["slots"], worker["mode"], worker["health"]) == ("cpu", 1, "cpu", "healthy")
    assert app.http.get("/health").json() == {"status": "ok"}
