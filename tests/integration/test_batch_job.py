"""Batches as Ray jobs: `python -m serve_app.batch` submitted through the Ray Jobs API."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest

from serve_app.batch import main as batch_main
from tests.ray_app import RunningApp


def run_ray_job(app: RunningApp, folder: Path, arguments: str) -> str:
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(app.dashboard_url)
    job_id = client.submit_job(entrypoint=f"python -m serve_app.batch {arguments}", runtime_env={"working_dir": str(folder)})
    deadline = time.monotonic() + 240
    while not (status := client.get_job_status(job_id)).is_terminal():
        assert time.monotonic() < deadline, f"Ray job {job_id} still {status}"
        time.sleep(1)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs
    return logs


def summary(logs: str) -> dict:
    return json.loads(logs[logs.index('{\n  "batch_id"') :])


def test_a_batch_file_runs_as_a_ray_job_and_a_second_submission_creates_nothing(app: RunningApp, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    lines = [
        {"prompt": "a red kite", "width": 64, "height": 64, "num_inference_steps": 4},
        {"prompt": "a blue kite", "width": 64, "height": 64, "num_inference_steps": 4, "seed": 5},
        {"prompt": "a green kite", "width": 64, "height": 64, "num_inference_steps": 4},
    ]
    prompts.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    batch_id = str(uuid.uuid4())

    logs = run_ray_job(app, tmp_path, f"prompts.jsonl --batch-id {batch_id}")
    assert "3 job(s) submitted, 0 already known" in logs
    assert f"batch {batch_id}" in logs and "3/3" in logs  # the progress bar
    result = summary(logs)
    assert result["counts"] == {"completed": 3}
    assert [entry["prompt"] for entry in result["manifest"]] == ["a red kite", "a blue kite", "a green kite"]
    manifest = json.loads(app.media.get(result["manifest_key"]))
    assert manifest == result["manifest"]
    assert all(app.media.exists(entry["object_key"]) for entry in manifest)
    jobs = app.http.get("/jobs", params={"batch_id": batch_id}).json()
    assert {(job["lane"], job["priority"]) for job in jobs} == {("batch", 8)}

    again = run_ray_job(app, tmp_path, f"prompts.jsonl --batch-id {batch_id}")
    assert "0 job(s) submitted, 3 already known" in again
    assert len(app.http.get("/jobs", params={"batch_id": batch_id}).json()) == 3


def test_plain_text_prompts_and_bad_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from serve_app.batch import read_items

    text = tmp_path / "prompts.txt"
    text.write_text("a lighthouse\n\na fox in the snow\n")
    assert [item.prompt for item in read_items(text)] == ["a lighthouse", "a fox in the snow"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": "x", "width": 100}\n')
    assert batch_main([str(bad)]) == 2  # refused before anything reaches the cluster
    assert capsys.readouterr().err.strip() == f"batch: error: {bad}:2: width: Value error, must be a multiple of 8, got 100"


def test_seidra_batch_wraps_the_jobs_api(app: RunningApp, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from serve_app.cli import main as seidra

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a paper lantern\n")
    assert seidra(["batch", str(prompts), "--address", app.dashboard_url, "--wait"]) == 0
    out = capsys.readouterr().out
    assert "submitted as Ray job" in out and "ray job logs -f" in out
    assert '"completed": 1' in out

    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert seidra(["batch", str(empty), "--address", app.dashboard_url]) == 1
    assert "holds no prompts" in capsys.readouterr().err


def test_scripts_submit_batch_uses_plain_ray_job_submit(app: RunningApp, tmp_path: Path) -> None:
    import os
    import subprocess

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a glass of water\na bowl of cherries\n")
    script = Path(__file__).parents[2] / "scripts" / "submit-batch.sh"
    batch_id = str(uuid.uuid4())
    done = subprocess.run(
        [str(script), str(prompts), "--batch-id", batch_id],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "RAY_API_SERVER_ADDRESS": app.dashboard_url},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert '"completed": 2' in done.stdout
    assert len(app.http.get("/jobs", params={"batch_id": batch_id}).json()) == 2


def test_the_operators_ray_commands(app: RunningApp, tmp_path: Path) -> None:
    """What the README tells an operator to run, against the test cluster."""
    import subprocess

    from ray.job_submission import JobSubmissionClient

    def ray_cli(*args: str) -> str:
        done = subprocess.run(list(args), capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return done.stdout

    (tmp_path / "prompts.txt").write_text("a teapot\n")
    job_id = JobSubmissionClient(app.dashboard_url).submit_job(
        entrypoint="python -m serve_app.batch prompts.txt", runtime_env={"working_dir": str(tmp_path)}
    )
    logs = ray_cli("ray", "job", "logs", "-f", job_id, "--address", app.dashboard_url)
    assert "1 job(s) submitted" in logs and '"completed": 1' in logs
    assert job_id in ray_cli("ray", "job", "list", "--address", app.dashboard_url)
    status = ray_cli("serve", "status", "--address", app.dashboard_url)
    assert "seidra:" in status and "DiffusionWorker" in status and "RUNNING" in status
    actors = ray_cli("ray", "list", "actors", "--filter", "name=seidra-router", "--address", app.dashboard_url)
    assert "JobRouter" in actors and "seidra" in actors
