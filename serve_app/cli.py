"""`seidra`: bring the application up and down, submit prompts, list jobs.

User mistakes and unreachable services end in one line on stderr and exit code 1, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from scheduling.lanes import Lane
from serve_app.client import (
    DEFAULT_URL,
    FINAL_EVENTS,
    ApiError,
    KeyFileError,
    SeidraClient,
    ServerEvent,
    api_key_from_environment,
)
from serve_app.cluster import (
    STARTING,
    UP,
    WORKERS_TIMEOUT_S,
    ClusterError,
    UpState,
    base_url,
    check_auth_binding,
    check_settings,
    deploy,
    forwarded_env,
    launch_head,
    process_started_ticks,
    stop_head,
    undeploy,
    use_token_auth,
    wait_for_head,
)
from storage.job_status import JobStatus

if TYPE_CHECKING:
    from datetime import datetime

    from storage.api_keys import ApiKeyStore


class CliError(Exception):
    pass


# ----- talking to the API -----


def api_url(explicit: str | None) -> str:
    if explicit:
        return explicit.rstrip("/")
    if os.environ.get("SEIDRA_API_URL"):
        return os.environ["SEIDRA_API_URL"].rstrip("/")
    state = UpState.load()
    return state.url if state else DEFAULT_URL


def api_client(explicit_url: str | None) -> SeidraClient:
    return SeidraClient(api_url(explicit_url), api_key=api_key())


def api_key() -> str | None:
    """The API key from SEIDRA_API_KEY, or read from the file SEIDRA_API_KEY_FILE names; None without either."""
    try:
        return api_key_from_environment()
    except KeyFileError as error:
        raise CliError(str(error)) from None


# ----- commands -----


def cmd_up(args: argparse.Namespace) -> None:
    from deployments.settings import WorkerSettings
    from storage.database import upgrade
    from storage.settings import StorageSettings

    use_token_auth()  # first of all: Ray reads RAY_AUTH_MODE once, when something imports it
    check_settings(forwarded_env())  # before SEIDRA_MODEL: SEIDRA_MODLE=... deserves its own answer
    check_auth_binding(args.http_host)
    try:
        WorkerSettings().require_model()
    except ValueError as error:
        raise CliError(str(error)) from None
    _forget_stale_state()
    upgrade(StorageSettings().database_url)
    with _sigterm_as_interrupt():
        try:
            state = _start_head(args) if args.address is None else _joined(args)
            print(f"Deploying the Serve application on {state.address}...")
            deploy(state.address, args.http_host, args.http_port, args.timeout, args.workers_timeout)
        except BaseException:  # Ctrl-C and SIGTERM included: the head lives in its own session
            _abandon()
            raise
    replace(state, status=UP).save()
    print(f"SEIDRA is up: {state.url}")
    if state.dashboard_url:
        print(f"Ray dashboard: {state.dashboard_url}   (ray job submit --address {state.dashboard_url} ...)")


def _forget_stale_state() -> None:
    """Refuse to start over a running SEIDRA; forget the state of one whose head is gone."""
    previous = UpState.load()
    if previous is None:
        return
    if previous.head_pid is not None and previous.running_head() is None:
        print(f"Forgetting an earlier `seidra up`: the Ray head it started (pid {previous.head_pid}) is no longer running.")
        UpState.forget()
        return
    if previous.status == STARTING:
        where = f"its Ray head, pid {previous.head_pid}, is running" if previous.head_pid else f"on {previous.address}"
        raise CliError(
            f"SEIDRA is still starting, or its `seidra up` was interrupted ({where}; state in {UpState.path()}): "
            "wait for it to finish, or run `seidra down`"
        )
    raise CliError(f"SEIDRA is already up at {previous.url} (state in {UpState.path()}); run `seidra down` first")


def _joined(args: argparse.Namespace) -> UpState:
    """Record the cluster before deploying: `seidra down` deletes what a killed `seidra up` left there."""
    state = UpState(base_url(args.http_host, args.http_port), args.address, dashboard_url=None, head_pid=None, status=STARTING)
    state.save()
    return state


def _start_head(args: argparse.Namespace) -> UpState:
    """Start a local head and record it at once, so that `seidra down` can stop it whatever happens next."""
    from storage.settings import seidra_home

    print(f"Starting a local Ray head (GCS port {args.gcs_port}, dashboard 127.0.0.1:{args.dashboard_port})...")
    log_file = seidra_home() / "run" / "ray-head.log"
    head = launch_head(args.gcs_port, args.dashboard_port, args.num_cpus, log_file)
    state = UpState(
        url=base_url(args.http_host, args.http_port),
        address=f"127.0.0.1:{args.gcs_port}",
        dashboard_url=f"http://127.0.0.1:{args.dashboard_port}",
        head_pid=head.pid,
        head_started_ticks=process_started_ticks(head.pid),
        status=STARTING,
    )
    state.save()
    wait_for_head(head, args.dashboard_port, log_file)
    return state


def _abandon() -> None:
    """After a failed or interrupted `seidra up`: stop the head it recorded, forget the state."""
    recorded = UpState.load()
    head_pid = recorded.running_head() if recorded else None
    if head_pid is not None:
        print(f"Stopping the Ray head that `seidra up` started (pid {head_pid})...")
        stop_head(head_pid)
    UpState.forget()


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so that `seidra up` stops the head it started before exiting."""

    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        # A second SIGTERM during that cleanup ends us at once; the state file still tells `seidra down`.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def cmd_down(_args: argparse.Namespace) -> None:
    state = UpState.load()
    if state is None:
        raise CliError(f"nothing to stop: no `seidra up` state in {UpState.path()}")
    if state.head_pid is not None and state.running_head() is None:
        UpState.forget()
        print(f"The Ray head that `seidra up` started (pid {state.head_pid}) is no longer running; forgot its state.")
        print("SEIDRA is down")
        return
    # A head that is still starting goes with everything on it; no need to reach it first.
    if state.head_pid is None or state.status == UP:
        try:
            undeploy(state.address)
        except Exception as error:  # the cluster may already be gone; the head is still ours to stop
            print(f"warning: could not delete the application cleanly: {error}", file=sys.stderr)
    if state.head_pid is not None:
        stop_head(state.head_pid)
    UpState.forget()
    print("SEIDRA is down" + (" (Ray head stopped)" if state.head_pid else " (the Ray cluster keeps running)"))


def cmd_status(args: argparse.Namespace) -> None:
    with api_client(args.url) as api:
        status = api.get("/status")
    if args.json:
        print(json.dumps(status, indent=2))
        return
    print(f"SEIDRA at {api.base_url}")
    print("queues:  " + ", ".join(f"{lane} {depth}" for lane, depth in status["queues"].items()))
    admin_view = "workers" in status  # a user key sees queue depths and its own counts only
    if admin_view:
        print(f"running: {status['running']} job(s), {status['usable_slots']} usable worker slot(s) free")
    mine = "" if admin_view else " (yours)"
    if status["jobs"] is None:  # the router answers from memory; the counts need the database
        print(f"jobs{mine}:    unknown: the database is {status['database']}")
    else:
        counts = ", ".join(f"{name} {count}" for name, count in sorted(status["jobs"].items())) or "none"
        print(f"jobs{mine}:    {counts}")
    if status.get("recovering"):
        print("RECOVERING: the router is rebuilding its queue from the database; submissions get 503 until it is done")
    if status["paused_lanes"]:
        print(f"PAUSED:  {', '.join(status['paused_lanes'])} (seidra lane resume LANE)")
    if not admin_view:
        return
    print("held:    " + ", ".join(f"{lane} {count}" for lane, count in status["held"].items()))
    if status["outage"]:
        print(f"OUTAGE:  no usable GPU ({status['outage']})")
    for worker in status["workers"]:
        print(worker_line(worker))


def worker_line(worker: dict[str, Any]) -> str:
    gpu = worker.get("gpu") or {}
    readings = f", GPU {gpu['temperature_c']:.0f} °C" if gpu else ""
    reason = f" ({worker['reason']})" if worker.get("reason") else ""
    return (
        f"worker {worker['replica_id']}: mode={worker['mode']} health={worker['health']}{reason}, "
        f"{worker.get('model')} on {worker.get('device')}{readings}, "
        f"{len(worker['running'])}/{worker['slots']} busy, seen {worker['seen_s_ago']} s ago"
    )


def cmd_submit(args: argparse.Namespace) -> None:
    item = {
        key: value
        for key, value in {
            "prompt": args.prompt,
            "negative_prompt": args.negative_prompt,
            "width": args.width,
            "height": args.height,
            "num_inference_steps": args.steps,
            "guidance_scale": args.guidance_scale,
            "seed": args.seed,
            "priority": args.priority,
        }.items()
        if value is not None
    }
    with api_client(args.url) as api:
        if args.batch:
            job = api.post("/generation/batch", json={"items": [item]})["jobs"][0]
        else:
            job = api.post("/generation/single", json=item)
        if args.wait:
            try:
                job = follow(api, str(job["id"]), args.timeout)
            except TimeoutError as error:
                raise CliError(str(error)) from None
    print(json.dumps(job, indent=2) if args.json else job_line(job))
    if args.wait and job["status"] != "completed":
        raise CliError(f"job {job['id']} ended {job['status']}: {job.get('error') or 'no error recorded'}")


def follow(api: SeidraClient, job_id: str, timeout_s: float) -> dict[str, Any]:
    """The job once it ended, its progress drawn on stderr from its event stream as it goes."""
    from serve_app.progress import StatusLine

    with StatusLine(sys.stderr) as line:
        for event in api.follow_job(job_id, timeout_s):
            line.show(*progress_text(job_id, event))
            if event.name in FINAL_EVENTS:
                return dict(event.data)
    raise ApiError(f"the event stream of job {job_id} ended before the job did")


def progress_text(job_id: str, event: ServerEvent) -> tuple[str, str]:
    """The state an event puts the job in (stderr that is not a terminal gets a line per state), and
    the line to show."""
    from serve_app.progress import bar

    name, data, short = event.name, event.data, job_id[:8]
    if name == "queued":
        position = data["queue_position"]
        return "queued", f"{short} queued" + ("" if position is None else f", {position} job(s) ahead")
    if name == "held":
        return "held", f"{short} held: {data['reason']} (retry in {data['retry_after_seconds']} s)"
    if name == "resumed":
        return "resumed", f"{short} resumed"
    if name in ("started", "progress"):
        return "running", f"{short} running {bar(data.get('step', 0), data['total_steps'], 'steps')}"
    return name, f"{short} {name}"


def job_line(job: dict[str, Any]) -> str:
    return f"{job['id']}  {job['status']:<9}  {job['lane']:<8}  p{job['priority']}  {job.get('image_url') or ''}"


def cmd_jobs(args: argparse.Namespace) -> None:
    params = {"limit": args.limit, **{k: v for k, v in (("status", args.status), ("lane", args.lane)) if v}}
    with api_client(args.url) as api:
        jobs = api.get("/jobs", params=params)
    if args.json:
        print(json.dumps(jobs, indent=2))
        return
    print(format_jobs_table(jobs))


def format_jobs_table(jobs: Sequence[dict[str, Any]]) -> str:
    from datetime import datetime

    def seconds(job: dict[str, Any]) -> str:
        if not (job.get("started_at") and job.get("finished_at")):
            return "-"
        started, finished = (datetime.fromisoformat(job[key]) for key in ("started_at", "finished_at"))
        return f"{(finished - started).total_seconds():.2f}"

    rows = [("id", "lane", "priority", "status", "seconds", "image")]
    rows += [(str(j["id"]), j["lane"], str(j["priority"]), j["status"], seconds(j), j.get("image_url") or "-") for j in jobs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1] for row in rows
    )


def cmd_retry(args: argparse.Namespace) -> None:
    with api_client(args.url) as api:
        job = api.post(f"/jobs/{args.job_id}/retry", params={"countdown_s": args.countdown})
    when = f" in {args.countdown:g} s" if args.countdown else ""
    print(json.dumps(job, indent=2) if args.json else f"{job_line(job)}  (re-queued at priority {job['priority']}{when})")


def cmd_maintenance(args: argparse.Namespace) -> None:
    body = {"enabled": args.state == "on", "replica_id": args.replica}
    with api_client(args.url) as api:
        workers = api.post("/admin/maintenance", json=body)["workers"]
    print(json.dumps(workers, indent=2) if args.json else "\n".join(worker_line(w) for w in workers))


def cmd_lane(args: argparse.Namespace) -> None:
    body = {"paused": args.action == "pause"}
    with api_client(args.url) as api:
        paused = api.post(f"/admin/lanes/{args.lane}", json=body)["paused_lanes"]
    print(f"paused lanes: {', '.join(paused) or 'none'}")


def cmd_fault(args: argparse.Namespace) -> None:
    with api_client(args.url) as api:
        if args.clear:
            params = {"replica_id": args.replica} if args.replica else {}
            workers = api.delete("/admin/faults", params=params)["workers"]
        else:
            body = {
                "replica_id": args.replica,
                "temperature_c": args.temperature,
                "health": args.health,
                "inference_delay_s": args.inference_delay,
                "fail_inference": args.fail_inference,
            }
            workers = api.post("/admin/faults", json=body)["workers"]
    print(json.dumps(workers, indent=2) if args.json else "\n".join(worker_line(w) for w in workers))


def cmd_notifications(args: argparse.Namespace) -> None:
    params = {"limit": args.limit, **{k: v for k, v in (("job_id", args.job), ("level", args.level)) if v}}
    with api_client(args.url) as api:
        rows = api.get("/notifications", params=params)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    for row in rows:
        print(f"{row['created_at']}  {row['level']:<7}  job {row['job_id']}  {row['message']}")


def cmd_batch(args: argparse.Namespace) -> None:
    """Submit a prompts file as a Ray job running `python -m serve_app.batch` in the cluster.

    The API key never travels with the job (the dashboard shows its entrypoint and runtime env):
    the driver reads the file `--api-key-file` names, or the cluster's own SEIDRA_API_KEY.
    """
    import shutil
    import tempfile

    use_token_auth()  # before Ray is imported: it reads RAY_AUTH_MODE once
    from ray.job_submission import JobStatus as RayJobStatus
    from ray.job_submission import JobSubmissionClient

    from serve_app.batch import BatchError, read_items

    try:
        count = len(read_items(args.file))  # refuse a bad file here, before the cluster sees it
    except BatchError as error:
        raise CliError(str(error)) from None
    batch_id = args.batch_id or str(uuid.uuid4())
    address = jobs_api_address(args.address)
    if args.api_key_file is None and (os.environ.get("SEIDRA_API_KEY") or os.environ.get("SEIDRA_API_KEY_FILE")):
        print("Note: this shell's API key does not travel with the Ray job; give the driver one with --api-key-file PATH.")
    client = JobSubmissionClient(address)
    with tempfile.TemporaryDirectory() as upload:  # the job's working dir: the prompts file alone
        shutil.copy(args.file, upload)
        entrypoint = batch_entrypoint(args.file.name, batch_id, args.priority, args.api_key_file, args.url)
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": upload})
    print(f"Batch {batch_id} ({count} prompt(s)) submitted as Ray job {job_id}")
    print(f"Follow it with: ray job logs -f {job_id} --address {address}")
    if not args.wait:
        return
    while not (status := client.get_job_status(job_id)).is_terminal():
        time.sleep(2)
    print(client.get_job_logs(job_id))
    if status != RayJobStatus.SUCCEEDED:
        raise CliError(f"Ray job {job_id} ended {status.value}")


def batch_entrypoint(file_name: str, batch_id: str, priority: str, api_key_file: Path | None, url: str | None) -> str:
    """The driver's command line. Ray runs it through a shell: every argument is quoted, so a file
    named `a b $(touch x).txt` is one argument and runs nothing."""
    import shlex

    command = ["python", "-m", "serve_app.batch", file_name, "--batch-id", batch_id, "--priority", priority]
    if api_key_file is not None:  # the path, absolute: the driver runs in a working dir of its own
        command += ["--api-key-file", str(api_key_file.expanduser().resolve())]
    if url is not None:
        command += ["--url", url]
    return shlex.join(command)


def jobs_api_address(explicit: str | None) -> str:
    state = UpState.load()
    return (
        explicit
        or os.environ.get("RAY_API_SERVER_ADDRESS")
        or (state.dashboard_url if state and state.dashboard_url else None)
        or "http://127.0.0.1:8265"
    )


def cmd_cleanup(args: argparse.Namespace) -> None:
    """Archive, then remove, generated media older than --days (what scripts/sync-minio.sh runs)."""
    from datetime import timedelta

    from storage.jobs import JobStore
    from storage.models import utcnow
    from storage.object_store import open_object_store
    from storage.retention import archive_and_remove
    from storage.settings import StorageSettings, seidra_home

    storage = StorageSettings()
    now = utcnow()
    archive_dir = args.archive_dir or seidra_home() / "archive" / now.strftime("%Y-%m-%d")
    report = archive_and_remove(
        open_object_store(storage), JobStore(storage.database_url), now - timedelta(days=args.days), archive_dir, args.dry_run
    )
    for obj in report.expired:
        print(
            f"{'would remove' if args.dry_run else 'removed'}  {obj.key}  ({obj.last_modified:%Y-%m-%d}, {obj.size_bytes} bytes)"
        )
    if args.dry_run:
        print(f"{len(report.expired)} object(s) older than {args.days} day(s); nothing removed (--dry-run)")
    else:
        print(
            f"{len(report.removed)} object(s) archived to {archive_dir} and removed; {report.jobs_marked} job(s) marked archived"
        )


def cmd_make_model(args: argparse.Namespace) -> None:
    from deployments.random_model import ARCHITECTURES, make_random_model

    architecture = ARCHITECTURES[args.architecture]
    print(f"Building a random-weight {architecture.name} pipeline ({architecture.save_dtype}) in {args.dir}...")
    folder = make_random_model(args.dir, architecture)
    print(f"Wrote a random-weight {architecture.name} pipeline to {folder} (its images are noise).")
    print(f"Use it with: export SEIDRA_MODEL={folder}")


def cmd_db_upgrade(_args: argparse.Namespace) -> None:
    from storage.database import current_revision, upgrade
    from storage.settings import StorageSettings

    url = StorageSettings().database_url
    upgrade(url)
    print(f"Database schema at revision {current_revision(url)}")


# The columns of `seidra keys list`: everything about a key but its hash.
KEY_FIELDS = (
    "key_id", "user", "admin", "created_at", "expires_at", "revoked_at",
    "max_waiting_realtime", "max_waiting_batch", "submissions_per_minute", "webhook_url",
)  # fmt: skip
KEY_TIMES = ("created_at", "expires_at", "revoked_at")
KEY_OVERRIDES = {"max_waiting_realtime": "realtime", "max_waiting_batch": "batch", "submissions_per_minute": "per-minute"}


def _key_store() -> ApiKeyStore:
    """The keys in SEIDRA's database, reached directly (no service needed), its schema upgraded first."""
    from storage.api_keys import ApiKeyStore
    from storage.database import upgrade
    from storage.settings import StorageSettings

    url = StorageSettings().database_url
    upgrade(url)
    return ApiKeyStore(url)


def cmd_keys_create(args: argparse.Namespace) -> None:
    from storage.api_keys import KeyLimits

    limits = KeyLimits(args.max_waiting_realtime, args.max_waiting_batch, args.submissions_per_minute)
    try:
        created = _key_store().create(
            args.user, admin=args.admin, expires_in_days=args.expires, limits=limits, webhook_url=args.webhook_url
        )
    except ValueError as error:
        raise CliError(str(error)) from None
    # The key alone on stdout (`seidra keys create ... > key-file` makes a SEIDRA_API_KEY_FILE); the rest on stderr.
    print(created.key)
    record = created.record
    scope = "admin" if record.admin else "user"
    until = f"expires {_key_time(record.expires_at)}" if record.expires_at else "does not expire"
    print(f"API key {record.key_id} ({scope} {record.user}, {until}). It is not shown again: keep it now.", file=sys.stderr)
    if record.webhook_url:
        print(f"Its deliveries are signed: `seidra keys webhook-secret {record.key_id}` makes and prints the secret that verifies them.", file=sys.stderr)


def cmd_keys_list(args: argparse.Namespace) -> None:
    keys = [
        {name: _key_time(getattr(key, name)) if name in KEY_TIMES else getattr(key, name) for name in KEY_FIELDS}
        for key in _key_store().list()
    ]
    print(json.dumps(keys, indent=2) if args.json else format_keys_table(keys))


def format_keys_table(keys: Sequence[dict[str, Any]]) -> str:
    def overrides(key: dict[str, Any]) -> str:
        return " ".join(f"{label}={key[name]}" for name, label in KEY_OVERRIDES.items() if key[name] is not None) or "-"

    rows = [("key id", "user", "admin", "created", "expires", "revoked", "webhook", "overrides")]
    rows += [
        (key["key_id"], key["user"], "yes" if key["admin"] else "no",
         *(key[name] or "-" for name in KEY_TIMES), key["webhook_url"] or "-", overrides(key))
        for key in keys
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows)


def cmd_keys_revoke(args: argparse.Namespace) -> None:
    from storage.api_keys import KeyNotFound

    try:
        key = _key_store().revoke(args.key_id)
    except KeyNotFound as error:
        raise CliError(str(error)) from None
    print(f"API key {key.key_id} ({key.user}) is revoked since {_key_time(key.revoked_at)}")


def cmd_keys_set_webhook(args: argparse.Namespace) -> None:
    from storage.api_keys import KeyNotFound

    try:
        key = _key_store().set_webhook(args.key_id, None if args.clear else args.url)
    except KeyNotFound as error:
        raise CliError(str(error)) from None
    if key.webhook_url is None:
        print(f"API key {key.key_id} ({key.user}) has no default webhook; deliveries still pending to the old one are not sent")
    else:
        print(f"API key {key.key_id} ({key.user}): jobs without a webhook_url of their own are delivered to {key.webhook_url}")


def cmd_keys_webhook_secret(args: argparse.Namespace) -> None:
    from storage.api_keys import KeyNotFound

    try:
        secret = _key_store().rotate_webhook_secret(args.key_id)
    except KeyNotFound as error:
        raise CliError(str(error)) from None
    # The secret alone on stdout (`... > secret-file`), as `keys create` prints a key.
    print(secret)
    print(
        f"Webhook secret of API key {args.key_id}: it signs the key's deliveries from now on; the one before no longer "
        "does. It is not shown again: keep it now.",
        file=sys.stderr,
    )


def _key_time(moment: datetime | None) -> str | None:
    """A key's timestamp in UTC, to the second."""
    from storage.jobs import as_utc

    return None if moment is None else as_utc(moment).isoformat(timespec="seconds")


# ----- argument parsing -----


def _priority(text: str) -> int:
    """The API takes a JSON integer or a name; a shell gives text: "3" is sent as 3."""
    from scheduling.lanes import parse_priority

    try:
        return parse_priority(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _at_least_one(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def _webhook_url(text: str) -> str:
    """A webhook URL's form; where it leads is checked at each delivery (SEIDRA_WEBHOOK_ALLOW_PRIVATE)."""
    from scheduling.webhooks import check_url

    try:
        return check_url(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r} {error}") from None


def _days(text: str) -> float:
    try:
        days = float(text)
    except ValueError:
        days = math.nan
    if not (math.isfinite(days) and days > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days > 0")
    return days


def _batch_id(text: str) -> str:
    from storage.batches import batch_name

    try:
        return batch_name(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seidra", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Callable[[argparse.Namespace], None], help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        return sub

    up = command("up", cmd_up, "Start a local Ray head (or join one) and deploy the application.")
    up.add_argument("--address", help="Join this running Ray cluster (host:port) instead of starting a head.")
    up.add_argument("--http-port", type=_port, default=8000, help="Serve HTTP port (default 8000).")
    up.add_argument("--http-host", default="127.0.0.1", help="Serve HTTP bind address (default 127.0.0.1).")
    up.add_argument("--gcs-port", type=_port, default=6379, help="GCS port of a head started here (default 6379).")
    up.add_argument("--dashboard-port", type=_port, default=8265, help="Dashboard port (default 8265).")
    up.add_argument("--num-cpus", type=int, help="CPUs the local head offers to Ray (default: all).")
    up.add_argument("--timeout", type=float, default=600, help="Seconds to wait for the app to answer (default 600).")
    up.add_argument(
        "--workers-timeout", type=float, default=WORKERS_TIMEOUT_S,
        help=f"Seconds to wait, once the app answers, for a usable worker replica (default {WORKERS_TIMEOUT_S:.0f}).",
    )  # fmt: skip

    command("down", cmd_down, "Stop what `seidra up` started, nothing else.")

    def with_url(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument("--url", help=f"API base URL (default: SEIDRA_API_URL, then `seidra up`'s, then {DEFAULT_URL}).")
        sub.add_argument("--json", action="store_true", help="Print JSON.")
        return sub

    with_url(command("status", cmd_status, "Queues, workers and job counts."))

    submit = with_url(command("submit", cmd_submit, "Submit one prompt."))
    submit.add_argument("prompt")
    submit.add_argument("--batch", action="store_true", help="Send it to the batch lane (/generation/batch).")
    submit.add_argument("--wait", action="store_true", help="Wait until the job ends, its progress on stderr.")
    submit.add_argument("--timeout", type=float, default=300, help="Seconds --wait waits (default 300).")
    submit.add_argument("--priority", type=_priority, help="0-9 or high, normal, low.")
    submit.add_argument("--negative-prompt")
    submit.add_argument("--width", type=int)
    submit.add_argument("--height", type=int)
    submit.add_argument("--steps", type=int, help="num_inference_steps")
    submit.add_argument("--guidance-scale", type=float)
    submit.add_argument("--seed", type=int)

    jobs = with_url(command("jobs", cmd_jobs, "List recent jobs."))
    jobs.add_argument("--status", choices=[status.value for status in JobStatus])
    jobs.add_argument("--lane", choices=[lane.value for lane in Lane])
    jobs.add_argument("--limit", type=int, default=50)

    retry = with_url(command("retry", cmd_retry, "Queue a failed, cancelled or held job again, at realtime priority."))
    retry.add_argument("job_id")
    retry.add_argument("--countdown", type=float, default=0.0, metavar="SECONDS", help="Wait this long before re-queueing.")

    maintenance = with_url(command("maintenance", cmd_maintenance, "Drain worker replicas (running jobs finish) or end it."))
    maintenance.add_argument("state", choices=["on", "off"])
    maintenance.add_argument("--replica", help="One replica id (see `seidra status`); default: all of them.")

    lane = with_url(command("lane", cmd_lane, "Stop dispatching from a lane (its jobs wait in place) or start again."))
    lane.add_argument("action", choices=["pause", "resume"])
    lane.add_argument("lane", choices=[lane.value for lane in Lane])

    fault = with_url(command("fault", cmd_fault, "Drills only (SEIDRA_FAULT_INJECTION=1): make replicas report a fault."))
    fault.add_argument("--replica", help="One replica id; default: all of them.")
    fault.add_argument("--temperature", type=float, metavar="CELSIUS", help="Report this GPU temperature.")
    fault.add_argument("--health", choices=["degraded", "unhealthy"], help="Report this health.")
    fault.add_argument("--inference-delay", type=float, default=0.0, metavar="SECONDS", help="Slow every denoising step.")
    fault.add_argument("--fail-inference", action="store_true", help="Make every inference raise an error.")
    fault.add_argument("--clear", action="store_true", help="Remove injected faults.")

    notifications = with_url(command("notifications", cmd_notifications, "User notifications (delays, ...)."))
    notifications.add_argument("--job", help="Only this job's.")
    notifications.add_argument("--level", choices=["info", "warning", "error"])
    notifications.add_argument("--limit", type=int, default=50)

    batch = command("batch", cmd_batch, "Submit a prompts file (JSON Lines or text) as a Ray job.")
    batch.add_argument("file", type=Path)
    batch.add_argument(
        "--address",
        help="Ray Jobs API (dashboard) URL (default: RAY_API_SERVER_ADDRESS, `seidra up`'s, then http://127.0.0.1:8265).",
    )
    batch.add_argument(
        "--batch-id", type=_batch_id, help="The batch's name; run again, it makes nothing twice (default: a new UUID)."
    )
    batch.add_argument("--priority", default="low", help="0-9 or high, normal, low (default low).")
    batch.add_argument("--wait", action="store_true", help="Wait for the Ray job and print its logs.")
    batch.add_argument(
        "--api-key-file", type=Path,
        help="File holding the driver's API key, a path on the machine the driver runs on (default: its SEIDRA_API_KEY).",
    )  # fmt: skip
    batch.add_argument("--url", help="SEIDRA API base URL for the driver (default: the cluster's Serve HTTP proxy).")

    cleanup = command("cleanup", cmd_cleanup, "Archive, then remove, generated media older than --days.")
    cleanup.add_argument("--days", type=_at_least_one, required=True, help="Keep media younger than this many days.")
    cleanup.add_argument("--dry-run", action="store_true", help="List what would go; change nothing.")
    cleanup.add_argument("--archive-dir", type=Path, help="Where to archive (default: SEIDRA_HOME/archive/<date>).")

    from deployments.random_model import ARCHITECTURES  # plain data: torch and diffusers load only when building

    model = command("make-model", cmd_make_model, "Write a random-weight diffusers pipeline to DIR (nothing downloaded).")
    model.add_argument("dir", type=Path)
    model.add_argument(
        "--architecture", choices=list(ARCHITECTURES), default="tiny",
        help="tiny (tests, demos) or sd15: Stable Diffusion 1.5's full size, for GPU benchmarks (default tiny).",
    )  # fmt: skip
    tiny = command("make-tiny-model", cmd_make_model, "Write the tiny random-weight diffusers pipeline to DIR.")
    tiny.add_argument("dir", type=Path)
    tiny.set_defaults(architecture="tiny")

    db = commands.add_parser("db", help="Database schema.")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    db_commands.add_parser("upgrade", help="Apply Alembic migrations.").set_defaults(handler=cmd_db_upgrade)

    keys = commands.add_parser("keys", help="API keys, in the database directly: works before `seidra up`.")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = key_commands.add_parser("create", help="Make a key and print it, this once: only its hash is stored.")
    create.set_defaults(handler=cmd_keys_create)
    create.add_argument("--user", required=True, help="Who the key acts as: owns the jobs it submits (letters, digits, _.@-).")
    create.add_argument("--admin", action="store_true", help="Admin scope: /admin/*, cleanup, every user's jobs.")
    create.add_argument("--expires", type=_days, metavar="DAYS", help="Stop accepting the key after DAYS (default: never).")
    for setting in ("max_waiting_realtime", "max_waiting_batch", "submissions_per_minute"):
        create.add_argument(
            f"--{setting.replace('_', '-')}", type=_at_least_one, metavar="N",
            help=f"This key's own limit instead of SEIDRA_USER_{setting.upper()}.",
        )  # fmt: skip
    create.add_argument(
        "--webhook-url",
        type=_webhook_url,
        metavar="URL",
        help="Where the key's jobs are delivered when they name no webhook_url.",
    )
    listing = key_commands.add_parser("list", help="Every key, revoked and expired ones included; never their hashes.")
    listing.set_defaults(handler=cmd_keys_list)
    listing.add_argument("--json", action="store_true", help="Print JSON.")
    revoke = key_commands.add_parser("revoke", help="Refuse a key from now on.")
    revoke.set_defaults(handler=cmd_keys_revoke)
    revoke.add_argument("key_id", metavar="KEY_ID", help="The key's id, from `seidra keys list` (the part after seidra_).")
    set_webhook = key_commands.add_parser("set-webhook", help="Set or remove the key's default webhook URL.")
    set_webhook.set_defaults(handler=cmd_keys_set_webhook)
    set_webhook.add_argument("key_id", metavar="KEY_ID", help="The key's id, from `seidra keys list`.")
    where = set_webhook.add_mutually_exclusive_group(required=True)
    where.add_argument("url", nargs="?", type=_webhook_url, metavar="URL", help="http:// or https://.")
    where.add_argument("--clear", action="store_true", help="No default webhook: pending deliveries to it are not sent.")
    secret = key_commands.add_parser(
        "webhook-secret", help="Make the key a new webhook secret and print it, this once: the old one stops signing."
    )
    secret.set_defaults(handler=cmd_keys_webhook_secret)
    secret.add_argument("key_id", metavar="KEY_ID", help="The key's id, from `seidra keys list`.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except (CliError, ClusterError, ApiError) as error:
        print(f"seidra: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # config and service errors: one line, the traceback only on request
        if os.environ.get("SEIDRA_DEBUG"):
            raise
        print(f"seidra: error: {type(error).__name__}: {error} (set SEIDRA_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
