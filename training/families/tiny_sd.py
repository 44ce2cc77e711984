"""The embedded default base model: a tiny SD-architecture pipeline built in code.

It has the same parts as SD1.x (UNet2DConditionModel, AutoencoderKL, CLIPTextModel + CLIPTokenizer,
a DDPM noise schedule), only small, so the whole tool runs on a laptop CPU. It is written once as a
diffusers folder and then loaded through the same ``from_pretrained`` path as a real model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from training.cache.folders import cached_folder, default_cache_root
from training.families.pipeline import sd_pipeline
from training.text.tokenizer import build_word_tokenizer

TINY_SD_NAME = "tiny-sd-v1"
TINY_SEED = 0
TINY_RESOLUTION = 64  # pixels; latents are 16x16 (VAE downsamples by 4)


def build_tiny_vae(**config: object) -> AutoencoderKL:
    """The tiny models' VAE (64 px -> 16x16x4); ``config`` overrides (SDXL's scaling factor)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=TINY_RESOLUTION,
        **config,
    )


def tiny_text_config(vocab_size: int, hidden: int, *, layers: int = 2, projection: int = 32) -> CLIPTextConfig:
    """A tiny CLIP text encoder's config (4 heads, 77 positions, the word tokenizer's special ids):
    every tiny family's text encoders, each with its own width, depth and projection."""
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=projection,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def sd1_noise_scheduler() -> DDPMScheduler:
    """The SD1.x noise schedule (scaled-linear betas 0.00085-0.012 over 1000 steps, epsilon), as the
    SD1.x scheduler configs give it: the tiny model's and the toy base model's."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )


def build_tiny_pipeline(seed: int = TINY_SEED) -> StableDiffusionPipeline:
    """Random but fixed weights: the same seed gives the same model on every CPU."""
    with torch.random.fork_rng(devices=[]):  # the caller's RNG state is left as it was
        torch.manual_seed(seed)
        tokenizer = build_word_tokenizer()
        text_encoder = CLIPTextModel(tiny_text_config(len(tokenizer), 32))
        unet = UNet2DConditionModel(
            sample_size=TINY_RESOLUTION // 4,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=4,
            norm_num_groups=8,
        )
        vae = build_tiny_vae()
        scheduler = sd1_noise_scheduler()
    return sd_pipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)


def build_tiny_model_folder(folder: Path) -> None:
    build_tiny_pipeline().save_pretrained(folder, safe_serialization=True)


def ensure_tiny_model(cache_root: str | Path | None = None) -> Path:
    """The tiny model's diffusers folder, built on first use."""
    return cached_folder(cache_root or default_cache_root(), TINY_SD_NAME, build_tiny_model_folder)
