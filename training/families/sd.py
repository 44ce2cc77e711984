"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, a DDPM UNet, ``StableDiffusionPipeline``.

SD2 differs from SD1 only in its text encoder (OpenCLIP ViT-H, hidden size 1024), which detection
reads, and in its names in a LoRA file (``ss_v2``, the modelspec architecture); v-prediction is
``model.prediction_type``, not the family.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline

from training.families.base import Conditioning, ModelFamily, TextPart
from training.families.pipeline import sd_pipeline
from training.text.encoding import encode_prompts

SD2_TEXT_HIDDEN_SIZE = 1024  # OpenCLIP ViT-H/14; SD1's CLIP ViT-L/14 is 768


def kind_of_text_width(hidden_size: int) -> tuple[str, str]:
    """(kind, evidence) of a one-text-encoder model from its encoder's width: SD2's is 1024."""
    if hidden_size == SD2_TEXT_HIDDEN_SIZE:
        return "sd2", f"an SD2 model (text encoder hidden size {hidden_size}: OpenCLIP ViT-H)"
    return "sd1", f"an SD1 model (text encoder hidden size {hidden_size}, not SD2's 1024)"


class StableDiffusion(ModelFamily):
    """SD1.x (CLIP ViT-L) and SD2.x (OpenCLIP ViT-H): the same code, two names in files."""

    text_parts = (TextPart("text_encoder", "tokenizer", "lora_te_", "text_encoder_lr"),)

    def __init__(
        self,
        kind: str,
        label: str,
        architectures: dict[bool, str],
        detection_rank: int,
        checkpoint_markers: tuple[tuple[str, str], ...],
    ) -> None:
        self.kind, self.label = kind, label
        self._architectures = architectures  # v_prediction -> modelspec architecture
        self.detection_rank, self.checkpoint_markers = detection_rank, checkpoint_markers

    def folder_evidence(self, folder: Path, index: dict[str, Any]) -> str | None:
        """SD1 and SD2 share a pipeline class: the text encoder's width tells them apart (SD2's is 1024).
        Asked after the families with a second text encoder, so any folder with one CLIP text encoder is SD."""
        try:
            hidden_size = json.loads((folder / "text_encoder" / "config.json").read_text())["hidden_size"]
        except (OSError, ValueError, KeyError):
            return None
        kind, evidence = kind_of_text_width(hidden_size)
        return evidence if kind == self.kind else None

    def encode_text(
        self,
        base: Any,
        captions: list[str],
        device: torch.device | str,
        *,
        clip_skip: int,
        max_token_length: int,
        t5_max_length: int | None = None,
    ) -> Conditioning:
        hidden = encode_prompts(
            base.tokenizers[0],
            base.text_encoders[0],
            captions,
            device,
            clip_skip=clip_skip,
            max_token_length=max_token_length,
        )
        return {"hidden": hidden}

    def pipeline(self, base: Any, scheduler: Any) -> StableDiffusionPipeline:
        return sd_pipeline(
            vae=base.vae,
            text_encoder=base.text_encoders[0],
            tokenizer=base.tokenizers[0],
            unet=base.denoiser,
            scheduler=scheduler,
        )

    def base_model_version(self, base: Any) -> str:
        """sd_v1, sd_v2, sd_v2_v (v-prediction)."""
        if self.kind == "sd2":
            return "sd_v2_v" if base.noise_scheduler.config.prediction_type == "v_prediction" else "sd_v2"
        return "sd_v1"

    def architecture(self, v_prediction: bool, base: Any = None) -> str:
        return self._architectures[v_prediction]

    def file_metadata(self, base: Any) -> dict[str, Any]:
        return {"ss_v2": self.kind == "sd2"}

    def load_single_file(
        self, file: str, config_source: str | None, vae: Any | None, local_only: bool, with_t5: bool = True
    ) -> dict:
        """Through diffusers' own converters; the checkpoint's text-encoder layout (CLIP or OpenCLIP)
        is converted by diffusers. The safety checker is never loaded."""
        pipeline = StableDiffusionPipeline.from_single_file(
            file,
            config=config_source,
            local_files_only=local_only,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            **({"vae": vae} if vae is not None else {}),
        )
        return self.pipeline_parts(pipeline)

    def build_tiny(self, cache_root: Any) -> str:
        from training.families.tiny_sd import ensure_tiny_model

        return str(ensure_tiny_model(cache_root))


SD1 = StableDiffusion(
    "sd1",
    "SD1.x",
    {False: "stable-diffusion-v1", True: "stable-diffusion-v1"},
    detection_rank=30,  # after SD2: any width but 1024 is SD1
    checkpoint_markers=(
        ("cond_stage_model.transformer.", "an SD1 checkpoint (cond_stage_model.transformer: CLIP ViT-L)"),
    ),
)
SD2 = StableDiffusion(
    "sd2",
    "SD2.x",
    {False: "stable-diffusion-v2-512", True: "stable-diffusion-v2-768-v"},
    detection_rank=20,
    checkpoint_markers=(("cond_stage_model.model.", "an SD2 checkpoint (cond_stage_model.model: OpenCLIP ViT-H)"),),
)
