"""Random-weight pipelines: SD 1.5's full size checked on the meta device, a scaled-down copy really written and run;
tiny LoRA adapters written as diffusers writes them.

The full-size weights (about 4 GB in float32) are never allocated here.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

import pytest

from deployments.random_model import SD15, Architecture, build_text_encoder, build_tokenizer, build_unet, build_vae
from deployments.tiny_model import is_tiny_model
from scheduling.work import GenerationParams, WorkBatch, WorkItem
from serve_app.cli import main

# runwayml/stable-diffusion-v1-5's parameter counts.
SD15_UNET_PARAMETERS = 859_520_964
SD15_VAE_PARAMETERS = 83_653_863
SD15_TEXT_ENCODER_PARAMETERS = 123_060_480


@pytest.fixture(scope="module")
def sd15_on_meta():  # type: ignore[no-untyped-def]
    """The three SD 1.5 networks with shapes and no storage."""
    import torch

    tokenizer = build_tokenizer(SD15.vocab_size)
    with torch.device("meta"):
        return build_unet(SD15), build_vae(SD15), build_text_encoder(SD15, tokenizer), tokenizer


def parameter_count(module) -> int:  # type: ignore[no-untyped-def]
    return sum(parameter.numel() for parameter in module.parameters())


def test_sd15_networks_have_stable_diffusion_15s_parameter_counts(sd15_on_meta) -> None:  # type: ignore[no-untyped-def]
    unet, vae, text_encoder, _ = sd15_on_meta
    assert all(parameter.is_meta for network in (unet, vae, text_encoder) for parameter in network.parameters())
    assert parameter_count(unet) == SD15_UNET_PARAMETERS
    assert parameter_count(vae) == SD15_VAE_PARAMETERS
    assert parameter_count(text_encoder) == SD15_TEXT_ENCODER_PARAMETERS


def test_sd15_configs_are_stable_diffusion_15s(sd15_on_meta) -> None:  # type: ignore[no-untyped-def]
    unet, vae, text_encoder, _ = sd15_on_meta
    assert (unet.config.sample_size, unet.config.layers_per_block, unet.config.cross_attention_dim) == (64, 2, 768)
    assert tuple(unet.config.block_out_channels) == (320, 640, 1280, 1280)
    assert unet.config.attention_head_dim == 8
    assert tuple(unet.config.down_block_types) == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    assert tuple(unet.config.up_block_types) == ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    assert tuple(vae.config.block_out_channels) == (128, 256, 512, 512)
    assert (vae.config.latent_channels, vae.config.layers_per_block, vae.config.sample_size) == (4, 2, 512)
    assert vae.config.scaling_factor == 0.18215
    config = text_encoder.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (768, 12, 12)
    assert (config.intermediate_size, config.max_position_embeddings, config.vocab_size) == (3072, 77, 49408)
    assert config.hidden_act == "quick_gelu"


def test_the_generated_tokenizer_fills_clips_vocabulary_and_pads_to_77_tokens(sd15_on_meta) -> None:  # type: ignore[no-untyped-def]
    tokenizer = sd15_on_meta[3]
    assert len(tokenizer) == 49408
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (49406, 49407)  # CLIP's own ids
    ids = tokenizer("a lighthouse at dusk " * 20, padding="max_length", truncation=True, max_length=tokenizer.model_max_length)
    assert len(ids.input_ids) == 77
    assert (ids.input_ids[0], ids.input_ids[-1]) == (49406, 49407)


def scaled_down(architecture: Architecture) -> Architecture:
    """SD 1.5's layout (block types, layers, vocabulary, float16 files) with narrow channels, to run on a CPU."""
    return replace(
        architecture,
        name="sd15-narrow",
        unet=MappingProxyType({**architecture.unet, "block_out_channels": (32, 32, 64, 64), "cross_attention_dim": 32}),
        vae=MappingProxyType({**architecture.vae, "block_out_channels": (32, 32, 32, 32)}),
        text_encoder=MappingProxyType(
            {**architecture.text_encoder, "hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4}
        ),
    )


def test_a_scaled_down_sd15_is_written_in_float16_and_generates_through_the_workers_loading_path(tmp_path: Path) -> None:
    import torch
    from safetensors import safe_open

    from deployments.pipeline import DiffusionRunner
    from deployments.random_model import make_random_model
    from deployments.settings import WorkerSettings

    narrow = scaled_down(SD15)
    folder = make_random_model(tmp_path / "model", narrow)
    with safe_open(folder / "unet" / "diffusion_pytorch_model.safetensors", "pt") as weights:
        assert weights.get_tensor("conv_in.weight").dtype == torch.float16
    assert json.loads((folder / "seidra-sd15-narrow-model.json").read_text())["dtype"] == "float16"
    assert not is_tiny_model(str(folder))

    runner = DiffusionRunner(WorkerSettings(model=str(folder), device="cpu", torch_threads=1))
    assert tuple(runner.pipeline.unet.config.block_out_channels) == (32, 32, 64, 64)
    assert len(runner.pipeline.tokenizer) == runner.pipeline.text_encoder.config.vocab_size == 49408
    params = GenerationParams("a lighthouse", None, width=64, height=64, num_inference_steps=1, guidance_scale=7.5, seed=1)
    [output] = runner.advance(WorkBatch(1, "replica", (WorkItem("job", params),)))
    assert (output.step, output.total_steps) == (1, 1)
    assert output.png.startswith(b"\x89PNG")


@pytest.mark.parametrize("argv", [["make-model"], ["make-model", "--architecture", "tiny"], ["make-tiny-model"]])
def test_the_cli_writes_the_tiny_model_by_default(argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "tiny"
    assert main([argv[0], str(folder), *argv[1:]]) == 0
    assert is_tiny_model(str(folder)) and (folder / "model_index.json").is_file()
    assert f"export SEIDRA_MODEL={folder}" in capsys.readouterr().out


def test_a_tiny_lora_adapter_is_seeded_and_covers_the_unet_and_the_text_encoder(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from deployments.tiny_model import make_tiny_lora

    weights = [
        load_file(make_tiny_lora(tmp_path / name, seed) / "pytorch_lora_weights.safetensors")
        for name, seed in (("first", 0), ("again", 0), ("other", 1))
    ]
    first, again, other = weights
    assert {key.split(".")[0] for key in first} == {"unet", "text_encoder"}
    assert first.keys() == again.keys() == other.keys()
    assert all(first[key].equal(again[key]) for key in first)
    assert not any(first[key].equal(other[key]) for key in first)
