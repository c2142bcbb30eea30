"""Stable-Diffusion pipelines with random weights, built offline: a tiny one and a full-size SD 1.5 one,
and LoRA adapters for them.

Both go through the real loading paths (`DiffusionPipeline.from_pretrained`, `load_lora_weights`)
where no hub is reachable. Their images are noise. The tiny architecture is for tests and demos; `SD15` has Stable Diffusion
1.5's exact architecture (UNet ≈ 859.5 M, VAE ≈ 83.7 M, CLIP ViT-L/14 text encoder ≈ 123.1 M
parameters), so a GPU does the same work per step as with the real weights: realistic benchmarks
without downloading anything.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

SaveDtype = Literal["float16", "float32"]
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
MAX_TOKENS = 77  # CLIP's context: every prompt is padded or cut to this many tokens


@dataclass(frozen=True)
class Architecture:
    """Constructor arguments of the three networks; the text encoder's vocabulary is the tokenizer's."""

    name: str
    save_dtype: SaveDtype  # the precision of the written weights
    unet: MappingProxyType[str, Any]  # UNet2DConditionModel(**unet)
    vae: MappingProxyType[str, Any]  # AutoencoderKL(**vae)
    text_encoder: MappingProxyType[str, Any]  # CLIPTextConfig(**text_encoder), vocab_size included

    @property
    def vocab_size(self) -> int:
        return int(self.text_encoder["vocab_size"])

    def marker_name(self) -> str:
        """The file in the model folder that says its weights are random, and which architecture it is."""
        return f"seidra-{self.name}-model.json"


def _frozen(**kwargs: Any) -> MappingProxyType[str, Any]:
    return MappingProxyType(kwargs)


# 256 byte characters, each alone and word-final, plus the two special tokens: the smallest vocabulary.
BYTE_LEVEL_VOCAB_SIZE = 2 * 256 + len(SPECIAL_TOKENS)

TINY = Architecture(
    name="tiny",
    save_dtype="float32",
    unet=_frozen(
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
    ),
    # Four blocks give the usual 8x VAE scale factor, so sizes behave as with Stable Diffusion.
    vae=_frozen(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
    ),
    text_encoder=_frozen(
        vocab_size=BYTE_LEVEL_VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=MAX_TOKENS,
    ),
)

# runwayml/stable-diffusion-v1-5's unet/, vae/ and text_encoder/ config.json, numbers only.
SD15 = Architecture(
    name="sd15",
    # Half the files (about 2.1 GB instead of 4.3 GB) and what a GPU worker loads anyway; random
    # weights lose nothing to the rounding, and `from_pretrained(..., dtype=float32)` widens them on a CPU.
    save_dtype="float16",
    unet=_frozen(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=8,
    ),
    vae=_frozen(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        norm_num_groups=32,
        sample_size=512,
        scaling_factor=0.18215,
    ),
    text_encoder=_frozen(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_attention_heads=12,
        num_hidden_layers=12,
        max_position_embeddings=MAX_TOKENS,
        hidden_act="quick_gelu",
    ),
)

ARCHITECTURES = MappingProxyType({architecture.name: architecture for architecture in (TINY, SD15)})


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
    return dict(zip(printable, (chr(code) for code in codes), strict=True))


def _write_clip_tokenizer_files(folder: Path, vocab_size: int) -> tuple[Path, Path]:
    """A byte-level BPE vocabulary with no merges: every character is a token, as CLIP's fallback.

    Unused placeholders fill it up to `vocab_size` so that the special tokens end it, as in CLIP's
    (ids 49406 and 49407 for SD 1.5), and the tokenizer's length is the text encoder's vocabulary.
    """
    alphabet = sorted(_bytes_to_unicode().values())
    tokens = alphabet + [f"{char}</w>" for char in alphabet]
    filler_count = vocab_size - len(tokens) - len(SPECIAL_TOKENS)
    if filler_count < 0:
        raise ValueError(f"vocab_size {vocab_size} is below the byte-level minimum {BYTE_LEVEL_VOCAB_SIZE}")
    tokens += [f"<|unused{index}|>" for index in range(filler_count)] + list(SPECIAL_TOKENS)
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps({token: index for index, token in enumerate(tokens)}))
    merges_file.write_text("#version: 0.2\n")
    return vocab_file, merges_file


def build_tokenizer(vocab_size: int) -> CLIPTokenizer:
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as scratch:
        files = _write_clip_tokenizer_files(Path(scratch), vocab_size)
        return CLIPTokenizer(*map(str, files), model_max_length=MAX_TOKENS)


def build_text_encoder(architecture: Architecture, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        **architecture.text_encoder,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_unet(architecture: Architecture) -> UNet2DConditionModel:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**architecture.unet)


def build_vae(architecture: Architecture) -> AutoencoderKL:
    from diffusers import AutoencoderKL

    return AutoencoderKL(**architecture.vae)


def build_pipeline(architecture: Architecture, seed: int = 0) -> StableDiffusionPipeline:
    """Random weights drawn from `seed`, in float32."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(architecture.vocab_size)
    # Built in this order so that a seed gives the same weights as before the architectures existed.
    text_encoder = build_text_encoder(architecture, tokenizer)
    unet = build_unet(architecture)
    vae = build_vae(architecture)
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


def _torch_dtype(name: SaveDtype) -> torch.dtype:
    import torch

    return {"float16": torch.float16, "float32": torch.float32}[name]


def make_random_model(folder: str | Path, architecture: Architecture, seed: int = 0) -> Path:
    """Write a random-weight pipeline to `folder` with `save_pretrained` (safetensors); returns the folder."""
    target = Path(folder).expanduser().resolve()
    target.mkdir(parents=True, exist_ok=True)
    pipeline = build_pipeline(architecture, seed).to(dtype=_torch_dtype(architecture.save_dtype))
    pipeline.save_pretrained(target, safe_serialization=True)
    marker = {
        "architecture": architecture.name,
        "seed": seed,
        "dtype": architecture.save_dtype,
        "note": "random weights; images are noise",
    }
    (target / architecture.marker_name()).write_text(json.dumps(marker))
    return target


# The attention projections, where LoRA adapters for Stable Diffusion usually act.
UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def make_random_lora(folder: str | Path, architecture: Architecture, seed: int = 0, rank: int = 4) -> Path:
    """Write a random LoRA adapter for `architecture`'s UNet and text encoder to `folder` with
    diffusers' `save_lora_weights`; returns the folder."""
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    target = Path(folder).expanduser().resolve()
    unet = build_unet(architecture)
    text_encoder = build_text_encoder(architecture, build_tokenizer(architecture.vocab_size))
    torch.manual_seed(seed)  # after the networks: only the adapter's weights are saved
    layers = {}
    for name, network, targets in (("unet", unet, UNET_LORA_TARGETS), ("text_encoder", text_encoder, TEXT_ENCODER_LORA_TARGETS)):
        # Random up-projections, not the usual zeros: an adapter that changes nothing would prove nothing.
        network.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False, target_modules=list(targets)))
        layers[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(network))
    StableDiffusionPipeline.save_lora_weights(target, **layers, safe_serialization=True)
    return target
