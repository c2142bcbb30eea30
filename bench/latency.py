"""Scenarios 1 and 2 of issue 11 against one deployed SEIDRA: realtime latency on an idle cluster and
while the batch lane is saturated with long jobs, and the batch images/s meanwhile.

Idle: `idle_jobs` realtime jobs one after the other. Loaded: batch jobs of `batch_steps` steps are
kept waiting `batch_depth` deep (never fewer, so the lane never drains; never many more, so that a
FIFO queue's wait stays bounded), and `loaded_jobs` realtime jobs arrive every `interval_s` whatever
happened to the earlier ones (open loop): every configuration gets the same realtime load, so its
batch images/s can be compared. End to end is the client's time from POST to the answer of
`?wait=true`; queue wait is the record's `started_at - created_at`. Batch images/s counts the batch
images completed while realtime jobs were in flight (first realtime created_at to last finished_at).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from bench.bare_pipeline import WARMUP_SEED
from bench.harness import STATUS_POLL_S, Client, JobTiming, open_client, ratio, steady_images_per_s, summary_ms, timestamp

JOB_DEADLINE_S = 600.0


@dataclass(frozen=True)
class LatencyPlan:
    size: int = 64
    realtime_steps: int = 30
    batch_steps: int = 150
    idle_jobs: int = 20
    loaded_jobs: int = 30
    interval_s: float = 1.5
    batch_depth: int = 3
    warmup_jobs: int = 2

    def realtime_item(self, n: int) -> dict[str, Any]:
        return _item(f"realtime {n}", self.size, self.realtime_steps, n)

    def warmup_item(self, n: int) -> dict[str, Any]:
        return _item(f"warm-up {n}", self.size, self.realtime_steps, WARMUP_SEED + n)

    def batch_item(self, n: int) -> dict[str, Any]:
        return _item(f"batch {n}", self.size, self.batch_steps, n)


def _item(prompt: str, size: int, steps: int, seed: int) -> dict[str, Any]:
    return {"prompt": prompt, "width": size, "height": size, "num_inference_steps": steps, "seed": seed}


async def measure(url: str, plan: LatencyPlan) -> dict[str, Any]:
    async with open_client(url) as http:
        client = Client(http)
        for n in range(plan.warmup_jobs):  # the worker's first calls pay for lazy initialisation
            await client.run_single(plan.warmup_item(n), JOB_DEADLINE_S)
        idle = [await client.run_single(plan.realtime_item(n), JOB_DEADLINE_S) for n in range(plan.idle_jobs)]
        loaded, batch_ids = await _under_batch_load(client, plan)
        batch_jobs = await client.jobs(batch_ids)
    return report(plan, idle, loaded, batch_jobs, client.tally.statuses)


async def _under_batch_load(client: Client, plan: LatencyPlan) -> tuple[list[JobTiming], list[str]]:
    batch_ids: list[str] = []
    stop = asyncio.Event()
    topper = asyncio.create_task(_keep_batch_lane_full(client, plan, batch_ids, stop))
    try:
        await _until_started(client, batch_ids)
        began = time.perf_counter()
        arrivals = []
        for n in range(plan.loaded_jobs):  # on a fixed schedule: a late answer delays no arrival
            await asyncio.sleep(max(0.0, began + n * plan.interval_s - time.perf_counter()))
            arrivals.append(asyncio.create_task(client.run_single(plan.realtime_item(plan.idle_jobs + n), JOB_DEADLINE_S)))
        loaded = list(await asyncio.gather(*arrivals))
    finally:
        stop.set()
        await topper
    await client.cancel(batch_ids)  # what is left of the backlog; ended jobs answer 409
    await client.wait_until_idle()
    return loaded, batch_ids


async def _keep_batch_lane_full(client: Client, plan: LatencyPlan, batch_ids: list[str], stop: asyncio.Event) -> None:
    while not stop.is_set():
        # Batch jobs not started yet, by the jobs' own lane: whatever queues the router keeps them in.
        response = await client.http.get("/jobs", params={"status": "pending", "lane": "batch", "limit": 1000})
        client.tally.note(response)
        missing = plan.batch_depth - len(response.json())
        if missing > 0:
            batch_ids += await client.submit_batch([plan.batch_item(len(batch_ids) + i) for i in range(missing)])
        with contextlib.suppress(TimeoutError):  # the poll period, or sooner when told to stop
            await asyncio.wait_for(stop.wait(), STATUS_POLL_S)


async def _until_started(client: Client, batch_ids: list[str]) -> None:
    """Until the first batch job runs: realtime jobs arrive on a busy worker."""
    while not batch_ids or (await client.job(batch_ids[0]))["started_at"] is None:
        await asyncio.sleep(STATUS_POLL_S)


def report(
    plan: LatencyPlan, idle: list[JobTiming], loaded: list[JobTiming], batch_jobs: list[dict[str, Any]], statuses: Counter[int]
) -> dict[str, Any]:
    idle_figures, loaded_figures = _latencies(idle), _latencies(loaded)
    completed = [timing.job for timing in loaded if timing.status == "completed"]
    window = (min(job["created_at"] for job in completed), max(job["finished_at"] for job in completed)) if completed else None
    in_window = [
        job["finished_at"]
        for job in batch_jobs
        if window and job["status"] == "completed" and timestamp(window[0]) <= timestamp(job["finished_at"]) <= timestamp(window[1])
    ]  # fmt: skip
    return {
        "plan": asdict(plan),
        "idle": idle_figures,
        "loaded": loaded_figures,
        "loaded_over_idle": {
            "end_to_end_p50": ratio(loaded_figures["end_to_end_ms"]["p50"], idle_figures["end_to_end_ms"]["p50"]),
            "end_to_end_p95": ratio(loaded_figures["end_to_end_ms"]["p95"], idle_figures["end_to_end_ms"]["p95"]),
            "queue_wait_p95": ratio(loaded_figures["queue_wait_ms"]["p95"], idle_figures["queue_wait_ms"]["p95"]),
        },
        "realtime_jobs": dict(Counter(timing.status for timing in idle + loaded)),
        "batch_jobs": dict(Counter(job["status"] for job in batch_jobs)),
        "batch_completed_in_window": len(in_window),
        "window_s": round((timestamp(window[1]) - timestamp(window[0])).total_seconds(), 3) if window else None,
        "batch_images_per_s": steady_images_per_s(in_window),
        "responses_by_status": dict(sorted(statuses.items())),
    }


def _latencies(timings: list[JobTiming]) -> dict[str, Any]:
    done = sorted((timing for timing in timings if timing.status == "completed"), key=lambda timing: timing.end_to_end_s)
    return {
        "end_to_end_ms": summary_ms([timing.end_to_end_s for timing in done]),
        "queue_wait_ms": summary_ms([timing.queue_wait_s for timing in done]),
        "inference_ms": summary_ms([timing.inference_s for timing in done]),
        # The job at the end-to-end p95 (nearest rank), part by part: what makes the tail.
        "p95_job_ms": done[max(0, math.ceil(0.95 * len(done)) - 1)].parts_ms() if done else None,
    }
