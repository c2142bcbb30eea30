"""Scenario 3 of issue 11: images/s through SEIDRA at one batch size, and the bare pipeline's.

SEIDRA: `images` compatible jobs (same size, steps and guidance; their own prompts and seeds) go in
as one `/generation/batch` on an idle cluster deployed with `SEIDRA_MAX_BATCH_SIZE=batch_size`, after
a warm-up batch; images/s is their count over first `started_at` to last `finished_at`. The bare
pipeline (`bench.bare_pipeline`) makes as many images in a subprocess, with the same model, sizes,
steps, batch size and torch threads, while no SEIDRA is deployed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from bench.bare_pipeline import GUIDANCE_SCALE, WARMUP_SEED
from bench.harness import Client, images_per_s, open_client

JOBS_DEADLINE_S = 1800.0
BARE_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class BatchingPlan:
    size: int = 64
    steps: int = 30
    images: int = 32  # per batch size; a multiple of the largest batch size

    def item(self, seed: int) -> dict[str, Any]:
        return {
            "prompt": f"batch {seed}", "width": self.size, "height": self.size,
            "num_inference_steps": self.steps, "guidance_scale": GUIDANCE_SCALE, "seed": seed,
        }  # fmt: skip


async def measure(url: str, plan: BatchingPlan, batch_size: int) -> dict[str, Any]:
    async with open_client(url) as http:
        client = Client(http)
        warmup = await client.submit_batch([plan.item(WARMUP_SEED + n) for n in range(batch_size)])
        await client.wait_for(warmup, JOBS_DEADLINE_S)
        job_ids = await client.submit_batch([plan.item(n) for n in range(plan.images)])
        jobs = await client.wait_for(job_ids, JOBS_DEADLINE_S)
    return {
        "plan": asdict(plan),
        "batch_size": batch_size,
        "jobs": dict(Counter(job["status"] for job in jobs)),
        "images_per_s": images_per_s(jobs),
        "responses_by_status": dict(sorted(client.tally.statuses.items())),
    }


def bare(model: str, plan: BatchingPlan, batch_size: int, torch_threads: int) -> dict[str, Any]:
    """The bare pipeline's figures, from a process of its own (its torch threads are its own)."""
    command = [
        sys.executable, "-m", "bench.bare_pipeline", "--model", model, "--batch-size", str(batch_size),
        "--images", str(plan.images), "--size", str(plan.size), "--steps", str(plan.steps),
        "--torch-threads", str(torch_threads),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=BARE_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"bench.bare_pipeline failed ({done.returncode}): {done.stderr[-2000:]}")
    figures: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures
