"""The real diffusers pipeline (the tiny offline model), loaded through `from_pretrained`."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from scheduling.work import GenerationParams, WorkBatch, WorkItem

pytestmark = pytest.mark.usefixtures("without_session_models")


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


def call(*items: WorkItem, slice_steps: int = 0, timeout_s: float = 0.0) -> WorkBatch:
    return WorkBatch(1, "replica", items, slice_steps=slice_steps, timeout_s=timeout_s)


def yielding() -> Any:
    """A control whose router asked for a yield before the call began: it yields at the first boundary."""
    from deployments.pipeline import StepControl

    control = StepControl()
    control.yield_requested.set()
    return control


def seeded(seed: int, prompt: str = PARAMS.prompt) -> GenerationParams:
    return replace(PARAMS, seed=seed, prompt=prompt)


def test_one_call_makes_a_png_of_the_requested_size(runner) -> None:  # type: ignore[no-untyped-def]
    [output] = runner.advance(call(WorkItem("job", PARAMS)))
    assert (output.step, output.total_steps, output.latents) == (10, 10, None)
    assert png_pixels(output.png).shape == (64, 96, 3)


def test_same_seed_same_image_other_seed_other_image(runner) -> None:  # type: ignore[no-untyped-def]
    [first] = runner.advance(call(WorkItem("a", PARAMS)))
    [again] = runner.advance(call(WorkItem("b", PARAMS)))
    [other] = runner.advance(call(WorkItem("c", seeded(4))))
    assert np.array_equal(png_pixels(first.png), png_pixels(again.png))
    assert not np.array_equal(png_pixels(first.png), png_pixels(other.png))


def test_jobs_denoised_together_make_the_images_they_make_alone(runner) -> None:  # type: ignore[no-untyped-def]
    jobs = [WorkItem(f"j{i}", seeded(10 + i, f"prompt number {i}")) for i in range(4)]
    jobs.append(WorkItem("negative", replace(PARAMS, negative_prompt="blurry", seed=20)))
    together = runner.advance(call(*jobs))
    alone = [runner.advance(call(job))[0] for job in jobs]
    for batched, single in zip(together, alone, strict=True):
        assert np.abs(png_pixels(batched.png).astype(int) - png_pixels(single.png).astype(int)).max() <= 1
    assert len({png_pixels(output.png).tobytes() for output in together}) == len(jobs)  # each its own image


def test_a_call_asked_to_yield_stops_at_a_slice_boundary_and_resumes_exactly(runner) -> None:  # type: ignore[no-untyped-def]
    jobs = (WorkItem("a", seeded(1)), WorkItem("b", seeded(2)))
    first = runner.advance(call(*jobs, slice_steps=4), yielding())
    assert [(output.step, output.png) for output in first] == [(4, None)] * 2
    resumed = tuple(
        WorkItem(job.job_id, job.params, step=4, latents=output.latents) for job, output in zip(jobs, first, strict=True)
    )
    second = runner.advance(call(*resumed, slice_steps=4), yielding())
    assert [output.step for output in second] == [8, 8]
    # The second job moves on alone (to another replica, say); the first ends where it is.
    [a_done] = runner.advance(call(WorkItem("a", seeded(1), step=8, latents=second[0].latents), slice_steps=4))
    [b_done] = runner.advance(call(WorkItem("b", seeded(2), step=8, latents=second[1].latents)))
    for job, sliced in zip(jobs, (a_done, b_done), strict=True):
        [whole] = runner.advance(call(job))
        assert sliced.step == 10
        assert np.abs(png_pixels(sliced.png).astype(int) - png_pixels(whole.png).astype(int)).max() <= 1


def test_a_yield_asked_for_near_the_end_lets_the_call_finish(runner) -> None:  # type: ignore[no-untyped-def]
    [output] = runner.advance(call(WorkItem("job", PARAMS, step=0), slice_steps=10), yielding())
    assert output.png is not None  # the only boundary is the end


def test_jobs_of_one_call_must_be_compatible(runner) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="share size"):
        runner.advance(call(WorkItem("a", PARAMS), WorkItem("b", replace(PARAMS, width=64))))


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
    manager = ModelManager(settings, NoGpu(), lambda name: DiffusionRunner(settings, name))
    snapshot = manager.get_status_snapshot()
    assert (snapshot.mode, snapshot.health, snapshot.device, snapshot.dtype) == ("mock", "healthy", "cpu", "float32")
    assert not torch.cuda.is_initialized()
    [output] = manager.runner_for("").advance(call(WorkItem("job", PARAMS)))
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
        runner.advance(call(WorkItem("job", PARAMS)), control)


def test_a_slice_past_its_deadline_stops_at_the_next_step_as_a_timeout(runner) -> None:  # type: ignore[no-untyped-def]
    from deployments.pipeline import StepControl
    from scheduling.directives import InferenceTimeout

    steps: list[int] = []
    control = StepControl(step_delay_s=0.05, on_step=steps.append)
    with pytest.raises(InferenceTimeout, match=r"did not finish within 0\.01 s"):
        runner.advance(call(WorkItem("job", PARAMS), timeout_s=0.01), control)
    assert steps == [1]  # one step, then the boundary saw the deadline
    [output] = runner.advance(call(WorkItem("job", PARAMS), timeout_s=60), StepControl())
    assert output.png is not None


def test_the_timeout_counts_per_slice(runner) -> None:  # type: ignore[no-untyped-def]
    from deployments.pipeline import StepControl

    # Each 2-step slice takes about 0.1 s, the whole call about 0.5 s: only a per-call deadline would expire.
    [output] = runner.advance(call(WorkItem("job", PARAMS), slice_steps=2, timeout_s=0.3), StepControl(step_delay_s=0.05))
    assert output.png is not None
