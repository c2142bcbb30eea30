"""Bringing the application up on a Ray cluster and down again (`seidra up` / `seidra down`).

A head started by `seidra up` runs as `ray start --head --block` in its own process group, so
`seidra down` stops exactly those processes and leaves any other Ray cluster on the host alone.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from storage.settings import seidra_home

SERVE_APP_NAME = "seidra"
SERVE_CONFIG = Path(__file__).with_name("serve_config.yaml")
# Settings travel to every replica and to the router through the runtime_env.
FORWARDED_ENV_PREFIXES = ("SEIDRA_", "HF_", "OTEL_")
HEAD_START_TIMEOUT_S = 120.0
HEAD_STOP_GRACE_S = 30.0



class ClusterError(RuntimeError):
    """A failure to report as one line to the operator."""


@dataclass
class UpState:
    url: str
    address: str
    dashboard_url: str | None
    head_pid: int | None  # set only when `seidra up` started the head itself
    # With the pid, identifies the process: after a reboot the pid may belong to something else.
    head_started_ticks: str | None = None

    @staticmethod
    def path() -> Path:
        return seidra_home() / "run" / "up.json"

    def save(self) -> None:
        self.path().parent.mkdir(parents=True, exist_ok=True)
        self.path().write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls) -> "UpState | None":
        try:
            return cls(**json.loads(cls.path().read_text()))
        except FileNotFoundError:
            return None

    @classmethod
    def forget(cls) -> None:
        cls.path().unlink(missing_ok=True)


def forwarded_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key.startswith(FORWARDED_ENV_PREFIXES)}
    # Resolved here: replicas run in other working directories and maybe as other users.
    env["SEIDRA_HOME"] = str(seidra_home())
    return env


def use_token_auth() -> None:
    """Ray clusters started here use token authentication, and so must every client of theirs.

    Ray 2.60 turns token auth on for a new head but not for a client joining one by address, so we
    make the choice explicit (an operator can still set RAY_AUTH_MODE=disabled for a cluster without it).
    """
    if "RAY_AUTH_MODE" in os.environ:
        return
    subprocess.run([_executable("ray"), "get-auth-token", "--generate"], check=True, capture_output=True)
    os.environ["RAY_AUTH_MODE"] = "token"


def _path_with_this_python() -> str:
    """`ray job submit -- python ...` on this head must find this environment's Python."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def _executable(name: str) -> str:
    beside_python = Path(sys.executable).with_name(name)
    found = str(beside_python) if beside_python.exists() else shutil.which(name)
    if not found:
        raise ClusterError(f"the `{name}` command is not installed in this environment")
    return found


def process_started_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _check_port_free(port: int, what: str) -> None:
    with socket.socket() as probe:
        # As servers do: a port left in TIME_WAIT by a cluster that just stopped is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError:
            raise ClusterError(
                f"{what} port {port} is in use (another Ray cluster?): choose another port or stop that cluster"
            ) from None


def start_head(gcs_port: int, dashboard_port: int, num_cpus: int | None, log_file: Path) -> int:
    """Start `ray start --head --block` in a new process group; returns its pid once the GCS answers."""
    _check_port_free(gcs_port, "GCS")
    _check_port_free(dashboard_port, "dashboard")
    use_token_auth()
    command = [
        _executable("ray"), "start", "--head", "--block",
        f"--port={gcs_port}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
    ]  # fmt: skip
    if num_cpus is not None:
        command.append(f"--num-cpus={num_cpus}")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env={**os.environ, **forwarded_env(), "PATH": _path_with_this_python()},
        )  # fmt: skip
    try:
        _wait_for_head(process, dashboard_port, log_file)
    except BaseException:  # Ctrl-C included: the head lives in its own session and would outlive us
        stop_head(process.pid)
        raise
    return process.pid


def _wait_for_head(process: subprocess.Popen[bytes], dashboard_port: int, log_file: Path) -> None:
    deadline = time.monotonic() + HEAD_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ClusterError(f"`ray start --head` exited with code {process.returncode}; see {log_file}")
        if _dashboard_answers(dashboard_port):
            return
        time.sleep(1)
    raise ClusterError(f"the Ray head did not come up within {HEAD_START_TIMEOUT_S:.0f} s; see {log_file}")


def _dashboard_answers(port: int) -> bool:
    # Any answer will do: with Ray's token authentication on, an anonymous request gets a 401.
    try:
        return httpx.get(f"http://127.0.0.1:{port}/api/version", timeout=2).status_code < 500
    except httpx.HTTPError:
        return False


def stop_head(pid: int) -> None:
    """SIGTERM the head's process group (the raylet, GCS, dashboard and workers), then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + HEAD_STOP_GRACE_S
        while time.monotonic() < deadline:
            if not _group_alive(pid):
                return
            time.sleep(0.5)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # Reap our own child when it has exited, or it lingers as a zombie that still "exists".
    try:
        os.waitpid(pgid, os.WNOHANG)
    except ChildProcessError:
        pass
    return True


def serve_config(http_host: str, http_port: int, cluster_gpus: float, source: Path = SERVE_CONFIG) -> dict[str, Any]:
    """The Serve config file, with this shell's SEIDRA_* settings and the HTTP address applied.

    A setting in the environment wins over the same one in the file's application args, so
    `SEIDRA_MODEL=... seidra up` does what it says. On a cluster without GPUs the workers run on
    the CPU, at a fixed count, unless SEIDRA_NUM_GPUS / SEIDRA_MAX_WORKERS say otherwise.
    """
    config = yaml.safe_load(source.read_text())
    config["http_options"] = {**config.get("http_options", {}), "host": http_host, "port": http_port}
    [app] = [app for app in config["applications"] if app["name"] == SERVE_APP_NAME]
    env = forwarded_env()
    settings = {key.removeprefix("SEIDRA_").lower(): value for key, value in env.items() if key.startswith("SEIDRA_")}
    if not cluster_gpus:  # a laptop or CI machine: one CPU worker, unless told otherwise
        settings.setdefault("num_gpus", "0")
        settings.setdefault("max_workers", "0")
    app["args"] = {**(app.get("args") or {}), **settings}
    others = {key: value for key, value in env.items() if not key.startswith("SEIDRA_")}
    runtime_env = app.setdefault("runtime_env", {})
    runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **others}
    return config


def deploy(address: str, http_host: str, http_port: int, timeout_s: float) -> str:
    """Deploy the Serve config on the cluster at `address`; returns the base URL once it answers."""
    use_token_auth()  # before Ray is imported: it reads RAY_AUTH_MODE once
    import ray

    context = ray.init(address=address, log_to_driver=False)
    dashboard_url = f"http://{context.dashboard_url}"
    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    ray.shutdown()
    if not cluster_gpus:
        print("No GPU in this Ray cluster: worker replicas run on the CPU.")
    return deploy_serve_config(dashboard_url, http_host, http_port, cluster_gpus, timeout_s)


def deploy_serve_config(dashboard_url: str, http_host: str, http_port: int, cluster_gpus: float, timeout_s: float) -> str:
    """`serve deploy` the Serve config (with this shell's settings) through the dashboard at `dashboard_url`."""
    derived = seidra_home() / "run" / "serve_config.yaml"
    derived.parent.mkdir(parents=True, exist_ok=True)
    derived.write_text(yaml.safe_dump(serve_config(http_host, http_port, cluster_gpus), sort_keys=False))
    completed = subprocess.run(
        [_executable("serve"), "deploy", str(derived), "--address", dashboard_url], capture_output=True, text=True
    )
    if completed.returncode != 0:
        raise ClusterError(f"`serve deploy {derived}` failed: {completed.stderr.strip().splitlines()[-1:]}")
    url = f"http://{'127.0.0.1' if http_host in ('0.0.0.0', '::') else http_host}:{http_port}"
    wait_until_healthy(url, timeout_s=timeout_s)
    wait_for_workers(url, timeout_s=timeout_s)
    return url


def wait_for_workers(url: str, timeout_s: float) -> None:
    """Until a worker replica reports to the router (its model loaded), or a clear error."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/status", timeout=5).json()["workers"]:
                return
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(1)
    raise ClusterError(
        f"no worker replica reported within {timeout_s:.0f} s: see `serve status` "
        "(not enough GPUs or CPUs for SEIDRA_NUM_GPUS / SEIDRA_WORKER_NUM_CPUS? a model that fails to load?)"
    )


def wait_until_healthy(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise ClusterError(f"the application did not answer on {url}/health within {timeout_s:.0f} s")


def undeploy(address: str) -> None:
    """Delete the Serve application and the router actor; other applications stay."""
    use_token_auth()
    import ray
    from ray import serve

    from scheduling.router import get_router

    ray.init(address=address, log_to_driver=False)
    try:
        serve.delete(SERVE_APP_NAME)
        try:
            ray.kill(get_router(SERVE_APP_NAME), no_restart=True)
        except ValueError:
            pass  # no router: nothing was ever submitted, or it is already gone
    finally:
        ray.shutdown()
