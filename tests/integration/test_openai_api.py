"""OpenAI's Images API on the session's cluster, with the official `openai` client as the caller."""

from __future__ import annotations

import base64
import io
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI
from PIL import Image

from tests.ray_app import ADAPTER, SECOND_MODEL, RunningApp

CHEAP = {"num_inference_steps": 4}


@pytest.fixture
def user() -> str:
    return f"openai-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def client(app: RunningApp, user: str) -> Iterator[OpenAI]:
    # No retries: a refusal must reach the test as the client's own error, at once.
    with OpenAI(base_url=f"{app.url}/v1", api_key=app.key_for(user), max_retries=0, timeout=120) as client:
        yield client


def png_size(data: bytes) -> tuple[int, int]:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image.size


def test_models_lists_the_served_models_the_default_first(client: OpenAI, tiny_model: Path) -> None:
    models = client.models.list().data
    assert [(model.id, model.object, model.owned_by) for model in models] == [
        (tiny_model.name, "model", "seidra"),
        (SECOND_MODEL, "model", "seidra"),
    ]


def test_b64_json_is_the_png_of_the_requested_size_recorded_as_the_callers_job(
    app: RunningApp, client: OpenAI, user: str, tiny_model: Path
) -> None:
    made = client.images.generate(
        prompt="a lighthouse",
        model=tiny_model.name,
        size="96x64",
        response_format="b64_json",
        user="end-user-7",
        quality="high",  # OpenAI's, ignored
        extra_body={"seidra": {**CHEAP, "seed": 11}},
    )
    [image] = made.data
    assert image.url is None and png_size(base64.b64decode(image.b64_json or "")) == (96, 64)
    job = app.job(image.model_extra["seidra"]["job_id"])
    assert (job["owner"], job["status"], job["lane"], job["priority"], job["seed"]) == (user, "completed", "realtime", 2, 11)
    assert job["metadata"]["end_user"] == "end-user-7"
    assert (job["width"], job["height"], job["num_inference_steps"], job["batch_id"], job["model"]) == (
        96,
        64,
        4,
        None,
        tiny_model.name,
    )
    assert made.size == "96x64" and made.created > 0


def test_n_urls_are_n_jobs_of_one_submission_with_the_default_model(
    app: RunningApp, client: OpenAI, user: str, tiny_model: Path
) -> None:
    made = client.images.generate(prompt="a fox", n=3, size="64x64", extra_body={"seidra": {**CHEAP, "seed": 5}})
    job_ids = [image.model_extra["seidra"]["job_id"] for image in made.data]
    assert len(set(job_ids)) == 3
    with app.client(app.key_for(user)) as mine:
        for image in made.data:
            # A presigned S3 URL stands alone; the API's own image route needs the key.
            assert image.b64_json is None and image.url and image.url.startswith("http")
            fetched = httpx.get(image.url) if not image.url.startswith(app.url) else mine.get(image.url)
            assert png_size(fetched.raise_for_status().content) == (64, 64)
        listed = {job["id"]: job for job in mine.get("/jobs").json()}
    jobs = [listed[job_id] for job_id in job_ids]
    assert {(job["owner"], job["status"], job["lane"], job["model"]) for job in jobs} == {
        (user, "completed", "realtime", tiny_model.name)
    }
    assert [job["seed"] for job in jobs] == [5, 6, 7]
    [batch_id] = {job["batch_id"] for job in jobs}
    assert batch_id is not None


def test_the_batch_lane_through_the_extension_with_the_model_named(app: RunningApp, client: OpenAI) -> None:
    made = client.images.generate(
        prompt="a tile", model=SECOND_MODEL, size="64x64", extra_body={"seidra": {**CHEAP, "priority": "low"}}
    )
    job = app.job(made.data[0].model_extra["seidra"]["job_id"])
    assert (job["lane"], job["priority"], job["status"], job["model"]) == ("batch", 8, "completed", SECOND_MODEL)


def test_a_lora_adapter_through_the_extension(app: RunningApp, client: OpenAI) -> None:
    def generate(**seidra: object) -> tuple[bytes, dict[str, object]]:
        made = client.images.generate(
            prompt="a tile", model=SECOND_MODEL, size="64x64", response_format="b64_json",
            extra_body={"seidra": {**CHEAP, "seed": 3, **seidra}},
        )  # fmt: skip
        [image] = made.data
        return base64.b64decode(image.b64_json or ""), app.job(image.model_extra["seidra"]["job_id"])

    plain, _ = generate()
    inked, job = generate(loras=[{"name": ADAPTER, "scale": 0.8}])
    assert (job["status"], job["model"], job["loras"]) == ("completed", SECOND_MODEL, [{"name": ADAPTER, "scale": 0.8}])
    assert inked != plain


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"size": "13x7"}, "size"),
        ({"n": 11}, "n"),
        ({"prompt": ""}, "prompt"),
        ({"extra_body": {"seidra": {"num_inference_steps": 0}}}, "seidra.num_inference_steps"),
        ({"extra_body": {"colour": "red"}}, "colour"),
        ({"extra_body": {"seidra": {"loras": [{"name": "no-such-adapter"}]}}}, "seidra.loras.0.name"),
        ({"extra_body": {"seidra": {"loras": [{"name": ADAPTER, "scale": 99}]}}}, "seidra.loras.0.scale"),
    ],
)
def test_a_bad_request_is_the_clients_bad_request_error_naming_the_field(
    app: RunningApp, client: OpenAI, user: str, fields: dict[str, object], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.generate(**{"prompt": "x", "size": "64x64", **fields})  # type: ignore[arg-type]
    assert (refused.value.status_code, refused.value.type, refused.value.param) == (400, "invalid_request_error", param)
    assert param in refused.value.message
    assert app.jobs.count_by_status(owner=user) == {}


def test_a_missing_or_bad_key_is_the_clients_authentication_error(app: RunningApp) -> None:
    stranger = OpenAI(base_url=f"{app.url}/v1", api_key="seidra_0123456789ab_" + "a" * 43, max_retries=0)
    with stranger, pytest.raises(openai.AuthenticationError) as refused:
        stranger.models.list()
    assert (refused.value.code, refused.value.type) == ("invalid_api_key", "invalid_request_error")
    keyless = httpx.post(f"{app.url}/v1/images/generations", json={"prompt": "x"})
    assert (keyless.status_code, keyless.headers["www-authenticate"]) == (401, "Bearer")
    assert set(keyless.json()["error"]) == {"message", "type", "param", "code"}


def test_an_unknown_model_is_not_found(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as refused:
        client.images.generate(prompt="x", model="dall-e-3", size="64x64")
    assert (refused.value.code, refused.value.param) == ("model_not_found", "model")
    assert "dall-e-3" in refused.value.message


def test_an_idempotency_key_replays_the_images_and_the_quota_is_the_keys(app: RunningApp, user: str) -> None:
    once = app.key_for(f"{user}-once", submissions_per_minute=1)
    with OpenAI(base_url=f"{app.url}/v1", api_key=once, max_retries=0) as client:
        first = client.images.generate(
            prompt="a bowl", size="64x64", extra_body={"seidra": CHEAP}, extra_headers={"Idempotency-Key": "bowl-1"}
        )
        again = client.images.generate(
            prompt="a bowl", size="64x64", extra_body={"seidra": CHEAP}, extra_headers={"Idempotency-Key": "bowl-1"}
        )
        assert again.data[0].model_extra == first.data[0].model_extra  # the same job, no token spent
        with pytest.raises(openai.RateLimitError) as refused:
            client.images.generate(prompt="a cup", size="64x64", extra_body={"seidra": CHEAP})
    assert (refused.value.code, refused.value.type) == ("rate_limit_exceeded", "requests")
    assert int(refused.value.response.headers["retry-after"]) >= 1


def test_errors_elsewhere_keep_the_native_shape(app: RunningApp) -> None:
    native = app.http.post("/generation/single", json={"prompt": "x", "width": 100})
    assert native.status_code == 422 and native.json()["message"].startswith("width:")
    unknown = app.http.get("/v1/nothing-here")
    assert (unknown.status_code, unknown.json()["error"]["type"]) == (404, "invalid_request_error")
