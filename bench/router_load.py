"""Scenario 4 of issue 11: what a job costs besides inference, and how fast submissions are accepted,
with few and with very many jobs waiting.

The batch lane is paused (`POST /admin/lanes/batch`), so that the jobs submitted stay waiting; then at
each level (`low_waiting`, `high_waiting`): submissions per second over the last `low_waiting` jobs
that brought the lane there (batches of `chunk` through `/generation/batch`), `probes` realtime jobs
one after the other (the worker is otherwise idle), and the router actor's resident memory. A probe's
non-inference time is `finished_at - created_at - metadata.inference_s` (the router's clock and the
worker's own timing), and, from outside, the client's end to end minus `inference_s`. The deployment
runs each job in one call (`SEIDRA_STEPS_PER_DISPATCH=0`): `inference_s` is the time of a job's last
call, which is then all of its inference.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.harness import Client, JobTiming, open_client, ratio, summary_ms

PROBE_DEADLINE_S = 600.0


@dataclass(frozen=True)
class RouterPlan:
    size: int = 64
    steps: int = 30
    low_waiting: int = 1_000
    high_waiting: int = 100_000
    chunk: int = 500
    probes: int = 30

    def item(self, prompt: str, seed: int) -> dict[str, Any]:
        return {"prompt": prompt, "width": self.size, "height": self.size, "num_inference_steps": self.steps, "seed": seed}


@dataclass
class Backlog:
    """The paused batch lane's jobs, submitted in chunks, timed."""

    client: Client
    plan: RouterPlan
    waiting: int = 0

    async def fill_to(self, target: int) -> float | None:
        """Submit until `target` jobs wait; returns the jobs accepted per second (None: none submitted)."""
        submitted, elapsed_s = 0, 0.0
        while self.waiting < target:
            count = min(self.plan.chunk, target - self.waiting)
            items = [self.plan.item(f"waiting {self.waiting + n}", self.waiting + n) for n in range(count)]
            began = time.perf_counter()
            accepted = await self.client.submit_batch(items)
            elapsed_s += time.perf_counter() - began
            self.waiting += len(accepted)
            submitted += len(accepted)
        return round(submitted / elapsed_s, 1) if elapsed_s else None


async def measure(url: str, plan: RouterPlan, router_pid: int | None) -> dict[str, Any]:
    async with open_client(url) as http:
        client = Client(http)
        await _probe(client, plan, "warm-up", 2)
        await client.pause_lane("batch", True)
        backlog = Backlog(client, plan)
        levels = {}
        for level in (plan.low_waiting, plan.high_waiting):
            fill_per_s = await backlog.fill_to(max(0, level - plan.low_waiting))
            levels[str(level)] = {
                "fill_submissions_per_s": fill_per_s,  # everything before the measured stretch
                "submissions_per_s": await backlog.fill_to(level),
                "waiting": (await client.status())["queues"]["batch"],
                **_overheads(await _probe(client, plan, f"probe at {level}", plan.probes)),
                "router_rss_mib": resident_mib(router_pid),
            }
        await client.pause_lane("batch", False)
    low, high = levels[str(plan.low_waiting)], levels[str(plan.high_waiting)]
    return {
        "plan": asdict(plan),
        "levels": levels,
        "high_over_low": {
            "non_inference_p50": ratio(high["non_inference_ms"]["p50"], low["non_inference_ms"]["p50"]),
            "non_inference_p99": ratio(high["non_inference_ms"]["p99"], low["non_inference_ms"]["p99"]),
            "submissions_per_s": ratio(high["submissions_per_s"], low["submissions_per_s"]),
        },
        "responses_by_status": dict(sorted(client.tally.statuses.items())),
    }


async def _probe(client: Client, plan: RouterPlan, prompt: str, count: int) -> list[JobTiming]:
    return [await client.run_single(plan.item(f"{prompt} {n}", n), PROBE_DEADLINE_S) for n in range(count)]


def _overheads(probes: list[JobTiming]) -> dict[str, Any]:
    done = [probe for probe in probes if probe.status == "completed"]
    return {
        "probe_jobs": dict(Counter(probe.status for probe in probes)),
        "non_inference_ms": summary_ms([probe.recorded_s - probe.inference_s for probe in done]),
        "client_non_inference_ms": summary_ms([probe.end_to_end_s - probe.inference_s for probe in done]),
        "inference_ms": summary_ms([probe.inference_s for probe in done]),
    }


def resident_mib(pid: int | None) -> float | None:
    """A local process's resident memory now (VmRSS); None when it does not run on this machine."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines() if pid else []
    except OSError:
        return None
    rss_kib = next((int(line.split()[1]) for line in lines if line.startswith("VmRSS:")), None)
    return round(rss_kib / 1024, 1) if rss_kib is not None else None
