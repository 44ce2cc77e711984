"""A tiny random CLIP built in-process, so evaluation runs (and is tested) without a download.

Its scores carry no meaning about image quality; it exists so the whole evaluation path (sampling,
scoring, logging) can run offline in tests and smoke sweeps, with ``eval.clip_model=tiny``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel, CLIPProcessor

from training.cache.folders import cached_folder, default_cache_root
from training.text.tokenizer import MAX_LENGTH, build_word_tokenizer

try:  # transformers >= 5 without torchvision: the PIL backend, named directly to skip a fallback warning
    from transformers import CLIPImageProcessorPil as _ImageProcessor
except ImportError:  # pragma: no cover - transformers 4.x
    from transformers import CLIPImageProcessor as _ImageProcessor

TINY_CLIP_NAME = "tiny-clip-v1"  # bump the suffix whenever the architecture or seed below changes
TINY_CLIP_SEED = 0
IMAGE_SIZE = 64


def build_tiny_clip(folder: Path) -> None:
    """Write a seeded tiny ``CLIPModel`` and its ``CLIPProcessor`` into ``folder`` (safetensors).

    The seed is set here, not by the caller, so every machine builds the same weights and a
    cached copy is interchangeable with a fresh one.
    """
    tokenizer = build_word_tokenizer()
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": MAX_LENGTH,
        "bos_token_id": tokenizer.bos_token_id,  # 0
        "eos_token_id": tokenizer.eos_token_id,  # 1: pooling reads the first EOS position
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision_config = {
        "image_size": IMAGE_SIZE,
        "patch_size": 8,
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    }
    config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=32)
    torch.manual_seed(TINY_CLIP_SEED)
    model = CLIPModel(config).eval()
    image_processor = _ImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)

    folder = Path(folder)
    model.save_pretrained(folder)  # safetensors is the default format
    processor.save_pretrained(folder)


def ensure_tiny_clip(cache_root: Path | None = None) -> Path:
    """The tiny CLIP's folder under ``cache_root`` (default: the user cache), built on first use."""
    return cached_folder(cache_root or default_cache_root(), TINY_CLIP_NAME, build_tiny_clip)
