"""Scenarios 1-4 of issue 11, each a real run against SEIDRA, in one run with one Ray head.

    python -m bench.serving [--slice-steps N] [--batch-sizes 1 2 4 8] [--record docs/benchmarks.md]

SEIDRA is deployed once per configuration of settings (`bench.harness`), and each scenario measures
on the deployments it needs:

| deployment | settings (besides the common ones) | measured there |
|---|---|---|
| sliced | `SEIDRA_STEPS_PER_DISPATCH=<slice steps>` | 1 and 2 (slicing on), 3 at batch size 1 |
| whole | `SEIDRA_STEPS_PER_DISPATCH=0`, a batch lane as deep as scenario 4 needs | 1 and 2 (whole-job dispatch), 4 |
| fifo | `SEIDRA_QUEUE_POLICY=fifo`, `SEIDRA_STEPS_PER_DISPATCH=0` | 1 (one FIFO lane) |
| batch-B | `SEIDRA_STEPS_PER_DISPATCH=<slice steps>`, `SEIDRA_MAX_BATCH_SIZE=B` | 3 at batch size B |

Common settings: `SEIDRA_AUTH=off` (loopback, as `make demo`), a fixed worker count
(`SEIDRA_MAX_WORKERS=0`), `SEIDRA_TORCH_THREADS`, `SEIDRA_MAX_BATCH_SIZE=1` and
`SEIDRA_QUEUE_POLICY=lanes` unless the deployment says otherwise. The model is `SEIDRA_MODEL`, or the
tiny one. Figures that matter are same-run ratios; the report lists every deployment's settings, and
those the cluster did not know (not applied).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import batching, latency, record, router_load
from bench.batching import BatchingPlan
from bench.harness import BenchHead, Deployment, bench_head, ratio
from bench.latency import LatencyPlan
from bench.load import RAY_WORKER_NICENESS
from bench.record import Target
from bench.router_load import RouterPlan

SCENARIOS = ("latency", "batching", "router")


def release_slice_steps() -> int:
    """This release's default slice length (SEIDRA_STEPS_PER_DISPATCH), the one slicing on is measured with."""
    from scheduling.settings import RouterSettings

    default: int = RouterSettings.model_fields["steps_per_dispatch"].default
    return default


TITLE = "Serving: realtime latency, slice cost, batching, router (bench.serving)"


@dataclass(frozen=True)
class Plan:
    latency: LatencyPlan = field(default_factory=LatencyPlan)
    batching: BatchingPlan = field(default_factory=BatchingPlan)
    router: RouterPlan = field(default_factory=RouterPlan)
    slice_steps: int = field(default_factory=release_slice_steps)
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8)
    torch_threads: int = 1
    scenarios: tuple[str, ...] = SCENARIOS


@dataclass(frozen=True)
class Stage:
    """One deployment of SEIDRA and what is measured on it."""

    name: str
    settings: dict[str, str]  # besides the common ones
    latency: bool = False
    batch_size: int | None = None
    router: bool = False


def common_settings(plan: Plan) -> dict[str, str]:
    smallest = min(plan.latency.size, plan.batching.size, plan.router.size)
    return {
        "SEIDRA_AUTH": "off",
        "SEIDRA_MAX_WORKERS": "0",  # no autoscaling: every configuration runs on the same replicas
        "SEIDRA_TORCH_THREADS": str(plan.torch_threads),
        "SEIDRA_MIN_IMAGE_SIZE": str(min(smallest, 64)),
        "SEIDRA_MAX_BATCH_SIZE": "1",
        "SEIDRA_QUEUE_POLICY": "lanes",
    }


def stages(plan: Plan) -> list[Stage]:
    """The deployments the chosen scenarios need, each once, in the order they run."""
    wants = set(plan.scenarios)
    sliced = {"SEIDRA_STEPS_PER_DISPATCH": str(plan.slice_steps)}
    deep_batch_lane = {
        "SEIDRA_MAX_BATCH_QUEUE": str(plan.router.high_waiting + plan.router.chunk),
        "SEIDRA_MAX_BATCH_ITEMS": str(plan.router.chunk),
    }
    all_stages = [
        Stage("sliced", sliced, latency="latency" in wants, batch_size=1 if "batching" in wants and 1 in plan.batch_sizes else None),
        Stage("whole", {"SEIDRA_STEPS_PER_DISPATCH": "0", **deep_batch_lane}, latency="latency" in wants, router="router" in wants),
        Stage("fifo", {"SEIDRA_STEPS_PER_DISPATCH": "0", "SEIDRA_QUEUE_POLICY": "fifo"}, latency="latency" in wants),
        *(
            Stage(f"batch-{size}", {**sliced, "SEIDRA_MAX_BATCH_SIZE": str(size)}, batch_size=size)
            for size in plan.batch_sizes
            if size != 1 and "batching" in wants
        ),
    ]  # fmt: skip
    return [stage for stage in all_stages if stage.latency or stage.batch_size or stage.router]


@dataclass
class Report:
    plan: Plan
    model: str
    deployments: dict[str, dict[str, Any]] = field(default_factory=dict)
    latency: dict[str, dict[str, Any]] = field(default_factory=dict)  # by deployment
    batching: dict[str, dict[str, Any]] = field(default_factory=dict)  # by batch size
    router: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "plan": asdict(self.plan),
            "model": self.model,
            "deployments": self.deployments,
            "latency": self.latency,
            "batching": self.batching,
            "router": self.router,
            "targets": [target.as_dict() for target in targets(self)],
        }


def run(head: BenchHead, plan: Plan, model: str) -> Report:
    report = Report(plan, model)
    for stage in stages(plan):
        progress(f"deploying {stage.name}: {stage.settings}")
        with head.deployed(stage.name, {**common_settings(plan), **stage.settings}) as deployment:
            report.deployments[stage.name] = {**deployment.describe(), "stage_settings": stage.settings}
            measure(stage, deployment, plan, report, model)
    return report


def measure(stage: Stage, deployment: Deployment, plan: Plan, report: Report, model: str) -> None:
    """This stage's measurements, latency first: it needs an idle cluster; the router's last: it leaves 100,000 jobs."""
    if stage.latency:
        progress(f"{stage.name}: realtime latency, idle and saturated")
        report.latency[stage.name] = asyncio.run(latency.measure(deployment.url, plan.latency))
    if stage.batch_size:
        size = stage.batch_size
        progress(f"{stage.name}: images/s at batch size {size}, {plan.batching.rounds} rounds beside the bare pipeline")
        result = batching.measure_rounds(
            plan.batching,
            size,
            lambda round_: asyncio.run(batching.measure(deployment.url, plan.batching, size, round_)),
            lambda: batching.bare(model, plan.batching, size, plan.torch_threads),
        )
        report.batching[str(size)] = {"deployment": stage.name, **result}
    if stage.router:
        progress(f"{stage.name}: router overhead at {plan.router.low_waiting:,} and {plan.router.high_waiting:,} waiting")
        report.router = {
            "deployment": stage.name,
            **asyncio.run(router_load.measure(deployment.url, plan.router, deployment.router_pid)),
        }


def progress(line: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} bench.serving: {line}", file=sys.stderr, flush=True)


# ----- targets and the recorded table -----


def targets(report: Report) -> list[Target]:
    return [*_latency_targets(report), *_batching_targets(report), *_router_targets(report)]


def _not_applied(report: Report, *deployments: str) -> str:
    ignored = sorted(
        {name for deployment in deployments for name in report.deployments.get(deployment, {}).get("ignored_settings", {})}
    )
    return f"not applied, unknown to this release: {', '.join(ignored)}" if ignored else ""


def _latency_targets(report: Report) -> list[Target]:
    sliced, whole = report.latency.get("sliced"), report.latency.get("whole")
    found = []
    if sliced:
        e2e = sliced["loaded_over_idle"]["end_to_end_p95"]
        found.append(
            Target(
                "realtime end-to-end p95, saturated / idle, slicing on <= 1.3", e2e, 1.3, False, _not_applied(report, "sliced")
            )
        )
    if sliced and whole:
        wait = ratio(whole["loaded"]["queue_wait_ms"]["p95"], sliced["loaded"]["queue_wait_ms"]["p95"])
        throughput = ratio(sliced["batch_images_per_s"], whole["batch_images_per_s"])
        note = _not_applied(report, "sliced", "whole")
        found.append(Target("realtime queue-wait p95 under saturation, whole-job / sliced >= 20", wait, 20, True, note))
        found.append(Target("batch images/s under realtime load, slicing on / off >= 0.95", throughput, 0.95, True, note))
    return found


def _batching_targets(report: Report) -> list[Target]:
    def seidra(size: int) -> float | None:
        entry = report.batching.get(str(size))
        return entry["seidra"]["images_per_s"] if entry else None

    found = []
    if seidra(1) is not None and seidra(4) is not None:
        note = _not_applied(report, report.batching["4"]["deployment"])
        found.append(Target("SEIDRA images/s, batch size 4 / batch size 1 >= 1.3", ratio(seidra(4), seidra(1)), 1.3, True, note))
    for size, entry in sorted(report.batching.items(), key=lambda item: int(item[0])):
        efficiency = ratio(entry["seidra"]["images_per_s"], entry.get("bare", {}).get("images_per_s"))
        note = _not_applied(report, entry["deployment"])
        found.append(Target(f"images/s at batch size {size}, SEIDRA / bare pipeline >= 0.9", efficiency, 0.9, True, note))
    return found


def _router_targets(report: Report) -> list[Target]:
    if report.router is None:
        return []
    plan = report.plan.router
    low, high = report.router["levels"][str(plan.low_waiting)], report.router["levels"][str(plan.high_waiting)]
    at_low, at_high = f"{plan.low_waiting:,} waiting", f"{plan.high_waiting:,} waiting"
    return [
        Target(f"non-inference time per job p50 at {at_low} <= 20 ms", low["non_inference_ms"]["p50"], 20, False),
        Target(f"non-inference time per job p50 at {at_high} <= 20 ms", high["non_inference_ms"]["p50"], 20, False),
        Target(
            f"non-inference p50, {at_high} / {at_low} <= 1.2", report.router["high_over_low"]["non_inference_p50"], 1.2, False
        ),
        Target(f"submissions/s in batches of {plan.chunk} at {at_low} >= 2,000", low["submissions_per_s"], 2000, True),
        Target(f"submissions/s in batches of {plan.chunk} at {at_high} >= 2,000", high["submissions_per_s"], 2000, True),
    ]


def figures(report: Report) -> dict[str, Any]:
    """The table's rows: each deployment's own settings, then the figures behind the targets."""
    shown: dict[str, Any] = {"model": report.model}
    for name, deployment in report.deployments.items():
        settings = ", ".join(f"{key}={value}" for key, value in deployment["stage_settings"].items()) or "common only"
        ignored = ", ".join(deployment["ignored_settings"])
        shown[f"deployment {name}"] = settings + (f" (not applied: {ignored})" if ignored else "")
    for name, result in report.latency.items():
        idle, loaded = result["idle"], result["loaded"]
        shown[f"{name}: realtime end-to-end p50 / p95 ms, idle"] = (
            f"{idle['end_to_end_ms']['p50']} / {idle['end_to_end_ms']['p95']}"
        )
        shown[f"{name}: realtime end-to-end p50 / p95 ms, saturated"] = (
            f"{loaded['end_to_end_ms']['p50']} / {loaded['end_to_end_ms']['p95']}"
        )
        shown[f"{name}: realtime queue wait p50 / p95 ms, saturated"] = (
            f"{loaded['queue_wait_ms']['p50']} / {loaded['queue_wait_ms']['p95']}"
        )
        for level in ("idle", "loaded"):
            parts = result[level].get("p95_job_ms")
            if parts:
                shown[f"{name}: realtime p95 job, {level}: ms waiting / in pipeline / around it / outside the record"] = (
                    f"{parts['queue_wait']} / {parts['inference']} / {parts['around_inference']} / {parts['outside_record']}"
                )
        shown[f"{name}: batch images/s under realtime load"] = result["batch_images_per_s"]
    for size, entry in sorted(report.batching.items(), key=lambda item: int(item[0])):
        seidra, bare = entry["seidra"], entry.get("bare", {})
        shown[f"images/s at batch size {size}: SEIDRA / bare pipeline"] = f"{seidra['images_per_s']} / {bare.get('images_per_s')}"
        shown[f"batch size {size}: SEIDRA / bare per round"] = ", ".join(
            str(round_["seidra_over_bare"]) for round_ in entry.get("rounds", [])
        )
        parts = seidra.get("breakdown")
        if parts:
            shown[f"batch size {size}: SEIDRA's s in pipeline / around it in calls / between calls"] = (
                f"{parts['pipeline_s']} / {parts['in_call_s']} / {parts['between_calls_s']}"
            )
            shown[f"batch size {size}: pipeline images/s, in SEIDRA's replica / bare"] = (
                f"{seidra['pipeline_images_per_s']} / {bare.get('images_per_s')}"
            )
    if report.router is not None:
        for level, figures_at in report.router["levels"].items():
            at = f"at {int(level):,} waiting"
            shown[f"non-inference ms p50 / p99 {at}"] = (
                f"{figures_at['non_inference_ms']['p50']} / {figures_at['non_inference_ms']['p99']}"
            )
            shown[f"submissions/s {at}"] = figures_at["submissions_per_s"]
            shown[f"router resident MiB {at}"] = figures_at["router_rss_mib"]
    return shown  # fmt: skip


def every_job_completed(report: Report) -> bool:
    counts = [result["realtime_jobs"] for result in report.latency.values()]
    counts += [entry["seidra"]["jobs"] for entry in report.batching.values()]
    if report.router is not None:
        counts += [level["probe_jobs"] for level in report.router["levels"].values()]
    return all(set(count) <= {"completed"} for count in counts)


# ----- command line -----


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.splitlines()[0])
    lat, bat, rou = LatencyPlan(), BatchingPlan(), RouterPlan()
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument(
        "--slice-steps",
        type=int,
        default=release_slice_steps(),
        help="SEIDRA_STEPS_PER_DISPATCH with slicing on (default: the release's).",
    )
    parser.add_argument("--torch-threads", type=int, default=1, help="SEIDRA_TORCH_THREADS, and the bare pipeline's (default 1).")
    parser.add_argument("--size", type=int, default=lat.size, help="Width and height of every job (default 64).")
    parser.add_argument("--realtime-steps", type=int, default=lat.realtime_steps)
    parser.add_argument("--batch-steps", type=int, default=lat.batch_steps, help="Steps of the saturating batch jobs.")
    parser.add_argument("--idle-jobs", type=int, default=lat.idle_jobs)
    parser.add_argument("--loaded-jobs", type=int, default=lat.loaded_jobs)
    parser.add_argument("--interval", type=float, default=lat.interval_s, help="Seconds between realtime arrivals under load.")
    parser.add_argument("--batch-depth", type=int, default=lat.batch_depth, help="Batch jobs kept waiting under load.")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--batching-calls", type=int, default=bat.calls, help="Pipeline calls per round and batch size.")
    parser.add_argument("--batching-rounds", type=int, default=bat.rounds, help="Rounds of bare pipeline, then SEIDRA.")
    parser.add_argument("--low-waiting", type=int, default=rou.low_waiting)
    parser.add_argument("--high-waiting", type=int, default=rou.high_waiting)
    parser.add_argument("--chunk", type=int, default=rou.chunk, help="Jobs per /generation/batch (default 500).")
    parser.add_argument("--probes", type=int, default=rou.probes, help="Realtime jobs timed at each level.")
    parser.add_argument("--record", type=Path, help="Append the result to this file (docs/benchmarks.md).")
    parser.add_argument("--out", type=Path, help="Also write the report (JSON) here.")
    return parser


def plan_from(args: argparse.Namespace) -> Plan:
    return Plan(
        latency=LatencyPlan(
            args.size, args.realtime_steps, args.batch_steps, args.idle_jobs, args.loaded_jobs, args.interval, args.batch_depth
        ),
        batching=BatchingPlan(args.size, args.realtime_steps, args.batching_calls, args.batching_rounds),
        router=RouterPlan(args.size, args.realtime_steps, args.low_waiting, args.high_waiting, args.chunk, args.probes),
        slice_steps=args.slice_steps,
        batch_sizes=tuple(args.batch_sizes),
        torch_threads=args.torch_threads,
        scenarios=tuple(args.scenarios),
    )


def main(argv: Sequence[str] | None = None) -> int:
    from serve_app.demo import ensure_model
    from storage.settings import seidra_home

    args = build_parser().parse_args(argv)
    plan = plan_from(args)
    ensure_model()
    with bench_head(seidra_home() / "bench") as head:
        # After the head started (at our niceness): Ray runs its workers at this niceness, and a load
        # generator at the default one would take the CPU from what it measures.
        os.nice(max(0, RAY_WORKER_NICENESS - os.nice(0)))
        report = run(head, plan, os.environ["SEIDRA_MODEL"])
    result = report.as_dict()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if args.record:
        record.append(args.record, TITLE, figures(report), result, targets(report))
    return 0 if every_job_completed(report) else 1


if __name__ == "__main__":
    sys.exit(main())
