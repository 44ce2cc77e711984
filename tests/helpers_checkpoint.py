"""Test-only: write a diffusers pipeline as an original-layout (LDM / A1111) single-file checkpoint.

The inverse of the key mapping diffusers' single-file loader applies (``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``), written independently so that the
round trip diffusers folder -> .safetensors -> ``from_single_file`` tests the loader, not itself.
Covers the SD1 layout: UNet with conv proj_in/proj_out, CLIP ViT text encoder, KL VAE.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."

# diffusers ResnetBlock2D -> LDM ResBlock
UNET_RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
UNET_TOP_LEVEL = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
# diffusers Attention (VAE mid block, linear) -> LDM AttnBlock (1x1 convs)
VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_module_map(config: Any) -> dict[str, tuple[str, bool]]:
    """diffusers module prefix -> (LDM module prefix, is a resnet) for an SD-style UNet config."""
    blocks, per_block = len(config["block_out_channels"]), config["layers_per_block"]
    down_attn = ["CrossAttn" in t for t in config["down_block_types"]]
    up_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    mapping = {d: (ldm, False) for d, ldm in UNET_TOP_LEVEL.items()}
    index = 1
    for b in range(blocks):
        for layer in range(per_block):
            mapping[f"down_blocks.{b}.resnets.{layer}"] = (f"input_blocks.{index}.0", True)
            if down_attn[b]:
                mapping[f"down_blocks.{b}.attentions.{layer}"] = (f"input_blocks.{index}.1", False)
            index += 1
        if b < blocks - 1:
            mapping[f"down_blocks.{b}.downsamplers.0.conv"] = (f"input_blocks.{index}.0.op", False)
            index += 1
    mapping["mid_block.resnets.0"] = ("middle_block.0", True)
    mapping["mid_block.attentions.0"] = ("middle_block.1", False)
    mapping["mid_block.resnets.1"] = ("middle_block.2", True)
    index = 0
    for b in range(blocks):
        for layer in range(per_block + 1):
            mapping[f"up_blocks.{b}.resnets.{layer}"] = (f"output_blocks.{index}.0", True)
            if up_attn[b]:
                mapping[f"up_blocks.{b}.attentions.{layer}"] = (f"output_blocks.{index}.1", False)
            index += 1
        if b < blocks - 1:
            slot = 2 if up_attn[b] else 1
            mapping[f"up_blocks.{b}.upsamplers.0.conv"] = (f"output_blocks.{index - 1}.{slot}.conv", False)
    return mapping


def unet_to_ldm(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    mapping = unet_module_map(config)
    converted = {}
    for key, value in state.items():
        prefix = max((p for p in mapping if key.startswith(p + ".")), key=len, default=None)
        if prefix is None:
            raise KeyError(f"no LDM name for UNet key {key}")
        ldm_prefix, is_resnet = mapping[prefix]
        rest = key[len(prefix) + 1 :]
        if is_resnet:
            head, _, tail = rest.partition(".")
            rest = f"{UNET_RESNET_NAMES.get(head, head)}.{tail}"
        converted[f"{UNET_PREFIX}{ldm_prefix}.{rest}"] = value
    return converted


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


def text_encoder_to_ldm(state: dict[str, torch.Tensor], context: int = 77) -> dict[str, torch.Tensor]:
    """SD1's CLIP text encoder as A1111 checkpoints store it (position_ids included, as real files do)."""
    converted = {CLIP_PREFIX + key.removeprefix("text_model."): value for key, value in state.items()}
    converted[CLIP_PREFIX + "embeddings.position_ids"] = torch.arange(context)[None]
    return converted


def write_ldm_checkpoint(pipeline: Any, file: Path) -> Path:
    """The pipeline's UNet, VAE and text encoder as one original-layout .safetensors file."""
    tensors = {
        **unet_to_ldm(pipeline.unet.state_dict(), pipeline.unet.config),
        **vae_to_ldm(pipeline.vae.state_dict()),
        **text_encoder_to_ldm(pipeline.text_encoder.state_dict()),
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
