"""The generation fields are defined once (`GenerationParams`); the layers that declare them again
for their own reasons (SQL column types, the API's bounds) must name exactly the same fields."""

from __future__ import annotations

from typing import get_type_hints

from scheduling.work import GenerationParams
from serve_app.schemas import GenerationFields, JobView
from storage.batches import IMAGE_FIELDS
from storage.models import GenerationJob

NAMES = set(GenerationParams.names())


def test_the_job_table_and_the_api_name_the_same_generation_fields() -> None:
    assert NAMES == {"prompt", "negative_prompt", "width", "height", "num_inference_steps", "guidance_scale", "seed", "model", "loras"}
    assert NAMES <= set(GenerationJob.model_fields)
    assert NAMES <= set(JobView.model_fields)
    assert set(GenerationFields.model_fields) == NAMES | {"priority"}  # what a request may say
    assert set(IMAGE_FIELDS) == NAMES  # what a batch item submitted again must ask for as its job did


def test_the_response_declares_them_with_generation_params_types() -> None:
    hints = get_type_hints(GenerationParams)
    assert {name: JobView.model_fields[name].annotation for name in NAMES} == hints


def test_a_stored_job_gives_its_params_and_the_pipeline_its_arguments() -> None:
    job = GenerationJob(
        lane="realtime", priority=2, prompt="p", negative_prompt=None, width=64, height=32,
        num_inference_steps=4, guidance_scale=7.5, seed=9,
    )  # fmt: skip
    params = GenerationParams.of(job)
    assert params == GenerationParams("p", None, 64, 32, 4, 7.5, 9)
    assert params.pipeline_arguments() == {
        "prompt": "p", "negative_prompt": None, "width": 64, "height": 32, "guidance_scale": 7.5,
    }  # fmt: skip
