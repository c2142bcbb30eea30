"""Scale on paper: the scheduling core alone, driven as a 1,000-GPU fleet would drive it.

    python -m bench.core_scale [--replicas 1000] [--jobs 100000] [--users 100] [--slices-per-job 3]

No Ray, no database: the core's own events (submissions in batches, a heartbeat from every replica
every `--heartbeat-s`, a result for every call, `tick`) on a simulated clock, timed on the wall
clock. A *decision* is one event handled or one action produced by `tick` (a start). The report
sets the decisions per second the core sustains against what the fleet needs: every job costs
`slices_per_job` starts and as many results, so `replicas / inference_s_per_slice` calls end every
second, plus the heartbeats.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import record
from scheduling.directives import Health, Mode, ReplicaSnapshot
from scheduling.lanes import Lane, lane_for
from scheduling.scheduler import JobSpec, Scheduler, SchedulerConfig, Start
from scheduling.work import GenerationParams, WorkResult

HEALTHY = ReplicaSnapshot(Mode.CUDA, Health.HEALTHY)
SUBMISSION_SIZE = 500  # jobs per submission, as a batch driver sends them
REALTIME_SHARE = 10  # one job in this many is realtime


@dataclass(frozen=True)
class Fleet:
    replicas: int = 1000
    jobs: int = 100_000
    users: int = 100
    slices_per_job: int = 3
    heartbeat_s: float = 2.0
    inference_s_per_slice: float = 0.5  # SD 1.5, 10 steps of 512x512, on a recent datacenter GPU


@dataclass
class Simulation:
    fleet: Fleet
    now: float = 0.0

    def __post_init__(self) -> None:
        limits = {Lane.REALTIME: self.fleet.jobs, Lane.BATCH: self.fleet.jobs}
        config = SchedulerConfig(queue_limits=limits, steps_per_dispatch=1, worker_ttl_s=10 * self.fleet.heartbeat_s)
        self.core = Scheduler(config, clock=lambda: self.now, rand=lambda: 0.5)
        self.running: dict[str, tuple[Start, int]] = {}  # job id -> (its call, steps done)
        self.decisions = 0
        self.next_reporter = 0

    def submit_all(self) -> float:
        """Every job, in submissions of SUBMISSION_SIZE; returns the wall seconds it took."""
        params = GenerationParams("a lighthouse", None, 512, 512, self.fleet.slices_per_job, 7.5, 1)
        began = time.perf_counter()
        for first in range(0, self.fleet.jobs, SUBMISSION_SIZE):
            owner = f"user-{first // SUBMISSION_SIZE % self.fleet.users}"  # each submission is one user's
            specs = [
                JobSpec(f"job-{n}", 2 if n % REALTIME_SHARE == 0 else 8, float(n), params, owner=owner)
                for n in range(first, min(first + SUBMISSION_SIZE, self.fleet.jobs))
            ]
            self.core.release(self.core.reserve([lane_for(spec.priority) for spec in specs], owner))
            self.core.submit(specs)
            self.decisions += 1
        return time.perf_counter() - began

    def heartbeats(self, share: float) -> None:
        """The next `share` of the replicas report, in turn, so that each reports every `heartbeat_s`."""
        for _ in range(int(self.fleet.replicas * share)):
            self.core.heartbeat(f"gpu-{self.next_reporter:04}", 1, HEALTHY)
            self.next_reporter = (self.next_reporter + 1) % self.fleet.replicas
            self.decisions += 1

    def step(self) -> int:
        """One slice's worth of time: every call ends, heartbeats arrive, the core dispatches again."""
        self.now += self.fleet.inference_s_per_slice
        for job_id, (start, steps) in list(self.running.items()):
            done = steps + 1 >= self.fleet.slices_per_job
            result = WorkResult(
                job_id, start.batch.replica_id, steps + 1, self.fleet.inference_s_per_slice,
                latents=None if done else b"latents", object_key=f"images/{job_id}.png" if done else None,
            )  # fmt: skip
            self.core.result(job_id, start.call_id, result)
            self.decisions += 1
            del self.running[job_id]
        self.heartbeats(self.fleet.inference_s_per_slice / self.fleet.heartbeat_s)
        starts = [action for action in self.core.tick() if isinstance(action, Start)]
        for start in starts:
            for item in start.batch.items:
                self.running[item.job_id] = (start, item.step)
        self.decisions += len(starts)
        return len(starts)


def run(fleet: Fleet, steps: int) -> dict[str, float | int | dict[str, float | int]]:
    simulation = Simulation(fleet)
    submit_s = simulation.submit_all()
    simulation.heartbeats(1.0)  # every replica joins
    simulation.decisions = 0
    began = time.perf_counter()
    dispatched = sum(simulation.step() for _ in range(steps))
    elapsed_s = time.perf_counter() - began
    decisions_per_s = simulation.decisions / elapsed_s
    # Per second of the fleet's life: each replica ends a call and starts one per slice, and reports.
    needed_per_s = fleet.replicas * (2 / fleet.inference_s_per_slice + 1 / fleet.heartbeat_s)
    return {
        "fleet": asdict(fleet),
        "simulated_slices": steps,
        "calls_dispatched": dispatched,
        "decisions": simulation.decisions,
        "wall_s": round(elapsed_s, 3),
        "decisions_per_s": round(decisions_per_s),
        "decisions_needed_per_s": round(needed_per_s),
        "capacity_over_need": round(decisions_per_s / needed_per_s, 2),
        "jobs_submitted_per_s": round(fleet.jobs / submit_s),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.core_scale", description=__doc__.splitlines()[0])
    defaults = Fleet()
    parser.add_argument("--replicas", type=int, default=defaults.replicas)
    parser.add_argument("--jobs", type=int, default=defaults.jobs)
    parser.add_argument("--users", type=int, default=defaults.users)
    parser.add_argument("--slices-per-job", type=int, default=defaults.slices_per_job)
    parser.add_argument("--inference-s-per-slice", type=float, default=defaults.inference_s_per_slice)
    parser.add_argument("--steps", type=int, default=20, help="Simulated slice periods to time (default 20).")
    parser.add_argument("--record", type=Path, help="Append the result to this file (docs/benchmarks.md).")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    fleet = Fleet(args.replicas, args.jobs, args.users, args.slices_per_job, inference_s_per_slice=args.inference_s_per_slice)
    report = run(fleet, args.steps)
    print(json.dumps(report, indent=2))
    if args.record:
        figures = {
            "replicas / jobs waiting": f"{fleet.replicas:,} / {fleet.jobs:,}",
            "core decisions per second": f"{report['decisions_per_s']:,}",
            "decisions the fleet needs per second": f"{report['decisions_needed_per_s']:,}",
            "capacity / need": report["capacity_over_need"],
            "jobs submitted per second (batches of 500)": f"{report['jobs_submitted_per_s']:,}",
        }
        target = record.Target(
            f"core decisions/s with {fleet.replicas:,} replicas >= 20,000", report["decisions_per_s"], 20_000, at_least=True
        )
        record.append(args.record, "Scheduling core at scale (bench.core_scale)", figures, report, [target])
    return 0


if __name__ == "__main__":
    sys.exit(main())
