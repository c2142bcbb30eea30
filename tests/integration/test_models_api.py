"""Several models and a LoRA adapter through HTTP on the session's cluster: a job gets the model and
adapter it names, the records say which, an unknown one is refused naming the field with nothing
stored, the replica keeps both models (no reload when jobs alternate), and /status shows what it
holds."""

from __future__ import annotations

import uuid
from typing import Any

from tests.ray_app import ADAPTER, SECOND_MODEL, RunningApp

JOB = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "num_inference_steps": 4, "seed": 21}


def image(app: RunningApp, **fields: Any) -> tuple[dict[str, Any], bytes]:
    response = app.http.post("/generation/single?wait=true", json={**JOB, **fields})
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["status"] == "completed", job
    return job, app.media.get(job["result_key"])


def default_model(app: RunningApp) -> str:
    models = [model["id"] for model in app.http.get("/v1/models").json()["data"]]
    assert models[1:] == [SECOND_MODEL]
    return models[0]


def test_a_job_gets_the_model_and_adapter_it_names_and_its_record_says_which(app: RunningApp) -> None:
    default = default_model(app)
    plain_job, plain = image(app)
    assert (plain_job["model"], plain_job["loras"]) == (default, [])  # named at submission
    second_job, second = image(app, model=SECOND_MODEL)
    inked_job, inked = image(app, model=SECOND_MODEL, loras=[{"name": ADAPTER, "scale": 0.7}])
    assert (second_job["model"], inked_job["loras"]) == (SECOND_MODEL, [{"name": ADAPTER, "scale": 0.7}])
    assert len({plain, second, inked}) == 3  # same seed and prompt: only the model and the adapter differ
    # Each is its model's own image, whichever ran before it on the replica: no adapter leaks.
    assert image(app, model=SECOND_MODEL)[1] == second
    assert image(app)[1] == plain
    listed = app.http.get("/jobs", params={"status": "completed", "limit": 20}).json()
    assert {job["id"]: job["model"] for job in listed}[second_job["id"]] == SECOND_MODEL


def test_the_replica_holds_both_models_and_its_adapter_and_status_says_so(app: RunningApp) -> None:
    default = default_model(app)
    image(app, model=SECOND_MODEL, loras=[{"name": ADAPTER}])
    image(app)
    [worker] = app.status()["workers"]
    # Two models a replica (SEIDRA_MODELS_PER_REPLICA=2): alternating jobs found both loaded.
    assert worker["models"] == {default: [], SECOND_MODEL: [ADAPTER]}


def test_an_unknown_model_or_adapter_is_refused_naming_the_field_and_nothing_is_stored(app: RunningApp) -> None:
    before = app.jobs.count_by_status()
    single = app.http.post("/generation/single", json={**JOB, "model": "dall-e-9"})
    assert single.status_code == 422, single.text
    assert single.json()["message"].startswith("model: unknown model 'dall-e-9'")
    marker = f"unknown-{uuid.uuid4().hex[:6]}"
    batch = app.http.post("/generation/batch", json={"items": [JOB, {**JOB, "loras": [{"name": ADAPTER}, {"name": marker}]}]})
    assert batch.status_code == 422, batch.text
    assert batch.json()["message"] == f"items.1.loras.1.name: unknown LoRA adapter '{marker}'"
    twice = app.http.post("/generation/single", json={**JOB, "loras": [{"name": ADAPTER}, {"name": ADAPTER}]})
    assert twice.status_code == 422 and "loras" in twice.json()["message"]
    assert app.jobs.count_by_status() == before
