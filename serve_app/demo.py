"""`make demo`: bring SEIDRA up on 127.0.0.1 without API keys, send a batch and a realtime request over HTTP,
show the jobs, go down."""

from __future__ import annotations

import io
import os
import sys
from typing import Any

from PIL import Image

from serve_app.cli import format_jobs_table
from serve_app.cli import main as seidra
from serve_app.client import SeidraClient
from serve_app.cluster import UpState
from storage.object_store import open_object_store
from storage.settings import StorageSettings, seidra_home

BATCH_PROMPTS = ["a lighthouse at dusk", "a fox in the snow", "a bowl of ramen", "a city at night"]
REALTIME_PROMPT = "a portrait of a cat astronaut"


def ensure_model() -> bool:
    """Use SEIDRA_MODEL when set; otherwise build the tiny model once. Returns True for the tiny one."""
    from deployments.tiny_model import is_tiny_model, make_tiny_model

    if not os.environ.get("SEIDRA_MODEL"):
        folder = seidra_home() / "tiny-model"
        if not (folder / "model_index.json").is_file():
            print(f"No SEIDRA_MODEL configured: building the tiny offline model in {folder}")
            make_tiny_model(folder)
        os.environ["SEIDRA_MODEL"] = str(folder)
    return is_tiny_model(os.environ["SEIDRA_MODEL"])


def run_requests(api: SeidraClient, size: int, steps: int) -> list[dict[str, Any]]:
    common = {"width": size, "height": size, "num_inference_steps": steps}
    batch = api.post("/generation/batch", json={"items": [{"prompt": p, **common} for p in BATCH_PROMPTS], "priority": "low"})
    print(f"POST /generation/batch: batch {batch['batch_id']}, {len(BATCH_PROMPTS)} jobs")
    realtime = api.post("/generation/single", params={"wait": "true"}, json={"prompt": REALTIME_PROMPT, **common})
    print(f"POST /generation/single?wait=true: job {realtime['id']} {realtime['status']}")
    job_ids = [str(job_id) for job_id in batch["job_ids"]] + [realtime["id"]]
    return [api.wait_for_job(job_id, timeout_s=600) for job_id in job_ids]


def check_images(api: SeidraClient, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fetch every image back and show where it lives (a file or a presigned URL)."""
    store = open_object_store(StorageSettings())
    for job in jobs:
        if job["status"] == "completed":
            Image.open(io.BytesIO(api.get_bytes(f"/jobs/{job['id']}/image"))).verify()
            job["image_url"] = store.location(job["result_key"])
    return jobs


def main() -> int:
    # No keys to make or pass around: `seidra up` binds the API to 127.0.0.1, where SEIDRA_AUTH=off
    # is allowed (and refused anywhere else).
    os.environ["SEIDRA_AUTH"] = "off"
    tiny = ensure_model()
    if UpState.load() is not None:
        print("A previous demo left SEIDRA up; stopping it first.")
        seidra(["down"])
    if seidra(["up"]) != 0:
        return 1
    try:
        size, steps = (128, 12) if tiny else (512, 30)
        # ?wait=true holds a request up to SEIDRA_WAIT_TIMEOUT_S; on the CPU a job may take that long.
        with SeidraClient(UpState.load().url, timeout_s=300) as api:  # type: ignore[union-attr]
            jobs = check_images(api, run_requests(api, size, steps))
    finally:
        seidra(["down"])
    jobs.sort(key=lambda job: job["started_at"] or "")
    print()
    print(format_jobs_table(jobs))
    realtime_rank = next(i for i, job in enumerate(jobs, 1) if job["lane"] == "realtime")
    print(f"\nThe realtime job, submitted after the {len(BATCH_PROMPTS)} batch jobs, started #{realtime_rank} of {len(jobs)}.")
    if tiny:
        print(
            "\nThese images are noise: the tiny model has random weights and exists so that everything runs offline.\n"
            "For real pictures point SEIDRA_MODEL at a diffusers model folder or hub id, on a GPU cluster for speed:\n"
            "  SEIDRA_MODEL=stabilityai/sd-turbo SEIDRA_NUM_GPUS=1 HF_HUB_OFFLINE=0 make demo"
        )
    failed = [job for job in jobs if job["status"] != "completed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
