"""Old media out of the object store: archive to a folder, remove, and say so on the jobs.

A removed image stays accounted for: its job keeps its record and gets `metadata.archived`
(when, where to), and the API stops offering an image URL for it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from storage.job_status import JobStatus
from storage.jobs import JobNotFound, JobStore
from storage.models import utcnow
from storage.object_store import ObjectStore, StoredObject

IMAGE_KEY = re.compile(r"^images/(?P<job_id>[0-9a-f-]{36})\.png$")


@dataclass
class CleanupReport:
    expired: list[StoredObject]
    archive_dir: Path | None = None
    removed: list[str] = field(default_factory=list)
    jobs_marked: int = 0


def expired(store: ObjectStore, cutoff: datetime) -> list[StoredObject]:
    """Objects last written before `cutoff`, oldest first."""
    return sorted((obj for obj in store.list() if obj.last_modified < cutoff), key=lambda obj: obj.last_modified)


def archive_and_remove(
    store: ObjectStore, jobs: JobStore, cutoff: datetime, archive_dir: Path, dry_run: bool = False
) -> CleanupReport:
    """Copy each expired object under `archive_dir`, then remove it and mark its job."""
    report = CleanupReport(expired(store, cutoff))
    if dry_run:
        return report
    report.archive_dir = archive_dir
    for obj in report.expired:
        target = archive_dir / obj.key
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(store.get(obj.key))  # archived before anything is removed
        store.delete(obj.key)
        report.removed.append(obj.key)
        if match := IMAGE_KEY.match(obj.key):
            report.jobs_marked += _mark_archived(jobs, match["job_id"], target)
    return report


def _mark_archived(jobs: JobStore, job_id: str, location: Path) -> int:
    archived = {"archived": {"at": utcnow().isoformat(), "location": str(location)}}
    try:
        job = jobs.annotate(job_id, while_status=JobStatus.COMPLETED, edit_metadata=lambda meta: {**meta, **archived})
    except JobNotFound:  # an image whose job record is gone: nothing to keep truthful
        return 0
    return 0 if job is None else 1
