"""kohya's names for the LoRA modules of SD3's and FLUX.1's transformers (MMDiT), read off a diffusers model.

kohya sd-scripts (``networks/lora_sd3.py``, ``networks/lora_flux.py``), ComfyUI and diffusers'
kohya converter name a LoRA module after the original implementation's layer: Stability AI's
``joint_blocks.{i}.x_block.attn.qkv`` for SD3, Black Forest Labs' ``double_blocks.{i}.img_attn.qkv``
and ``single_blocks.{i}.linear1`` for FLUX. Those originals fuse what diffusers keeps apart: one
``qkv`` linear for ``to_q``/``to_k``/``to_v`` (and FLUX's ``linear1`` also holds ``proj_mlp``). Such
a module is a *fused group*: its diffusers modules, in the order their outputs are stacked.

Only modules whose weights are laid out the same in both implementations are named; the last SD3
block's context modulation is stored with scale and shift swapped (diffusers' ``swap_scale_shift``)
and gets no LoRA here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class KohyaNames:
    """``single``: diffusers module -> the original layer's name; ``fused``: an original layer's name ->
    its diffusers modules in stacking order. kohya's flat name is the original's with ``_`` for dots."""

    single: dict[str, str] = field(default_factory=dict)
    fused: dict[str, list[str]] = field(default_factory=dict)

    def modules(self) -> list[str]:
        """Every diffusers module that has a kohya name (alone or in a fused group)."""
        return [*self.single, *(module for group in self.fused.values() for module in group)]

    def flat(self) -> KohyaNames:
        """The same names as kohya writes them (``double_blocks_0_img_attn_qkv``; no ``lora_unet_``)."""
        return KohyaNames(
            {module: name.replace(".", "_") for module, name in self.single.items()},
            {name.replace(".", "_"): group for name, group in self.fused.items()},
        )

    def keep_existing(self, model: torch.nn.Module) -> KohyaNames:
        """The names of modules ``model`` has (SD3's last block has no context output layers)."""
        present = {name for name, _ in model.named_modules()}
        return KohyaNames(
            {module: flat for module, flat in self.single.items() if module in present},
            {flat: group for flat, group in self.fused.items() if all(module in present for module in group)},
        )


def _qkv(prefix: str, q: str = "to_q", k: str = "to_k", v: str = "to_v") -> list[str]:
    return [f"{prefix}.{q}", f"{prefix}.{k}", f"{prefix}.{v}"]


def flux_kohya_names(transformer: torch.nn.Module) -> KohyaNames:
    """BFL's FLUX.1 layout: ``double_blocks`` (image and text streams) and ``single_blocks``."""
    names = KohyaNames()
    for i in range(len(transformer.transformer_blocks)):
        block, original = f"transformer_blocks.{i}", f"double_blocks.{i}"
        names.fused[f"{original}.img_attn.qkv"] = _qkv(f"{block}.attn")
        names.fused[f"{original}.txt_attn.qkv"] = _qkv(f"{block}.attn", "add_q_proj", "add_k_proj", "add_v_proj")
        names.single.update(
            {
                f"{block}.attn.to_out.0": f"{original}.img_attn.proj",
                f"{block}.attn.to_add_out": f"{original}.txt_attn.proj",
                f"{block}.ff.net.0.proj": f"{original}.img_mlp.0",
                f"{block}.ff.net.2": f"{original}.img_mlp.2",
                f"{block}.ff_context.net.0.proj": f"{original}.txt_mlp.0",
                f"{block}.ff_context.net.2": f"{original}.txt_mlp.2",
                f"{block}.norm1.linear": f"{original}.img_mod.lin",
                f"{block}.norm1_context.linear": f"{original}.txt_mod.lin",
            }
        )
    for i in range(len(transformer.single_transformer_blocks)):
        block, original = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        # linear1 computes q, k, v and the MLP's input at once; linear2 reads attention and MLP outputs
        names.fused[f"{original}.linear1"] = [*_qkv(f"{block}.attn"), f"{block}.proj_mlp"]
        names.single.update(
            {f"{block}.proj_out": f"{original}.linear2", f"{block}.norm.linear": f"{original}.modulation.lin"}
        )
    return names.keep_existing(transformer)


def sd3_kohya_names(transformer: torch.nn.Module) -> KohyaNames:
    """Stability AI's SD3 layout: ``joint_blocks.{i}`` with an ``x_block`` (image) and a ``context_block``."""
    names = KohyaNames()
    last = len(transformer.transformer_blocks) - 1
    for i in range(last + 1):
        block = f"transformer_blocks.{i}"
        x, context = f"joint_blocks.{i}.x_block", f"joint_blocks.{i}.context_block"
        names.fused[f"{x}.attn.qkv"] = _qkv(f"{block}.attn")
        names.fused[f"{context}.attn.qkv"] = _qkv(f"{block}.attn", "add_q_proj", "add_k_proj", "add_v_proj")
        names.fused[f"{x}.attn2.qkv"] = _qkv(f"{block}.attn2")  # SD3.5's second image attention
        names.single.update(
            {
                f"{block}.attn.to_out.0": f"{x}.attn.proj",
                f"{block}.attn2.to_out.0": f"{x}.attn2.proj",
                f"{block}.attn.to_add_out": f"{context}.attn.proj",
                f"{block}.ff.net.0.proj": f"{x}.mlp.fc1",
                f"{block}.ff.net.2": f"{x}.mlp.fc2",
                f"{block}.ff_context.net.0.proj": f"{context}.mlp.fc1",
                f"{block}.ff_context.net.2": f"{context}.mlp.fc2",
                f"{block}.norm1.linear": f"{x}.adaLN_modulation.1",
            }
        )
        if i != last:  # the last block's is stored (shift, scale) in the original, (scale, shift) in diffusers
            names.single[f"{block}.norm1_context.linear"] = f"{context}.adaLN_modulation.1"
    return names.keep_existing(transformer)
