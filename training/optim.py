"""Optimizer and learning-rate schedule for the LoRA parameter groups."""

from __future__ import annotations

from typing import Any

import torch
from diffusers.optimization import get_scheduler

OPTIMIZERS = ("adamw",)
SCHEDULERS = ("constant", "constant_with_warmup", "cosine")


def build_optimizer(param_groups: list[dict[str, Any]], optimizer_cfg: Any) -> torch.optim.Optimizer:
    """AdamW over the groups, each with its own lr (unet_lr / text_encoder_lr)."""
    if optimizer_cfg.name != "adamw":
        raise ValueError(f"optimizer.name: unknown optimizer '{optimizer_cfg.name}'; use one of {OPTIMIZERS}")
    fused = all(p.is_cuda for group in param_groups for p in group["params"])
    return torch.optim.AdamW(
        param_groups,
        lr=optimizer_cfg.lr,
        betas=tuple(optimizer_cfg.betas),
        weight_decay=optimizer_cfg.weight_decay,
        eps=optimizer_cfg.eps,
        fused=fused or None,
    )


def build_lr_scheduler(optimizer: torch.optim.Optimizer, scheduler_cfg: Any, total_steps: int):
    """diffusers' schedules, stepped once per optimizer step."""
    return get_scheduler(
        scheduler_cfg.name,
        optimizer=optimizer,
        num_warmup_steps=int(scheduler_cfg.warmup_steps),
        num_training_steps=total_steps,
    )
