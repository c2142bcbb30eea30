"""GPU-only: the same pipeline code on CUDA in float16. Skipped without a CUDA device."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_tiny_pipeline_runs_on_cuda_in_half_precision(tiny_model: Path) -> None:
    from deployments.pipeline import DiffusionRunner
    from deployments.settings import WorkerSettings
    from scheduling.work import GenerationParams, WorkItem

    runner = DiffusionRunner(WorkerSettings(model=str(tiny_model), device="auto", dtype="auto"))
    unet = runner.pipeline.unet
    assert (unet.device.type, unet.dtype) == ("cuda", torch.float16)
    params = GenerationParams("a lighthouse", None, width=128, height=64, num_inference_steps=6, guidance_scale=7.5, seed=1)
    first = runner.advance(WorkItem("job", params, max_steps=2))
    output = runner.advance(WorkItem("job", params, step=first.step, latents=first.latents))
    assert Image.open(io.BytesIO(output.png)).size == (128, 64)


def test_nvml_reads_the_replicas_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from deployments.nvml import NvmlReader, open_gpu_reader

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    reader = open_gpu_reader()
    assert isinstance(reader, NvmlReader)
    reading = reader.read()
    assert 0 < reading.temperature_c < 120 and reading.memory_total_mb > 0
