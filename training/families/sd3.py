"""SD3 and SD3.5: an MMDiT (``SD3Transformer2DModel``), CLIP-L + CLIP-G + optional T5-XXL, flow matching.

Conditioning as diffusers' ``StableDiffusion3Pipeline.encode_prompt`` computes it (Esser et al. 2024,
"Scaling Rectified Flow Transformers", arXiv:2403.03206, Sec. 5.2): the penultimate hidden states
of CLIP-L (768) and CLIP-G (1280) joined along the features and zero-padded to T5's width, followed
along the sequence by T5's last hidden states (zeros of 77 tokens without T5, which SD3 was trained
to allow); the pooled, projected outputs of both CLIPs joined as ``pooled_projections``. Training
is rectified flow with a static shift of 3.0 (the scheduler's).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextModelWithProjection

from training.families.base import Conditioning, TextPart
from training.families.detect import checkpoint_keys
from training.families.mmdit import MMDiTFamily, clip_outputs, t5_states
from training.families.mmdit_names import KohyaNames, sd3_kohya_names

CLIP_CONTEXT = 77  # the T5 placeholder's length without T5 (the pipeline's tokenizer_max_length)
CLIP_G_IN_FILE = "text_encoders.clip_g."  # a single file that carries its text encoders (diffusers' layout check)
VAE_IN_FILE = "first_stage_model."


class StableDiffusion3(MMDiTFamily):
    kind = "sd3"
    label = "SD3"
    text_parts = (
        TextPart("text_encoder", "tokenizer", "lora_te1_", "text_encoder_lr", CLIPTextModelWithProjection),
        TextPart("text_encoder_2", "tokenizer_2", "lora_te2_", "text_encoder_2_lr", CLIPTextModelWithProjection),
    )
    denoiser_type = SD3Transformer2DModel
    t5_folders = ("text_encoder_3", "tokenizer_3")
    network_module = "networks.lora_sd3"
    default_t5_max_length = 256  # kohya's sd3 default (t5xxl_max_token_length)
    detection_rank = 2
    pipeline_classes = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline")
    config_dir_files = (*MMDiTFamily.config_dir_files, "text_encoder_2/config.json", "tokenizer_2")
    checkpoint_markers = (
        ("joint_blocks.0.", "an SD3 checkpoint (joint_blocks: the MMDiT of SD3)"),
        ("model.diffusion_model.joint_blocks.0.", "an SD3 checkpoint (joint_blocks: the MMDiT of SD3)"),
    )

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
        """``hidden`` (batch, 77 + T5 tokens, joint width) and ``pooled`` (batch, CLIP-L + CLIP-G projections)."""
        states, pooled = [], []
        for tokenizer, encoder in zip(base.tokenizers[:2], base.text_encoders, strict=True):
            output = clip_outputs(tokenizer, encoder, captions, device)
            states.append(output.hidden_states[-(clip_skip + 1)])
            pooled.append(output.text_embeds)
        clip = torch.cat(states, dim=-1)
        width = base.denoiser.config.joint_attention_dim
        if base.t5 is not None:
            t5 = t5_states(base.t5_tokenizer, base.t5, captions, device, t5_max_length or self.default_t5_max_length)
        else:
            t5 = clip.new_zeros(len(captions), CLIP_CONTEXT, width)
        clip = F.pad(clip, (0, width - clip.shape[-1]))
        return {"hidden": torch.cat([clip, t5.to(clip.dtype)], dim=-2), "pooled": torch.cat(pooled, dim=-1)}

    def predict(self, unet: Any, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The velocity at timesteps σ·1000, as the pipeline calls the transformer."""
        return unet(
            hidden_states=noisy,
            timestep=timesteps,
            encoder_hidden_states=cond["hidden"],
            pooled_projections=cond["pooled"],
            return_dict=False,
        )[0]

    def graph_inputs(self, cond: Conditioning) -> tuple[torch.Tensor, ...]:
        return (cond["hidden"], cond["pooled"])

    def from_graph_inputs(self, tensors: Sequence[torch.Tensor]) -> Conditioning:
        return {"hidden": tensors[0], "pooled": tensors[1]}

    def pipeline(self, base: Any, scheduler: Any) -> StableDiffusion3Pipeline:
        return StableDiffusion3Pipeline(
            transformer=base.denoiser,
            scheduler=scheduler,
            vae=base.vae,
            text_encoder=base.text_encoders[0],
            tokenizer=base.tokenizers[0],
            text_encoder_2=base.text_encoders[1],
            tokenizer_2=base.tokenizers[1],
            text_encoder_3=base.t5,
            tokenizer_3=base.t5_tokenizer,
        )

    def pipeline_inputs(self, cond: Conditioning) -> dict[str, torch.Tensor]:
        hidden, pooled = cond["hidden"], cond["pooled"]
        return {
            "prompt_embeds": hidden[:1],
            "negative_prompt_embeds": hidden[1:],
            "pooled_prompt_embeds": pooled[:1],
            "negative_pooled_prompt_embeds": pooled[1:],
        }

    def kohya_names(self, denoiser: torch.nn.Module) -> KohyaNames:
        return sd3_kohya_names(denoiser)

    def base_model_version(self, base: Any) -> str:
        """kohya's model type: ``medium`` (SD3), ``5-medium`` (SD3.5 with dual attention), ``5-large``."""
        config = base.denoiser.config
        if not config.qk_norm:
            return "medium"
        return "5-medium" if config.dual_attention_layers else "5-large"

    def architecture(self, v_prediction: bool, base: Any = None) -> str:
        return "stable-diffusion-3" + (f"-{self.base_model_version(base)}" if base is not None else "")

    def load_single_file(
        self, file: str, config_source: str | None, vae: Any | None, local_only: bool, with_t5: bool = True
    ) -> dict:
        """Through diffusers' SD3 converters. A file with its text encoders (``sd3_medium_incl_clips``)
        loads whole; a file of the transformer (and VAE) alone, as SD3.5 ships, takes the text
        encoders, and the VAE where it has none, from the diffusers folder ``model.config_dir``."""
        keys = checkpoint_keys(Path(file))
        if any(key.startswith(CLIP_G_IN_FILE) for key in keys):
            without_t5 = {} if with_t5 else {"text_encoder_3": None, "tokenizer_3": None}
            pipeline = StableDiffusion3Pipeline.from_single_file(
                file,
                config=config_source,
                local_files_only=local_only,
                **({"vae": vae} if vae is not None else {}),
                **without_t5,
            )
            return self.pipeline_parts(pipeline)
        if not config_source:
            raise ValueError(
                f"model.config_dir: '{file}' holds no text encoders; give the diffusers SD3 folder they come from"
            )
        single = {"config": config_source, "local_files_only": local_only}
        if vae is None and any(key.startswith(VAE_IN_FILE) for key in keys):
            vae = AutoencoderKL.from_single_file(file, subfolder="vae", **single)
        parts = self.load_folder(config_source, None, vae, with_t5)
        parts["denoiser"] = SD3Transformer2DModel.from_single_file(file, subfolder="transformer", **single)
        return parts

    def build_tiny(self, cache_root: Any) -> str:
        from training.families.tiny_mmdit import ensure_tiny_sd3_model

        return str(ensure_tiny_sd3_model(cache_root))


SD3 = StableDiffusion3()
