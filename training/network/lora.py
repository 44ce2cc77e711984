"""The LoRA network: peft adapters on the UNet (and optionally the text encoders), and its kohya file.

Strength follows kohya: the low-rank update is scaled by alpha/dim (peft's ``lora_alpha / r``).
The saved file uses kohya's key names so every SD tool (A1111, ComfyUI, diffusers'
``load_lora_weights``) can load it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict

from training.network.adapters import (
    ADAPTER,
    adapter_config,
    adapter_parameters,
    attach_lora,
    detach_adapters,
    module_alpha,
    set_adapters_enabled,
)
from training.network.types import FILE_SUFFIXES, FUSED_FACTORS, conv_alpha_of, conv_dim_of, network_args

# kohya names text-encoder modules as in transformers 4's CLIPTextModel (``text_model.encoder...``);
# transformers 5 dropped the ``text_model`` level, so it is put back for file compatibility.
TEXT_MODEL_LEVEL = "text_model."


def effective_alpha(network_cfg: Any) -> float:
    """alpha, or scale * dim, or dim (scale 1) when neither is given."""
    if network_cfg.alpha is not None:
        return float(network_cfg.alpha)
    if network_cfg.scale is not None:
        return float(network_cfg.scale) * network_cfg.dim
    return float(network_cfg.dim)


@dataclass
class LoraPart:
    """One model that may carry a LoRA: its file prefix and kohya's name for each of its modules."""

    label: str  # "unet", or the family's text-encoder component name ("text_encoder", "text_encoder_2")
    model: torch.nn.Module
    kohya_prefix: str  # lora_unet_, lora_te_, lora_te1_ / lora_te2_
    trains: bool
    why_off: str  # the options that switch it off, for messages
    # module path -> accepted kohya flat names (first = the one written); the family decides them
    kohya_names: dict[str, list[str]] = field(default_factory=dict)
    # kohya flat name -> the modules one original layer holds, in stacking order (SD3/FLUX's fused qkv)
    fused: dict[str, list[str]] = field(default_factory=dict)

    @property
    def fused_modules(self) -> set[str]:
        """The modules written as part of a fused original layer."""
        return {module for group in self.fused.values() for module in group}

    def kohya_name(self, module: str) -> str:
        return self.kohya_names.get(module, [module.replace(".", "_")])[0]

    def out_features(self, module: str) -> int:
        layer = self.model.get_submodule(module)
        return getattr(layer, "base_layer", layer).out_features


@dataclass
class LoraNetwork:
    """Handles to the adapted models and the optimizer's parameter groups."""

    parts: list[LoraPart]
    dim: int
    alpha: float
    param_groups: list[dict[str, Any]]
    type: str = "lora"  # network.type (training/network/types.py)
    args: dict[str, str] = field(default_factory=dict)  # ss_network_args as LyCORIS writes them

    @property
    def unet(self) -> torch.nn.Module:
        return self.parts[0].model

    @property
    def trains_unet(self) -> bool:
        return self.parts[0].trains

    @property
    def text_parts(self) -> list[LoraPart]:
        return self.parts[1:]

    @property
    def trains_text_encoder(self) -> bool:
        return any(part.trains for part in self.text_parts)

    def adapted(self) -> list[LoraPart]:
        return [part for part in self.parts if part.trains]

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for group in self.param_groups for p in group["params"]]

    def set_enabled(self, enabled: bool) -> None:
        """Switch the LoRA on or off (off = the base model, for the baseline score)."""
        for part in self.adapted():
            set_adapters_enabled(part.model, enabled)

    def lora_pairs(self) -> list[tuple[torch.nn.Parameter, torch.nn.Parameter]]:
        """(down, up) weights of every adapted linear layer."""
        pairs = []
        for part in self.adapted():
            for module in part.model.modules():
                lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
                if isinstance(lora_a, torch.nn.ModuleDict) and ADAPTER in lora_a:
                    pairs.append((lora_a[ADAPTER].weight, lora_b[ADAPTER].weight))
        return pairs

    @torch.no_grad()
    def apply_max_norm(self, max_norm: float) -> dict[str, float]:
        """kohya's scale_weight_norms: shrink modules whose update norm |up.down|*alpha/dim exceeds max_norm.

        Both factors are scaled by sqrt(ratio), so their product (the update) scales by ratio.
        """
        scale = self.alpha / self.dim
        norms, scaled = [], 0
        for down, up in self.lora_pairs():
            # 1x1-conv LoRA (proj_in/out of SD1) has (out, r, 1, 1) and (r, in, 1, 1): the same matrices
            update = up.float().flatten(1) @ down.float().flatten(1)
            norm = torch.linalg.matrix_norm(update) * scale
            norms.append(float(norm))
            if norm > max_norm:
                ratio = (max_norm / norm).sqrt()
                down.mul_(ratio)
                up.mul_(ratio)
                scaled += 1
        return {"max_norm/scaled_modules": float(scaled), "max_norm/max": max(norms, default=0.0)}

    def kohya_state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """kohya names: ``<prefix><module name>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``.

        The modules of a fused group (``part.fused``) are written as the one original layer, as kohya's
        ``split_qkv`` saves them: the downs stacked, the ups block-diagonal. Loaders scale such a module
        by alpha / (its stacked rank), so its alpha is this network's times the modules stacked. A DoRA
        is a LoRA plus ``dora_scale``, one magnitude per output row, so a fused layer's magnitudes are
        its modules' rows in order.
        """
        suffixes = FILE_SUFFIXES[self.type]
        tensors: dict[str, torch.Tensor] = {}
        for part in self.adapted():
            state = get_peft_model_state_dict(part.model, adapter_name=ADAPTER, save_embedding_layers=False)
            modules: dict[str, dict[str, torch.Tensor]] = {}  # module -> its tensors by file suffix
            for key, value in state.items():
                parameter = next(s for s in suffixes if key.endswith(f".{s}"))
                modules.setdefault(key[: -len(parameter) - 1], {})[suffixes[parameter]] = value.detach()
            tensors.update(kohya_tensors(part, modules, module_alphas(part.model), self.type, dtype))
        return tensors


def module_alphas(model: torch.nn.Module) -> dict[str, float]:
    """Each adapted module's alpha (a LoCon's 3x3 convolutions have conv_alpha, the rest alpha)."""
    return {name: module_alpha(module) for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}


def kohya_tensors(
    part: LoraPart,
    modules: dict[str, dict[str, torch.Tensor]],
    alphas: dict[str, float],
    network_type: str = "lora",
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """``modules`` (module -> its tensors by file suffix: ``lora_down.weight``, ``hada_w1_a``, ...) under
    ``part``'s kohya names, one ``alpha`` each, and each fused group as its one original layer."""
    tensors: dict[str, torch.Tensor] = {}

    def write(name: str, factors: dict[str, torch.Tensor], alpha: float) -> None:
        for suffix, value in factors.items():
            tensors[f"{name}.{suffix}"] = value.to("cpu", dtype).contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=dtype)

    in_groups = part.fused_modules
    for module, factors in modules.items():
        if module not in in_groups:
            stored = to_file(factors, alphas[module], part.model.get_submodule(module))
            write(part.kohya_prefix + part.kohya_name(module), *stored)
    for flat, group in part.fused.items():
        present = [module for module in group if module in modules]
        if present:
            write(part.kohya_prefix + flat, fuse(part, group, modules, network_type), alphas[present[0]] * len(present))
    return tensors


def to_file(
    factors: dict[str, torch.Tensor], alpha: float, layer: torch.nn.Module
) -> tuple[dict[str, torch.Tensor], float]:
    """One module's tensors and alpha as the loaders read them, where peft holds them otherwise.

    - DoRA: peft's magnitude (``(out,)``, or ``(1, out, 1, 1)`` for a convolution) is one norm per
      output feature; LyCORIS' ``dora_scale`` of that axis (``wd_on_output``) is ``(out, 1)`` /
      ``(out, 1, 1, 1)``, the shape by which ComfyUI tells the axis.
    - LoKr of two full factors: the loaders (A1111's network_lokr.py, ComfyUI's lokr.py) find no rank
      tensor and apply the product unscaled, as LyCORIS trains it; peft scales it by alpha/dim, so that
      scale is multiplied into ``lokr_w2`` and alpha written as dim.
    """
    factors = dict(factors)
    if "dora_scale" in factors:
        weight = layer.get_base_layer().weight
        factors["dora_scale"] = factors["dora_scale"].reshape(weight.shape[0], *[1] * (weight.dim() - 1))
    if "lokr_w1" in factors and "lokr_w2" in factors:
        rank = layer.r[ADAPTER]
        factors["lokr_w2"] = factors["lokr_w2"] * (alpha / rank)
        alpha = float(rank)
    return factors, alpha


def fuse(
    part: LoraPart, group: list[str], modules: dict[str, dict[str, torch.Tensor]], network_type: str = "lora"
) -> dict[str, torch.Tensor]:
    """One set of tensors for the original layer of ``group``: the adapted modules' downs stacked along
    the rank and their ups placed block-diagonally at their output rows (zeros for modules without an
    adapter). For a LoHa both of its products are fused so: row block k of (w1_a·w1_b) ⊙ (w2_a·w2_b) is
    then module k's own product, and the loaders' alpha/rank sees the stacked rank. A DoRA's magnitudes
    are the modules' rows in order (a module without an adapter keeps its rows' norms)."""
    downs, ups = FUSED_FACTORS["loha" if network_type == "loha" else "lora"]
    present = [module for module in group if module in modules]
    first = modules[present[0]]
    rank = first[downs[0]].shape[0]
    sizes = [part.out_features(module) for module in group]
    fused = {key: torch.cat([modules[module][key] for module in present]) for key in downs}
    for key in ups:
        block = first[key].new_zeros(sum(sizes), rank * len(present))
        row, column = 0, 0
        for module, size in zip(group, sizes, strict=True):
            if module in modules:
                block[row : row + size, column : column + rank] = modules[module][key]
                column += rank
            row += size
        fused[key] = block
    if "dora_scale" in first:
        rows = [
            modules[module]["dora_scale"].reshape(-1)
            if module in modules
            else part.model.get_submodule(module).weight.detach().norm(dim=1).to(first["dora_scale"])
            for module in group
        ]
        fused["dora_scale"] = torch.cat(rows)[:, None]  # (out, 1), as LyCORIS writes a linear layer's
    return fused


def text_encoder_kohya_names(model: torch.nn.Module) -> dict[str, list[str]]:
    """kohya names text-encoder modules as transformers 4 did (``text_model.encoder...``); a model
    without that level (transformers 5) gets it put back, and files without it are still read."""
    names = {}
    for name, _ in model.named_modules():
        if not name:
            continue
        flat = name.replace(".", "_")
        leveled = (name if name.startswith(TEXT_MODEL_LEVEL) else TEXT_MODEL_LEVEL + name).replace(".", "_")
        names[name] = [leveled] if leveled == flat else [leveled, flat]
    return names


def lora_parts(base: Any, network_cfg: Any, base_lr: float) -> list[tuple[LoraPart, list[str], list[str], float]]:
    """Each part of ``base`` that may carry a LoRA, with its targets (at ``network.dim``), its 3x3
    convolutions (at ``conv_dim``, LoCon) and its learning rate.

    A part whose own learning rate (``network.unet_lr`` / ``text_encoder_lr`` / ``text_encoder_2_lr``) is 0
    gets no adapter: "0 freezes that part" (PARAMETERS.md). ``optimizer.lr=0`` alone keeps the adapters
    and trains them at rate 0 (they stay at their initial, no-op values): a learning-rate sweep may include 0.
    """
    family = base.family
    unet_lr = base_lr if network_cfg.unet_lr is None else network_cfg.unet_lr
    unet_names = {module: [flat] for module, flat in family.kohya_unet_names(base.denoiser).items()}
    targets = family.lora_targets(base.denoiser, list(network_cfg.unet_targets))
    conv_at_dim, conv_3x3 = family.conv_targets(base.denoiser) if conv_dim_of(network_cfg) else ([], [])
    parts = [
        (
            LoraPart(
                "unet",  # the denoiser's label in training states and messages, whatever its class
                base.denoiser,
                family.unet_prefix,
                network_cfg.train_unet and (unet_lr > 0 or network_cfg.unet_lr is None),
                "network.train_unet=false or network.unet_lr=0",
                unet_names,
                family.kohya_fused_names(base.denoiser),
            ),
            [*targets, *conv_at_dim],
            conv_3x3,
            unet_lr,
        )
    ]
    te_lr = network_cfg.text_encoder_lr
    for text_part, encoder in zip(family.text_parts, base.text_encoders, strict=True):
        own = getattr(network_cfg, text_part.lr_key)
        given = te_lr if own is None else own  # text_encoder_2_lr falls back to text_encoder_lr
        lr = base_lr if given is None else given
        trains = network_cfg.train_text_encoder and (lr > 0 or given is None)
        why_off = f"network.train_text_encoder=false or network.{text_part.lr_key}=0"
        part = LoraPart(
            text_part.encoder, encoder, text_part.kohya_prefix, trains, why_off, text_encoder_kohya_names(encoder)
        )
        parts.append((part, list(network_cfg.text_encoder_targets), [], lr))
    return parts


def add_lora(base: Any, network_cfg: Any, base_lr: float) -> LoraNetwork:
    """Attach fresh LoRA adapters to ``base``'s parts; the caller seeds the RNG first so init is reproducible."""
    alpha = effective_alpha(network_cfg)
    groups: list[dict[str, Any]] = []
    parts = []
    conv_dim, conv_alpha = conv_dim_of(network_cfg), conv_alpha_of(network_cfg, alpha)
    for part, targets, conv_targets, lr in lora_parts(base, network_cfg, base_lr):
        parts.append(part)
        if not part.trains:
            continue
        config = adapter_config(
            network_cfg.type,
            network_cfg.dim,
            alpha,
            targets,
            conv_targets=conv_targets,
            conv_dim=conv_dim,
            conv_alpha=conv_alpha,
            lokr_factor=network_cfg.lokr_factor,
            decompose_both=network_cfg.decompose_both,
        )
        attach_lora(part.model, config)
        if network_cfg.dropout > 0:
            _add_rank_dropout(part.model, network_cfg.dropout)
        params = [p for _, p in adapter_parameters(part.model)]
        for p in params:
            p.data = p.data.float()  # fp32 master weights even when the base runs in half precision
            p.requires_grad_(True)
        groups.append({"params": params, "lr": lr, "name": part.label})
    return LoraNetwork(parts, network_cfg.dim, alpha, groups, network_cfg.type, network_args(network_cfg, alpha))


def remove_lora(network: LoraNetwork) -> None:
    """Take the adapters out again so the base model can serve another trial untouched."""
    remove_leftover_adapters(*(part.model for part in network.parts))


def remove_leftover_adapters(*models: torch.nn.Module) -> None:
    """Delete every adapter still attached (also after a run that crashed before its clean-up)."""
    for model in models:
        detach_adapters(model)


def _add_rank_dropout(model: torch.nn.Module, rate: float) -> None:
    """kohya's network_dropout: dropout on lora_down's output (the rank-r activations).

    peft's own ``lora_dropout`` drops the layer *input* instead, which is a different regulariser;
    a forward hook on each ``lora_A`` gives kohya's semantics and keeps peft's weight names.
    """
    for name, module in model.named_modules():
        if name.endswith(f"lora_A.{ADAPTER}"):
            module.register_forward_hook(lambda mod, _inp, out: F.dropout(out, rate, mod.training))
