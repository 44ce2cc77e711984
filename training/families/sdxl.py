"""SDXL: two text encoders, size/crop micro-conditioning, ``StableDiffusionXLPipeline``.

Conditioning as kohya's sdxl_train_network.py and diffusers' ``StableDiffusionXLPipeline.encode_prompt``
compute it (Podell et al. 2023, "SDXL", arXiv:2307.01952, sections 2.1-2.2): the penultimate hidden
states of CLIP ViT-L (768) and OpenCLIP ViT-bigG (1280), without their final layer norm, joined
along the features as the 2048-wide context; the pooled, projected output of the second encoder as
``text_embeds``; and per image ``time_ids`` = original size, crop top-left, target size.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline
from transformers import CLIPTextModelWithProjection

from training.families.base import Conditioning, ImageGeometry, ModelFamily, TextPart
from training.text.encoding import tokenize_chunks

SDXL_BASE_VERSION = "sdxl_base_v1-0"  # kohya's ss_base_model_version for SDXL 1.0 and its fine-tunes
SDXL_ARCHITECTURE = "stable-diffusion-xl-v1-base"


class StableDiffusionXL(ModelFamily):
    kind = "sdxl"
    label = "SDXL"
    text_parts = (
        TextPart("text_encoder", "tokenizer", "lora_te1_", "text_encoder_lr"),
        TextPart("text_encoder_2", "tokenizer_2", "lora_te2_", "text_encoder_2_lr", CLIPTextModelWithProjection),
    )
    vae_overflows_in_fp16 = True  # kohya's --no_half_vae; diffusers ships SDXL's VAE with force_upcast
    detection_rank = 10  # before SD1/SD2; after SD3 and FLUX, which have a second text encoder too
    pipeline_classes = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")
    checkpoint_markers = (("conditioner.embedders.1.", "an SDXL checkpoint (conditioner.embedders.1: OpenCLIP bigG)"),)
    config_dir_files = (*ModelFamily.config_dir_files, "text_encoder_2/config.json", "tokenizer_2")

    def folder_evidence(self, folder: Path, index: dict[str, Any]) -> str | None:
        if evidence := super().folder_evidence(folder, index):
            return evidence
        if "text_encoder_2" in index or (folder / "text_encoder_2").is_dir():
            return "an SDXL model (it has text_encoder_2)"
        return None

    def problems(
        self, model_cfg: Any, network_cfg: Any, train_cfg: Any | None = None, eval_cfg: Any | None = None
    ) -> list[str]:
        problems = super().problems(model_cfg, network_cfg, train_cfg, eval_cfg)
        if network_cfg.embedding.enabled:
            problems.append(
                "network.embedding.enabled=true: textual-inversion co-training is built for one text encoder "
                "(SD1/SD2); SDXL would need a vector per encoder (clip_l and clip_g). Set "
                "network.embedding.enabled=false for SDXL"
            )
        return problems

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
        """``hidden`` (batch, 77 * chunks, 768 + 1280) and ``text_embeds`` (batch, 1280).

        ``clip_skip`` 1 is SDXL's own penultimate layer; n goes n - 1 layers further back (diffusers'
        ``clip_skip=n-1``). Long captions are chunked as for SD1; the pooled embedding is the first
        chunk's, as kohya does.
        """
        hidden, pooled = [], None
        for tokenizer, encoder in zip(base.tokenizers, base.text_encoders, strict=True):
            ids = tokenize_chunks(tokenizer, captions, max_token_length)
            batch, chunks, context = ids.shape
            output = encoder(ids.view(batch * chunks, context).to(device), output_hidden_states=True)
            states = output.hidden_states[-(clip_skip + 1)]
            hidden.append(states.reshape(batch, chunks * context, states.shape[-1]))
            if isinstance(encoder, CLIPTextModelWithProjection) or hasattr(output, "text_embeds"):
                pooled = output.text_embeds.reshape(batch, chunks, -1)[:, 0]
        if pooled is None:
            raise ValueError("SDXL needs a text encoder with a projection (CLIPTextModelWithProjection) as its second")
        return {"hidden": torch.cat(hidden, dim=-1), "text_embeds": pooled}

    def batch_extras(
        self, geometry: Sequence[ImageGeometry], device: torch.device | str, train_cfg: Any | None = None
    ) -> Conditioning:
        """SDXL's micro-conditioning: (original h, w, crop top, left, target h, w) per image."""
        rows = torch.tensor(
            [[*g.original_size, *g.crop_top_left, *g.target_size] for g in geometry], dtype=torch.float32
        )
        if torch.device(device).type == "cuda":  # a pageable copy would make the host wait for the GPU every step
            rows = rows.pin_memory()
        return {"time_ids": rows.to(device, non_blocking=True)}

    def predict(self, unet: Any, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
        return unet(noisy, timesteps, cond["hidden"], added_cond_kwargs=added).sample

    def graph_inputs(self, cond: Conditioning) -> tuple[torch.Tensor, ...]:
        return (cond["hidden"], cond["text_embeds"], cond["time_ids"])

    def from_graph_inputs(self, tensors: Sequence[torch.Tensor]) -> Conditioning:
        return {"hidden": tensors[0], "text_embeds": tensors[1], "time_ids": tensors[2]}

    def pipeline(self, base: Any, scheduler: Any) -> StableDiffusionXLPipeline:
        return StableDiffusionXLPipeline(
            vae=base.vae,
            text_encoder=base.text_encoders[0],
            text_encoder_2=base.text_encoders[1],
            tokenizer=base.tokenizers[0],
            tokenizer_2=base.tokenizers[1],
            unet=base.denoiser,
            scheduler=scheduler,
            add_watermarker=False,
        )

    def pipeline_inputs(self, cond: Conditioning) -> dict[str, torch.Tensor]:
        hidden, pooled = cond["hidden"], cond["text_embeds"]
        return {
            "prompt_embeds": hidden[:1],
            "negative_prompt_embeds": hidden[1:],
            "pooled_prompt_embeds": pooled[:1],
            "negative_pooled_prompt_embeds": pooled[1:],
        }

    def kohya_unet_names(self, unet: torch.nn.Module) -> dict[str, str]:
        """kohya writes SDXL UNet keys in the original SDXL naming (``input_blocks_4_1_...``)."""
        from training.families.ldm_names import kohya_unet_names

        return kohya_unet_names(unet)

    def base_model_version(self, base: Any) -> str:
        return SDXL_BASE_VERSION

    def architecture(self, v_prediction: bool, base: Any = None) -> str:
        return SDXL_ARCHITECTURE

    def file_metadata(self, base: Any) -> dict[str, Any]:
        return {"ss_v2": False}

    def load_single_file(
        self, file: str, config_source: str | None, vae: Any | None, local_only: bool, with_t5: bool = True
    ) -> dict:
        """Through diffusers' own SDXL converters (OpenCLIP bigG included)."""
        pipeline = StableDiffusionXLPipeline.from_single_file(
            file,
            config=config_source,
            local_files_only=local_only,
            add_watermarker=False,
            **({"vae": vae} if vae is not None else {}),
        )
        return self.pipeline_parts(pipeline)

    def build_tiny(self, cache_root: Any) -> str:
        from training.families.tiny_sdxl import ensure_tiny_sdxl_model

        return str(ensure_tiny_sdxl_model(cache_root))


SDXL = StableDiffusionXL()
