"""The tiny Stable-Diffusion-style pipeline with random weights, built offline (`random_model.TINY`).

It exercises the real loading path (`DiffusionPipeline.from_pretrained`) where no hub is reachable.
Its images are noise: it is for tests and demos, not for pictures.
"""

from __future__ import annotations

from pathlib import Path

from deployments.random_model import TINY, make_random_model

TINY_MODEL_MARKER = TINY.marker_name()


def make_tiny_model(folder: str | Path, seed: int = 0) -> Path:
    """Write the tiny pipeline to `folder` with `save_pretrained`; returns the folder."""
    return make_random_model(folder, TINY, seed)


def is_tiny_model(model: str) -> bool:
    return (Path(model).expanduser() / TINY_MODEL_MARKER).is_file()
