"""The baseline of scenario 3: a bare diffusers pipeline called in a loop in one process.

    python -m bench.bare_pipeline --model DIR --batch-size 4 --images 32 [--size 64] [--steps 30] [--torch-threads 1]

The pipeline is loaded as a worker replica loads it (`deployments.pipeline.DiffusionRunner`: the same
device, dtype and scheduler, the same torch thread count), then called with `batch_size` prompts and
one seeded generator per image, `images / batch_size` times after one warm-up call. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

GUIDANCE_SCALE = 7.5  # the API's default_guidance_scale, which the benchmark's jobs get
WARMUP_SEED = 1_000_000


def run(model: str, size: int, steps: int, batch_size: int, images: int, torch_threads: int) -> dict[str, Any]:
    import torch

    from deployments.pipeline import DiffusionRunner
    from deployments.settings import WorkerSettings

    runner = DiffusionRunner(WorkerSettings(model=model, torch_threads=torch_threads))
    calls = max(1, images // batch_size)

    def call(first_seed: int) -> None:
        seeds = range(first_seed, first_seed + batch_size)
        with torch.inference_mode():
            runner.pipeline(
                prompt=[f"batch {seed}" for seed in seeds],
                generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds],
                width=size, height=size, num_inference_steps=steps, guidance_scale=GUIDANCE_SCALE,
            )  # fmt: skip

    call(WARMUP_SEED)  # lazy initialisation is not throughput
    began = time.perf_counter()
    for n in range(calls):
        call(n * batch_size)
    elapsed_s = time.perf_counter() - began
    return {
        "batch_size": batch_size,
        "images": calls * batch_size,
        "elapsed_s": round(elapsed_s, 3),
        "images_per_s": round(calls * batch_size / elapsed_s, 3),
        "device": runner.device,
        "dtype": str(runner.dtype),
        "torch_threads": torch.get_num_threads(),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="The diffusers model folder the workers load (SEIDRA_MODEL).")
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--images", type=int, required=True)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--torch-threads", type=int, default=0, help="As SEIDRA_TORCH_THREADS (0: torch's default).")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(json.dumps(run(args.model, args.size, args.steps, args.batch_size, args.images, args.torch_threads)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
