"""FLUX.1: an MMDiT (``FluxTransformer2DModel``) over packed latents, CLIP-L (pooled) + T5-XXL, flow matching.

Conditioning as diffusers' ``FluxPipeline`` computes it (Black Forest Labs 2024; the transformer
follows SD3's MMDiT, Esser et al. 2024, arXiv:2403.03206): T5's last hidden states as the sequence,
CLIP-L's pooled output as ``pooled_projections``; latents packed into 2x2 patches (a token per
patch, with (0, row, column) position ids for the rotary embedding); FLUX.1-dev's distilled
guidance as an embedded scalar (``train.guidance``). The transformer takes timesteps as σ in (0, 1).
Training is rectified flow with the resolution-dependent shift (the scheduler's dynamic shifting).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel

from training.families.base import Conditioning, ImageGeometry, TextPart
from training.families.mmdit import MMDiTFamily, clip_outputs, t5_states
from training.families.mmdit_names import KohyaNames, flux_kohya_names

PATCH = 2  # latent pixels per token side


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(batch, C, H, W) -> (batch, H/2 * W/2, 4C): one token per 2x2 patch, row-major (FluxPipeline's layout)."""
    batch, channels, height, width = latents.shape
    patches = latents.view(batch, channels, height // PATCH, PATCH, width // PATCH, PATCH)
    return patches.permute(0, 2, 4, 1, 3, 5).reshape(batch, (height // PATCH) * (width // PATCH), channels * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of ``pack_latents`` for latents of ``height`` x ``width``."""
    batch, _, features = tokens.shape
    channels = features // 4
    patches = tokens.view(batch, height // PATCH, width // PATCH, channels, PATCH, PATCH)
    return patches.permute(0, 3, 1, 4, 2, 5).reshape(batch, channels, height, width)


def image_ids(height: int, width: int, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """(tokens, 3) position ids (0, row, column) of the packed patches."""
    rows = torch.arange(height // PATCH, device=device, dtype=dtype)
    columns = torch.arange(width // PATCH, device=device, dtype=dtype)
    grid = torch.stack(torch.meshgrid(rows, columns, indexing="ij"), dim=-1).reshape(-1, 2)
    return torch.cat([torch.zeros_like(grid[:, :1]), grid], dim=-1)


class Flux(MMDiTFamily):
    kind = "flux"
    label = "FLUX.1"
    text_parts = (TextPart("text_encoder", "tokenizer", "lora_te1_", "text_encoder_lr"),)
    denoiser_type = FluxTransformer2DModel
    t5_folders = ("text_encoder_2", "tokenizer_2")
    t5_required = True
    network_module = "networks.lora_flux"
    default_t5_max_length = 512  # FLUX.1-dev's (kohya: 512 for dev, 256 for schnell)
    detection_rank = 1
    pipeline_classes = ("FluxPipeline", "FluxImg2ImgPipeline", "FluxFillPipeline")
    # a FLUX.1 file holds the transformer alone: the folder gives the VAE and text encoders, weights too
    config_dir_files = (*MMDiTFamily.config_dir_files, "text_encoder_2/config.json", "tokenizer_2")
    checkpoint_markers = (
        ("double_blocks.0.img_attn.", "a FLUX.1 checkpoint (double_blocks: the MMDiT of FLUX)"),
        ("model.diffusion_model.double_blocks.0.", "a FLUX.1 checkpoint (double_blocks: the MMDiT of FLUX)"),
    )

    def problems(
        self, model_cfg: Any, network_cfg: Any, train_cfg: Any | None = None, eval_cfg: Any | None = None
    ) -> list[str]:
        problems = super().problems(model_cfg, network_cfg, train_cfg, eval_cfg)
        if not model_cfg.t5:
            problems.append(
                "model.t5=false: FLUX.1 conditions on T5's states and cannot run without them; set model.t5=true"
            )
        if model_cfg.clip_skip != 1:
            problems.append(
                f"model.clip_skip={model_cfg.clip_skip}: FLUX.1 uses only CLIP's pooled output, which clip skip does "
                "not change; set model.clip_skip=1"
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
        """``hidden`` (batch, T5 tokens, 4096) and ``pooled`` (batch, 768: CLIP-L's pooled output)."""
        pooled = clip_outputs(base.tokenizers[0], base.text_encoders[0], captions, device).pooler_output
        hidden = t5_states(base.t5_tokenizer, base.t5, captions, device, t5_max_length or self.default_t5_max_length)
        return {"hidden": hidden.to(pooled.dtype), "pooled": pooled}

    def batch_extras(
        self, geometry: Sequence[ImageGeometry], device: torch.device | str, train_cfg: Any | None = None
    ) -> Conditioning:
        """FLUX.1-dev's guidance scalar per image (``train.guidance``)."""
        value = 1.0 if train_cfg is None else float(train_cfg.guidance)
        return {"guidance": torch.full((len(geometry),), value, device=device)}

    def predict(self, unet: Any, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The velocity for (batch, C, H, W) latents at timesteps σ·1000, unpacked to their shape."""
        height, width = noisy.shape[-2:]
        hidden = cond["hidden"]
        guidance = cond["guidance"] if unet.config.guidance_embeds else None
        tokens = unet(
            hidden_states=pack_latents(noisy),
            timestep=timesteps / 1000,
            guidance=guidance,
            pooled_projections=cond["pooled"],
            encoder_hidden_states=hidden,
            txt_ids=hidden.new_zeros(hidden.shape[1], 3),
            img_ids=image_ids(height, width, noisy.device, hidden.dtype),
            return_dict=False,
        )[0]
        return unpack_latents(tokens, height, width)

    def graph_inputs(self, cond: Conditioning) -> tuple[torch.Tensor, ...]:
        return (cond["hidden"], cond["pooled"], cond["guidance"])

    def from_graph_inputs(self, tensors: Sequence[torch.Tensor]) -> Conditioning:
        return {"hidden": tensors[0], "pooled": tensors[1], "guidance": tensors[2]}

    # --- evaluation
    def pipeline(self, base: Any, scheduler: Any) -> FluxPipeline:
        return FluxPipeline(
            scheduler=scheduler,
            vae=base.vae,
            text_encoder=base.text_encoders[0],
            tokenizer=base.tokenizers[0],
            text_encoder_2=base.t5,
            tokenizer_2=base.t5_tokenizer,
            transformer=base.denoiser,
        )

    def pipeline_inputs(self, cond: Conditioning) -> dict[str, torch.Tensor]:
        """The prompt's embeddings only: FLUX.1-dev samples with distilled guidance, not a negative prompt."""
        return {"prompt_embeds": cond["hidden"][:1], "pooled_prompt_embeds": cond["pooled"][:1]}

    def sampling_guidance(self, eval_cfg: Any, train_cfg: Any) -> float:
        """The distilled guidance the LoRA trained with (``train.guidance``), not eval.guidance_scale's CFG."""
        return float(train_cfg.guidance)

    def initial_latents(
        self, count: int, channels: int, height: int, width: int, generator: torch.Generator, device: Any, dtype: Any
    ) -> torch.Tensor:
        """Packed noise, as FluxPipeline takes ``latents`` (``channels`` is the transformer's: 4 per latent channel)."""
        from diffusers.utils.torch_utils import randn_tensor

        noise = randn_tensor((count, channels // 4, height, width), generator=generator, device=device, dtype=dtype)
        return pack_latents(noise)

    def native_resolution(self, base: Any) -> int:
        """The VAE's sample size (1024 for FLUX.1): the transformer's config has none."""
        return int(base.vae.config.sample_size)

    # --- the LoRA file
    def kohya_names(self, denoiser: torch.nn.Module) -> KohyaNames:
        return flux_kohya_names(denoiser)

    def base_model_version(self, base: Any) -> str:
        return "flux1"

    def architecture(self, v_prediction: bool, base: Any = None) -> str:
        """kohya's: dev has the guidance embedding, schnell not."""
        if base is None:
            return "flux-1"
        return "flux-1-dev" if base.denoiser.config.guidance_embeds else "flux-1-schnell"

    # --- loading
    def load_single_file(
        self, file: str, config_source: str | None, vae: Any | None, local_only: bool, with_t5: bool = True
    ) -> dict:
        """The transformer from the file (BFL's layout, through diffusers' converter); VAE and text
        encoders from ``model.config_dir``, as FLUX.1 files hold the transformer alone."""
        if not config_source:
            raise ValueError(f"model.config_dir: a FLUX.1 single file ({file}) needs a diffusers FLUX.1 folder")
        parts = self.load_folder(config_source, None, vae, with_t5)
        parts["denoiser"] = FluxTransformer2DModel.from_single_file(
            file, config=config_source, subfolder="transformer", local_files_only=local_only
        )
        return parts

    def build_tiny(self, cache_root: Any) -> str:
        from training.families.tiny_mmdit import ensure_tiny_flux_model

        return str(ensure_tiny_flux_model(cache_root))


FLUX = Flux()
