"""The tiny Stable-Diffusion-style pipeline with random weights, built offline (`random_model.TINY`),
and LoRA adapters for it.

It exercises the real loading path (`DiffusionPipeline.from_pretrained`) where no hub is reachable.
Its images are noise: it is for tests and demos, not for pictures.
"""

from __future__ import annotations

from pathlib import Path

from deployments.random_model import TINY, make_random_lora, make_random_model

TINY_MODEL_MARKER = TINY.marker_name()


def make_tiny_model(folder: str | Path, seed: int = 0) -> Path:
    """Write the tiny pipeline to `folder` with `save_pretrained`; returns the folder. Another seed
    gives another model of the same architecture."""
    return make_random_model(folder, TINY, seed)


def make_tiny_lora(folder: str | Path, seed: int = 0) -> Path:
    """Write a LoRA adapter for the tiny pipeline (UNet and text encoder) to `folder` with
    `save_lora_weights`; returns the folder."""
    return make_random_lora(folder, TINY, seed)


def is_tiny_model(model: str) -> bool:
    return (Path(model).expanduser() / TINY_MODEL_MARKER).is_file()
