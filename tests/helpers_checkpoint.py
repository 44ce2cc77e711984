"""Test-only: write a diffusers pipeline as an original-layout (LDM / A1111) single-file checkpoint.

The inverse of the key mapping diffusers' single-file loader applies (``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``), written independently so that the
round trip diffusers folder -> .safetensors -> ``from_single_file`` tests the loader, not itself.
Covers the SD1 layout (UNet with conv proj_in/proj_out, CLIP ViT text encoder, KL VAE) and the SDXL
base layout (the same UNet naming plus label_emb, CLIP ViT-L and OpenCLIP ViT-bigG text encoders under
``conditioner.embedders``). The UNet names come from the product module ``training.families.ldm_names``,
which the single-file converter round trip in tests/test_ldm_names.py checks on its own.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from training.families.ldm_names import ldm_module_name, unet_module_map

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
# transformers CLIPEncoderLayer -> OpenCLIP ResidualAttentionBlock (q, k, v become one in_proj)
OPEN_CLIP_LAYER_NAMES = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}

# diffusers Attention (VAE mid block, linear) -> LDM AttnBlock (1x1 convs)
VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_to_ldm(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    mapping = unet_module_map(config)
    return {UNET_PREFIX + ldm_module_name(key, mapping): value for key, value in state.items()}


def vae_to_ldm(state: dict[str, torch.Tensor], prefix: str = VAE_PREFIX) -> dict[str, torch.Tensor]:
    """``prefix=""`` gives a standalone VAE file (vae-ft-mse style)."""
    up_blocks = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k)))
    converted = {}
    for key, value in state.items():
        new = key.replace("conv_norm_out", "norm_out")
        new = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", new)
        new = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", new)
        new = re.sub(r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{up_blocks - 1 - int(m.group(1))}.block.", new)
        new = re.sub(
            r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{up_blocks - 1 - int(m.group(1))}.upsample.", new
        )
        new = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m.group(1)) + 1}.", new)
        new = new.replace("conv_shortcut", "nin_shortcut")
        if ".mid_block.attentions.0." in new:
            head, _, name = new.partition(".mid_block.attentions.0.")
            module, _, param = name.rpartition(".")
            new = f"{head}.mid.attn_1.{VAE_ATTENTION_NAMES[module]}.{param}"
            if param == "weight" and value.ndim == 2:
                value = value[:, :, None, None]  # LDM's AttnBlock uses 1x1 convolutions
        converted[prefix + new] = value
    return converted


def text_encoder_to_ldm(
    state: dict[str, torch.Tensor], context: int = 77, prefix: str = CLIP_PREFIX
) -> dict[str, torch.Tensor]:
    """SD1's CLIP text encoder as A1111 checkpoints store it (position_ids included, as real files do)."""
    converted = {prefix + key.removeprefix("text_model."): value for key, value in state.items()}
    converted[prefix + "embeddings.position_ids"] = torch.arange(context)[None]
    return converted


def open_clip_to_ldm(state: dict[str, torch.Tensor], prefix: str = SDXL_OPEN_CLIP_PREFIX) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection in the OpenCLIP layout SDXL's second text encoder is stored in."""
    state = {key.removeprefix("text_model."): value for key, value in state.items()}
    converted = {
        "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        "positional_embedding": state.pop("embeddings.position_embedding.weight"),
        "ln_final.weight": state.pop("final_layer_norm.weight"),
        "ln_final.bias": state.pop("final_layer_norm.bias"),
        # OpenCLIP multiplies x @ text_projection, so it stores the transpose of the Linear weight
        "text_projection": state.pop("text_projection.weight").T,
    }
    state.pop("embeddings.position_ids", None)
    layers = sorted({int(m.group(1)) for key in state if (m := re.match(r"encoder\.layers\.(\d+)\.", key))})
    for i in layers:
        source, target = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for param in ("weight", "bias"):
            converted[f"{target}attn.in_proj_{param}"] = torch.cat(
                [state.pop(f"{source}self_attn.{qkv}_proj.{param}") for qkv in "qkv"]
            )
            for name, ldm in OPEN_CLIP_LAYER_NAMES.items():
                converted[f"{target}{ldm}.{param}"] = state.pop(f"{source}{name}.{param}")
    if state:
        raise KeyError(f"no OpenCLIP name for text encoder keys {sorted(state)}")
    return {prefix + key: value for key, value in converted.items()}


def write_ldm_checkpoint(pipeline: Any, file: Path) -> Path:
    """The pipeline's UNet, VAE and text encoder as one original-layout .safetensors file."""
    tensors = {
        **unet_to_ldm(pipeline.unet.state_dict(), pipeline.unet.config),
        **vae_to_ldm(pipeline.vae.state_dict()),
        **text_encoder_to_ldm(pipeline.text_encoder.state_dict()),
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(file))
    return file


def write_sdxl_checkpoint(pipeline: Any, file: Path) -> Path:
    """An SDXL pipeline's UNet, VAE and both text encoders as one original-layout (SGM) .safetensors file."""
    tensors = {
        **unet_to_ldm(pipeline.unet.state_dict(), pipeline.unet.config),
        **vae_to_ldm(pipeline.vae.state_dict()),
        **text_encoder_to_ldm(pipeline.text_encoder.state_dict(), prefix=SDXL_CLIP_PREFIX),
        **open_clip_to_ldm(pipeline.text_encoder_2.state_dict()),
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(file))
    return file


def write_ldm_vae(vae: Any, file: Path) -> Path:
    """A standalone VAE file in the original layout (no prefix), like vae-ft-mse-840000.safetensors."""
    save_file({k: v.contiguous() for k, v in vae_to_ldm(vae.state_dict(), prefix="").items()}, str(file))
    return file


def copy_configs(model_folder: Path, config_dir: Path) -> Path:
    """A diffusers config folder: every file of ``model_folder`` except the weights."""
    for file in model_folder.rglob("*"):
        if file.is_file() and file.suffix not in (".safetensors", ".bin"):
            target = config_dir / file.relative_to(model_folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(file.read_bytes())
    return config_dir
