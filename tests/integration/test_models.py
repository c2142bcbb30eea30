"""Several models and LoRA adapters on one replica: real tiny pipelines and a tiny adapter, made
offline in temporary folders, loaded through the ModelManager as a worker replica loads them.

Each image is compared with what a plain diffusers call makes with the same model and adapter
(within 1/255 per pixel: the replica passes prompt embeddings where the plain call passes text).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from scheduling.work import GenerationParams, Lora, WorkBatch, WorkItem

PARAMS = GenerationParams("a lighthouse at dusk", "fog", width=64, height=64, num_inference_steps=4, guidance_scale=7.5, seed=3)
INK = (Lora("ink", 0.7),)


pytestmark = pytest.mark.usefixtures("without_session_models")


@dataclass(frozen=True)
class Assets:
    models: dict[str, str]  # a is the session's tiny model, b the same architecture with other weights
    lora_dir: Path  # one adapter, ink


class Events:
    def __init__(self) -> None:
        self.loads: list[str] = []
        self.evictions: list[str] = []

    def loaded(self, model: str, seconds: float) -> None:
        self.loads.append(model)

    def evicted(self, model: str) -> None:
        self.evictions.append(model)


@pytest.fixture(scope="module")
def assets(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Assets:
    from deployments.tiny_model import make_tiny_lora, make_tiny_model

    folder = tmp_path_factory.mktemp("models")
    other = make_tiny_model(folder / "b", seed=1)
    make_tiny_lora(folder / "loras" / "ink", seed=0)
    return Assets({"a": str(tiny_model), "b": str(other)}, folder / "loras")


def replica(assets: Assets, models_per_replica: int) -> tuple[Any, Events]:
    from deployments.model_manager import ModelManager
    from deployments.nvml import NoGpu
    from deployments.pipeline import DiffusionRunner
    from deployments.settings import WorkerSettings

    settings = WorkerSettings(
        models=assets.models,
        models_per_replica=models_per_replica,
        lora_dir=str(assets.lora_dir),
        device="cpu",
        torch_threads=1,
    )
    events = Events()
    return ModelManager(settings, NoGpu(), lambda name: DiffusionRunner(settings, name), events=events), events


@pytest.fixture(scope="module")
def manager(assets: Assets) -> Any:
    return replica(assets, models_per_replica=2)[0]


def advance(manager: Any, *items: WorkItem, slice_steps: int = 0, control: Any = None) -> list[Any]:
    """One call, as the worker makes it: the runner of the batch's model, then its pipeline."""
    params = items[0].params
    runner = manager.runner_for(params.model, [lora.name for lora in params.loras])
    return runner.advance(WorkBatch(1, "replica", items, slice_steps=slice_steps), control)


def image(manager: Any, params: GenerationParams) -> np.ndarray:
    [output] = advance(manager, WorkItem("job", params))
    return pixels(output.png)


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png))).astype(int)


def plain_call(folder: str, params: GenerationParams, lora_dir: Path | None = None) -> np.ndarray:
    """The image a diffusers pipeline makes by itself, with diffusers' own LoRA calls."""
    import torch
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    for lora in params.loras:
        pipeline.load_lora_weights(str(lora_dir / lora.name), adapter_name=lora.name)
    if params.loras:
        pipeline.set_adapters([lora.name for lora in params.loras], adapter_weights=[lora.scale for lora in params.loras])
    generator = torch.Generator("cpu").manual_seed(params.seed)
    return np.asarray(
        pipeline(**params.pipeline_arguments(), num_inference_steps=params.num_inference_steps, generator=generator).images[0]
    ).astype(int)


def close(first: np.ndarray, second: np.ndarray) -> bool:
    return bool(np.abs(first - second).max() <= 1)


def test_a_job_gets_the_model_it_asked_for(manager: Any, assets: Assets) -> None:
    a, b = image(manager, replace(PARAMS, model="a")), image(manager, replace(PARAMS, model="b"))
    assert not close(a, b)  # same seed, other weights
    assert close(b, plain_call(assets.models["b"], PARAMS))
    assert close(a, plain_call(assets.models["a"], PARAMS))
    assert np.array_equal(image(manager, replace(PARAMS, model="")), a)  # "": the default model
    assert list(manager.get_status_snapshot().models) == ["b", "a"]  # least recently used first


def test_an_adapter_changes_the_image_as_diffusers_own_lora_calls_do(manager: Any, assets: Assets) -> None:
    params = replace(PARAMS, model="b", loras=INK)
    with_ink = image(manager, params)
    assert close(with_ink, plain_call(assets.models["b"], params, assets.lora_dir))
    assert not close(with_ink, image(manager, replace(params, loras=())))
    assert manager.get_status_snapshot().models["b"] == ("ink",)


def test_no_adapter_or_scale_leaks_into_the_next_call(manager: Any) -> None:
    plain = image(manager, replace(PARAMS, model="a"))
    inked = image(manager, replace(PARAMS, model="a", loras=INK))
    stronger = image(manager, replace(PARAMS, model="a", loras=(Lora("ink", 1.0),)))
    assert not close(inked, stronger)
    assert np.array_equal(image(manager, replace(PARAMS, model="a", loras=INK)), inked)
    assert np.array_equal(image(manager, replace(PARAMS, model="a")), plain)
    assert np.array_equal(image(manager, replace(PARAMS, model="a", loras=INK)), inked)  # on again after off


def test_jobs_with_the_same_adapter_denoised_together_make_the_images_they_make_alone(manager: Any) -> None:
    jobs = [WorkItem(f"j{i}", replace(PARAMS, model="b", loras=INK, seed=10 + i, prompt=f"prompt {i}")) for i in range(3)]
    together = advance(manager, *jobs)
    for job, output in zip(jobs, together, strict=True):
        assert close(pixels(output.png), image(manager, job.params))


def test_a_job_with_an_adapter_yields_and_resumes_exactly(manager: Any) -> None:
    from deployments.pipeline import StepControl

    params = replace(PARAMS, model="b", loras=INK)
    control = StepControl()
    control.yield_requested.set()
    [first] = advance(manager, WorkItem("job", params), slice_steps=2, control=control)
    assert (first.step, first.png) == (2, None)
    image(manager, replace(params, loras=()))  # another call in between, without the adapter
    [done] = advance(manager, WorkItem("job", params, step=2, latents=first.latents), slice_steps=2)
    assert close(pixels(done.png), image(manager, params))


def test_at_one_model_per_replica_alternating_models_evicts_and_reloads(assets: Assets) -> None:
    manager, events = replica(assets, models_per_replica=1)
    first_a = manager.runner_for("a")
    a = image(manager, replace(PARAMS, model="a"))
    image(manager, replace(PARAMS, model="b"))
    assert not hasattr(first_a, "pipeline")  # released as b came in
    assert np.array_equal(image(manager, replace(PARAMS, model="a")), a)
    image(manager, replace(PARAMS, model="a", loras=INK))  # held: no load
    assert (events.loads, events.evictions) == (["a", "b", "a"], ["a", "b"])
    assert manager.get_status_snapshot().models == {"a": ("ink",)}
