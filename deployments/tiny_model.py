"""A tiny Stable-Diffusion-style pipeline with random weights, built offline.

It exercises the real loading path (`DiffusionPipeline.from_pretrained`) where no hub is reachable.
Its images are noise: it is for tests and demos, not for pictures.
"""

from __future__ import annotations

import json
from pathlib import Path

TINY_MODEL_MARKER = "seidra-tiny-model.json"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte maps to a printable character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code) for code in codes)))


def _write_clip_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    """A byte-level BPE vocabulary with no merges: every character is a token, as CLIP's fallback."""
    alphabet = sorted(_bytes_to_unicode().values())
    tokens = alphabet + [f"{char}</w>" for char in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps({token: index for index, token in enumerate(tokens)}))
    merges_file.write_text("#version: 0.2\n")
    return vocab_file, merges_file


def build_tiny_pipeline(seed: int = 0):  # type: ignore[no-untyped-def]
    import tempfile

    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = CLIPTokenizer(*map(str, _write_clip_tokenizer_files(Path(scratch))), model_max_length=77)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
    )
    # Four blocks give the usual 8x VAE scale factor, so sizes behave as with Stable Diffusion.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def make_tiny_model(folder: str | Path, seed: int = 0) -> Path:
    """Write the tiny pipeline to `folder` with `save_pretrained`; returns the folder."""
    target = Path(folder).expanduser().resolve()
    target.mkdir(parents=True, exist_ok=True)
    build_tiny_pipeline(seed).save_pretrained(target)
    (target / TINY_MODEL_MARKER).write_text(json.dumps({"seed": seed, "note": "random weights; images are noise"}))
    return target


def is_tiny_model(model: str) -> bool:
    return (Path(model).expanduser() / TINY_MODEL_MARKER).is_file()
