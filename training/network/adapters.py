"""LoRA adapters on any torch module, through peft's own API (not the diffusers/transformers wrappers).

Why not ``model.add_adapter``: transformers' ``PeftAdapterMixin`` gates every adapter call on a peft
version of its own choosing (transformers 5.24 refuses any peft below 0.22, which did not exist yet),
so a text-encoder LoRA would depend on two libraries agreeing on a release. The wrappers of both
libraries are thin layers over ``peft.inject_adapter_in_model`` and peft's ``BaseTunerLayer``; calling
those directly gives the UNet and the text encoder one code path whose only contract is peft's.
"""

from __future__ import annotations

import torch
from peft import LoHaConfig, LoraConfig, inject_adapter_in_model
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTunerLayer

ADAPTER = "default"


def adapter_config(network_type: str, dim: int, alpha: float, targets: list[str]) -> PeftConfig:
    """peft's tuner config of ``network.type`` (training/network/types.py), scaled alpha/dim as kohya
    and LyCORIS scale it."""
    if network_type == "loha":
        return LoHaConfig(r=dim, alpha=alpha, target_modules=targets, rank_dropout=0.0, module_dropout=0.0)
    return LoraConfig(r=dim, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0)


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
