"""Batch names (issue 12), through the HTTP API and the batch driver: a batch is called what its
submitter picks, `GET /jobs?batch_id=` lists it by that name, and submitting it again makes
nothing twice and refuses, naming them, the items that ask for other images than their jobs."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from serve_app.batch import main as batch_main
from tests.ray_app import RunningApp

SMALL = {"width": 64, "height": 64, "num_inference_steps": 4}
ENDED = ("completed", "failed", "cancelled")
RULE = "1 to 64 letters, digits, '.', '_' or '-', the first a letter or a digit"


class User:
    def __init__(self, app: RunningApp) -> None:
        self.name = f"user-{uuid.uuid4().hex[:8]}"
        self.key = app.key_for(self.name)
        self.http = app.client(self.key)

    def post(self, name: str | None, *prompts: str, headers: dict[str, str] | None = None, **body: Any) -> httpx.Response:
        items = [{"prompt": prompt, **SMALL} for prompt in prompts]
        return self.http.post("/generation/batch", json={"items": items, "batch_id": name, **body}, headers=headers)

    def listed(self, name: str, **params: Any) -> list[str]:
        response = self.http.get("/jobs", params={"batch_id": name, "limit": 1000, **params})
        assert response.status_code == 200, response.text
        return [job["id"] for job in response.json()]


def accepted(response: httpx.Response, status: int = 202) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.fixture
def users(app: RunningApp) -> Iterator[list[User]]:
    """Two fresh users; their jobs have ended when the test is over: the batch lane holds 20."""
    made = [User(app), User(app)]
    try:
        yield made
    finally:
        for user in made:
            app.wait_for([job["id"] for job in user.http.get("/jobs", params={"limit": 1000}).json()], ENDED)
            user.http.close()


def test_a_named_batch_is_its_jobs_batch_id_and_lists_by_it(users: list[User]) -> None:
    ann = users[0]
    batch = accepted(ann.post("nightly-2026-12-01", "a kite", "a fox"))
    assert (batch["batch_id"], batch["existing_job_ids"]) == ("nightly-2026-12-01", [])
    assert {job["batch_id"] for job in batch["jobs"]} == {"nightly-2026-12-01"}
    assert sorted(ann.listed("nightly-2026-12-01")) == sorted(batch["job_ids"])

    unnamed = accepted(ann.post(None, "an owl"))
    assert str(uuid.UUID(unnamed["batch_id"])) == unnamed["batch_id"]  # none given: a new UUID, as before
    assert ann.listed(unnamed["batch_id"].upper()) == unnamed["job_ids"]  # any spelling of a UUID names it


def test_a_batch_sent_again_makes_nothing_twice_and_queues_its_new_items(users: list[User]) -> None:
    ann = users[0]
    first = accepted(ann.post("nightly", "a kite", "a fox"))
    again = accepted(ann.post("nightly", "a kite", "a fox"), 200)
    assert again["job_ids"] == again["existing_job_ids"] == first["job_ids"]
    next_chunk = accepted(ann.post("nightly", "an owl", first_index=2))
    assert next_chunk["existing_job_ids"] == []
    whole = accepted(ann.post("nightly", "a kite", "a fox", "an owl", "a bee"))
    assert whole["existing_job_ids"] == [*first["job_ids"], *next_chunk["job_ids"]]
    assert whole["job_ids"][:3] == whole["existing_job_ids"]
    assert sorted(ann.listed("nightly")) == sorted(whole["job_ids"])
    # Another priority is no other image (and a retry raises a job's): the job is found as it is.
    assert accepted(ann.post("nightly", "a kite", priority="high"), 200)["jobs"][0]["priority"] == 8


def test_an_item_that_asks_for_another_image_is_refused_naming_it_and_nothing_is_stored(users: list[User]) -> None:
    ann = users[0]
    first = accepted(ann.post("nightly", "a kite", "a fox"))
    refused = ann.post("nightly", "a kite", "a red fox", "an owl")
    assert refused.status_code == 409, refused.text
    body = refused.json()
    assert body["changed"] == [
        {"index": 1, "job_id": first["job_ids"][1], "fields": ["prompt"], "message": "prompt was 'a fox', now 'a red fox'"}
    ]
    assert body["detail"] == (
        "batch nightly: 1 item(s) ask for other images than their jobs stored already, and nothing of this request "
        "was stored (item 1: prompt was 'a fox', now 'a red fox'). Send them as they were, or under another batch name."
    )
    assert sorted(ann.listed("nightly")) == sorted(first["job_ids"])  # no owl either
    # The kite gave no seed: its job's was drawn from its id, and any other is another image.
    reseeded = ann.http.post(
        "/generation/batch", json={"batch_id": "nightly", "items": [{"prompt": "a kite", **SMALL, "seed": 5}]}
    )
    assert reseeded.status_code == 409 and reseeded.json()["changed"][0]["fields"] == ["seed"]


def test_idempotency_keys_answer_first_and_a_refused_request_spends_none(users: list[User]) -> None:
    ann = users[0]
    first = accepted(ann.post("keyed", "a kite", headers={"Idempotency-Key": "k1"}))
    replay = accepted(ann.post("keyed", "a kite", headers={"Idempotency-Key": "k1"}), 200)
    assert replay["job_ids"] == replay["existing_job_ids"] == first["job_ids"]
    mismatch = ann.post("another-name", "a kite", headers={"Idempotency-Key": "k1"})
    assert mismatch.status_code == 422 and "already used for a different request" in mismatch.text

    assert ann.post("keyed", "a red kite", headers={"Idempotency-Key": "k2"}).status_code == 409
    # Had the refused request spent k2, this other body would be a mismatch.
    grown = accepted(ann.post("keyed", "a kite", "a fox", headers={"Idempotency-Key": "k2"}))
    assert grown["existing_job_ids"] == first["job_ids"]
    assert accepted(ann.post("keyed", "a kite", "a fox"), 200)["job_ids"] == grown["job_ids"]  # no key: the same jobs


def test_two_users_with_one_name_see_and_touch_only_their_own(app: RunningApp, users: list[User]) -> None:
    ann, bob = users
    name = f"shared-{uuid.uuid4().hex[:8]}"
    anns = accepted(ann.post(name, "a kite"))
    bobs = accepted(bob.post(name, "a kite"))
    assert bobs["existing_job_ids"] == [] and bobs["job_ids"] != anns["job_ids"]  # bob's run adopts nothing of ann's
    refused = bob.post(name, "a red kite")
    assert refused.status_code == 409 and refused.json()["changed"][0]["job_id"] == bobs["job_ids"][0]
    assert (ann.listed(name), bob.listed(name)) == (anns["job_ids"], bobs["job_ids"])
    assert sorted(job["id"] for job in app.http.get("/jobs", params={"batch_id": name}).json()) == sorted(
        anns["job_ids"] + bobs["job_ids"]
    )  # an admin sees each user's batch of that name
    assert [job["id"] for job in app.http.get("/jobs", params={"batch_id": name, "owner": ann.name}).json()] == anns["job_ids"]


def test_a_bad_batch_name_is_422_naming_batch_id(users: list[User]) -> None:
    ann = users[0]
    for name in ("two words", "-leading", "x" * 65):
        for response in (ann.http.get("/jobs", params={"batch_id": name}), ann.post(name, "a kite")):
            assert response.status_code == 422, response.text
            assert response.json()["message"] == f"batch_id: Value error, {name!r} is not a batch name: {RULE}"


def test_a_batch_is_listed_page_after_page(users: list[User]) -> None:
    ann = users[0]
    batch = accepted(ann.post("paged", *[f"prompt {n}" for n in range(5)]))
    pages: list[list[str]] = []
    after = None
    while page := ann.listed("paged", limit=2, **({"after": after} if after else {})):
        pages.append(page)
        after = page[-1]
    assert [len(page) for page in pages] == [2, 2, 1]
    assert sorted(job_id for page in pages for job_id in page) == sorted(batch["job_ids"])


def test_the_driver_runs_a_name_again_and_names_the_lines_edited_since(
    app: RunningApp, users: list[User], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ann = users[0]
    keys = tmp_path / "ann.key"
    keys.write_text(ann.key + "\n")
    keys.chmod(0o600)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red kite\n\na blue kite\na green kite\n")
    arguments = [str(prompts), "--url", app.url, "--api-key-file", str(keys), "--batch-id", "kites", "--chunk-size", "2"]

    assert batch_main(arguments) == 0
    assert "3 job(s) queued in 2 request(s)" in capsys.readouterr().out
    assert batch_main(arguments) == 0
    assert "0 job(s) queued in 2 request(s); 3 made by an earlier run" in capsys.readouterr().out

    prompts.write_text("a pink kite\n\na blue kite\na green kite\na yellow kite\n")
    assert batch_main(arguments) == 2
    assert capsys.readouterr().err.strip() == (
        f"batch: error: 1 line(s) of {prompts} ask for other images than the jobs an earlier run of batch kites made "
        f"for them:\n  {prompts}:1: prompt was 'a red kite', now 'a pink kite'\n"
        "Nothing of their chunks (2 lines each) was submitted; the other chunks were. Put those lines back as they "
        "were, or run the edited file under a new --batch-id."
    )
    prompts_listed = sorted(job["prompt"] for job in ann.http.get("/jobs", params={"batch_id": "kites"}).json())
    assert prompts_listed == ["a blue kite", "a green kite", "a red kite", "a yellow kite"]  # the second chunk went
