"""LoRA adapters on any torch module, through peft's own API (not the diffusers/transformers wrappers).

Why not ``model.add_adapter``: transformers' ``PeftAdapterMixin`` gates every adapter call on a peft
version of its own choosing (transformers 5.24 refuses any peft below 0.22, which did not exist yet),
so a text-encoder LoRA would depend on two libraries agreeing on a release. The wrappers of both
libraries are thin layers over ``peft.inject_adapter_in_model`` and peft's ``BaseTunerLayer``; calling
those directly gives the UNet and the text encoder one code path whose only contract is peft's.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig, inject_adapter_in_model
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTunerLayer

ADAPTER = "default"


def adapter_config(
    network_type: str,
    dim: int,
    alpha: float,
    targets: list[str],
    *,
    conv_targets: list[str] = (),
    conv_dim: int | None = None,
    conv_alpha: float | None = None,
    lokr_factor: int = -1,
    decompose_both: bool = False,
) -> PeftConfig:
    """peft's tuner config of ``network.type`` (training/network/types.py), scaled alpha/dim as kohya
    and LyCORIS scale it.

    ``conv_targets`` (full module names of 3x3 convolutions) are adapted at ``conv_dim`` /
    ``conv_alpha`` through peft's ``rank_pattern`` / ``alpha_pattern``, as LyCORIS' and kohya's
    ``conv_dim`` do; every other target (linear or 1x1) at ``dim`` / ``alpha``.
    """
    patterns: dict[str, dict] = {"rank_pattern": {}, "alpha_pattern": {}}
    if conv_targets:
        if conv_dim is None or conv_alpha is None:
            raise ValueError("conv_targets need conv_dim and conv_alpha")
        exact = "|".join(re.escape(name) for name in conv_targets)  # peft anchors it: (.*\.)?(...)$
        patterns = {"rank_pattern": {exact: conv_dim}, "alpha_pattern": {exact: conv_alpha}}
    modules = [*targets, *conv_targets]
    if network_type == "loha":
        return LoHaConfig(r=dim, alpha=alpha, target_modules=modules, rank_dropout=0.0, module_dropout=0.0, **patterns)
    if network_type == "lokr":
        return LoKrConfig(
            r=dim,
            alpha=alpha,
            target_modules=modules,
            rank_dropout=0.0,
            module_dropout=0.0,
            decompose_both=decompose_both,
            decompose_factor=lokr_factor,
            **patterns,
        )
    if network_type not in ("lora", "locon", "dora"):
        raise ValueError(f"unknown network type {network_type!r}")
    return LoraConfig(
        r=dim,
        lora_alpha=alpha,
        target_modules=modules,
        lora_dropout=0.0,
        use_dora=network_type == "dora",
        **patterns,
    )


def module_alpha(layer: BaseTunerLayer, adapter_name: str = ADAPTER) -> float:
    """The alpha a tuner layer of any type was given (peft keeps scaling = alpha / r for each)."""
    return float(layer.scaling[adapter_name] * layer.r[adapter_name])


def adapter_parameters(model: torch.nn.Module, adapter_name: str = ADAPTER) -> list[tuple[str, torch.nn.Parameter]]:
    """The adapter's own parameters (``...lora_A.default.weight``, ``...hada_w1_a.default``), any type."""
    return [(name, p) for name, p in model.named_parameters() if adapter_name in name.split(".")]


def attach_lora(model: torch.nn.Module, config: PeftConfig, adapter_name: str = ADAPTER) -> None:
    """Inject fresh LoRA layers for ``config.target_modules`` and make them the active adapter.

    peft records the config as ``model.peft_config[adapter_name]`` (its state-dict helpers read it).
    """
    if adapter_name in (getattr(model, "peft_config", None) or {}):
        raise ValueError(f"{type(model).__name__} already has an adapter named {adapter_name!r}")
    inject_adapter_in_model(config, model, adapter_name)
    for layer in tuner_layers(model):
        layer.set_adapter(adapter_name)


def set_adapters_enabled(model: torch.nn.Module, enabled: bool) -> None:
    """Switch every LoRA layer on or off (off = the base model's own output)."""
    for layer in tuner_layers(model):
        layer.enable_adapters(enabled)


def detach_adapters(model: torch.nn.Module) -> None:
    """Delete every adapter and put each wrapped layer's own base layer back in its place, so the next
    trial may attach any network type (a LoHa wrapper cannot take a LoRA, nor the other way round)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer) and name:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config


def tuner_layers(model: torch.nn.Module) -> list[BaseTunerLayer]:
    return [module for module in model.modules() if isinstance(module, BaseTunerLayer)]


def plain_lora_adapter(layer: Any) -> str | None:
    """The name of a peft LoRA layer's one active adapter where the layer takes peft's plain path with it
    (enabled, unmerged, no variant such as DoRA, no hook on its factors), else None: what the speed paths
    that stand in for that path may replace."""
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in layer.lora_variant:
        return None
    factors = (layer.lora_A[name], layer.lora_B[name])
    return None if any(m._forward_hooks or m._forward_pre_hooks for m in factors) else name
