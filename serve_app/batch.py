"""A batch of prompts as a Ray job:

    ray job submit --working-dir . -- python -m serve_app.batch PROMPTS_FILE [--batch-id ID]

PROMPTS_FILE holds JSON Lines (one object per line, with the fields of `/generation/single`) or
plain text (one prompt per line). The driver is a client of SEIDRA's HTTP API like any other and
holds no storage credentials: it submits every item to the batch lane (`POST /generation/batch`, in
chunks), waits, drawing a progress bar of the jobs ended on stderr (in the Ray job's logs: a line
each time the count changes), and ends with a summary
and a manifest (prompt, job id, status, result key, error), printed and, with `--manifest PATH`,
written to a file that only its owner can read.

Its API key comes from its own environment (`SEIDRA_API_KEY` or `SEIDRA_API_KEY_FILE`) or from
`--api-key-file PATH`, a path on the machine the driver runs on; never from the Ray job's runtime env
or entrypoint, which the dashboard shows. The API: `--url`, else `SEIDRA_API_URL`, else the Serve
HTTP proxy of the Ray cluster the driver runs in, else http://127.0.0.1:8000.

Each chunk goes with an `Idempotency-Key` made of the batch id and the chunk's index, so running the
same batch id again (after the Ray job was stopped halfway, say) within `SEIDRA_IDEMPOTENCY_TTL_S`
creates nothing twice: it gets the first run's jobs back and waits for what is left.
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
from storage.job_status import JobStatus
from storage.settings import SecretSettingError

POLL_INTERVAL_S = 2.0
SUBMIT_CHUNK = 100
LIST_LIMIT = 1000  # the most jobs one `GET /jobs` returns: a chunk must fit in one page
RETRIED_STATUSES = (429, 503)  # a full queue, a quota, a restarting router: wait and send it again
DEFAULT_RETRY_AFTER_S = 5.0
MISSING = "missing"  # a job the API no longer lists


class BatchError(Exception):
    pass


@dataclass(frozen=True)
class Chunk:
    """One `POST /generation/batch`: the API's batch id for its jobs, and their ids in item order."""

    batch_id: str
    job_ids: list[str]


def read_items(path: Path) -> list[GenerationFields]:
    """Every line validated before anything is submitted; a bad line names itself and its field."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise BatchError(f"cannot read {path}: {error.strerror}") from None
    items = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            fields = json.loads(line) if line.lstrip().startswith("{") else {"prompt": line.strip()}
            items.append(GenerationFields(**fields))
        except json.JSONDecodeError as error:
            raise BatchError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        except ValidationError as error:
            first = error.errors()[0]
            raise BatchError(f"{path}:{number}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    if not items:
        raise BatchError(f"{path} holds no prompts")
    return items


def idempotency_key(batch_id: str, chunk_index: int) -> str:
    return f"seidra-batch-{batch_id}-chunk-{chunk_index}"


def submit(api: SeidraClient, items: list[GenerationFields], priority: int, batch_id: str, chunk_size: int) -> list[Chunk]:
    """Submit in chunks, waiting out full queues and quotas; a chunk sent before gets its jobs back."""
    from scheduling import tracing

    chunks = []
    # Each job gets a trace of its own, linked to this span through the request's traceparent.
    with tracing.tracer().start_as_current_span("seidra.batch", attributes={"seidra.batch_id": batch_id}):
        for index, start in enumerate(range(0, len(items), chunk_size)):
            # The fields each line gave, no more: the service applies its own defaults to the rest.
            body = {"items": [item.model_dump(exclude_unset=True) for item in items[start : start + chunk_size]]}
            headers = {"Idempotency-Key": idempotency_key(batch_id, index), **tracing.carrier()}
            accepted = _post_until_accepted(api, {**body, "priority": priority}, headers)
            chunks.append(Chunk(str(accepted["batch_id"]), [str(job_id) for job_id in accepted["job_ids"]]))
    return chunks


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


def wait(api: SeidraClient, chunks: list[Chunk], batch_id: str) -> dict[str, dict[str, Any]]:
    """Every job once it ended, by id; chunks whose jobs have all ended are not asked again.

    Progress comes from one `GET /jobs?batch_id=` per unfinished chunk (up to 1,000 jobs, one
    indexed query) every POLL_INTERVAL_S, not from each job's event stream: a batch of 10,000 images
    would hold 10,000 connections, each polling the router four times a second, to draw one bar of
    jobs ended.
    """
    jobs: dict[str, dict[str, Any]] = {}
    waiting = list(chunks)
    total = sum(len(chunk.job_ids) for chunk in chunks)
    with StatusLine(sys.stderr) as line:
        while True:
            waiting = [chunk for chunk in waiting if not _ended(api, chunk, jobs)]
            ended = [job["status"] for job in jobs.values() if _is_terminal(job)]
            counts = ", ".join(f"{ended.count(status)} {status}" for status in sorted(set(ended)))
            line.show(
                str(len(ended)), f"batch {batch_id}: {bar(len(ended), total, 'ended')}" + (f" ({counts})" if counts else "")
            )
            if not waiting:
                return jobs
            time.sleep(POLL_INTERVAL_S)


def _ended(api: SeidraClient, chunk: Chunk, jobs: dict[str, dict[str, Any]]) -> bool:
    listed = {str(job["id"]): job for job in api.get("/jobs", params={"batch_id": chunk.batch_id, "limit": LIST_LIMIT})}
    for job_id in chunk.job_ids:
        jobs[job_id] = listed.get(job_id) or {"id": job_id, "status": MISSING}
    return all(_is_terminal(jobs[job_id]) for job_id in chunk.job_ids)


def _is_terminal(job: dict[str, Any]) -> bool:
    return job["status"] == MISSING or JobStatus(job["status"]).is_terminal


def manifest(items: list[GenerationFields], chunks: list[Chunk], jobs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    job_ids = [job_id for chunk in chunks for job_id in chunk.job_ids]
    return [
        {
            "prompt": item.prompt,
            "job_id": job_id,
            "status": jobs[job_id]["status"],
            "result_key": jobs[job_id].get("result_key"),
            "error": jobs[job_id].get("error"),
        }
        for item, job_id in zip(items, job_ids, strict=True)
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

    items = read_items(args.prompts_file)
    priority = parse_priority(args.priority)
    batch_id = args.batch_id or str(uuid.uuid4())
    key = api_key(args.api_key_file)
    url = api_url(args.url, args.address)
    print(f"Batch {batch_id}: {len(items)} prompt(s) from {args.prompts_file}, to {url}", flush=True)

    tracing.configure("batch")
    with SeidraClient(url, api_key=key) as api:
        chunks = submit(api, items, priority, batch_id, args.chunk_size)
        print(f"{len(items)} job(s) queued in {len(chunks)} request(s)", flush=True)
        if args.no_wait:
            return 0
        entries = manifest(items, chunks, wait(api, chunks, batch_id))
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
    parser.add_argument("--batch-id", type=_uuid_text, help="Resume or re-run this batch (default: a new id).")
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


def _uuid_text(text: str) -> str:
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a UUID") from None


def _chunk_size(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= LIST_LIMIT:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from 1 to {LIST_LIMIT}")
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
