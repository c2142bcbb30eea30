"""Request validation: each refusal names its field."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from serve_app.schemas import LIMITS, BatchRequest, GenerationRequest


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
    assert [fields["priority"] for fields in batch.to_job_fields()] == [8, 0]
    assert [f["priority"] for f in BatchRequest(items=[{"prompt": "a"}], priority=6).to_job_fields()] == [6]


def test_batch_size_is_bounded() -> None:
    with pytest.raises(ValidationError, match="items"):
        BatchRequest(items=[])
    with pytest.raises(ValidationError, match="items"):
        BatchRequest(items=[{"prompt": "p"}] * (LIMITS.max_batch_items + 1))


def test_a_bad_item_is_named_by_its_position() -> None:
    with pytest.raises(ValidationError) as refused:
        BatchRequest(items=[{"prompt": "ok"}, {"prompt": "bad", "width": 63}])
    assert [error["loc"] for error in refused.value.errors()] == [("items", 1, "width")]
