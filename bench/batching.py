"""Scenario 3 of issue 11: images/s through SEIDRA at one batch size, and the bare pipeline's.

SEIDRA: `calls x batch_size` compatible jobs (same size, steps and guidance; their own prompts and
seeds) go in as one `/generation/batch` on an idle cluster deployed with
`SEIDRA_MAX_BATCH_SIZE=batch_size`, after a warm-up batch; images/s is their count over first
`started_at` to last `finished_at`. The bare pipeline (`bench.bare_pipeline`) makes as many images in
a subprocess, with the same model, sizes, steps, batch size and torch threads.

The two alternate, `rounds` times, the bare pipeline while SEIDRA is deployed and idle: on a shared
machine the CPU's speed drifts by tens of percent within minutes, and a comparison of two runs
minutes apart measured that drift more than SEIDRA. A round is as many calls at every batch size:
four calls of 8 (two seconds here) measured the noise of the moment. Each round's prompts are new,
so no round finds its text embeddings cached on the replica.

Each SEIDRA round is also broken down from its records (`breakdown`), so that a miss says where the
time went: in the pipeline (its calls' `inference_s`), around it within a call (PNG upload, the
start and completion writes), or between calls (the router's dispatch).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from bench.bare_pipeline import GUIDANCE_SCALE, WARMUP_SEED
from bench.harness import Client, images_per_s, open_client, ratio, seconds_between, timestamp

JOBS_DEADLINE_S = 1800.0
BARE_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class BatchingPlan:
    size: int = 64
    steps: int = 30
    calls: int = 24  # pipeline calls per round: images = calls x batch size
    rounds: int = 3

    def images(self, batch_size: int) -> int:
        return self.calls * batch_size

    def item(self, seed: int) -> dict[str, Any]:
        return {
            "prompt": f"batch {seed}", "width": self.size, "height": self.size,
            "num_inference_steps": self.steps, "guidance_scale": GUIDANCE_SCALE, "seed": seed,
        }  # fmt: skip


def measure_rounds(
    plan: BatchingPlan, batch_size: int, seidra: Callable[[int], dict[str, Any]], bare: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """`rounds` of (bare pipeline, then SEIDRA), and their totals; `seidra(round)` runs one round."""
    rounds = []
    for round_ in range(plan.rounds):
        bare_round = bare()
        seidra_round = seidra(round_)
        rounds.append({"bare": bare_round, "seidra": seidra_round})
    return {
        "seidra": _seidra_total(rounds),
        "bare": _bare_total(rounds),
        "rounds": [
            {**round_, "seidra_over_bare": ratio(round_["seidra"]["images_per_s"], round_["bare"]["images_per_s"])}
            for round_ in rounds
        ],
        "batch_size": batch_size,
    }


async def measure(url: str, plan: BatchingPlan, batch_size: int, round_: int = 0) -> dict[str, Any]:
    """One SEIDRA round: a warm-up batch, then `plan.images(batch_size)` jobs with prompts of this round's own."""
    images = plan.images(batch_size)
    first_seed = round_ * images
    async with open_client(url) as http:
        client = Client(http)
        warmup = await client.submit_batch([plan.item(WARMUP_SEED + first_seed + n) for n in range(batch_size)])
        await client.wait_for(warmup, JOBS_DEADLINE_S)
        job_ids = await client.submit_batch([plan.item(first_seed + n) for n in range(images)])
        jobs = await client.wait_for(job_ids, JOBS_DEADLINE_S)
    return {
        "plan": asdict(plan),
        "batch_size": batch_size,
        "jobs": dict(Counter(job["status"] for job in jobs)),
        "images_per_s": images_per_s(jobs),
        "breakdown": breakdown(jobs),
        "responses_by_status": dict(sorted(client.tally.statuses.items())),
    }


def breakdown(jobs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Where a round's time went, from its completed jobs' records (router's clock).

    A replica runs one call at a time, so on each replica the jobs whose [started_at, finished_at]
    overlap are one call, and the call's pipeline time is its jobs' `metadata.inference_s` (the
    denoising, decoding and PNG encoding, timed on the replica). `in_call_s` is the rest of the calls'
    spans (their first start write to their last completion write: uploads and writes), and
    `between_calls_s` what is left of the round's span: the replica had no call.
    """
    done = [job for job in jobs if job["status"] == "completed"]
    if not done:
        return None
    span_s = seconds_between(min(job["started_at"] for job in done), max(job["finished_at"] for job in done))
    calls = [call for replica_jobs in _by_replica(done).values() for call in _calls(replica_jobs)]
    pipeline_s = sum(max(float(job["metadata"]["inference_s"]) for job in call) for call in calls)
    calls_s = sum(seconds_between(call[0]["started_at"], max(job["finished_at"] for job in call)) for call in calls)
    return {
        "span_s": round(span_s, 3),
        "calls": len(calls),
        "pipeline_s": round(pipeline_s, 3),
        "in_call_s": round(calls_s - pipeline_s, 3),
        "between_calls_s": round(span_s - calls_s, 3) if len(_by_replica(done)) == 1 else None,
        "pipeline_images_per_s": round(len(done) / pipeline_s, 3) if pipeline_s > 0 else None,
    }


def _by_replica(jobs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for job in jobs:
        grouped[str(job["metadata"].get("replica_id"))].append(job)
    return grouped


def _calls(jobs: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    calls: list[list[dict[str, Any]]] = []
    ends = None
    for job in sorted(jobs, key=lambda job: job["started_at"]):
        if ends is not None and timestamp(job["started_at"]) < ends:
            calls[-1].append(job)
            ends = max(ends, timestamp(job["finished_at"]))
        else:
            calls.append([job])
            ends = timestamp(job["finished_at"])
    return calls


def _seidra_total(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    parts = [round_["seidra"] for round_ in rounds]
    breakdowns = [part["breakdown"] for part in parts if part["breakdown"]]
    jobs: Counter[str] = Counter()
    for part in parts:
        jobs.update(part["jobs"])
    span_s = sum(part["span_s"] for part in breakdowns)
    totals = {
        key: round(sum(part[key] or 0.0 for part in breakdowns), 3) for key in ("pipeline_s", "in_call_s", "between_calls_s")
    }
    return {
        "jobs": dict(jobs),
        "images_per_s": round(jobs["completed"] / span_s, 3) if span_s > 0 else None,
        "breakdown": {"span_s": round(span_s, 3), "calls": sum(part["calls"] for part in breakdowns), **totals},
        "pipeline_images_per_s": round(jobs["completed"] / totals["pipeline_s"], 3) if totals["pipeline_s"] > 0 else None,
    }


def _bare_total(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    parts = [round_["bare"] for round_ in rounds]
    images, elapsed_s = sum(part["images"] for part in parts), sum(part["elapsed_s"] for part in parts)
    return {
        **{key: parts[0][key] for key in ("batch_size", "device", "dtype", "torch_threads")},
        "images": images,
        "elapsed_s": round(elapsed_s, 3),
        "images_per_s": round(images / elapsed_s, 3) if elapsed_s > 0 else None,
    }


def bare(model: str, plan: BatchingPlan, batch_size: int, torch_threads: int) -> dict[str, Any]:
    """The bare pipeline's figures, from a process of its own (its torch threads are its own)."""
    command = [
        sys.executable, "-m", "bench.bare_pipeline", "--model", model, "--batch-size", str(batch_size),
        "--images", str(plan.images(batch_size)), "--size", str(plan.size), "--steps", str(plan.steps),
        "--torch-threads", str(torch_threads),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=BARE_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"bench.bare_pipeline failed ({done.returncode}): {done.stderr[-2000:]}")
    figures: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures
