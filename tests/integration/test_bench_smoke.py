"""A smoke run of the serving benchmarks (bench/serving.py: scenarios 1-4 of issue 11) at tiny sizes.

One run of `python -m bench.serving`, as `make bench` runs it, in a shell of its own (its own Ray head,
SEIDRA_HOME and ports, nothing of this session's cluster inherited): every scenario on every
deployment it needs, the batching scenario at batch sizes 1 and 2. The tests check what the run did
(fields, counts, settings, the record), never how fast it was.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.seidra_command import NOT_INHERITED

SMOKE_ARGS = [
    "--size", "32", "--realtime-steps", "4", "--batch-steps", "20", "--slice-steps", "2",
    "--idle-jobs", "3", "--loaded-jobs", "4", "--interval", "0.5", "--batch-depth", "2",
    "--batch-sizes", "1", "2", "--batching-calls", "2", "--batching-rounds", "2",
    "--low-waiting", "20", "--high-waiting", "60", "--chunk", "10", "--probes", "3",
]  # fmt: skip


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> tuple[dict[str, Any], str]:
    work = tmp_path_factory.mktemp("bench")
    document = work / "benchmarks.md"
    document.write_text("# Benchmarks\n")
    env = {key: value for key, value in os.environ.items() if not key.startswith(NOT_INHERITED)}
    env.update(SEIDRA_HOME=str(work / "home"), SEIDRA_MODEL=str(tiny_model), HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "bench.serving", *SMOKE_ARGS, "--out", str(work / "report.json"), "--record", str(document)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-5000:]
    return json.loads((work / "report.json").read_text()), document.read_text()


def test_every_deployment_ran_with_the_settings_it_asked_for(smoke: tuple[dict[str, Any], str]) -> None:
    report, _ = smoke
    deployments = report["deployments"]
    assert list(deployments) == ["sliced", "whole", "fifo", "batch-2"]
    assert deployments["sliced"]["settings"]["SEIDRA_STEPS_PER_DISPATCH"] == "2"
    assert deployments["whole"]["settings"]["SEIDRA_STEPS_PER_DISPATCH"] == "0"
    assert deployments["fifo"]["settings"]["SEIDRA_QUEUE_POLICY"] == "fifo"
    assert deployments["batch-2"]["settings"]["SEIDRA_MAX_BATCH_SIZE"] == "2"
    assert all(deployment["settings"]["SEIDRA_AUTH"] == "off" for deployment in deployments.values())
    assert all(not deployment["ignored_settings"] for deployment in deployments.values())


def test_latency_every_realtime_job_completed_and_the_batch_backlog_is_accounted_for(smoke: tuple[dict[str, Any], str]) -> None:
    report, _ = smoke
    assert set(report["latency"]) == {"sliced", "whole", "fifo"}
    for result in report["latency"].values():
        assert result["realtime_jobs"] == {"completed": 3 + 4}
        assert result["idle"]["end_to_end_ms"]["count"] == 3 and result["loaded"]["queue_wait_ms"]["count"] == 4
        assert result["loaded"]["end_to_end_ms"]["p95"] >= result["loaded"]["end_to_end_ms"]["p50"] > 0
        # The lane was kept full: batch jobs ran, and what was left when the realtime jobs were done was cancelled.
        assert set(result["batch_jobs"]) <= {"completed", "cancelled"} and result["batch_jobs"].get("completed", 0) >= 1
        assert result["batch_completed_in_window"] <= result["batch_jobs"]["completed"]
        assert result["loaded_over_idle"]["end_to_end_p95"] > 0
        assert not any(int(status) >= 500 for status in result["responses_by_status"])


def test_batching_every_image_completed_through_seidra_and_the_bare_pipeline(smoke: tuple[dict[str, Any], str]) -> None:
    report, _ = smoke
    assert set(report["batching"]) == {"1", "2"}
    for size, entry in report["batching"].items():
        images = 2 * int(size)  # two calls a round
        assert entry["seidra"]["jobs"] == {"completed": 2 * images} and entry["seidra"]["images_per_s"] > 0
        assert (
            entry["bare"]["batch_size"] == int(size)
            and entry["bare"]["images"] == 2 * images
            and entry["bare"]["torch_threads"] == 1
        )
        assert [round_["seidra"]["jobs"] for round_ in entry["rounds"]] == [{"completed": images}] * 2
        parts = entry["seidra"]["breakdown"]
        # Every image was made in a call of at most `size` jobs, and the pipeline's share is part of the span.
        assert 2 * 2 <= parts["calls"] <= 2 * images
        assert 0 < parts["pipeline_s"] <= parts["span_s"] and parts["between_calls_s"] >= 0


def test_router_levels_were_reached_and_probed(smoke: tuple[dict[str, Any], str]) -> None:
    report, _ = smoke
    router = report["router"]
    assert router["deployment"] == "whole"
    for level, figures in router["levels"].items():
        assert figures["waiting"] == int(level)  # the paused lane kept every submitted job
        assert figures["probe_jobs"] == {"completed": 3} and figures["non_inference_ms"]["count"] == 3
        assert figures["submissions_per_s"] > 0 and figures["router_rss_mib"] > 0
    assert router["levels"]["60"]["fill_submissions_per_s"] > 0


def test_the_record_has_the_table_the_targets_and_the_raw_json(smoke: tuple[dict[str, Any], str]) -> None:
    report, document = smoke
    assert "### Serving: realtime latency, slice cost, batching, router (bench.serving), " in document
    assert "- command: `python -m bench.serving --size 32" in document
    assert "| deployment fifo | SEIDRA_STEPS_PER_DISPATCH=0, SEIDRA_QUEUE_POLICY=fifo |" in document
    verdicts = {target["target"]: target["verdict"] for target in report["targets"]}
    assert len(verdicts) == 3 + 2 + 5  # latency; SEIDRA / bare per batch size (no 4 / 1 without size 4); router
    assert set(verdicts.values()) <= {"met", "missed"}
    assert all(f"| {name} |" in document for name in verdicts)
