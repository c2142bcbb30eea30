"""The live API fuzzed from its own OpenAPI schema with schemathesis, as a user with a key.

Every operation but fault injection (it would disturb the shared test cluster) gets
`SEIDRA_FUZZ_EXAMPLES` generated cases (default 12) in each of schemathesis' positive and negative
modes: a few hundred in `make test`. A longer run:
`SEIDRA_FUZZ_EXAMPLES=200 CI=1 .venv/bin/python -m pytest tests/integration/test_api_fuzz.py`.
Every answer must be no 5xx and a status the schema documents for its operation; a refusal (4xx)
must leave the fuzzing user's jobs in the database as they were. Every problem found is listed.

The cluster has one CPU worker with a 4 s inference timeout: accepted submissions are made cheap
(64x64, at most 4 steps), and the fuzzing user's unfinished jobs are cancelled before each case, so
that a `?wait=true` case waits for its own job alone.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import status_code_conformance

from storage.job_status import JobStatus
from tests.ray_app import RunningApp

EXAMPLES_PER_MODE = int(os.environ.get("SEIDRA_FUZZ_EXAMPLES", "12"))
FUZZ_USER = "fuzzer"
EXCLUDED_OPERATIONS = {"POST /admin/faults", "DELETE /admin/faults"}
CHEAP_JOB = {"width": 64, "height": 64, "num_inference_steps": 4}
OPENAI_IMAGES = "/v1/images/generations"
REQUEST_TIMEOUT_S = 120  # above the API's ?wait=true wait (SEIDRA_WAIT_TIMEOUT_S, 60 s)


def stored_jobs(app: RunningApp) -> int:
    return sum(app.jobs.count_by_status(owner=FUZZ_USER).values())


def cancel_unfinished(app: RunningApp, client: httpx.Client) -> None:
    for status in (JobStatus.PENDING, JobStatus.RUNNING):
        for job in app.jobs.list(status=status, owner=FUZZ_USER, limit=1000):
            client.delete(f"/jobs/{job.id}")  # 409 when it ended meanwhile: as good


def cheapen(body: Any, path: str) -> None:
    """Cap a valid submission's size and steps (and images), in place: anything else is left as generated."""
    if not isinstance(body, dict):
        return
    if path == OPENAI_IMAGES:
        extension = body.get("seidra") or {}
        extension["num_inference_steps"] = min(extension.get("num_inference_steps", 4), 4)
        body.update(size="64x64", n=min(body.get("n") or 1, 2), seidra=extension)
        return
    for item in body.get("items", [body]):
        for field, ceiling in CHEAP_JOB.items():
            item[field] = min(item.get(field, ceiling), ceiling)


def problems_with(case: schemathesis.Case, response: Any, jobs_before: int, jobs_after: int) -> list[str]:
    found: list[str] = []
    try:
        case.validate_response(response, checks=[not_a_server_error, status_code_conformance])
    except FailureGroup as failures:
        found += [f"{case.operation.label}: {response.status_code}, {failure.title}" for failure in failures.exceptions]
    if 400 <= response.status_code < 500 and jobs_after != jobs_before:
        found.append(f"{case.operation.label}: {response.status_code} stored {jobs_after - jobs_before} job(s)")
    return found


def fuzz(operation: Any, mode: GenerationMode, exercise: Callable[[schemathesis.Case], None]) -> None:
    # Generation only: every problem is collected rather than raised, so there is nothing to shrink.
    @settings(
        max_examples=EXAMPLES_PER_MODE,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case) -> None:
        if mode is GenerationMode.POSITIVE and case.operation.path.startswith(("/generation/", OPENAI_IMAGES)):
            cheapen(case.body, case.operation.path)
        exercise(case)

    try:
        run()
    except Unsatisfiable:
        # An operation without parameters or body (GET /health) has nothing to make invalid.
        if mode is GenerationMode.POSITIVE:
            raise


def test_fuzzed_requests_get_no_5xx_documented_statuses_and_store_nothing_when_refused(app: RunningApp) -> None:
    key = app.key_for(FUZZ_USER, submissions_per_minute=1_000_000)
    headers = {"Authorization": f"Bearer {key}"}
    with app.client(key) as client:
        schema = schemathesis.openapi.from_dict(client.get("/openapi.json").raise_for_status().json())
        problems = fuzz_every_operation(app, client, schema, headers)
    assert not problems, "\n".join(sorted(set(problems)))


def fuzz_every_operation(app: RunningApp, client: httpx.Client, schema: Any, headers: dict[str, str]) -> list[str]:
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {operation.label for operation in operations} >= EXCLUDED_OPERATIONS | {"POST /generation/single"}
    answered: set[str] = set()
    problems: list[str] = []

    def exercise(case: schemathesis.Case) -> None:
        cancel_unfinished(app, client)
        before = stored_jobs(app)
        response = case.call(base_url=app.url, headers=headers, timeout=REQUEST_TIMEOUT_S)
        answered.add(case.operation.label)
        problems.extend(problems_with(case, response, before, stored_jobs(app)))

    try:
        for operation in operations:
            if operation.label not in EXCLUDED_OPERATIONS:
                for mode in GenerationMode:
                    fuzz(operation, mode, exercise)
    finally:
        cancel_unfinished(app, client)
    assert answered == {operation.label for operation in operations} - EXCLUDED_OPERATIONS
    return problems


@pytest.mark.parametrize(
    ("method", "path", "body", "field"),
    [
        ("POST", "/generation/single", {"prompt": "x", "seed": False}, "seed"),
        ("POST", "/generation/single", {"prompt": "x", "width": "64"}, "width"),
        ("POST", "/generation/single", {"prompt": "x", "priority": True}, "priority"),
        ("POST", "/generation/single", {"prompt": "x", "priority": "3"}, "priority"),
        ("POST", "/generation/batch", {"items": [{"prompt": "x", "num_inference_steps": 4.0}]}, "items.0.num_inference_steps"),
        ("GET", "/jobs?limit=true", None, "limit"),
        ("GET", "/notifications?limit=1.5", None, "limit"),
    ],
)
def test_numbers_are_strict_on_the_live_api(app: RunningApp, method: str, path: str, body: Any, field: str) -> None:
    client = app.client(app.key_for(FUZZ_USER))
    response = client.request(method, path, json=body)
    assert response.status_code == 422, response.text
    assert response.json()["message"].startswith(f"{field}: ")
