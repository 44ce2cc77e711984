"""diffusers UNet module paths -> the original (LDM / SGM) module paths of the same weights.

We train a diffusers ``UNet2DConditionModel``, but two things outside diffusers name the UNet the
original way: single-file checkpoints (keys ``model.diffusion_model.<ldm path>.<param>``) and kohya
sd-scripts' SDXL LoRA files. For SDXL kohya builds its own UNet whose modules are named exactly like
the original checkpoint keys (kohya-ss/sd-scripts ``library/sdxl_original_unet.py``:
``SdxlUNet2DConditionModel`` with ``time_embed``, ``label_emb``, ``input_blocks``, ``middle_block``,
``output_blocks``, ``out``; ResnetBlock2D with ``in_layers``/``emb_layers``/``out_layers``/
``skip_connection``; Transformer2DModel with ``norm``, ``proj_in``, ``transformer_blocks``, ``proj_out``;
attention ``to_q``/``to_k``/``to_v``/``to_out.0``; feed-forward ``ff.net.0.proj``/``ff.net.2``; down- and
upsamplers ``op`` and ``conv``), and names a LoRA ``lora_unet_`` + that path with dots as underscores.
Inside a transformer block the two layouts agree, so only the block prefix and the resnet parts change.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

# diffusers ResnetBlock2D -> LDM ResBlock (in_layers = GroupNorm, SiLU, Conv; out_layers = GroupNorm, SiLU,
# Dropout, Conv; emb_layers = SiLU, Linear)
UNET_RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
# modules outside the block structure; add_embedding is SDXL's size/crop conditioning MLP (label_emb)
UNET_TOP_LEVEL = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}

UnetModuleMap = Mapping[str, tuple[str, bool]]


def unet_module_map(config: Any) -> dict[str, tuple[str, bool]]:
    """diffusers module prefix -> (LDM module prefix, is a resnet), from the block layout of an SD/SDXL UNet config."""
    blocks, per_block = len(config["block_out_channels"]), config["layers_per_block"]
    down_attn = ["CrossAttn" in t for t in config["down_block_types"]]
    up_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    mapping = {d: (ldm, False) for d, ldm in UNET_TOP_LEVEL.items()}
    # input_blocks.0 is conv_in; then per level: one slot per layer (resnet, attention), one for the downsampler
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
    # output_blocks: per_block + 1 slots per level; the upsampler shares the level's last slot, after the attention
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


def ldm_module_name(diffusers_path: str, mapping: UnetModuleMap) -> str:
    """The LDM path of a diffusers module (or parameter) path; KeyError where the original layout has no counterpart."""
    prefix = max(
        (p for p in mapping if diffusers_path == p or diffusers_path.startswith(p + ".")), key=len, default=None
    )
    if prefix is None:
        raise KeyError(f"no LDM name for UNet module {diffusers_path}")
    ldm_prefix, is_resnet = mapping[prefix]
    rest = diffusers_path[len(prefix) + 1 :]
    if not rest:
        return ldm_prefix
    if is_resnet:
        head, dot, tail = rest.partition(".")
        rest = UNET_RESNET_NAMES.get(head, head) + dot + tail
    return f"{ldm_prefix}.{rest}"


def kohya_unet_names(unet: nn.Module) -> dict[str, str]:
    """diffusers module path -> kohya's LoRA name (minus ``lora_unet_``), for every module with an LDM counterpart.

    Containers that exist only in diffusers (``down_blocks.1``, ``time_embedding``) are left out: they hold no
    weights of their own, and no kohya file names them.
    """
    mapping = unet_module_map(unet.config)
    names = {}
    for path, _ in unet.named_modules():
        try:
            names[path] = ldm_module_name(path, mapping).replace(".", "_")
        except KeyError:
            continue
    return names
