"""`seidra up` and `seidra down` as an operator runs them: the installed command, a Ray head of its own.

Every test gives `seidra` its own SEIDRA_HOME and free ports, and leaves no process of its head
behind, whatever happened (see `Seidra.leftovers`).
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from serve_app.cluster import auth_off_refusal, process_started_ticks
from tests.seidra_command import SEIDRA, Seidra, error_line


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


def test_no_keys_beyond_loopback_is_refused_before_ray_starts(seidra: Seidra) -> None:
    done = seidra.up("--http-host", "0.0.0.0", SEIDRA_AUTH="off", timeout_s=120)
    assert done.returncode == 1
    assert error_line(done) == f"seidra: error: {auth_off_refusal('0.0.0.0')}"
    assert "Starting a local Ray head" not in done.stdout
    assert seidra.state() is None and seidra.leftovers() == []


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
