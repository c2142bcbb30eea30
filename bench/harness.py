"""What the serving benchmarks share: one Ray head for a whole run, SEIDRA deployed on it once per
configuration of settings, and an HTTP client that times jobs from outside.

Every configuration gets its own `seidra up --address` (a fresh SEIDRA_HOME: its own database and
images) and `seidra down`; the head stays, which saves its start and stop per configuration. Settings
travel as `SEIDRA_*` variables of `seidra up`, as an operator passes them. A setting this release does
not know is left out (`seidra up` would refuse it) and named in the report, so that a result never
claims a setting it did not run with.
"""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from bench.load import TERMINAL, Tally, router_pid, submit

APP_NAME = "seidra"
SEIDRA = Path(sys.executable).with_name("seidra")
POLL_INTERVAL_S = 0.05  # job polls after a ?wait=true answered 202: fine enough for sub-second latencies
STATUS_POLL_S = 0.2
IDLE_TIMEOUT_S = 600.0
COMMAND_TIMEOUT_S = 900.0


def free_port() -> int:
    """A port the kernel hands out (above Ray's worker port range, 10002-19999)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def known_settings() -> set[str]:
    """Every `SEIDRA_*` setting this release's application accepts."""
    from serve_app.settings import SETTINGS_CLASSES

    return {f"SEIDRA_{name.upper()}" for cls in SETTINGS_CLASSES for name in cls.model_fields}


def split_settings(settings: Mapping[str, str], known: set[str]) -> tuple[dict[str, str], dict[str, str]]:
    """(applied, ignored): the settings this release knows, and those it would refuse."""
    applied = {name: value for name, value in settings.items() if name in known}
    ignored = {name: value for name, value in settings.items() if name not in known}
    return applied, ignored


@dataclass(frozen=True)
class Deployment:
    """SEIDRA as deployed for one configuration; `settings` is what it actually ran with."""

    name: str
    url: str
    settings: dict[str, str]
    ignored_settings: dict[str, str]  # asked for, unknown to this release, not applied
    router_pid: int | None

    def describe(self) -> dict[str, Any]:
        return {"settings": self.settings, "ignored_settings": self.ignored_settings}


class BenchHead:
    """A local Ray head for the whole run (its own ports and process group), and SEIDRA on it."""

    def __init__(self, work_dir: Path, num_cpus: int | None = None) -> None:
        from serve_app.cluster import launch_head, wait_for_head

        self.work_dir = work_dir
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        # Serve's proxy keeps the port of the first deployment on this head: one port for all of them.
        self.http_port = free_port()
        log_file = work_dir / "ray-head.log"
        self._process = launch_head(self.gcs_port, self.dashboard_port, num_cpus, log_file)
        try:
            wait_for_head(self._process, self.dashboard_port, log_file)
        except BaseException:
            self.stop()
            raise
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self._known = known_settings()

    def stop(self) -> None:
        from serve_app.cluster import stop_head

        stop_head(self._process.pid)

    @contextmanager
    def deployed(self, name: str, settings: Mapping[str, str]) -> Iterator[Deployment]:
        """`seidra up --address` with `settings` (and SEIDRA_HOME of its own), `seidra down` after."""
        applied, ignored = split_settings(settings, self._known)
        home = self.work_dir / name
        shutil.rmtree(home, ignore_errors=True)
        env = {**os.environ, **applied, "SEIDRA_HOME": str(home)}
        self._seidra(env, "up", "--address", self.address, "--http-port", str(self.http_port))
        try:
            pid = router_pid(self.dashboard_url, APP_NAME)
            shown = {key: env[key] for key in sorted(env) if key.startswith("SEIDRA_") and key != "SEIDRA_HOME"}
            yield Deployment(name, f"http://127.0.0.1:{self.http_port}", shown, ignored, pid)
        finally:
            self._seidra(env, "down")
            shutil.rmtree(home, ignore_errors=True)  # a database of 100,000 jobs is no keepsake

    @staticmethod
    def _seidra(env: dict[str, str], *argv: str) -> None:
        done = subprocess.run([str(SEIDRA), *argv], env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"seidra {argv[0]} failed ({done.returncode}): {(done.stdout + done.stderr)[-2000:]}")


@contextmanager
def bench_head(work_dir: Path) -> Iterator[BenchHead]:
    work_dir.mkdir(parents=True, exist_ok=True)
    head = BenchHead(work_dir)
    try:
        yield head
    finally:
        head.stop()


# ----- jobs, timed from outside -----


@dataclass(frozen=True)
class JobTiming:
    """One job as the client saw it (`end_to_end_s`) and as its record says."""

    job: dict[str, Any]
    end_to_end_s: float  # POST sent -> the client knows it ended

    @property
    def status(self) -> str:
        return str(self.job["status"])

    @property
    def queue_wait_s(self) -> float:
        return seconds_between(self.job["created_at"], self.job["started_at"])

    @property
    def recorded_s(self) -> float:
        """created_at -> finished_at, on the router's clock."""
        return seconds_between(self.job["created_at"], self.job["finished_at"])

    @property
    def inference_s(self) -> float:
        return float(self.job["metadata"]["inference_s"])

    def parts_ms(self) -> dict[str, float]:
        """Where this job's end-to-end time went: waiting for a slot, in the pipeline, around it
        (upload, start and completion writes), and outside the record (HTTP, the API, the answer)."""
        run_s = seconds_between(self.job["started_at"], self.job["finished_at"])
        return {
            "end_to_end": round(1000 * self.end_to_end_s, 1),
            "queue_wait": round(1000 * self.queue_wait_s, 1),
            "inference": round(1000 * self.inference_s, 1),
            "around_inference": round(1000 * (run_s - self.inference_s), 1),
            "outside_record": round(1000 * (self.end_to_end_s - self.recorded_s), 1),
        }


def timestamp(text: str) -> datetime:
    return datetime.fromisoformat(text)


def seconds_between(earlier: str, later: str) -> float:
    return (timestamp(later) - timestamp(earlier)).total_seconds()


@dataclass
class Client:
    """An HTTP client of one SEIDRA, counting every answer (`tally`)."""

    http: httpx.AsyncClient
    tally: Tally = field(default_factory=Tally)

    async def run_single(self, item: dict[str, Any], deadline_s: float) -> JobTiming:
        """Submit one realtime job with ?wait=true and wait until it ends (polling if the wait ran out)."""
        started = time.perf_counter()
        job = await submit(self.http, self.tally, "/generation/single?wait=true", item)
        while job["status"] not in TERMINAL and time.perf_counter() - started < deadline_s:
            await asyncio.sleep(POLL_INTERVAL_S)
            job = await self.job(str(job["id"]))
        return JobTiming(job, time.perf_counter() - started)

    async def submit_batch(self, items: list[dict[str, Any]]) -> list[str]:
        accepted = await submit(self.http, self.tally, "/generation/batch", {"items": items})
        return [str(job_id) for job_id in accepted["job_ids"]]

    async def job(self, job_id: str) -> dict[str, Any]:
        response = await self.http.get(f"/jobs/{job_id}")
        self.tally.note(response)
        response.raise_for_status()
        job: dict[str, Any] = response.json()
        return job

    async def jobs(self, job_ids: list[str]) -> list[dict[str, Any]]:
        return [await self.job(job_id) for job_id in job_ids]

    async def wait_for(self, job_ids: list[str], deadline_s: float) -> list[dict[str, Any]]:
        """The jobs once all have ended, or as they are at the deadline.

        Polls the last job only, then looks at the others once: polling them all would take the CPU
        from the worker whose throughput is being measured.
        """
        give_up = time.perf_counter() + deadline_s
        pending = list(job_ids)
        while pending and time.perf_counter() < give_up:
            if (await self.job(pending[-1]))["status"] in TERMINAL:
                pending = [job_id for job_id in pending[:-1] if (await self.job(job_id))["status"] not in TERMINAL]
            else:
                await asyncio.sleep(STATUS_POLL_S)
        return await self.jobs(job_ids)

    async def status(self) -> dict[str, Any]:
        response = await self.http.get("/status")
        self.tally.note(response)
        response.raise_for_status()
        status: dict[str, Any] = response.json()
        return status

    async def cancel(self, job_ids: list[str]) -> None:
        """Cancel the jobs that have not ended (409: it ended meanwhile)."""
        for job_id in job_ids:
            response = await self.http.delete(f"/jobs/{job_id}")
            self.tally.note(response)

    async def pause_lane(self, lane: str, paused: bool) -> None:
        response = await self.http.post(f"/admin/lanes/{lane}", json={"paused": paused})
        self.tally.note(response)
        response.raise_for_status()

    async def wait_until_idle(self) -> None:
        """Until nothing waits or runs: the next measurement starts on an idle cluster."""
        deadline = time.perf_counter() + IDLE_TIMEOUT_S
        while time.perf_counter() < deadline:
            status = await self.status()
            if not status["running"] and not any(status["queues"].values()):
                return
            await asyncio.sleep(STATUS_POLL_S)
        raise RuntimeError(f"SEIDRA not idle within {IDLE_TIMEOUT_S:.0f} s")


def open_client(url: str, connections: int = 50) -> httpx.AsyncClient:
    """Benchmarks run with SEIDRA_AUTH=off on loopback: no key, like `make demo`."""
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=url, timeout=300, limits=limits)


# ----- figures -----


def summary_ms(values_s: list[float]) -> dict[str, float | int | None]:
    """Count, p50, p95 and p99 in milliseconds (nearest rank); None without values."""
    ordered = sorted(values_s)

    def rank(q: float) -> float | None:
        if not ordered:
            return None
        return round(1000 * ordered[max(0, math.ceil(q * len(ordered)) - 1)], 1)

    return {"count": len(ordered), "p50": rank(0.50), "p95": rank(0.95), "p99": rank(0.99)}


def ratio(numerator: float | int | None, denominator: float | int | None) -> float | None:
    """numerator / denominator, or None when either is missing (or the denominator is 0)."""
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 3)


def images_per_s(jobs: list[dict[str, Any]]) -> float | None:
    """Completed images per second over their span, first start to last finish (records' clock)."""
    done = [job for job in jobs if job["status"] == "completed"]
    if not done:
        return None
    span_s = seconds_between(min(job["started_at"] for job in done), max(job["finished_at"] for job in done))
    return round(len(done) / span_s, 3) if span_s > 0 else None


def steady_images_per_s(finished_at: list[str]) -> float | None:
    """Completions per second between the first and the last completion in a window: (n - 1) / span.

    Counting the intervals between completions, not the completions in a window, keeps an image that
    ends just inside or outside the window from moving the figure by a whole image.
    """
    if len(finished_at) < 2:
        return None
    ordered = sorted(timestamp(text) for text in finished_at)
    span_s = (ordered[-1] - ordered[0]).total_seconds()
    return round((len(ordered) - 1) / span_s, 3) if span_s > 0 else None
