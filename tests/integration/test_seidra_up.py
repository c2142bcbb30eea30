"""`seidra up` and `seidra down` as an operator runs them: the installed command, a Ray head of its own.

Every test gives `seidra` its own SEIDRA_HOME and free ports, and leaves no process of its head
behind, whatever happened (see `Seidra.leftovers`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from serve_app.cluster import process_started_ticks
from tests.ray_app import free_port

SEIDRA = Path(sys.executable).with_name("seidra")
# What this session's own cluster put in the environment must not leak into these `seidra up`s.
NOT_INHERITED = ("SEIDRA_", "HF_", "OTEL_", "RAY_ADDRESS")


@dataclass
class Seidra:
    """The `seidra` command in a shell of its own: SEIDRA_HOME, model, ports."""

    home: Path
    env: dict[str, str]
    gcs_port: int
    up_args: list[str]

    def run(self, *argv: str, timeout_s: float = 300, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(SEIDRA), *argv], env={**self.env, **env}, capture_output=True, text=True, timeout=timeout_s)

    def up(self, *argv: str, timeout_s: float = 300, **env: str) -> subprocess.CompletedProcess[str]:
        return self.run("up", *self.up_args, *argv, timeout_s=timeout_s, **env)

    def state(self) -> dict[str, Any] | None:
        path = self.home / "run" / "up.json"
        return json.loads(path.read_text()) if path.exists() else None

    def leftovers(self) -> list[int]:
        """Pids of this test's Ray head: `ray start`, the GCS, the raylet and the agents name its GCS port on their
        command lines (workers, renamed `ray::...`, exit with their raylet)."""
        mentions_port = re.compile(rf"[=:]{self.gcs_port}(\D|$)")
        pids = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue  # gone meanwhile
            if mentions_port.search(text) and int(cmdline.parent.name) != os.getpid():
                pids.append(int(cmdline.parent.name))
        return pids


def error_line(done: subprocess.CompletedProcess[str]) -> str:
    """`seidra`'s own error: the last line on stderr (Ray's client logs its connection above it)."""
    lines = done.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("seidra: error: "), done.stdout[-3000:] + done.stderr[-3000:]
    return lines[-1]


@pytest.fixture
def seidra(tmp_path: Path, tiny_model: Path) -> Iterator[Seidra]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(NOT_INHERITED)}
    env.update(
        SEIDRA_HOME=str(tmp_path / "home"),
        SEIDRA_MODEL=str(tiny_model),
        SEIDRA_TORCH_THREADS="1",
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",  # the SIGKILL test follows `seidra up`'s progress line by line
    )
    gcs_port = free_port()
    up_args = ["--gcs-port", str(gcs_port), "--dashboard-port", str(free_port()), "--http-port", str(free_port())]
    cli = Seidra(tmp_path / "home", env, gcs_port, [*up_args, "--num-cpus", "2"])
    try:
        yield cli
    finally:
        if cli.state() is not None:
            cli.run("down", timeout_s=120)
        for pid in cli.leftovers():  # only after a failed test: its workers exit with their raylet
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_an_unknown_setting_is_refused_before_ray_starts(seidra: Seidra) -> None:
    done = seidra.up(
        "--timeout", "30", SEIDRA_MODLE="/models/typo", SEIDRA_API_URL="http://127.0.0.1:9", timeout_s=120
    )  # fmt: skip
    assert done.returncode == 1
    line = error_line(done)
    assert "SEIDRA_MODLE (did you mean SEIDRA_MODEL?)" in line
    assert "SEIDRA_API_URL" not in line  # the CLI's own variable, never forwarded to the application
    assert "Starting a local Ray head" not in done.stdout
    assert seidra.state() is None


def test_a_failed_deployment_ends_up_at_once_with_serves_reason(seidra: Seidra) -> None:
    # Valid as a name, refused by the settings inside the API replica: Serve marks the app DEPLOY_FAILED.
    started = time.monotonic()
    done = seidra.up(SEIDRA_MAX_REALTIME_QUEUE="0", timeout_s=240)
    assert done.returncode == 1, done.stdout[-3000:]
    line = error_line(done)
    assert "Serve could not deploy the application (DEPLOY_FAILED)" in line
    assert "max_realtime_queue" in line and "greater than or equal to 1" in line
    assert time.monotonic() - started < 180  # not the 600 s of --timeout
    assert seidra.state() is None
    assert seidra.leftovers() == []


def test_no_usable_worker_ends_up_with_the_workers_reasons(seidra: Seidra, tmp_path: Path) -> None:
    empty = tmp_path / "empty-model"
    empty.mkdir()
    done = seidra.up(SEIDRA_MODEL=str(empty), timeout_s=300)
    assert done.returncode == 1, done.stdout[-3000:]
    assert "SEIDRA is up" not in done.stdout
    line = error_line(done)
    assert re.search(r"no worker replica .*usable.*: replica \w+ offline/unhealthy: model not loaded: OSError", line), line
    assert seidra.state() is None
    assert seidra.leftovers() == []


def test_down_stops_the_head_of_an_up_killed_while_it_waits(seidra: Seidra) -> None:
    up = subprocess.Popen(
        [str(SEIDRA), "up", *seidra.up_args], env=seidra.env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )  # fmt: skip
    try:
        assert up.stdout is not None
        for line in up.stdout:  # the head is up: `seidra up` deploys, then waits for the application
            if line.startswith("Deploying the Serve application"):
                break
        else:
            pytest.fail(f"`seidra up` ended before deploying (exit code {up.wait()})")
        time.sleep(2)
        up.send_signal(signal.SIGKILL)
    finally:
        up.kill()
        up.wait()

    state = seidra.state()
    assert state is not None and state["status"] == "starting"
    head_pid = state["head_pid"]
    assert process_started_ticks(head_pid) == state["head_started_ticks"]  # the head outlived `seidra up`

    again = seidra.up(timeout_s=60)
    assert again.returncode == 1
    line = error_line(again)
    assert f"SEIDRA is still starting, or its `seidra up` was interrupted (its Ray head, pid {head_pid}, is running" in line

    down = seidra.run("down", timeout_s=120)
    assert down.returncode == 0, down.stderr[-3000:]
    assert "Ray head stopped" in down.stdout
    assert process_started_ticks(head_pid) is None
    assert seidra.leftovers() == []
    assert seidra.state() is None
