"""Batches as Ray jobs: `python -m serve_app.batch`, a client of the HTTP API with the caller's key,
submitted through the Ray Jobs API; the key never travels with the job."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from serve_app.batch import main as batch_main
from serve_app.batch import manifest, read_items, submit, wait
from serve_app.cli import batch_entrypoint
from serve_app.client import SeidraClient
from tests.ray_app import RunningApp

KITES = [
    {"prompt": "a red kite", "width": 64, "height": 64, "num_inference_steps": 4},
    {"prompt": "a blue kite", "width": 64, "height": 64, "num_inference_steps": 4, "seed": 5},
    {"prompt": "a green kite", "width": 64, "height": 64, "num_inference_steps": 4},
]


def key_file(app: RunningApp, folder: Path, user: str) -> tuple[str, Path]:
    """A fresh user's key, in a file only its owner reads (what an operator hands the driver)."""
    key = app.key_for(user)
    path = folder / f"{user}.key"
    path.write_text(key + "\n")
    path.chmod(0o600)
    return key, path


def run_ray_job(app: RunningApp, folder: Path, entrypoint: str, secret: str) -> str:
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(app.dashboard_url)
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": str(folder)})
    deadline = time.monotonic() + 240
    while not (status := client.get_job_status(job_id)).is_terminal():
        assert time.monotonic() < deadline, f"Ray job {job_id} still {status}"
        time.sleep(1)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs
    assert_not_shown(client.get_job_info(job_id), secret)
    return logs


def assert_not_shown(info: Any, secret: str) -> None:
    """What the dashboard shows of a Ray job (entrypoint, runtime env, metadata) holds no key."""
    assert secret not in json.dumps(info.__dict__, default=str)


def summary(logs: str) -> dict[str, Any]:
    return json.loads(logs[logs.index('{\n  "batch_id"') :])


def test_a_batch_file_runs_as_a_ray_job_and_a_second_submission_creates_nothing(app: RunningApp, tmp_path: Path) -> None:
    user = f"batch-{uuid.uuid4().hex[:8]}"
    key, keys = key_file(app, tmp_path, user)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(line) for line in KITES) + "\n")
    batch_id = f"kites-{uuid.uuid4().hex[:8]}"
    written = tmp_path / "out" / "manifest.json"
    arguments = f"python -m serve_app.batch prompts.jsonl --batch-id {batch_id} --api-key-file {keys}"

    logs = run_ray_job(app, tmp_path, f"{arguments} --manifest {written}", key)
    assert "3 job(s) queued in 1 request(s)" in logs
    assert f"batch {batch_id}" in logs and "3/3" in logs  # the progress bar
    result = summary(logs)
    assert result["counts"] == {"completed": 3}
    assert [(entry["line"], entry["prompt"]) for entry in result["manifest"]] == [
        (1, "a red kite"), (2, "a blue kite"), (3, "a green kite"),
    ]  # fmt: skip
    assert json.loads(written.read_text()) == result["manifest"]
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    assert all(app.media.exists(entry["result_key"]) for entry in result["manifest"])
    with app.client(key) as own:
        jobs = [own.get(f"/jobs/{entry['job_id']}").json() for entry in result["manifest"]]
        assert {(job["lane"], job["priority"], job["seed"] == 5) for job in jobs} == {
            ("batch", 8, False), ("batch", 8, True),
        }  # fmt: skip

        logs = run_ray_job(app, tmp_path, arguments, key)
        assert "0 job(s) queued in 1 request(s); 3 made by an earlier run" in logs
        assert [entry["job_id"] for entry in summary(logs)["manifest"]] == [entry["job_id"] for entry in result["manifest"]]
        assert len(own.get("/jobs", params={"limit": 1000}).json()) == 3  # the user's own: nothing made twice
        assert {job["id"] for job in own.get("/jobs", params={"batch_id": batch_id}).json()} == {job["id"] for job in jobs}


def test_plain_text_prompts_and_bad_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "prompts.txt"
    text.write_text("a lighthouse\n\na fox in the snow\n")
    assert [(line.number, line.fields.prompt) for line in read_items(text)] == [(1, "a lighthouse"), (3, "a fox in the snow")]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": "x", "width": 100}\n')
    assert batch_main([str(bad)]) == 2  # refused before anything reaches the cluster
    assert capsys.readouterr().err.strip() == f"batch: error: {bad}:2: width: Value error, must be a multiple of 8, got 100"


def test_chunks_carry_the_name_and_their_first_index_and_the_wait_reads_every_page(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Against canned answers: each chunk names the batch and its first item's index, the same when a
    429 is retried; jobs are matched to lines by the order of each chunk's `job_ids`; the wait reads
    the batch's listing page after page."""
    monkeypatch.setattr("serve_app.batch.LIST_LIMIT", 2)
    sent: list[tuple[str, int, list[str]]] = []
    pages: list[str | None] = []
    answers = iter([httpx.Response(429, json={"detail": "the batch lane is full"}, headers={"Retry-After": "0"})])
    listed = [{"id": f"{p}-job", "status": "completed", "result_key": f"{p}.png"} for p in ("three", "two", "one")]

    def api(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            body = json.loads(request.content)
            prompts = [item["prompt"] for item in body["items"]]
            sent.append((body["batch_id"], body["first_index"], prompts))
            refusal = next(answers, None)
            if refusal is not None:
                return refusal
            job_ids = [f"{p}-job" for p in prompts]
            return httpx.Response(202, json={"batch_id": "B", "job_ids": job_ids, "jobs": [], "existing_job_ids": []})
        assert request.url.params["batch_id"] == "B"
        after = request.url.params.get("after")
        pages.append(after)
        start = 0 if after is None else [job["id"] for job in listed].index(after) + 1
        return httpx.Response(200, json=listed[start : start + 2])

    (tmp_path / "p.txt").write_text("one\n\ntwo\nthree\n")
    lines = read_items(tmp_path / "p.txt")
    with SeidraClient("http://seidra.test", transport=httpx.MockTransport(api), sleep=lambda _s: None) as client:
        submitted = submit(client, lines, 8, "B", chunk_size=2)
        entries = manifest(lines, submitted.job_ids, wait(client, "B", submitted.job_ids))
    assert sent == [
        ("B", 0, ["one", "two"]),  # refused with 429, then sent again as it was
        ("B", 0, ["one", "two"]),
        ("B", 2, ["three"]),
    ]
    assert pages == [None, "two-job"]
    assert [(e["line"], e["prompt"], e["job_id"], e["result_key"]) for e in entries] == [
        (1, "one", "one-job", "one.png"), (3, "two", "two-job", "two.png"), (4, "three", "three-job", "three.png"),
    ]  # fmt: skip


def test_the_driver_needs_a_valid_key(
    app: RunningApp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("SEIDRA_API_KEY", raising=False)
    monkeypatch.delenv("SEIDRA_API_KEY_FILE", raising=False)
    (tmp_path / "p.txt").write_text("a kite\n")
    assert batch_main([str(tmp_path / "p.txt"), "--url", app.url]) == 2
    assert "POST /generation/batch failed with HTTP 401" in capsys.readouterr().err
    assert batch_main([str(tmp_path / "p.txt"), "--url", app.url, "--api-key-file", str(tmp_path / "none")]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"batch: error: --api-key-file: cannot read {tmp_path / 'none'}: No such file or directory"
    )


def test_the_entrypoint_quotes_every_argument_and_runs_nothing(tmp_path: Path) -> None:
    """Ray runs a job's entrypoint through a shell: a stand-in `python` records the argv it gets."""
    name = "a b $(touch x).txt"
    keys = tmp_path / "my keys" / "key;touch y"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text('#!/bin/sh\nfor arg in "$@"; do printf "%s\\n" "$arg"; done\n')
    (bin_dir / "python").chmod(0o755)
    entrypoint = batch_entrypoint(name, "B", "low", keys, "http://h:8000/?a=1&b=2")
    ran = subprocess.run(entrypoint, shell=True, cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})  # fmt: skip
    assert ran.stdout.splitlines() == [
        "-m", "serve_app.batch", name, "--batch-id", "B", "--priority", "low",
        "--api-key-file", str(keys), "--url", "http://h:8000/?a=1&b=2",
    ]  # fmt: skip
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_seidra_batch_wraps_the_jobs_api(app: RunningApp, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from serve_app.cli import main as seidra

    key, keys = key_file(app, tmp_path, f"cli-{uuid.uuid4().hex[:8]}")
    prompts = tmp_path / "a b $(touch x).txt"  # one argument, and nothing run
    prompts.write_text("a paper lantern\n")
    arguments = ["--address", app.dashboard_url, "--api-key-file", str(keys), "--batch-id", "lanterns.v2"]
    assert seidra(["batch", str(prompts), *arguments, "--wait"]) == 0
    out = capsys.readouterr().out
    assert "Batch lanterns.v2 (1 prompt(s)) submitted as Ray job" in out and "ray job logs -f" in out
    assert '"completed": 1' in out and '"prompt": "a paper lantern"' in out
    assert key not in out

    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert seidra(["batch", str(empty), "--address", app.dashboard_url]) == 1
    assert "holds no prompts" in capsys.readouterr().err


def test_scripts_submit_batch_uses_plain_ray_job_submit(app: RunningApp, tmp_path: Path) -> None:
    key, _keys = key_file(app, tmp_path, f"script-{uuid.uuid4().hex[:8]}")
    prompts = tmp_path / "two prompts.txt"
    prompts.write_text("a glass of water\na bowl of cherries\n")
    script = Path(__file__).parents[2] / "scripts" / "submit-batch.sh"
    done = subprocess.run(
        # A key file relative to here: the script makes it absolute for the driver's own working dir.
        [str(script), prompts.name, "--api-key-file", _keys.name, "--batch-id", "groceries-2026-12-01"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "RAY_API_SERVER_ADDRESS": app.dashboard_url},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert '"completed": 2' in done.stdout and key not in done.stdout + done.stderr
    assert '"batch_id": "groceries-2026-12-01"' in done.stdout


def test_the_operators_ray_commands(app: RunningApp, tmp_path: Path) -> None:
    """What the README tells an operator to run, against the test cluster."""
    from ray.job_submission import JobSubmissionClient

    def ray_cli(*args: str) -> str:
        done = subprocess.run(list(args), capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return done.stdout

    _key, keys = key_file(app, tmp_path, f"operator-{uuid.uuid4().hex[:8]}")
    (tmp_path / "prompts.txt").write_text("a teapot\n")
    job_id = JobSubmissionClient(app.dashboard_url).submit_job(
        entrypoint=f"python -m serve_app.batch prompts.txt --api-key-file {keys}", runtime_env={"working_dir": str(tmp_path)}
    )
    logs = ray_cli("ray", "job", "logs", "-f", job_id, "--address", app.dashboard_url)
    assert "1 job(s) queued" in logs and '"completed": 1' in logs
    assert job_id in ray_cli("ray", "job", "list", "--address", app.dashboard_url)
    status = ray_cli("serve", "status", "--address", app.dashboard_url)
    assert "seidra:" in status and "DiffusionWorker" in status and "RUNNING" in status
    actors = ray_cli("ray", "list", "actors", "--filter", "name=seidra-router", "--address", app.dashboard_url)
    assert "JobRouter" in actors and "seidra" in actors
