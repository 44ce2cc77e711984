"""The LoRA network: peft adapters on the UNet (and optionally text encoder), and its kohya file.

Strength follows kohya: the low-rank update is scaled by alpha/dim (peft's ``lora_alpha / r``).
The saved file uses kohya's key names so every SD tool (A1111, ComfyUI, diffusers'
``load_lora_weights``) can load it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from training.adapters import ADAPTER, attach_lora, detach_adapters, set_adapters_enabled

UNET_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIX = "lora_te_"
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
class LoraNetwork:
    """Handles to the adapted models and the optimizer's parameter groups."""

    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    dim: int
    alpha: float
    trains_unet: bool
    trains_text_encoder: bool
    param_groups: list[dict[str, Any]]

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for group in self.param_groups for p in group["params"]]

    def set_enabled(self, enabled: bool) -> None:
        """Switch the LoRA on or off (off = the base model, for the baseline score)."""
        for model, adapted in ((self.unet, self.trains_unet), (self.text_encoder, self.trains_text_encoder)):
            if adapted:
                set_adapters_enabled(model, enabled)

    def lora_pairs(self) -> list[tuple[torch.nn.Parameter, torch.nn.Parameter]]:
        """(down, up) weights of every adapted linear layer."""
        pairs = []
        for model, adapted in ((self.unet, self.trains_unet), (self.text_encoder, self.trains_text_encoder)):
            if not adapted:
                continue
            for module in model.modules():
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
        """kohya names: ``lora_unet_<module path, dots as _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``."""
        tensors: dict[str, torch.Tensor] = {}
        parts = (
            (self.unet, UNET_PREFIX, "", self.trains_unet),
            (self.text_encoder, TEXT_ENCODER_PREFIX, TEXT_MODEL_LEVEL, self.trains_text_encoder),
        )
        for model, prefix, level, adapted in parts:
            if not adapted:
                continue
            for key, value in get_peft_model_state_dict(
                model, adapter_name=ADAPTER, save_embedding_layers=False
            ).items():
                module, _, kind = key.rpartition(".lora_")
                if level and not module.startswith(level):
                    module = level + module
                name = prefix + module.replace(".", "_")
                direction = "lora_down" if kind.startswith("A") else "lora_up"
                tensors[f"{name}.{direction}.weight"] = value.detach().to("cpu", dtype).contiguous()
                tensors[f"{name}.alpha"] = torch.tensor(self.alpha, dtype=dtype)
        return tensors


def add_lora(unet: torch.nn.Module, text_encoder: torch.nn.Module, network_cfg: Any, base_lr: float) -> LoraNetwork:
    """Attach fresh LoRA adapters; the caller seeds the RNG first so init is reproducible.

    A part whose own learning rate (``network.unet_lr`` / ``text_encoder_lr``) is 0 gets no adapter:
    "0 freezes that part" (PARAMETERS.md). ``optimizer.lr=0`` alone keeps the adapters and trains
    them at rate 0 (they stay at their initial, no-op values): a learning-rate sweep may include 0.
    """
    alpha = effective_alpha(network_cfg)
    unet_lr = base_lr if network_cfg.unet_lr is None else network_cfg.unet_lr
    te_lr = base_lr if network_cfg.text_encoder_lr is None else network_cfg.text_encoder_lr
    trains_unet = network_cfg.train_unet and (unet_lr > 0 or network_cfg.unet_lr is None)
    trains_te = network_cfg.train_text_encoder and (te_lr > 0 or network_cfg.text_encoder_lr is None)
    groups: list[dict[str, Any]] = []
    for model, adapted, targets, lr, label in (
        (unet, trains_unet, network_cfg.unet_targets, unet_lr, "unet"),
        (text_encoder, trains_te, network_cfg.text_encoder_targets, te_lr, "text_encoder"),
    ):
        if not adapted:
            continue
        attach_lora(
            model, LoraConfig(r=network_cfg.dim, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0)
        )
        if network_cfg.dropout > 0:
            _add_rank_dropout(model, network_cfg.dropout)
        params = [p for name, p in model.named_parameters() if "lora_" in name]
        for p in params:
            p.data = p.data.float()  # fp32 master weights even when the base runs in half precision
            p.requires_grad_(True)
        groups.append({"params": params, "lr": lr, "name": label})
    return LoraNetwork(unet, text_encoder, network_cfg.dim, alpha, trains_unet, trains_te, groups)


def remove_lora(network: LoraNetwork) -> None:
    """Take the adapters out again so the base model can serve another trial untouched."""
    remove_leftover_adapters(network.unet, network.text_encoder)


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
