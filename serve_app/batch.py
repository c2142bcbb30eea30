"""A batch of prompts as a Ray job:

    ray job submit --working-dir . -- python -m serve_app.batch PROMPTS_FILE [--batch-id ID]

PROMPTS_FILE holds JSON Lines (one object per line, with the fields of `/generation/single`) or
plain text (one prompt per line). The driver finds the application's router by name, submits every
item to the batch lane, shows progress in the job's logs, waits, and ends with a summary and a
manifest (prompt, job id, status, object key) written to the object store and printed.

Job ids derive from the batch id and the line, so submitting the same batch id again (after the
Ray job was stopped halfway, say) creates nothing twice and picks up where the batch was.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from scheduling.lanes import DEFAULT_BATCH_PRIORITY, parse_priority
from serve_app.schemas import GenerationFields

POLL_INTERVAL_S = 2.0
SUBMIT_CHUNK = 100


class BatchError(Exception):
    pass


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


def job_ids_for(batch_id: str, count: int) -> list[str]:
    return [str(uuid.uuid5(uuid.UUID(batch_id), f"item-{index}")) for index in range(count)]


def submit(router: Any, requests: list[dict[str, Any]], batch_id: str, job_ids: list[str]) -> int:
    """Submit in chunks, waiting out full queues; returns how many jobs were new."""
    import ray
    from ray.exceptions import RayTaskError

    from scheduling import tracing
    from scheduling.job_queue import QueueFullError

    created = 0
    # Each job gets a trace of its own, linked to this span (see `tracing.enqueue_spans`).
    with tracing.tracer().start_as_current_span("seidra.batch", attributes={"seidra.batch_id": batch_id}) as span:
        for start in range(0, len(requests), SUBMIT_CHUNK):
            chunk = slice(start, start + SUBMIT_CHUNK)
            while True:
                try:
                    submitted = router.submit.remote(requests[chunk], batch_id, job_ids[chunk], tracing.carrier())
                    created += len(ray.get(submitted).jobs)
                    break
                except RayTaskError as error:
                    if not isinstance(error.cause, QueueFullError):
                        raise
                    print(f"{error.cause}; retrying in {error.cause.retry_after_s} s", flush=True)
                    time.sleep(error.cause.retry_after_s)
        span.set_attribute("seidra.jobs_created", created)
    return created


def wait(jobs: Any, batch_id: str, total: int) -> list[Any]:
    from tqdm import tqdm

    from storage.job_status import JobStatus

    with tqdm(total=total, desc=f"batch {batch_id}", unit="image", file=sys.stdout, mininterval=POLL_INTERVAL_S) as bar:
        while True:
            rows = jobs.for_batch(batch_id)
            done = sum(1 for row in rows if JobStatus(row.status).is_terminal)
            bar.update(done - bar.n)
            if done >= total:
                return rows
            time.sleep(POLL_INTERVAL_S)


def manifest(items: list[GenerationFields], job_ids: list[str], rows: list[Any]) -> list[dict[str, Any]]:
    by_id = {str(row.id): row for row in rows}
    return [
        {
            "prompt": item.prompt,
            "job_id": job_id,
            "status": by_id[job_id].status,
            "object_key": by_id[job_id].result_key,
            "error": by_id[job_id].error,
        }
        for item, job_id in zip(items, job_ids)
    ]


def run(args: argparse.Namespace) -> int:
    import ray

    from scheduling import tracing
    from scheduling.router_lookup import get_router
    from storage.jobs import JobStore
    from storage.object_store import open_object_store
    from storage.settings import StorageSettings

    items = read_items(args.prompts_file)
    priority = parse_priority(args.priority)
    batch_id = args.batch_id or str(uuid.uuid4())
    job_ids = job_ids_for(batch_id, len(items))
    print(f"Batch {batch_id}: {len(items)} prompt(s) from {args.prompts_file}", flush=True)

    tracing.configure("batch")
    ray.init(address=args.address, log_to_driver=False)
    try:
        router = get_router(args.app)
    except ValueError:
        raise BatchError(f"no SEIDRA application {args.app!r} runs on this Ray cluster (start it with `seidra up`)") from None
    storage = StorageSettings(**ray.get(router.storage_settings.remote()))
    created = submit(router, [item.to_job_fields(priority) for item in items], batch_id, job_ids)
    print(f"{created} job(s) submitted, {len(items) - created} already known from an earlier run", flush=True)
    if args.no_wait:
        return 0
    rows = wait(JobStore(storage.database_url), batch_id, len(items))
    entries = manifest(items, job_ids, rows)
    key = f"batches/{batch_id}/manifest.json"
    open_object_store(storage).put(key, json.dumps(entries, indent=2).encode(), "application/json")
    counts = {status: sum(1 for e in entries if e["status"] == status) for status in sorted({e["status"] for e in entries})}
    print(json.dumps({"batch_id": batch_id, "counts": counts, "manifest_key": key, "manifest": entries}, indent=2))
    return 0 if counts.get("completed", 0) == len(entries) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serve_app.batch", description=__doc__.splitlines()[0])
    parser.add_argument("prompts_file", type=Path, help="JSON Lines, or plain text with one prompt per line.")
    parser.add_argument("--batch-id", type=_uuid_text, help="Resume or re-run this batch (default: a new id).")
    parser.add_argument("--priority", default=str(DEFAULT_BATCH_PRIORITY), help="0-9 or high/normal/low (default low).")
    parser.add_argument("--address", default="auto", help="Ray cluster address (default: the one this job runs in).")
    parser.add_argument("--app", default="seidra", help="Serve application name (default seidra).")
    parser.add_argument("--no-wait", action="store_true", help="Submit and exit without waiting.")
    return parser


def _uuid_text(text: str) -> str:
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a UUID") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (BatchError, ValueError) as error:
        print(f"batch: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
