"""Tiny SD3.5- and FLUX.1-architecture pipelines built in code (``model.source=tiny model.kind=sd3|flux``).

The structure of the real models (SD3.5-medium: joint blocks with qk RMS-norm and a dual-attention
block, CLIP-L + CLIP-G with projections, T5; FLUX.1-dev: double and single blocks, rotary position
ids, guidance embedding, CLIP-L + T5; flow-matching schedulers with their shifts; VAEs with a shift
factor), with widths small enough for a laptop CPU, as diffusers' own pipeline tests build theirs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from training.cache.folders import cached_folder, default_cache_root
from training.families.tiny_sd import TINY_RESOLUTION, TINY_SEED, build_tiny_vae, tiny_text_config
from training.text.tokenizer import build_word_t5_tokenizer, build_word_tokenizer

TINY_SD3_NAME = "tiny-sd3-v1"
TINY_FLUX_NAME = "tiny-flux-v1"
T5_WIDTH = 48  # T5-XXL: 4096
# the VAEs' latent statistics as the real ones give them (SD3: 1.5305 / 0.0609; FLUX.1: 0.3611 / 0.1159)
SD3_VAE = {"scaling_factor": 1.5305, "shift_factor": 0.0609, "use_quant_conv": False, "use_post_quant_conv": False}
FLUX_VAE = {"scaling_factor": 0.3611, "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False}


def _t5(vocab_size: int) -> T5EncoderModel:
    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=T5_WIDTH,
            d_kv=8,
            d_ff=96,
            num_layers=2,
            num_heads=4,
            feed_forward_proj="gated-gelu",  # T5 v1.1, as T5-XXL
            is_encoder_decoder=False,
            use_cache=False,
        )
    )


def build_tiny_sd3_pipeline(seed: int = TINY_SEED) -> StableDiffusion3Pipeline:
    """SD3.5-medium's structure: qk RMS-norm, block 0 with a second image attention, 16 latent channels
    in the real model (4 here), shift 3.0."""
    with torch.random.fork_rng(devices=[]):  # the caller's RNG state is left as it was
        torch.manual_seed(seed)
        tokenizer, tokenizer_2, tokenizer_3 = build_word_tokenizer(), build_word_tokenizer(), build_word_t5_tokenizer()
        text_encoder = CLIPTextModelWithProjection(tiny_text_config(len(tokenizer), 16, projection=16))
        text_encoder_2 = CLIPTextModelWithProjection(tiny_text_config(len(tokenizer_2), 24, projection=16))
        text_encoder_3 = _t5(len(tokenizer_3))
        transformer = SD3Transformer2DModel(
            sample_size=TINY_RESOLUTION // 4,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=T5_WIDTH,  # CLIP-L + CLIP-G (40) zero-padded to T5's width
            caption_projection_dim=32,
            pooled_projection_dim=32,  # the two CLIP projections joined
            pos_embed_max_size=16,
            qk_norm="rms_norm",
            dual_attention_layers=(0,),
        )
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
        return StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=scheduler,
            vae=build_tiny_vae(**SD3_VAE),
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3,
        )


def build_tiny_flux_pipeline(seed: int = TINY_SEED) -> FluxPipeline:
    """FLUX.1-dev's structure: double and single blocks, guidance embedding, dynamic shift."""
    with torch.random.fork_rng(devices=[]):  # the caller's RNG state is left as it was
        torch.manual_seed(seed)
        tokenizer, tokenizer_2 = build_word_tokenizer(), build_word_t5_tokenizer()
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,  # 4 latent channels x a 2x2 patch
            num_layers=1,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=T5_WIDTH,
            pooled_projection_dim=32,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
        )
        # FLUX.1-dev's scheduler config, with the shift's token range scaled to a 64 px image's 64 tokens
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=16,
            max_image_seq_len=256,
        )
        return FluxPipeline(
            scheduler=scheduler,
            vae=build_tiny_vae(**FLUX_VAE),
            text_encoder=CLIPTextModel(tiny_text_config(len(tokenizer), 32)),
            tokenizer=tokenizer,
            text_encoder_2=_t5(len(tokenizer_2)),
            tokenizer_2=tokenizer_2,
            transformer=transformer,
        )


def ensure_tiny_sd3_model(cache_root: str | Path | None = None) -> Path:
    """The tiny SD3 model's diffusers folder, built on first use."""
    return cached_folder(
        cache_root or default_cache_root(),
        TINY_SD3_NAME,
        lambda folder: build_tiny_sd3_pipeline().save_pretrained(folder, safe_serialization=True),
    )


def ensure_tiny_flux_model(cache_root: str | Path | None = None) -> Path:
    """The tiny FLUX.1 model's diffusers folder, built on first use."""
    return cached_folder(
        cache_root or default_cache_root(),
        TINY_FLUX_NAME,
        lambda folder: build_tiny_flux_pipeline().save_pretrained(folder, safe_serialization=True),
    )
