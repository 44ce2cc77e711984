"""One Stable Diffusion pipeline from its parts, as every caller here needs it: no safety checker.

Training evaluates the live LoRA-adapted models, the tiny and toy models are written as diffusers
folders, and the benchmarks write an SD1.5-sized one: all assemble the same pipeline.
"""

from __future__ import annotations

from typing import Any

from diffusers import StableDiffusionPipeline


def sd_pipeline(*, vae: Any, text_encoder: Any, tokenizer: Any, unet: Any, scheduler: Any) -> StableDiffusionPipeline:
    """A ``StableDiffusionPipeline`` over these parts (shared, not copied), without a safety checker."""
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
