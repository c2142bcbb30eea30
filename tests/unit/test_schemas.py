"""Request validation: each refusal names its field."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError

from serve_app.schemas import LIMITS, BatchRequest, FaultRequest, GenerationRequest, LaneRequest, MaintenanceRequest


def refused_fields(**body: object) -> set[str]:
    with pytest.raises(ValidationError) as refused:
        GenerationRequest(**body)
    return {".".join(str(part) for part in error["loc"]) for error in refused.value.errors()}


def test_defaults_give_a_realtime_job_with_a_drawn_seed() -> None:
    fields = GenerationRequest(prompt="a lighthouse").to_job_fields()
    assert fields["priority"] == 2
    assert (fields["width"], fields["height"]) == (LIMITS.default_image_size,) * 2
    assert fields["num_inference_steps"] == LIMITS.default_inference_steps
    assert isinstance(fields["seed"], int) and fields["seed"] >= 0


def test_a_given_seed_and_named_priority_are_kept() -> None:
    fields = GenerationRequest(prompt="x", seed=7, priority="high").to_job_fields()
    assert (fields["seed"], fields["priority"]) == (7, 0)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "x" * (LIMITS.max_prompt_chars + 1)}, "prompt"),
        ({"prompt": "x", "width": 100}, "width"),
        ({"prompt": "x", "height": LIMITS.max_image_size + 8}, "height"),
        ({"prompt": "x", "width": LIMITS.min_image_size - 8}, "width"),
        ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps"),
        ({"prompt": "x", "num_inference_steps": LIMITS.max_inference_steps + 1}, "num_inference_steps"),
        ({"prompt": "x", "guidance_scale": -1}, "guidance_scale"),
        ({"prompt": "x", "seed": -5}, "seed"),
        ({"prompt": "x", "priority": "urgent"}, "priority"),
        ({"prompt": "x", "priority": 12}, "priority"),
        ({"prompt": "x", "colour": "blue"}, "colour"),
    ],
)
def test_bad_fields_are_named(body: dict[str, object], field: str) -> None:
    assert refused_fields(**body) == {field}


def test_batch_items_take_the_batch_priority_unless_they_set_their_own() -> None:
    batch = BatchRequest(items=[{"prompt": "a"}, {"prompt": "b", "priority": "high"}])
    assert [fields["priority"] for fields in batch.to_job_fields("ann", "nightly")] == [8, 0]
    assert [f["priority"] for f in BatchRequest(items=[{"prompt": "a"}], priority=6).to_job_fields("ann", "nightly")] == [6]


def test_batch_size_is_bounded() -> None:
    with pytest.raises(ValidationError, match="items"):
        BatchRequest(items=[])
    with pytest.raises(ValidationError, match="items"):
        BatchRequest(items=[{"prompt": "p"}] * (LIMITS.max_batch_items + 1))


def test_a_bad_item_is_named_by_its_position() -> None:
    with pytest.raises(ValidationError) as refused:
        BatchRequest(items=[{"prompt": "ok"}, {"prompt": "bad", "width": 63}])
    assert [error["loc"] for error in refused.value.errors()] == [("items", 1, "width")]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"seed": False}, "seed"),
        ({"seed": "7"}, "seed"),
        ({"width": "64"}, "width"),
        ({"width": 64.0}, "width"),
        ({"height": True}, "height"),
        ({"num_inference_steps": "4"}, "num_inference_steps"),
        ({"guidance_scale": True}, "guidance_scale"),
        ({"guidance_scale": "7.5"}, "guidance_scale"),
        ({"priority": True}, "priority"),
        ({"priority": "3"}, "priority"),
        ({"priority": 3.0}, "priority"),
        ({"priority": "HIGH"}, "priority"),
    ],
)
def test_numbers_are_json_numbers_not_booleans_or_strings(body: dict[str, object], field: str) -> None:
    assert refused_fields(prompt="x", **body) == {field}


def test_a_float_field_takes_a_json_integer() -> None:
    assert GenerationRequest(prompt="x", guidance_scale=7).guidance_scale == 7.0


@pytest.mark.parametrize("priority", [True, "3", 3.5])
def test_a_batch_priority_is_an_integer_or_a_name(priority: object) -> None:
    with pytest.raises(ValidationError) as refused:
        BatchRequest(items=[{"prompt": "a"}], priority=priority)
    assert [error["loc"] for error in refused.value.errors()] == [("priority",)]


def test_a_batch_item_with_a_string_number_is_named_by_its_position() -> None:
    with pytest.raises(ValidationError) as refused:
        BatchRequest(items=[{"prompt": "ok"}, {"prompt": "bad", "seed": "1"}])
    assert [error["loc"] for error in refused.value.errors()] == [("items", 1, "seed")]


@pytest.mark.parametrize(
    ("model", "body", "field"),
    [
        (MaintenanceRequest, {"enabled": 1}, "enabled"),
        (MaintenanceRequest, {"enabled": "true"}, "enabled"),
        (LaneRequest, {"paused": 0}, "paused"),
        (FaultRequest, {"temperature_c": "90"}, "temperature_c"),
        (FaultRequest, {"inference_delay_s": True}, "inference_delay_s"),
        (FaultRequest, {"fail_inference": "yes"}, "fail_inference"),
    ],
)
def test_admin_bodies_are_strict_too(model: type[BaseModel], body: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as refused:
        model.model_validate(body)
    assert [error["loc"] for error in refused.value.errors()] == [(field,)]
