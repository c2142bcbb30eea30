"""Old media cleanup (`seidra cleanup`, `scripts/sync-minio.sh`) on a local folder and a real S3 server."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest

from storage.database import upgrade
from storage.job_status import JobStatus
from storage.jobs import JobStore
from storage.models import GenerationJob
from storage.object_store import S3ObjectStore, image_key
from storage.retention import archive_and_remove
from storage.settings import StorageSettings
from tests.servers import S3Server

SCRIPT = Path(__file__).parents[2] / "scripts" / "sync-minio.sh"


def completed_job(jobs: JobStore) -> str:
    [job] = jobs.add_all(
        [
            GenerationJob(
                prompt="p", width=64, height=64, num_inference_steps=4, guidance_scale=7.5, seed=1, priority=8, lane="batch"
            )
        ]
    )
    jobs.transition(job.id, JobStatus.RUNNING)
    jobs.transition(job.id, JobStatus.COMPLETED, result_key=image_key(str(job.id)))
    return str(job.id)


@pytest.fixture
def jobs(tmp_path: Path) -> JobStore:
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    upgrade(url)
    return JobStore(url)


def test_objects_of_two_ages_on_s3(s3: S3Server, jobs: JobStore, tmp_path: Path) -> None:
    store = S3ObjectStore(
        StorageSettings(
            s3_endpoint=s3.endpoint, s3_access_key=s3.access_key, s3_secret_key=s3.secret_key,
            s3_bucket=f"retention-{uuid.uuid4().hex[:10]}",
        )
    )  # fmt: skip
    old_job, young_job = completed_job(jobs), completed_job(jobs)
    store.put(image_key(old_job), b"old", "image/png")
    store.put("batches/b/manifest.json", b"[]", "application/json")
    time.sleep(2.1)  # S3 keeps whole seconds
    store.put(image_key(young_job), b"young", "image/png")
    ages = {obj.key: obj.last_modified for obj in store.list()}
    cutoff = ages[image_key(old_job)] + (ages[image_key(young_job)] - ages[image_key(old_job)]) / 2

    planned = archive_and_remove(store, jobs, cutoff, tmp_path / "archive", dry_run=True)
    assert sorted(obj.key for obj in planned.expired) == ["batches/b/manifest.json", image_key(old_job)]
    assert len(list(store.list())) == 3  # a dry run changes nothing

    report = archive_and_remove(store, jobs, cutoff, tmp_path / "archive")
    assert sorted(report.removed) == ["batches/b/manifest.json", image_key(old_job)]
    assert [obj.key for obj in store.list()] == [image_key(young_job)]
    assert (tmp_path / "archive" / image_key(old_job)).read_bytes() == b"old"
    assert report.jobs_marked == 1
    assert jobs.get(old_job).meta["archived"]["location"] == str(tmp_path / "archive" / image_key(old_job))
    assert "archived" not in jobs.get(young_job).meta


def run_script(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, env={**os.environ, **env}, timeout=120)


def test_the_script_on_the_media_folder(tmp_path: Path, jobs: JobStore) -> None:
    media = tmp_path / "media"
    old_job, young_job = completed_job(jobs), completed_job(jobs)
    for job_id in (old_job, young_job):
        (media / "images").mkdir(parents=True, exist_ok=True)
        (media / image_key(job_id)).write_bytes(b"png")
    forty_days_ago = time.time() - timedelta(days=40).total_seconds()
    os.utime(media / image_key(old_job), (forty_days_ago, forty_days_ago))
    env = {
        "SEIDRA_HOME": str(tmp_path / "home"), "SEIDRA_MEDIA_DIR": str(media), "SEIDRA_S3_ENDPOINT": "",
        "SEIDRA_DATABASE_URL": f"sqlite:///{tmp_path / 'jobs.db'}",
    }  # fmt: skip

    dry = run_script("--cleanup", "--days", "30", "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert f"would remove  {image_key(old_job)}" in dry.stdout and young_job not in dry.stdout
    assert (media / image_key(old_job)).exists()

    done = run_script("--cleanup", "--days", "30", "--archive-dir", str(tmp_path / "archive"), env=env)
    assert done.returncode == 0, done.stderr
    assert not (media / image_key(old_job)).exists() and (media / image_key(young_job)).exists()
    assert (tmp_path / "archive" / image_key(old_job)).exists()
    assert "1 job(s) marked archived" in done.stdout

    assert run_script("--days", "30", env=env).returncode == 2  # the runbook's form needs --cleanup
    bad = run_script("--cleanup", "--days", "zero", env=env)
    assert bad.returncode == 2 and "argument --days" in bad.stderr and "not a whole number >= 1" in bad.stderr
