"""A batch of prompts as a Ray job:

    ray job submit --working-dir . -- python -m serve_app.batch PROMPTS_FILE [--batch-id NAME]

PROMPTS_FILE holds JSON Lines (one object per line, with the fields of `/generation/single`) or
plain text (one prompt per line). The driver is a client of SEIDRA's HTTP API like any other and
holds no storage credentials: it submits every item to the batch lane (`POST /generation/batch`, in
chunks), waits, drawing a progress bar of the jobs ended on stderr (in the Ray job's logs: a line
each time the count changes), and ends with a summary
and a manifest (line, prompt, job id, status, result key, error), printed and, with `--manifest
PATH`, written to a file that only its owner can read.

Its API key comes from its own environment (`SEIDRA_API_KEY` or `SEIDRA_API_KEY_FILE`) or from
`--api-key-file PATH`, a path on the machine the driver runs on; never from the Ray job's runtime env
or entrypoint, which the dashboard shows. The API: `--url`, else `SEIDRA_API_URL`, else the Serve
HTTP proxy of the Ray cluster the driver runs in, else http://127.0.0.1:8000.

The batch's name is `--batch-id` (`nightly-2026-12-01`: letters, digits, `.`, `_`, `-`), else a new
UUID; it is the `batch_id` of its jobs. A line's job derives from the name, the key's user and the
line's place among the file's prompts (blank lines are none), so running the same name again (after
the Ray job was stopped halfway, say) creates nothing twice: it finds the first run's jobs, queues
the lines that have none, and waits for what is left. A line that asks for another image than its
job (the file was edited since) is refused, with what changed: once every chunk was sent, the
driver names each such line and exits 2, the other chunks queued (a chunk is all or none).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from scheduling.lanes import DEFAULT_BATCH_PRIORITY, parse_priority
from serve_app.client import DEFAULT_URL, ApiError, KeyFileError, SeidraClient, api_key_from_environment, read_key_file
from serve_app.progress import StatusLine, bar
from serve_app.schemas import GenerationFields
from storage.batches import batch_name
from storage.job_status import JobStatus
from storage.settings import SecretSettingError

POLL_INTERVAL_S = 2.0
SUBMIT_CHUNK = 100
LIST_LIMIT = 1000  # the most jobs one `GET /jobs` returns: the batch is read a page of this many at a time
RETRIED_STATUSES = (429, 503)  # a full queue, a quota, a restarting router: wait and send it again
DEFAULT_RETRY_AFTER_S = 5.0
MISSING = "missing"  # a job the API no longer lists


class BatchError(Exception):
    pass


@dataclass(frozen=True)
class Line:
    """A prompt of the file: its line number (from 1) and its fields."""

    number: int
    fields: GenerationFields


@dataclass(frozen=True)
class Submitted:
    """The batch's jobs, one per line in the file's order, and how many of them an earlier run made;
    `refused`: (line number, what changed) of each line refused, whose chunk was not submitted."""

    job_ids: list[str]
    existing: int
    refused: list[tuple[int, str]]


def read_items(path: Path) -> list[Line]:
    """Every line validated before anything is submitted; a bad line names itself and its field."""
    try:
        text = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise BatchError(f"cannot read {path}: {error.strerror}") from None
    lines = []
    for number, line in enumerate(text, 1):
        if not line.strip():
            continue
        try:
            fields = json.loads(line) if line.lstrip().startswith("{") else {"prompt": line.strip()}
            lines.append(Line(number, GenerationFields(**fields)))
        except json.JSONDecodeError as error:
            raise BatchError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        except ValidationError as error:
            first = error.errors()[0]
            raise BatchError(f"{path}:{number}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    if not lines:
        raise BatchError(f"{path} holds no prompts")
    return lines


def submit(api: SeidraClient, lines: list[Line], priority: int, batch_id: str, chunk_size: int) -> Submitted:
    """Submit in chunks, each all or none, waiting out full queues and quotas. Each item's index in
    the batch is its line's place among the prompts: lines that have a job already get it back."""
    from scheduling import tracing

    job_ids: list[str] = []
    existing = 0
    refused: list[tuple[int, str]] = []
    # Each job gets a trace of its own, linked to this span through the request's traceparent.
    with tracing.tracer().start_as_current_span("seidra.batch", attributes={"seidra.batch_id": batch_id}):
        for start in range(0, len(lines), chunk_size):
            chunk = lines[start : start + chunk_size]
            # The fields each line gave, no more: the service applies its own defaults to the rest.
            items = [line.fields.model_dump(exclude_unset=True) for line in chunk]
            body = {"batch_id": batch_id, "first_index": start, "priority": priority, "items": items}
            try:
                accepted = _post_until_accepted(api, body, tracing.carrier())
            except ApiError as error:
                if error.status_code != 409:
                    raise
                refused += [(chunk[item["index"] - start].number, item["message"]) for item in error.body["changed"]]
                continue
            job_ids += [str(job_id) for job_id in accepted["job_ids"]]
            existing += len(accepted["existing_job_ids"])
    return Submitted(job_ids, existing, refused)


def _refusal(path: Path, batch_id: str, submitted: Submitted, chunk_size: int) -> str:
    named = "".join(f"\n  {path}:{number}: {change}" for number, change in submitted.refused)
    return (
        f"{len(submitted.refused)} line(s) of {path} ask for other images than the jobs an earlier run of batch "
        f"{batch_id} made for them:{named}\nNothing of their chunks ({chunk_size} lines each) was submitted; the other "
        "chunks were. Put those lines back as they were, or run the edited file under a new --batch-id."
    )


def _post_until_accepted(api: SeidraClient, body: dict[str, Any], headers: dict[str, str]) -> Any:
    while True:
        try:
            return api.post("/generation/batch", json=body, headers=headers)
        except ApiError as error:
            if error.status_code not in RETRIED_STATUSES:
                raise
            wait_s = DEFAULT_RETRY_AFTER_S if error.retry_after_s is None else error.retry_after_s
            print(f"HTTP {error.status_code}: {error.message}; sending it again in {wait_s:g} s", flush=True)
            time.sleep(wait_s)


def wait(api: SeidraClient, batch_id: str, job_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Every job once it ended, by id.

    Progress comes from the batch's `GET /jobs?batch_id=`, read a page of 1,000 jobs at a time (each
    one indexed query), every POLL_INTERVAL_S, not from each job's event stream: a batch of 10,000
    images would hold 10,000 connections, each polling the router four times a second, to draw one
    bar of jobs ended.
    """
    with StatusLine(sys.stderr) as line:
        while True:
            listed = _batch_jobs(api, batch_id)
            jobs = {job_id: listed.get(job_id) or {"id": job_id, "status": MISSING} for job_id in job_ids}
            ended = [job["status"] for job in jobs.values() if _is_terminal(job)]
            counts = ", ".join(f"{ended.count(status)} {status}" for status in sorted(set(ended)))
            line.show(
                str(len(ended)), f"batch {batch_id}: {bar(len(ended), len(jobs), 'ended')}" + (f" ({counts})" if counts else "")
            )
            if len(ended) == len(jobs):
                return jobs
            time.sleep(POLL_INTERVAL_S)


def _batch_jobs(api: SeidraClient, batch_id: str) -> dict[str, dict[str, Any]]:
    """The batch's jobs by id, page after page."""
    jobs: dict[str, dict[str, Any]] = {}
    params: dict[str, Any] = {"batch_id": batch_id, "limit": LIST_LIMIT}
    while True:
        page = api.get("/jobs", params=params)
        jobs.update((str(job["id"]), job) for job in page)
        if len(page) < LIST_LIMIT:
            return jobs
        params["after"] = page[-1]["id"]


def _is_terminal(job: dict[str, Any]) -> bool:
    return job["status"] == MISSING or JobStatus(job["status"]).is_terminal


def manifest(lines: list[Line], job_ids: list[str], jobs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "line": line.number,
            "prompt": line.fields.prompt,
            "job_id": job_id,
            "status": jobs[job_id]["status"],
            "result_key": jobs[job_id].get("result_key"),
            "error": jobs[job_id].get("error"),
        }
        for line, job_id in zip(lines, job_ids, strict=True)
    ]


def api_key(key_file: Path | None) -> str | None:
    """`--api-key-file`'s content, else SEIDRA_API_KEY or SEIDRA_API_KEY_FILE; None: no key."""
    try:
        return api_key_from_environment() if key_file is None else read_key_file(key_file, "--api-key-file")
    except KeyFileError as error:
        raise BatchError(str(error)) from None


def api_url(explicit: str | None, ray_address: str) -> str:
    return explicit or os.environ.get("SEIDRA_API_URL") or _serve_url(ray_address) or DEFAULT_URL


def _serve_url(ray_address: str) -> str | None:
    """The Serve HTTP proxy of the Ray cluster at `ray_address`; None without a cluster or Serve."""
    import ray

    from serve_app.cluster import base_url, serve_http_options

    try:
        ray.init(address=ray_address, log_to_driver=False)
    except ConnectionError:
        return None
    try:
        options = serve_http_options()
    finally:
        ray.shutdown()
    if options is None or options.host is None:
        return None
    return base_url(options.host, options.port) + options.root_path


def run(args: argparse.Namespace) -> int:
    from scheduling import tracing
    from serve_app.cluster import write_private

    lines = read_items(args.prompts_file)
    priority = parse_priority(args.priority)
    batch_id = args.batch_id or str(uuid.uuid4())
    key = api_key(args.api_key_file)
    url = api_url(args.url, args.address)
    print(f"Batch {batch_id}: {len(lines)} prompt(s) from {args.prompts_file}, to {url}", flush=True)

    tracing.configure("batch")
    with SeidraClient(url, api_key=key) as api:
        submitted = submit(api, lines, priority, batch_id, args.chunk_size)
        if submitted.refused:
            raise BatchError(_refusal(args.prompts_file, batch_id, submitted, args.chunk_size))
        requests = len(range(0, len(lines), args.chunk_size))
        found = f"; {submitted.existing} made by an earlier run" if submitted.existing else ""
        print(f"{len(lines) - submitted.existing} job(s) queued in {requests} request(s){found}", flush=True)
        if args.no_wait:
            return 0
        entries = manifest(lines, submitted.job_ids, wait(api, batch_id, submitted.job_ids))
    counts = {status: sum(1 for e in entries if e["status"] == status) for status in sorted({e["status"] for e in entries})}
    summary: dict[str, Any] = {"batch_id": batch_id, "counts": counts}
    if args.manifest:
        write_private(args.manifest, json.dumps(entries, indent=2))
        summary["manifest_file"] = str(args.manifest)
    print(json.dumps({**summary, "manifest": entries}, indent=2))
    return 0 if counts.get(JobStatus.COMPLETED.value, 0) == len(entries) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serve_app.batch", description=__doc__.splitlines()[0])
    parser.add_argument("prompts_file", type=Path, help="JSON Lines, or plain text with one prompt per line.")
    parser.add_argument(
        "--batch-id", type=_batch_name, help="The batch's name; run again, it makes nothing twice (default: a new UUID)."
    )
    parser.add_argument("--priority", default=str(DEFAULT_BATCH_PRIORITY), help="0-9 or high/normal/low (default low).")
    parser.add_argument("--url", help="SEIDRA API base URL (default: SEIDRA_API_URL, then the cluster's Serve proxy).")
    parser.add_argument(
        "--api-key-file", type=Path, help="File holding the API key (default: SEIDRA_API_KEY or SEIDRA_API_KEY_FILE)."
    )
    parser.add_argument("--manifest", type=Path, help="Also write the manifest (JSON) to this file, mode 0600.")
    parser.add_argument("--address", default="auto", help="Ray cluster whose Serve proxy to use (default: this job's).")
    parser.add_argument(
        "--chunk-size", type=_chunk_size, default=SUBMIT_CHUNK, help=f"Items per request (default {SUBMIT_CHUNK})."
    )
    parser.add_argument("--no-wait", action="store_true", help="Submit and exit without waiting.")
    return parser


def _batch_name(text: str) -> str:
    try:
        return batch_name(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _chunk_size(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (BatchError, SecretSettingError, ApiError, ValueError) as error:
        print(f"batch: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
