"""The OpenAI-compatible layer without Ray: a request's jobs, the errors in OpenAI's shape, the outcome of a wait."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.testclient import TestClient
from pydantic import BaseModel, ValidationError

from deployments.settings import WorkerSettings
from serve_app.openai_api import (
    NO_RETRY,
    ImageGenerationRequest,
    OpenAIErrorMiddleware,
    _in_openai_body,
    _require_completed,
    openai_error,
    refusal,
)
from serve_app.schemas import LIMITS
from serve_app.settings import served_models
from storage.models import GenerationJob


def request(**body: Any) -> ImageGenerationRequest:
    return ImageGenerationRequest.model_validate({"prompt": "a lighthouse", **body})


def refused_param(**body: Any) -> str:
    with pytest.raises(RequestValidationError) as refused:
        request(**body).to_job_fields()
    [where, *_] = {tuple(error["loc"]) for error in refused.value.errors()}
    assert where[0] == "body"
    return ".".join(where[1:])


# ----- a request's jobs -----


def test_n_images_are_n_jobs_with_the_native_fields_and_consecutive_seeds() -> None:
    extension = {"seed": 41, "priority": "low", "num_inference_steps": 3, "negative_prompt": "fog"}
    jobs = request(n=3, size="96x64", user="end-user-7", seidra=extension).to_job_fields()
    assert [job["seed"] for job in jobs] == [41, 42, 43]
    assert {
        (job["width"], job["height"], job["priority"], job["num_inference_steps"], job["negative_prompt"]) for job in jobs
    } == {(96, 64, 8, 3, "fog")}
    assert all(job["meta"] == {"end_user": "end-user-7"} for job in jobs)


def test_the_model_is_each_jobs_and_none_is_the_default() -> None:
    assert {job["model"] for job in request(n=2, model="tiny-b").to_job_fields()} == {"tiny-b"}
    assert request().to_job_fields()[0]["model"] == ""  # named at submission, as for the native routes


def test_defaults_are_the_native_ones_and_seeds_are_drawn_per_image() -> None:
    jobs = request(n=2, size="auto").to_job_fields()
    assert {(job["width"], job["height"], job["priority"], job["num_inference_steps"]) for job in jobs} == {
        (LIMITS.default_image_size, LIMITS.default_image_size, 2, LIMITS.default_inference_steps)
    }
    assert all("meta" not in job for job in jobs)
    assert request(safety_identifier="hashed", user="plain").to_job_fields()[0]["meta"] == {"end_user": "hashed"}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"size": "13x7"}, "size"),
        ({"size": f"{LIMITS.max_image_size + 8}x64"}, "size"),
        ({"prompt": "   "}, "prompt"),
        ({"seidra": {"negative_prompt": "nul \x00"}}, "seidra.negative_prompt"),
        ({"n": 2, "seidra": {"seed": 2**63 - 1}}, "seidra.seed"),  # the second image's seed is past the bound
    ],
)
def test_native_checks_name_the_openai_field(body: dict[str, Any], param: str) -> None:
    assert refused_param(**body) == param


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"n": 11}, "n"),
        ({"n": 0}, "n"),
        ({"n": "2"}, "n"),
        ({"size": "64"}, "size"),
        ({"prompt": ""}, "prompt"),
        ({"response_format": "jpeg"}, "response_format"),
        ({"output_format": "webp"}, "output_format"),
        ({"stream": True}, "stream"),
        ({"colour": "red"}, "colour"),
        ({"seidra": {"num_inference_steps": 0}}, "seidra.num_inference_steps"),
        ({"seidra": {"priority": "urgent"}}, "seidra.priority"),
        ({"seidra": {"width": 64}}, "seidra.width"),
    ],
)
def test_openai_fields_are_checked_by_the_body_model(body: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as refused:
        request(**body)
    assert {".".join(str(part) for part in error["loc"]) for error in refused.value.errors()} == {field}


def test_openai_fields_without_a_diffusers_equivalent_are_accepted_and_ignored() -> None:
    ignored = {"quality": "hd", "style": "vivid", "background": "opaque", "moderation": "low", "output_compression": 80}
    assert len(request(**ignored, output_format="png", stream=False).to_job_fields()) == 1


@pytest.mark.usefixtures("without_session_models")
def test_the_served_model_is_named_by_its_last_path_component() -> None:
    assert served_models(WorkerSettings(model="stabilityai/sd-turbo")) == ["sd-turbo"]
    assert served_models(WorkerSettings(model="/srv/models/tiny/")) == ["tiny"]


# ----- errors in OpenAI's shape -----


def native(detail: Any) -> bytes:
    return json.dumps({"detail": detail}).encode()


def test_validation_errors_are_400_naming_the_first_field() -> None:
    detail = [
        {"loc": ["body", "n"], "msg": "Input should be less than or equal to 10", "type": "less_than_equal"},
        {"loc": ["body", "colour"], "msg": "Extra inputs are not permitted", "type": "extra_forbidden"},
    ]
    status, body = openai_error(422, native(detail))
    assert status == 400
    assert body == {
        "error": {
            "message": "n: Input should be less than or equal to 10; Unrecognized request argument supplied: colour",
            "type": "invalid_request_error",
            "param": "n",
            "code": None,
        }
    }
    assert (
        openai_error(422, native([{"loc": ["body", 12], "msg": "JSON decode error", "type": "json_invalid"}]))[1]["error"][
            "param"
        ]
        is None
    )


def test_an_unknown_adapter_is_named_once_where_the_openai_body_has_it() -> None:
    # What the catalog says of a request of n=2: each image is a job, both at the body's top.
    unknown = {"type": "value_error", "loc": ("body", "loras", 0, "name"), "msg": "unknown LoRA adapter 'x'", "input": "x"}
    [error] = _in_openai_body([unknown, dict(unknown)])
    assert error["loc"] == ("body", "seidra", "loras", 0, "name")
    status, body = openai_error(422, native([error]))
    assert (status, body["error"]["param"]) == (400, "seidra.loras.0.name")
    assert body["error"]["message"] == "seidra.loras.0.name: unknown LoRA adapter 'x'"


@pytest.mark.parametrize(
    ("status", "sent", "kind", "code"),
    [
        (401, 401, "invalid_request_error", "invalid_api_key"),
        (403, 403, "invalid_request_error", None),
        (413, 413, "invalid_request_error", None),
        (422, 400, "invalid_request_error", None),  # a route's refusal of a well-formed body
        (429, 429, "requests", "rate_limit_exceeded"),
        (503, 503, "server_error", None),
    ],
)
def test_native_refusals_keep_their_status_and_message(status: int, sent: int, kind: str, code: str | None) -> None:
    assert openai_error(status, native("the reason")) == (
        sent,
        {"error": {"message": "the reason", "type": kind, "param": None, "code": code}},
    )


def test_a_refusal_in_openai_terms_passes_as_it_is_and_text_becomes_the_message() -> None:
    refused = refusal(404, "no such model", "invalid_request_error", code="model_not_found", param="model")
    assert openai_error(404, native(refused.detail)) == (404, refused.detail)
    assert openai_error(500, b"Internal Server Error")[1]["error"] == {
        "message": "Internal Server Error",
        "type": "server_error",
        "param": None,
        "code": None,
    }


class Counted(BaseModel):
    n: int


def middleware_client() -> TestClient:
    app = FastAPI()

    @app.get("/v1/refused")
    @app.get("/native/refused")
    async def refused() -> None:
        raise HTTPException(429, "slow down", headers={"Retry-After": "3"})

    @app.post("/v1/checked")
    async def checked(body: Counted) -> dict[str, int]:
        return {"n": body.n}

    @app.get("/v1/broken")
    async def broken() -> None:
        raise RuntimeError("a bug")

    app.add_middleware(OpenAIErrorMiddleware)
    return TestClient(app, raise_server_exceptions=False)


def test_the_middleware_translates_v1_answers_only() -> None:
    client = middleware_client()
    translated = client.get("/v1/refused")
    assert (translated.status_code, translated.headers["retry-after"]) == (429, "3")
    assert translated.json()["error"] == {
        "message": "slow down",
        "type": "requests",
        "param": None,
        "code": "rate_limit_exceeded",
    }
    assert client.get("/native/refused").json() == {"detail": "slow down"}
    assert client.post("/v1/checked", json={"n": 2}).json() == {"n": 2}
    invalid = client.post("/v1/checked", json={"n": "two"})
    assert (invalid.status_code, invalid.json()["error"]["param"]) == (400, "n")
    missing = client.get("/v1/nothing-here")
    assert (missing.status_code, missing.json()["error"]["message"]) == (404, "Not Found")


def test_an_unexpected_exception_is_a_500_in_openai_shape() -> None:
    answer = middleware_client().get("/v1/broken")
    assert answer.status_code == 500
    assert answer.json()["error"]["type"] == "server_error"
    assert "a bug" not in answer.text


# ----- the outcome of a wait -----


def job(status: str, error: str | None = None) -> GenerationJob:
    return GenerationJob(
        id=uuid.uuid4(), status=status, lane="realtime", priority=2, prompt="p", width=64, height=64,
        num_inference_steps=4, guidance_scale=7.5, seed=1, error=error,
    )  # fmt: skip


def refusal_of(jobs: list[GenerationJob], batch_id: str | None = None) -> HTTPException:
    with pytest.raises(HTTPException) as refused:
        _require_completed(jobs, batch_id)
    return refused.value


def test_completed_jobs_pass() -> None:
    _require_completed([job("completed"), job("completed")], str(uuid.uuid4()))


def test_jobs_still_running_after_the_wait_are_a_504_naming_them() -> None:
    jobs, batch_id = [job("completed"), job("running")], str(uuid.uuid4())
    refused = refusal_of(jobs, batch_id)
    error = refused.detail["error"]
    assert (refused.status_code, error["type"], error["code"], refused.headers) == (504, "server_error", "timeout", NO_RETRY)
    assert error["job_ids"] == [str(item.id) for item in jobs] and error["batch_id"] == batch_id
    assert all(str(item.id) in error["message"] for item in jobs) and f"GET /jobs?batch_id={batch_id}" in error["message"]


def test_a_failed_job_is_a_500_with_its_error_and_a_cancelled_one_a_409() -> None:
    failed = refusal_of([job("completed"), job("failed", "CUDA out of memory"), job("cancelled")])
    assert (failed.status_code, failed.detail["error"]["code"], failed.headers) == (500, "generation_failed", NO_RETRY)
    assert "CUDA out of memory" in failed.detail["error"]["message"]
    cancelled = refusal_of([job("cancelled")])
    assert (cancelled.status_code, cancelled.detail["error"]["code"]) == (409, "cancelled")
