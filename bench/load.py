"""Load against a running SEIDRA: concurrent realtime clients over a wall of batch jobs.

    python -m bench.load --url http://127.0.0.1:8000 --realtime-clients 200 --batch-jobs 5000

Batch jobs go in through `/generation/batch` (in chunks, honouring 429 + Retry-After); each realtime
client submits through `/generation/single` and polls its job until it ends, several times over.
The report (JSON) counts every answer by status, gives submission latency percentiles, how every
job ended, and the router actor's peak resident memory when it runs on this machine. `make load`
brings SEIDRA up with the tiny model, runs this, and takes it down.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

POLL_INTERVAL_S = 1.0
IDLE_PROBES = 20  # sequential submissions before the load: the same run's idle latency
# Ray runs its worker processes (the API, the router, the replicas) at this niceness; a load generator
# on the same machine at the default priority would take the CPU from the system it measures.
RAY_WORKER_NICENESS = 15
TERMINAL = {"completed", "failed", "cancelled"}


@dataclass
class Tally:
    """Every answer the load got, and how long submissions took."""

    statuses: Counter[int] = field(default_factory=Counter)
    submit_latency_s: dict[str, list[float]] = field(default_factory=dict)  # by path
    errors: list[str] = field(default_factory=list)  # the first few 5xx bodies and transport errors

    def note(self, response: httpx.Response) -> None:
        self.statuses[response.status_code] += 1
        if response.status_code >= 500 and len(self.errors) < 20:
            self.errors.append(
                f"{response.request.method} {response.request.url.path}: {response.status_code} {response.text[:200]}"
            )


@dataclass(frozen=True)
class LoadPlan:
    realtime_clients: int
    requests_per_client: int
    batch_jobs: int
    steps: int
    size: int
    timeout_s: float
    batch_chunk: int = 500  # items per /generation/batch request (SEIDRA_MAX_BATCH_ITEMS at most)

    def item(self, prompt: str) -> dict[str, Any]:
        return {"prompt": prompt, "width": self.size, "height": self.size, "num_inference_steps": self.steps}


async def submit(http: httpx.AsyncClient, tally: Tally, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST until accepted: 429 and 503 are back-pressure (wait Retry-After), not failures."""
    while True:
        started = time.perf_counter()
        response = await http.post(path, json=body)
        tally.note(response)
        if response.status_code in (429, 503):
            await asyncio.sleep(float(response.headers.get("retry-after", "1")))
            continue
        tally.submit_latency_s.setdefault(path, []).append(time.perf_counter() - started)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result


async def wait_until_done(http: httpx.AsyncClient, tally: Tally, job_id: str, deadline: float) -> str:
    while time.monotonic() < deadline:
        response = await http.get(f"/jobs/{job_id}")
        tally.note(response)
        if response.status_code == 200 and response.json()["status"] in TERMINAL:
            status: str = response.json()["status"]
            return status
        await asyncio.sleep(POLL_INTERVAL_S)
    return "timed out"


async def batch_load(http: httpx.AsyncClient, tally: Tally, plan: LoadPlan) -> list[str]:
    job_ids: list[str] = []
    for start in range(0, plan.batch_jobs, plan.batch_chunk):
        count = min(plan.batch_chunk, plan.batch_jobs - start)
        items = [plan.item(f"load batch {start + i}") for i in range(count)]
        accepted = await submit(http, tally, "/generation/batch", {"items": items})
        job_ids += [str(job_id) for job_id in accepted["job_ids"]]
    return job_ids


async def realtime_client(http: httpx.AsyncClient, tally: Tally, plan: LoadPlan, client: int, deadline: float) -> list[str]:
    ended = []
    for n in range(plan.requests_per_client):
        job = await submit(http, tally, "/generation/single", plan.item(f"load realtime {client}.{n}"))
        ended.append(await wait_until_done(http, tally, str(job["id"]), deadline))
    return ended


async def final_statuses(http: httpx.AsyncClient, tally: Tally, job_ids: Sequence[str], deadline: float) -> Counter[str]:
    """How the batch jobs ended (they are polled only once the realtime clients are done)."""
    ended: Counter[str] = Counter()
    for job_id in job_ids:
        ended[await wait_until_done(http, tally, job_id, deadline)] += 1
    return ended


async def run(url: str, plan: LoadPlan, router_pid: int | None, api_key: str | None = None) -> dict[str, Any]:
    tally = Tally()
    limits = httpx.Limits(max_connections=plan.realtime_clients + 10, max_keepalive_connections=plan.realtime_clients + 10)
    deadline = time.monotonic() + plan.timeout_s
    memory = RssSampler(router_pid)
    sampler = asyncio.create_task(memory.run())
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits, headers=headers) as http:
        idle = Tally()
        probes = [await submit(http, idle, "/generation/single", plan.item(f"idle probe {n}")) for n in range(IDLE_PROBES)]
        for probe in probes:
            await wait_until_done(http, idle, str(probe["id"]), deadline)
        started = time.monotonic()
        batch = asyncio.create_task(batch_load(http, tally, plan))
        clients = [realtime_client(http, tally, plan, client, deadline) for client in range(plan.realtime_clients)]
        realtime_ended = Counter(status for ended in await asyncio.gather(*clients) for status in ended)
        batch_ended = await final_statuses(http, tally, await batch, deadline)
    sampler.cancel()
    return {
        "plan": plan.__dict__,
        "duration_s": round(time.monotonic() - started, 1),
        "responses_by_status": dict(sorted(tally.statuses.items())),
        "responses_5xx": sum(count for status, count in tally.statuses.items() if status >= 500),
        "submission_latency_ms": {path: percentiles(latencies) for path, latencies in sorted(tally.submit_latency_s.items())},
        "idle_submission_latency_ms": percentiles(idle.submit_latency_s["/generation/single"]),
        "realtime_jobs": dict(realtime_ended),
        "batch_jobs": dict(batch_ended),
        "router_peak_rss_mib": memory.peak_mib(),
        "errors": tally.errors,
    }


def percentiles(latencies_s: list[float]) -> dict[str, float | int]:
    ordered = sorted(latencies_s)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return {"count": len(ordered), "p50": round(1000 * statistics.median(ordered), 1), "p99": round(1000 * p99, 1)}


class RssSampler:
    """Peak resident memory of a local process (the router actor), sampled every second."""

    def __init__(self, pid: int | None) -> None:
        self._status = Path(f"/proc/{pid}/status") if pid else None
        self._peak_kib = 0

    async def run(self) -> None:
        while self._status is not None:
            try:
                rss = next(line for line in self._status.read_text().splitlines() if line.startswith("VmRSS:"))
                self._peak_kib = max(self._peak_kib, int(rss.split()[1]))
            except (OSError, StopIteration):
                return
            await asyncio.sleep(1)

    def peak_mib(self) -> float | None:
        return round(self._peak_kib / 1024, 1) if self._peak_kib else None


def router_pid(address: str | None, app_name: str) -> int | None:
    """The router actor's pid, through Ray's state API; None when it cannot be found."""
    if not address:
        return None
    from ray.util.state import list_actors

    from scheduling.router_lookup import router_name

    actors = list_actors(address=address, filters=[("name", "=", router_name(app_name)), ("state", "=", "ALIVE")], detail=True)
    return int(actors[0].pid) if actors else None


def load_own_cluster(plan: LoadPlan) -> dict[str, Any]:
    """`seidra up`, the load, `seidra down`: what `make load` runs."""
    from serve_app.cli import main as seidra
    from serve_app.cluster import UpState
    from serve_app.demo import ensure_model

    ensure_model()
    # One local user on loopback: the load measures the service, not per-user quotas.
    os.environ["SEIDRA_AUTH"] = "off"
    if seidra(["up"]) != 0:
        raise SystemExit("seidra up failed")
    try:
        state = UpState.load()
        assert state is not None
        report = asyncio.run(run(state.url, plan, router_pid(state.dashboard_url, "seidra")))
    finally:
        seidra(["down"])
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="SEIDRA's API (default http://127.0.0.1:8000).")
    parser.add_argument("--ray-address", help="The Ray dashboard URL, to find the router's pid (memory).")
    parser.add_argument("--app", default="seidra")
    parser.add_argument("--realtime-clients", type=int, default=200)
    parser.add_argument("--requests-per-client", type=int, default=3)
    parser.add_argument("--batch-jobs", type=int, default=5000)
    parser.add_argument("--steps", type=int, default=2, help="Denoising steps per job (default 2).")
    parser.add_argument("--size", type=int, default=64, help="Width and height (default 64).")
    parser.add_argument("--timeout", type=float, default=3600, help="Seconds before unfinished jobs count as timed out.")
    parser.add_argument("--out", type=Path, help="Also write the report (JSON) here.")
    parser.add_argument(
        "--up", action="store_true", help="Bring SEIDRA up first (the tiny model unless SEIDRA_MODEL), down after."
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.nice(max(0, RAY_WORKER_NICENESS - os.nice(0)))
    plan = LoadPlan(args.realtime_clients, args.requests_per_client, args.batch_jobs, args.steps, args.size, args.timeout)
    if args.up:
        report = load_own_cluster(plan)
    else:
        api_key = os.environ.get("SEIDRA_API_KEY")  # a key made with a high --submissions-per-minute
        report = asyncio.run(run(args.url, plan, router_pid(args.ray_address, args.app), api_key))
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    every_job_completed = set(report["realtime_jobs"]) | set(report["batch_jobs"]) <= {"completed"}
    return 0 if report["responses_5xx"] == 0 and every_job_completed else 1


if __name__ == "__main__":
    sys.exit(main())
