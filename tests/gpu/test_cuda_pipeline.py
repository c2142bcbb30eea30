"""GPU-only: the same pipeline code on CUDA in float16. Skipped without a CUDA device."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_tiny_pipeline_runs_on_cuda_in_half_precision(tiny_model: Path) -> None:
    from deployments.pipeline import DiffusionRunner, StepControl
    from deployments.settings import WorkerSettings
    from scheduling.work import GenerationParams, WorkBatch, WorkItem

    runner = DiffusionRunner(WorkerSettings(model=str(tiny_model), device="auto", dtype="auto"))
    unet = runner.pipeline.unet
    assert (unet.device.type, unet.dtype) == ("cuda", torch.float16)
    params = GenerationParams("a lighthouse", None, width=128, height=64, num_inference_steps=6, guidance_scale=7.5, seed=1)
    control = StepControl()
    control.yield_requested.set()
    jobs = (WorkItem("a", params), WorkItem("b", params))
    first = runner.advance(WorkBatch(1, "gpu", jobs, slice_steps=2), control)
    assert [output.step for output in first] == [2, 2]
    resumed = tuple(WorkItem(job.job_id, params, step=2, latents=output.latents) for job, output in zip(jobs, first))
    outputs = runner.advance(WorkBatch(2, "gpu", resumed, slice_steps=2))
    assert [Image.open(io.BytesIO(output.png)).size for output in outputs] == [(128, 64)] * 2


def test_nvml_reads_the_replicas_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from deployments.nvml import NvmlReader, open_gpu_reader

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    reader = open_gpu_reader()
    assert isinstance(reader, NvmlReader)
    reading = reader.read()
    assert 0 < reading.temperature_c < 120 and reading.memory_total_mb > 0
