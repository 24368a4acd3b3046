"""Stable Diffusion pipelines built locally from configs, with random weights (no download).

* :func:`build_tiny_pipeline`: a few-MB pipeline with SD's layout (cross-attention transformer
  blocks at full latent resolution, VAE, CLIP text encoder, CLIP BPE tokenizer) for tests, the
  quickstart and smoke runs. Its images are noise-like: it checks plumbing, not quality.
* :func:`sd15_unet_config` / :func:`build_sd15_pipeline`: the SD 1.5 architecture (860M-parameter
  UNet, 83M VAE, 123M CLIP ViT-L/14 text encoder) with random weights, for timing: speed does not
  depend on weight values.
* :func:`sdxl_unet_config` / ``build_tiny_pipeline(kind="sdxl")``: the SDXL layout (no attention at
  full latent resolution, two text encoders, size/crop conditioning), full-size for timing, tiny
  for tests.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import torch

__all__ = [
    "build_sd15_pipeline",
    "build_tiny_pipeline",
    "sd15_unet_config",
    "sdxl_unet_config",
    "tiny_sdxl_unet_config",
    "tiny_unet_config",
    "write_clip_tokenizer_files",
]


def _bytes_to_unicode() -> list[str]:
    # CLIP's byte-level BPE alphabet: the 256 bytes mapped to printable unicode characters.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    bs = list(printable)
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return [chr(c) for c in cs]


def write_clip_tokenizer_files(folder: str) -> int:
    """Write a character-level CLIP BPE vocabulary (vocab.json, merges.txt) to ``folder``.

    Every byte symbol and its end-of-word form are tokens, with no merges: any text tokenizes.

    Returns:
        The vocabulary size.
    """
    chars = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for tok in ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]:
        vocab.setdefault(tok, len(vocab))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    return len(vocab)


def tiny_unet_config(cross_attention_dim: int = 32) -> dict[str, Any]:
    """A two-level UNet2DConditionModel config with transformer blocks at full resolution."""
    return dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=4,  # diffusers' legacy name: number of heads (SD 1.x: 8)
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=8,
    )


def sd15_unet_config() -> dict[str, Any]:
    """The UNet config of Stable Diffusion v1.5 (runwayml/stable-diffusion-v1-5, unet/config.json)."""
    return dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        attention_head_dim=8,
        cross_attention_dim=768,
        norm_num_groups=32,
    )


def sdxl_unet_config() -> dict[str, Any]:
    """The UNet config of SDXL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json):
    2.6B parameters, transformer blocks only at the 2x and 4x downsampled levels."""
    return dict(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),  # heads per level (head dim 64)
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,  # 6 x 256 size/crop embeddings + 1280 pooled text
        norm_num_groups=32,
    )


def tiny_sdxl_unet_config(text_dim: int = 32) -> dict[str, Any]:
    """An SDXL-shaped UNet2DConditionModel config: no attention at full resolution, transformer
    blocks (two per layer) at the 2x downsampled level, SDXL's size/crop and pooled-text conditioning.

    Args:
        text_dim: hidden size of each of the two text encoders (cross-attention width is twice it).
    """
    return dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        cross_attention_dim=2 * text_dim,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + text_dim,
        norm_num_groups=8,
    )


def _sd15_vae_config() -> dict[str, Any]:
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=512, layers_per_block=2,
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    )


def _build(unet_cfg, vae_cfg, text_cfg, seed: int, scheduler: str, torch_dtype: torch.dtype, xl: bool = False):
    from diffusers import (
        AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline,
        StableDiffusionXLPipeline, UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    schedulers = {"pndm": PNDMScheduler, "ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}
    if scheduler not in schedulers:
        raise ValueError(f"scheduler must be one of {sorted(schedulers)}, got {scheduler!r}")
    # SD 1.5's scheduler settings (scheduler/scheduler_config.json)
    sched = schedulers[scheduler](
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1, **{"pndm": {"skip_prk_steps": True}, "ddim": {"clip_sample": False}}.get(scheduler, {}),
    )
    with tempfile.TemporaryDirectory() as folder:
        vocab_size = write_clip_tokenizer_files(folder)
        tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=77)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # weights reproducible from the seed, global RNG restored after
    try:
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
        text_config = CLIPTextConfig(vocab_size=vocab_size, bos_token_id=0, eos_token_id=1, pad_token_id=1, **text_cfg)
        text_encoder = CLIPTextModel(text_config)
        text_encoder_2 = CLIPTextModelWithProjection(text_config) if xl else None
    finally:
        torch.random.set_rng_state(gen_state)
    if xl:
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer, unet=unet, scheduler=sched, force_zeros_for_empty_prompt=True,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=sched,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    if torch_dtype != torch.float32:
        for module in (unet, vae, text_encoder, text_encoder_2):
            if module is None:
                continue
            module.to(dtype=torch_dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_pipeline(seed: int = 0, scheduler: str = "pndm", torch_dtype: torch.dtype = torch.float32,
                        kind: str = "sd"):
    """A tiny StableDiffusionPipeline (or StableDiffusionXLPipeline) with random weights (a few MB).

    Its VAE downsamples by 2 (SD's by 8): 32×32 px images give 16×16 latents, so the full-resolution
    transformer blocks see 256 tokens (SDXL-shaped: the 8×8 level, 64 tokens).

    Args:
        seed: weight seed.
        scheduler: "pndm", "ddim" or "euler".
        torch_dtype: weight dtype.
        kind: "sd" (SD 1.x layout) or "sdxl" (SDXL layout: two text encoders, no full-resolution attention).
    """
    if kind not in ("sd", "sdxl"):
        raise ValueError(f"kind must be 'sd' or 'sdxl', got {kind!r}")
    vae_cfg = dict(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=32, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
    )
    text_cfg = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                    max_position_embeddings=77)
    if kind == "sdxl":
        return _build(tiny_sdxl_unet_config(32), vae_cfg, dict(text_cfg, projection_dim=32), seed, scheduler,
                      torch_dtype, xl=True)
    return _build(tiny_unet_config(32), vae_cfg, text_cfg, seed, scheduler, torch_dtype)


def build_sd15_pipeline(seed: int = 0, scheduler: str = "pndm", torch_dtype: torch.dtype = torch.float32):
    """A pipeline with the full SD 1.5 architecture and random weights (for timing only)."""
    text_cfg = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
    return _build(sd15_unet_config(), _sd15_vae_config(), text_cfg, seed, scheduler, torch_dtype)
