"""A tiny SDXL-architecture pipeline built in code, as ``model.source=tiny model.kind=sdxl``.

The structure of SDXL base (three UNet levels, the first without attention, two layers per block,
deeper transformers further down, linear projections, ``text_time`` micro-conditioning; CLIP +
CLIP-with-projection text encoders joined as the context; a VAE with SDXL's scaling factor), with
widths small enough for a laptop CPU, as diffusers' own SDXL tests build theirs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from training.cache.folders import cached_folder, default_cache_root
from training.families.tiny_sd import TINY_RESOLUTION, TINY_SEED, build_tiny_vae, tiny_text_config
from training.text.tokenizer import build_word_tokenizer

TINY_SDXL_NAME = "tiny-sdxl-v1"
# the two encoders' hidden sizes (SDXL: 768, 1280); unequal, as diffusers' single-file loader tells
# the two apart by width
TEXT_WIDTHS = (32, 48)
POOLED_WIDTH = 32  # the second encoder's projection (SDXL: 1280)
TIME_EMBED_WIDTH = 8  # per time id (SDXL: 256)
# stabilityai/stable-diffusion-xl-base-1.0's scheduler/scheduler_config.json (sampling; training draws
# noise with DDPM from the same betas)
SDXL_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    prediction_type="epsilon",
    steps_offset=1,
    timestep_spacing="leading",
)


def build_tiny_sdxl_pipeline(seed: int = TINY_SEED) -> StableDiffusionXLPipeline:
    """Random but fixed weights: the same seed gives the same model on every CPU."""
    with torch.random.fork_rng(devices=[]):  # the caller's RNG state is left as it was
        torch.manual_seed(seed)
        tokenizer, tokenizer_2 = build_word_tokenizer(), build_word_tokenizer()
        text_encoder = CLIPTextModel(
            tiny_text_config(len(tokenizer), TEXT_WIDTHS[0], layers=3, projection=POOLED_WIDTH)
        )
        text_encoder_2 = CLIPTextModelWithProjection(
            tiny_text_config(len(tokenizer_2), TEXT_WIDTHS[1], layers=3, projection=POOLED_WIDTH)
        )
        unet = UNet2DConditionModel(
            sample_size=TINY_RESOLUTION // 4,
            in_channels=4,
            out_channels=4,
            block_out_channels=(16, 32, 32),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2),
            attention_head_dim=(2, 4, 4),
            cross_attention_dim=sum(TEXT_WIDTHS),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=TIME_EMBED_WIDTH,
            projection_class_embeddings_input_dim=POOLED_WIDTH + 6 * TIME_EMBED_WIDTH,
            norm_num_groups=8,
        )
        vae = build_tiny_vae(scaling_factor=0.13025, force_upcast=True)  # SDXL's VAE scaling
        scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULER)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )


def build_tiny_sdxl_folder(folder: Path) -> None:
    build_tiny_sdxl_pipeline().save_pretrained(folder, safe_serialization=True)


def ensure_tiny_sdxl_model(cache_root: str | Path | None = None) -> Path:
    """The tiny SDXL model's diffusers folder, built on first use."""
    return cached_folder(cache_root or default_cache_root(), TINY_SDXL_NAME, build_tiny_sdxl_folder)
