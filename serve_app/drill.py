"""`make drill`: take a running SEIDRA through an injected GPU fault under mixed load, and back.

It starts SEIDRA with fault injection on (the only place besides the tests that turns it on),
sends batch work, makes every GPU report 95 °C, sends realtime work during the outage, clears the
fault, and checks the runbook's promises: every job completes, each delayed job has its history and
its warning, realtime jobs start before the batch jobs queued earlier, and the replicas' mode and
health are visible throughout.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from serve_app.cli import format_jobs_table, worker_line
from serve_app.cli import main as seidra
from serve_app.client import SeidraClient
from serve_app.cluster import UpState
from serve_app.demo import ensure_model

DRILL_ENV = {
    "SEIDRA_FAULT_INJECTION": "1",
    "SEIDRA_STEPS_PER_DISPATCH": "4",
    "SEIDRA_HEARTBEAT_INTERVAL_S": "1",
    "SEIDRA_HOLD_BASE_S": "2",
    "SEIDRA_HOLD_CAP_S": "10",
}
OUTAGE_S = 12.0
JOB = {"width": 128, "height": 128, "num_inference_steps": 24}


def show_status(api: SeidraClient, label: str) -> None:
    status = api.get("/status")
    print(f"[{label}] queues {status['queues']} held {status['held']} running {status['running']}")
    for worker in status["workers"]:
        print(f"    {worker_line(worker)}")


def run(api: SeidraClient) -> list[str]:
    """The drill itself; returns the failed checks."""
    batch = api.post("/generation/batch", json={"items": [{"prompt": f"batch {i}", **JOB} for i in range(6)]})
    batch_ids = [str(job_id) for job_id in batch["job_ids"]]
    show_status(api, "load")
    print("\n== Injecting the fault: every GPU reports 95 °C ==")
    api.post("/admin/faults", json={"temperature_c": 95})
    while not api.get("/status")["outage"]:  # the replicas learn of it with their next heartbeat
        time.sleep(0.5)
    deadline = time.monotonic() + OUTAGE_S
    realtime_ids: list[str] = []
    while time.monotonic() < deadline:
        if len(realtime_ids) < 2:
            realtime_ids.append(api.post("/generation/single", json={"prompt": "interactive", **JOB})["id"])
        show_status(api, "outage")
        time.sleep(3)
    print("\n== Clearing the fault ==")
    api.delete("/admin/faults")
    jobs = {job_id: api.wait_for_job(job_id, timeout_s=600) for job_id in batch_ids + realtime_ids}
    show_status(api, "recovered")
    return report(api, jobs, batch_ids, realtime_ids)


def report(api: SeidraClient, jobs: dict[str, dict[str, Any]], batch_ids: list[str], realtime_ids: list[str]) -> list[str]:
    print()
    print(format_jobs_table(sorted(jobs.values(), key=lambda job: job["started_at"] or "")))
    failed_checks = []
    if any(job["status"] != "completed" for job in jobs.values()):
        failed_checks.append("every job completed")
    delayed = [job for job in jobs.values() if job["metadata"].get("degraded")]
    print(f"\n{len(delayed)} job(s) were delayed:")
    for job in delayed:
        degraded = job["metadata"]["degraded"]
        levels = [note["level"] for note in api.get("/notifications", params={"job_id": job["id"]})]
        print(f"  {job['id']} ({job['lane']}): {degraded['delays']} delay(s) since {degraded['since']}; notified: {levels}")
        for entry in degraded["history"]:  # the first and the latest delay
            print(f"      {entry['at']}  retry after {entry['retry_after_seconds']} s  {entry['reason']}")
        # One warning when a hold begins, one info when the job runs again: per episode, not per delay.
        if not levels.count("warning") == levels.count("info") >= 1 or "resumed_at" not in degraded:
            failed_checks.append(f"one warning per hold and one info per resumption, for {job['id']}")
    if not delayed:
        failed_checks.append("some jobs were delayed by the outage")
    overtaken = [
        (jobs[r], jobs[b])
        for r in realtime_ids
        for b in batch_ids
        if jobs[b]["started_at"] > jobs[r]["created_at"]  # b was still waiting when r arrived
    ]
    if any(r["finished_at"] > b["started_at"] for r, b in overtaken):
        failed_checks.append("realtime jobs ran before the batch jobs queued earlier")
    print(
        f"Realtime jobs finished before the {len({b['id'] for _, b in overtaken})} batch job(s) still waiting when they arrived started."
    )
    return failed_checks


def main() -> int:
    for key, value in DRILL_ENV.items():
        os.environ.setdefault(key, value)
    # On this machine's loopback, as `make demo`: one local admin, no keys to make (refused elsewhere).
    os.environ["SEIDRA_AUTH"] = "off"
    ensure_model()
    if seidra(["up"]) != 0:
        return 1
    try:
        with SeidraClient(UpState.load().url) as api:  # type: ignore[union-attr]
            failed_checks = run(api)
    except Exception as error:  # report, then still bring SEIDRA down
        print(f"drill aborted: {error}", file=sys.stderr)
        failed_checks = ["the drill ran to its end"]
    finally:
        seidra(["down"])
    print("\nDrill " + ("PASSED" if not failed_checks else "FAILED: " + "; ".join(failed_checks)))
    return 1 if failed_checks else 0


if __name__ == "__main__":
    sys.exit(main())
