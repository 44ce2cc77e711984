"""LoRA adapters on any torch module, through peft's own API (not the diffusers/transformers wrappers).

Why not ``model.add_adapter``: transformers' ``PeftAdapterMixin`` gates every adapter call on a peft
version of its own choosing (transformers 5.24 refuses any peft below 0.22, which did not exist yet),
so a text-encoder LoRA would depend on two libraries agreeing on a release. The wrappers of both
libraries are thin layers over ``peft.inject_adapter_in_model`` and peft's ``BaseTunerLayer``; calling
those directly gives the UNet and the text encoder one code path whose only contract is peft's.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer

ADAPTER = "default"


def attach_lora(model: torch.nn.Module, config: LoraConfig, adapter_name: str = ADAPTER) -> None:
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
    """Delete every adapter (the wrapped layers stay, with no adapter: they compute the base layer)."""
    names = list(getattr(model, "peft_config", None) or {})
    for layer in tuner_layers(model):
        for name in names:
            if name in layer.lora_A or name in getattr(layer, "lora_embedding_A", {}):
                layer.delete_adapter(name)
    if hasattr(model, "peft_config"):
        del model.peft_config


def tuner_layers(model: torch.nn.Module) -> list[BaseTunerLayer]:
    return [module for module in model.modules() if isinstance(module, BaseTunerLayer)]
