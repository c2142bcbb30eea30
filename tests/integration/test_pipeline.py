"""The real diffusers pipeline (the tiny offline model), loaded through `from_pretrained`."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scheduling.work import GenerationParams, WorkItem


@pytest.fixture(scope="module")
def runner(tiny_model: Path):  # type: ignore[no-untyped-def]
    from deployments.pipeline import DiffusionRunner
    from deployments.settings import WorkerSettings

    return DiffusionRunner(WorkerSettings(model=str(tiny_model), device="cpu", torch_threads=1))


PARAMS = GenerationParams("a lighthouse at dusk", None, width=96, height=64, num_inference_steps=10, guidance_scale=7.5, seed=3)


def png_pixels(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return np.asarray(image)


def test_one_call_makes_a_png_of_the_requested_size(runner) -> None:  # type: ignore[no-untyped-def]
    output = runner.advance(WorkItem("job", PARAMS))
    assert (output.step, output.total_steps, output.latents) == (10, 10, None)
    assert png_pixels(output.png).shape == (64, 96, 3)


def test_same_seed_same_image_other_seed_other_image(runner) -> None:  # type: ignore[no-untyped-def]
    first = png_pixels(runner.advance(WorkItem("a", PARAMS)).png)
    again = png_pixels(runner.advance(WorkItem("b", PARAMS)).png)
    other = png_pixels(runner.advance(WorkItem("c", GenerationParams(**{**PARAMS.__dict__, "seed": 4}))).png)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_a_job_stopped_at_step_boundaries_resumes_exactly(runner) -> None:  # type: ignore[no-untyped-def]
    whole = runner.advance(WorkItem("job", PARAMS, max_steps=9))  # latents after 9 of 10 steps
    sliced_steps, item = [], WorkItem("job", PARAMS, max_steps=4)
    while True:
        output = runner.advance(item)
        sliced_steps.append(output.step)
        if output.step >= 9:
            break
        item = WorkItem("job", PARAMS, step=output.step, latents=output.latents, max_steps=min(4, 9 - output.step))
    assert sliced_steps == [4, 8, 9]
    assert np.abs(output.latents - whole.latents).max() < 1e-4

    last = runner.advance(WorkItem("job", PARAMS, step=9, latents=output.latents, max_steps=4))
    uninterrupted = runner.advance(WorkItem("job", PARAMS))
    assert last.step == 10
    assert np.abs(png_pixels(last.png).astype(int) - png_pixels(uninterrupted.png).astype(int)).max() <= 1


def test_loading_needs_a_model() -> None:
    from deployments.pipeline import DiffusionRunner
    from deployments.settings import WorkerSettings

    with pytest.raises(ValueError, match="SEIDRA_MODEL"):
        DiffusionRunner(WorkerSettings(model=""))


def test_forced_mock_mode_runs_on_the_cpu_without_touching_cuda_or_nvml(tiny_model: Path) -> None:
    import torch

    from deployments.model_manager import ModelManager
    from deployments.nvml import NoGpu
    from deployments.pipeline import DiffusionRunner
    from deployments.settings import WorkerSettings

    settings = WorkerSettings(model=str(tiny_model), device="cuda", dtype="float16", force_mock=True, torch_threads=1)
    manager = ModelManager(settings, NoGpu(), lambda: DiffusionRunner(settings))
    snapshot = manager.get_status_snapshot()
    assert (snapshot.mode, snapshot.health, snapshot.device, snapshot.dtype) == ("mock", "healthy", "cpu", "float32")
    assert not torch.cuda.is_initialized()
    output = manager.runner.advance(WorkItem("job", PARAMS))
    assert png_pixels(output.png).shape == (64, 96, 3)


def test_schedules_that_cannot_resume_exactly_run_in_one_call() -> None:
    from deployments.pipeline import _resumes_exactly

    assert _resumes_exactly({"timestep_spacing": "leading"})
    for flag in ({"use_karras_sigmas": True}, {"interpolation_type": "log_linear"}, {"timestep_type": "continuous"}):
        assert not _resumes_exactly(flag)


def test_a_cancelled_slice_stops_at_the_next_step(runner) -> None:  # type: ignore[no-untyped-def]
    from deployments.pipeline import Interrupted, StepControl

    control = StepControl()
    control.cancelled.set()
    with pytest.raises(Interrupted):
        runner.advance(WorkItem("job", PARAMS), control)


def test_a_slice_past_its_deadline_stops_at_the_next_step_as_a_timeout(runner) -> None:  # type: ignore[no-untyped-def]
    import time

    from deployments.pipeline import StepControl
    from scheduling.directives import InferenceTimeout

    steps: list[int] = []

    class Counting(StepControl):
        def __call__(self, pipeline, index, timestep, callback_kwargs):  # type: ignore[no-untyped-def]
            steps.append(index)
            return super().__call__(pipeline, index, timestep, callback_kwargs)

    with pytest.raises(InferenceTimeout, match="did not finish within 4 s"):
        runner.advance(WorkItem("job", PARAMS, timeout_s=4), Counting(deadline=time.monotonic() - 1))
    assert steps == [0]  # one step, then the boundary saw the deadline
    output = runner.advance(WorkItem("job", PARAMS, timeout_s=4), StepControl(deadline=time.monotonic() + 60))
    assert output.png is not None
