"""Bringing the application up on a Ray cluster and down again (`seidra up` / `seidra down`).

A head started by `seidra up` runs as `ray start --head --block` in its own process group, so
`seidra down` stops exactly those processes and leaves any other Ray cluster on the host alone.

Secrets (`storage.settings.SECRET_VARIABLES`) are never forwarded: the head's processes inherit
them from `seidra up`'s environment, and the nodes of a cluster joined by address have their own.
Every file written here is readable by its owner alone.
"""

from __future__ import annotations

import contextlib
import difflib
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import yaml

from serve_app.client import ApiError, SeidraClient
from storage.settings import is_secret_variable, seidra_home

if TYPE_CHECKING:
    from ray.serve.config import HTTPOptions

SERVE_APP_NAME = "seidra"
SERVE_CONFIG = Path(__file__).with_name("serve_config.yaml")
# Settings travel to every replica and to the router as the application's args or runtime_env,
# which anyone who can read `serve config` or the dashboard sees: secrets are left out.
FORWARDED_ENV_PREFIXES = ("SEIDRA_", "HF_", "OTEL_")
# Read by the CLI alone; the application builder would refuse them as unknown settings.
CLI_ONLY_VARIABLES = ("SEIDRA_API_URL", "SEIDRA_DEBUG", "SEIDRA_API_KEY", "SEIDRA_API_KEY_FILE")
PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700
LOOPBACK_NAMES = ("localhost",)
RAY_AGENT_PORT = 52365  # `ray start --dashboard-agent-listen-port`'s default
HEAD_START_TIMEOUT_S = 120.0
HEAD_STOP_GRACE_S = 30.0
WORKERS_TIMEOUT_S = 300.0
POLL_S = 1.0
ROUTER_STATUS_TIMEOUT_S = 5.0
# Serve's ApplicationStatus and DeploymentStatus values after which it stops trying on its own.
SERVE_FAILED_STATUSES = ("DEPLOY_FAILED", "UNHEALTHY")
# The last exception of a traceback: `ValueError: ...`, `ray.exceptions.RayTaskError(RuntimeError): ...`.
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(\([\w.]+\))?: ", re.MULTILINE)

STARTING = "starting"
UP = "up"


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
    # STARTING from the moment a head exists, so that an interrupted `seidra up` leaves nothing
    # that `seidra down` cannot stop. Files written before this field existed were all UP.
    status: str = UP

    @staticmethod
    def path() -> Path:
        return seidra_home() / "run" / "up.json"

    def save(self) -> None:
        write_private(self.path(), json.dumps(asdict(self), indent=2))

    def running_head(self) -> int | None:
        """The pid of the head `seidra up` started, while that very process runs (the pid may be reused)."""
        if self.head_pid is not None and process_started_ticks(self.head_pid) == self.head_started_ticks:
            return self.head_pid
        return None

    @classmethod
    def load(cls) -> UpState | None:
        try:
            return cls(**json.loads(cls.path().read_text()))
        except FileNotFoundError:
            return None

    @classmethod
    def forget(cls) -> None:
        cls.path().unlink(missing_ok=True)


def write_private(path: Path, text: str) -> None:
    """Write `path` readable by its owner alone; write, then rename, so that a `seidra up` killed
    mid-write leaves no half file behind."""
    path.parent.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.unlink(missing_ok=True)  # one left by a killed run may have another mode
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        file.write(text)
    partial.replace(path)


def forwarded_env() -> dict[str, str]:
    """This shell's settings for the application: every `SEIDRA_*`, `HF_*` and `OTEL_*` variable but
    the CLI's own and the secrets (and the names of secret files, which are paths on this machine)."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key.startswith(FORWARDED_ENV_PREFIXES) and key not in CLI_ONLY_VARIABLES and not is_secret_variable(key)
    }
    # Resolved here: replicas run in other working directories and maybe as other users.
    env["SEIDRA_HOME"] = str(seidra_home())
    return env


def settings_args(env: Mapping[str, str]) -> dict[str, str]:
    """The SEIDRA_* variables of `env` as the application's args: `SEIDRA_MODEL` becomes `model`."""
    return {key.removeprefix("SEIDRA_").lower(): value for key, value in env.items() if key.startswith("SEIDRA_")}


def check_settings(env: Mapping[str, str]) -> None:
    """Refuse, naming them, the SEIDRA_* variables that the application builder would refuse.

    Serve would report them only as a failed deployment, once a Ray head had started; a typo
    (SEIDRA_MODLE) or a setting of a newer release is better caught here, with the nearest name.
    """
    from serve_app.settings import SETTINGS_CLASSES, settings_from_args

    def accepted(name: str) -> bool:
        try:
            settings_from_args({name: ""})
        except ValueError:
            return False
        return True

    unknown = sorted(name for name in settings_args(env) if not accepted(name))
    if not unknown:
        return
    known = [field for cls in SETTINGS_CLASSES for field in cls.model_fields]
    raise ClusterError(
        f"unknown setting(s) in this shell: {', '.join(_with_nearest(name, known) for name in unknown)}; "
        "the application would refuse them: correct or unset them (the README's Settings table lists them all)"
    )


def _with_nearest(name: str, known: list[str]) -> str:
    nearest = difflib.get_close_matches(name, known, n=1)
    return f"SEIDRA_{name.upper()}" + (f" (did you mean SEIDRA_{nearest[0].upper()}?)" if nearest else "")


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
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), or None when it
    is not running: gone, or dead but not yet reaped (a zombie keeps its /proc entry)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else fields[19]


def _check_port_free(port: int, what: str) -> None:
    if not _port_free(port):
        raise ClusterError(f"{what} port {port} is in use (another Ray cluster?): choose another port or stop that cluster")


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        # As servers do: a port left in TIME_WAIT by a cluster that just stopped is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError:
            return False
        return True


def _agent_port() -> int:
    """Ray's default port for the head's dashboard agent, or a free one while another Ray cluster on
    this host holds it: the Jobs API finds the agent through the GCS, and without one it takes no job."""
    if _port_free(RAY_AGENT_PORT):
        return RAY_AGENT_PORT
    with socket.socket() as probe:
        probe.bind(("", 0))
        port: int = probe.getsockname()[1]
        return port


def launch_head(gcs_port: int, dashboard_port: int, num_cpus: int | None, log_file: Path) -> subprocess.Popen[bytes]:
    """Start `ray start --head --block` in a new process group; `wait_for_head` waits until it answers."""
    _check_port_free(gcs_port, "GCS")
    _check_port_free(dashboard_port, "dashboard")
    use_token_auth()
    command = [
        _executable("ray"), "start", "--head", "--block",
        f"--port={gcs_port}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
        f"--dashboard-agent-listen-port={_agent_port()}",
    ]  # fmt: skip
    if num_cpus is not None:
        command.append(f"--num-cpus={num_cpus}")
    log_file.parent.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    # The head's processes inherit this environment, secrets included: that is how they reach the
    # replicas and the router without being written anywhere. The CLI's own variables stay here: the
    # operator's API key would otherwise be every batch driver's.
    inherited = {key: value for key, value in os.environ.items() if key not in CLI_ONLY_VARIABLES}
    with os.fdopen(os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, PRIVATE_FILE_MODE), "ab") as log:
        return subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env={**inherited, **forwarded_env(), "PATH": _path_with_this_python()},
        )  # fmt: skip


def wait_for_head(process: subprocess.Popen[bytes], dashboard_port: int, log_file: Path) -> None:
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
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pgid, os.WNOHANG)
    return True


def serve_config(http_host: str, http_port: int, cluster_gpus: float, source: Path = SERVE_CONFIG) -> dict[str, Any]:
    """The Serve config file, with this shell's SEIDRA_* settings and the HTTP address applied.

    A setting in the environment wins over the same one in the file's application args, so
    `SEIDRA_MODEL=... seidra up` does what it says. On a cluster without GPUs the workers run on
    the CPU, at a fixed count, unless SEIDRA_NUM_GPUS / SEIDRA_MAX_WORKERS say otherwise.
    """
    config = yaml.safe_load(source.read_text())
    config["http_options"] = {**config.get("http_options", {}), "host": http_host, "port": http_port}
    app = _seidra_app(config)
    env = forwarded_env()
    settings = settings_args(env)
    if not cluster_gpus:  # a laptop or CI machine: one CPU worker, unless told otherwise
        settings.setdefault("num_gpus", "0")
        settings.setdefault("max_workers", "0")
    app["args"] = {**(app.get("args") or {}), **settings}
    others = {key: value for key, value in env.items() if not key.startswith("SEIDRA_")}
    runtime_env = app.setdefault("runtime_env", {})
    runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **others}
    return config


def _seidra_app(config: dict[str, Any]) -> dict[str, Any]:
    apps: list[dict[str, Any]] = [app for app in config["applications"] if app["name"] == SERVE_APP_NAME]
    [app] = apps
    return app


def is_loopback(host: str | None) -> bool:
    """Whether an HTTP proxy bound to `host` is reachable from this machine alone (None: no proxy)."""
    if host is None or host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def auth_off_refusal(http_host: str) -> str:
    return (
        f"SEIDRA_AUTH=off is allowed only while the HTTP proxy listens on loopback, and it listens on {http_host}: "
        "set SEIDRA_AUTH=keys (keys come from `seidra keys create`) or bind the proxy to 127.0.0.1"
    )


def check_auth_binding(http_host: str, source: Path = SERVE_CONFIG) -> None:
    """Refuse, before anything starts, to open an API without keys beyond this machine.

    The application's `auth` is this shell's SEIDRA_AUTH over the config file's args, as deployed.
    """
    file_args = _seidra_app(yaml.safe_load(source.read_text())).get("args") or {}
    auth = {**file_args, **settings_args(forwarded_env())}.get("auth", "keys")
    if auth == "off" and not is_loopback(http_host):
        raise ClusterError(auth_off_refusal(http_host))


def serve_http_options() -> HTTPOptions | None:
    """The HTTP options of the Serve instance on the Ray cluster this process is connected to; None
    when it is not connected, or no Serve instance runs there.

    Ray 2.60 has no public call for them (the dashboard's `GET /api/serve/applications/` shows the
    same ones, from the same controller), hence Serve's own client, used here alone.
    """
    import ray

    if not ray.is_initialized():  # asking would start a local Ray instance
        return None
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    return None if client is None else client.http_config


def base_url(http_host: str, http_port: int) -> str:
    return f"http://{'127.0.0.1' if http_host in ('0.0.0.0', '::') else http_host}:{http_port}"


def deploy(address: str, http_host: str, http_port: int, timeout_s: float, workers_timeout_s: float) -> str:
    """Deploy the Serve config on the cluster at `address`; returns the base URL once a worker is usable."""
    use_token_auth()  # before Ray is imported: it reads RAY_AUTH_MODE once
    import ray

    context = ray.init(address=address, log_to_driver=False)
    try:  # connected until the workers are ready: their state is asked of the router through Ray
        dashboard_url = f"http://{context.dashboard_url}"
        cluster_gpus = ray.cluster_resources().get("GPU", 0)
        if not cluster_gpus:
            print("No GPU in this Ray cluster: worker replicas run on the CPU.")
        return deploy_serve_config(dashboard_url, http_host, http_port, cluster_gpus, timeout_s, workers_timeout_s)
    finally:
        ray.shutdown()


def deploy_serve_config(
    dashboard_url: str,
    http_host: str,
    http_port: int,
    cluster_gpus: float,
    timeout_s: float,
    workers_timeout_s: float = WORKERS_TIMEOUT_S,
) -> str:
    """`serve deploy` the Serve config (with this shell's settings) through the dashboard at `dashboard_url`.

    Returns the base URL once the application answers and a worker replica is usable; fails as soon
    as Serve gives up on the application, with Serve's reason (or the workers' own). The caller is
    connected to the cluster's Ray: the workers' state comes from the router, with no API key.
    """
    derived = seidra_home() / "run" / "serve_config.yaml"
    write_private(derived, yaml.safe_dump(serve_config(http_host, http_port, cluster_gpus), sort_keys=False))
    completed = subprocess.run(
        [_executable("serve"), "deploy", str(derived), "--address", dashboard_url], check=False, capture_output=True, text=True
    )
    if completed.returncode != 0:
        raise ClusterError(f"`serve deploy {derived}` failed: {completed.stderr.strip().splitlines()[-1:]}")
    url = base_url(http_host, http_port)
    serve_app = ServeApp(dashboard_url)
    with SeidraClient(url, timeout_s=5, get_retries=0) as api:  # these loops are the retries
        print(f"Waiting for the application to answer on {url} (up to {timeout_s:.0f} s)...")
        wait_until_healthy(api, serve_app.state, timeout_s)
        print(f"Waiting for a usable worker replica (up to {workers_timeout_s:.0f} s)...")
        wait_for_workers(router_status, serve_app.state, workers_timeout_s)
    return url


@dataclass(frozen=True)
class ServeAppState:
    status: str  # Serve's ApplicationStatus: DEPLOYING, RUNNING, DEPLOY_FAILED, UNHEALTHY, ...
    message: str  # Serve's reasons on one line: of its failed deployments, else of those not yet healthy

    @property
    def failed(self) -> bool:
        return self.status in SERVE_FAILED_STATUSES

    @classmethod
    def from_details(cls, app: dict[str, Any]) -> ServeAppState:
        """From one application of the dashboard's `GET /api/serve/applications/` (Serve's REST API)."""
        deployments = app.get("deployments") or {}

        def reasons(statuses: Callable[[str], bool]) -> list[str]:
            return [
                f"{name}: {_one_line(details['message'])}"
                for name, details in deployments.items()
                if statuses(details["status"]) and details.get("message")
            ]

        failed = reasons(lambda status: status in SERVE_FAILED_STATUSES)
        message = "; ".join(failed or reasons(lambda status: status != "HEALTHY")) or _one_line(app.get("message", ""))
        return cls(app["status"], message)


def _one_line(message: str) -> str:
    """A traceback's last exception with the lines that detail it, else the whole message, on one line."""
    starts = [match.start() for match in _EXCEPTION_LINE.finditer(message)]
    return " ".join(message[starts[-1] if starts else 0 :].split())


class ServeApp:
    """Serve's own account of the application, from the dashboard's REST API (what `serve status` shows)."""

    def __init__(self, dashboard_url: str) -> None:
        self._url = f"{dashboard_url.rstrip('/')}/api/serve/applications/"
        self._headers = _dashboard_auth_headers()

    def state(self) -> ServeAppState | None:
        """None when the dashboard does not say (busy, restarting): no reason to give up."""
        try:
            response = httpx.get(self._url, headers=self._headers, timeout=5)
            response.raise_for_status()
            app = response.json()["applications"].get(SERVE_APP_NAME)
        except (httpx.HTTPError, ValueError, KeyError, AttributeError):
            return None
        return ServeAppState.from_details(app) if app else None


def _dashboard_auth_headers() -> dict[str, str]:
    """Ray's token for a dashboard with token authentication; `ray get-auth-token` knows where it lives."""
    found = subprocess.run([_executable("ray"), "get-auth-token"], check=False, capture_output=True, text=True)
    token = found.stdout.strip()
    return {"Authorization": f"Bearer {token}"} if found.returncode == 0 and token else {}


def wait_until_healthy(
    api: SeidraClient, serve_state: Callable[[], ServeAppState | None], timeout_s: float, poll_s: float = POLL_S
) -> None:
    """Until `/health` answers; fails as soon as Serve gives up on the application."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = serve_state()
        if state is not None and state.failed:
            raise ClusterError(f"Serve could not deploy the application ({state.status}): {state.message}")
        try:
            api.get("/health")
            return
        except ApiError:
            time.sleep(poll_s)
    raise ClusterError(
        f"the application did not answer on {api.base_url}/health within {timeout_s:.0f} s{_serve_says(serve_state())}"
    )


def router_status(app_name: str = SERVE_APP_NAME) -> dict[str, Any] | None:
    """The router's own view, replicas included, asked through Ray by a connected operator's process
    (with authentication on, `GET /status` would need an admin key). None until the router answers."""
    import ray

    from scheduling.router_lookup import get_router

    try:
        status = ray.get(get_router(app_name).status.remote(), timeout=ROUTER_STATUS_TIMEOUT_S)
    except (ValueError, ray.exceptions.RayError):  # not created yet, (re)starting, busy
        return None
    # As `GET /status` shows it: enum members as their values, timestamps as text.
    shown: dict[str, Any] = json.loads(json.dumps(status, default=str))
    return shown


def wait_for_workers(
    router_status: Callable[[], dict[str, Any] | None],
    serve_state: Callable[[], ServeAppState | None],
    timeout_s: float,
    poll_s: float = POLL_S,
) -> None:
    """Until a worker replica is usable (its model loaded, its GPU fit for work).

    Fails with the workers' own reasons when some report but none is usable within `timeout_s`, or
    as soon as Serve gives up on the application.
    """
    deadline = time.monotonic() + timeout_s
    workers: list[dict[str, Any]] = []  # the last ones reported: the router forgets replicas that stop reporting
    while time.monotonic() < deadline:
        status = router_status()
        if status is not None:
            if status.get("usable_slots", 0) >= 1 or any(worker.get("usable") for worker in status["workers"]):
                return
            workers = status["workers"] or workers
        state = serve_state()
        if state is not None and state.failed:
            if workers:
                raise ClusterError(f"no worker replica is usable: {_worker_reasons(workers)} (Serve: {state.status})")
            raise ClusterError(f"Serve could not deploy the application ({state.status}): {state.message}")
        time.sleep(poll_s)
    if workers:
        raise ClusterError(f"no worker replica became usable within {timeout_s:.0f} s: {_worker_reasons(workers)}")
    raise ClusterError(
        f"no worker replica reported within {timeout_s:.0f} s (not enough GPUs or CPUs for SEIDRA_NUM_GPUS / "
        f"SEIDRA_WORKER_NUM_CPUS?){_serve_says(serve_state())}; see `serve status`"
    )


def _worker_reasons(workers: list[dict[str, Any]]) -> str:
    return "; ".join(
        f"replica {worker['replica_id']} {worker['mode']}/{worker['health']}: "
        f"{worker.get('reason') or worker.get('unavailable_reason') or 'no reason given'}"
        for worker in workers
    )


def _serve_says(state: ServeAppState | None) -> str:
    return f"; Serve says: {state.message}" if state is not None and state.message else ""


def undeploy(address: str) -> None:
    """Delete the Serve application and the router actor; other applications stay."""
    use_token_auth()
    import ray
    from ray import serve

    from scheduling.router_lookup import get_router

    ray.init(address=address, log_to_driver=False)
    try:
        serve.delete(SERVE_APP_NAME)
        with contextlib.suppress(ValueError):  # no router: nothing was ever submitted, or it is already gone
            ray.kill(get_router(SERVE_APP_NAME), no_restart=True)
    finally:
        ray.shutdown()
