"""Batch names (issue 12): what a batch may be called, the ids and seeds its items get from it, how a
changed item is told, and the commands that take a name."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from pydantic import ValidationError

from serve_app.batch import main as batch_main
from serve_app.cli import main as seidra
from serve_app.schemas import BatchConflictBody, BatchRequest
from storage.batches import DRAWN_SEEDS, BatchConflict, ChangedJob, batch_job_id, batch_name, drawn_seed

RULE = "1 to 64 letters, digits, '.', '_' or '-', the first a letter or a digit"


@pytest.mark.parametrize("name", ["nightly-2026-12-01", "a", "Run_7.retry", "9" * 64])
def test_a_name_is_letters_digits_and_dot_underscore_dash(name: str) -> None:
    assert batch_name(name) == name


@pytest.mark.parametrize("name", ["", "-nightly", ".hidden", "_x", "two words", "a/b", "a:b", "x" * 65, "naïve", "end\n"])
def test_other_names_are_refused_naming_the_rule(name: str) -> None:
    with pytest.raises(ValueError) as refused:
        batch_name(name)
    assert str(refused.value) == f"{name!r} is not a batch name: {RULE}"


def test_a_uuid_names_the_batch_it_named_when_batch_ids_were_uuids() -> None:
    batch = uuid.uuid4()
    assert {batch_name(spelling) for spelling in (str(batch), str(batch).upper(), batch.hex)} == {str(batch)}


def test_job_ids_derive_from_the_owner_the_name_and_the_index() -> None:
    assert batch_job_id("ann", "nightly", 3) == batch_job_id("ann", "nightly", 3)
    derived = {batch_job_id(owner, name, index) for owner in ("ann", "bob") for name in ("n", "n1") for index in (0, 1, 10)}
    assert len(derived) == 12  # ("n1", 0) is not ("n", 10): the parts are not just run together


def test_items_get_their_ids_from_their_index_and_a_seed_left_out_from_their_id() -> None:
    request = BatchRequest(items=[{"prompt": "a kite"}, {"prompt": "a fox", "seed": 5}], batch_id="nightly", first_index=7)
    jobs = request.to_job_fields("ann", "nightly")
    assert [job["id"] for job in jobs] == [batch_job_id("ann", "nightly", 7), batch_job_id("ann", "nightly", 8)]
    assert [job["seed"] for job in jobs] == [drawn_seed(jobs[0]["id"]), 5]
    assert 0 <= jobs[0]["seed"] < DRAWN_SEEDS
    assert request.to_job_fields("ann", "nightly") == jobs  # sent again: the same jobs, asking for the same images
    assert [job["id"] for job in request.to_job_fields("bob", "nightly")] != [job["id"] for job in jobs]


def test_the_request_names_a_bad_batch_id_and_first_index() -> None:
    with pytest.raises(ValidationError) as refused:
        BatchRequest(items=[{"prompt": "a"}], batch_id="two words", first_index=-1)
    errors = {error["loc"]: error["msg"] for error in refused.value.errors()}
    assert set(errors) == {("batch_id",), ("first_index",)}
    assert errors[("batch_id",)] == f"Value error, 'two words' is not a batch name: {RULE}"
    batch = uuid.uuid4()
    assert BatchRequest(items=[{"prompt": "a"}], batch_id=str(batch).upper()).batch_id == str(batch)
    assert BatchRequest(items=[{"prompt": "a"}]).batch_id is None  # the API names it: a new UUID


def test_a_conflict_names_each_item_by_its_index_and_what_changed() -> None:
    ids = [batch_job_id("ann", "nightly", index) for index in range(14)]
    long_prompt = "a lighthouse at dusk, " * 10
    changed = [ChangedJob(ids[3], {"prompt": (long_prompt, "a fox"), "seed": (1, 2)})]
    changed += [ChangedJob(job_id, {"width": (64, 128)}) for job_id in reversed(ids[4:])]
    body = BatchConflictBody.of(BatchConflict(changed), "nightly", {job_id: index for index, job_id in enumerate(ids)})
    first = body.changed[0]
    assert (first.index, first.job_id, first.fields) == (3, ids[3], ["prompt", "seed"])
    assert first.message == f"prompt was '{long_prompt[:56]}..., now 'a fox'; seed was 1, now 2"
    assert [item.index for item in body.changed] == list(range(3, 14))  # in the batch's order
    assert body.detail.startswith(
        "batch nightly: 11 item(s) ask for other images than their jobs stored already, and nothing of this request "
        "was stored (item 3: prompt was "
    )
    assert "item 12: width was 64, now 128; and 1 more). Send them as they were, or under another batch name." in body.detail


def test_the_commands_refuse_a_bad_name_naming_the_rule(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a kite\n")
    for command in (
        lambda: seidra(["batch", str(prompts), "--batch-id", "two words"]),
        lambda: batch_main([str(prompts), "--batch-id", "a/b"]),
    ):
        with pytest.raises(SystemExit) as exited:
            command()
        assert exited.value.code == 2
        assert f"is not a batch name: {RULE}" in capsys.readouterr().err
