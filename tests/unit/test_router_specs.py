"""What the router reads back from stored rows (at start-up and when reconciling): one row it cannot
read must not keep it from starting."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

from scheduling.router import _specs
from storage.models import GenerationJob


def row(**meta: object) -> GenerationJob:
    return GenerationJob(
        id=uuid.uuid4(), lane="batch", priority=8, prompt="p", width=64, height=64, num_inference_steps=4,
        guidance_scale=7.5, seed=1, status="pending", meta=meta, created_at=datetime(2026, 12, 1, tzinfo=timezone.utc),
    )  # fmt: skip


def test_an_unreadable_row_is_left_alone_and_the_others_are_taken() -> None:
    good = row(failures=1)
    edited_by_hand = row(degraded={"history": [{"at": "yesterday", "reason": "x", "retry_after_seconds": 5}]})
    bad_retry = row(retry={"not_before": "soon"})
    [spec] = _specs([edited_by_hand, good, bad_retry])
    assert (spec.job_id, spec.failures, spec.arrival) == (str(good.id), 1, datetime(2026, 12, 1, tzinfo=timezone.utc).timestamp())
