"""Optimizer and learning-rate schedule for the LoRA parameter groups.

Pure builders over the ``optimizer`` and ``scheduler`` config groups. Every kind of schedule is
handed to the loop as one ``LrSchedule`` with the same three calls, so the loop never branches on
whether the schedule moves per optimizer step (diffusers' schedules) or per evaluation (plateau).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from training.optim_options import (
    _ADAMW8BIT_HELP,
    _optimizer_value_problems,
    resolve_warmup_steps,
    scheduler_problems,
)


class OptimizerUnavailable(RuntimeError):
    """The chosen optimizer cannot run here (missing package or no CUDA GPU); the message says the fix."""


# --- validation: every problem at once, each naming the key and the fix


# --- optimizer


def build_optimizer(
    param_groups: list[dict[str, Any]], optimizer_cfg: Any, grad_accum_steps: int = 1
) -> torch.optim.Optimizer:
    """The configured optimizer over ``param_groups``; each group keeps its own ``lr``.

    Groups without an ``lr`` get ``optimizer.lr``. With ``optimizer.scale_lr_with_accumulation``
    every lr is multiplied by ``grad_accum_steps`` (DrawThings' advice, the linear scaling rule:
    one step averages N micro-batches, an N times larger batch, so it may take an N times larger
    step). The caller's groups are not modified.
    """
    problems = _optimizer_value_problems(optimizer_cfg)
    if problems:
        raise ValueError("; ".join(problems))
    factor = grad_accum_steps if optimizer_cfg.scale_lr_with_accumulation else 1
    lr = float(optimizer_cfg.lr) * factor
    groups = []
    for group in param_groups:
        group = dict(group, params=list(group["params"]))
        group["lr"] = float(group.get("lr", optimizer_cfg.lr)) * factor
        groups.append(group)
    return _BUILDERS[optimizer_cfg.name](groups, optimizer_cfg, lr)


def _betas(cfg: Any) -> tuple[float, float]:
    first, second = (float(b) for b in cfg.betas)
    return first, second


def _adamw(groups: list[dict[str, Any]], cfg: Any, lr: float) -> torch.optim.Optimizer:
    # The fused kernel is one launch per step instead of one per tensor; CUDA tensors only.
    params = [p for group in groups for p in group["params"]]
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(
        groups, lr=lr, betas=_betas(cfg), weight_decay=cfg.weight_decay, eps=cfg.eps, fused=fused or None
    )


def _adamw8bit(groups: list[dict[str, Any]], cfg: Any, lr: float) -> torch.optim.Optimizer:
    # 8-bit optimizer states (Dettmers et al. 2022, arXiv:2110.02861): a quarter of AdamW's state memory.
    if not torch.cuda.is_available():
        raise OptimizerUnavailable(_ADAMW8BIT_HELP + " (no CUDA GPU here); use optimizer=adamw on this machine")
    try:
        import bitsandbytes
    except Exception as error:  # ImportError, or bitsandbytes failing to find its CUDA library
        raise OptimizerUnavailable(f"{_ADAMW8BIT_HELP} (import failed: {error})") from error
    return bitsandbytes.optim.AdamW8bit(groups, lr=lr, betas=_betas(cfg), weight_decay=cfg.weight_decay, eps=cfg.eps)


def _lion(groups: list[dict[str, Any]], cfg: Any, lr: float) -> torch.optim.Optimizer:
    # Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", arXiv:2302.06675):
    # sign updates, so it wants a 3-10x smaller lr and 3-10x larger weight decay than AdamW.
    try:
        from lion_pytorch import Lion
    except ImportError as error:
        raise OptimizerUnavailable("optimizer=lion needs lion-pytorch: pip install lion-pytorch") from error
    return Lion(groups, lr=lr, betas=_betas(cfg), weight_decay=cfg.weight_decay)


def _sgd(groups: list[dict[str, Any]], cfg: Any, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)


def _adafactor(groups: list[dict[str, Any]], cfg: Any, lr: float) -> torch.optim.Optimizer:
    # Adafactor (Shazeer & Stern 2018, arXiv:1804.04235) with an explicit lr: no relative step size,
    # no parameter-scale multiplier and no warm-up of its own, so optimizer.lr and the schedule rule.
    # Its eps is a (1e-30, 1e-3) pair unlike Adam's, so optimizer.eps is not passed.
    from transformers.optimization import Adafactor

    return Adafactor(
        groups,
        lr=lr,
        weight_decay=cfg.weight_decay,
        relative_step=False,
        scale_parameter=False,
        warmup_init=False,
    )


def _prodigy(groups: list[dict[str, Any]], cfg: Any, lr: float) -> torch.optim.Optimizer:
    # Prodigy (Mishchenko & Defazio 2023, arXiv:2306.06101) estimates the step size d itself; lr is a
    # multiplier on it (1.0 as intended), d_coef scales the estimate.
    try:
        from prodigyopt import Prodigy
    except ImportError as error:
        raise OptimizerUnavailable("optimizer=prodigy needs prodigyopt: pip install prodigyopt") from error
    return Prodigy(groups, lr=lr, betas=_betas(cfg), weight_decay=cfg.weight_decay, eps=cfg.eps, d_coef=cfg.d_coef)


_BUILDERS: dict[str, Callable[[list[dict[str, Any]], Any, float], torch.optim.Optimizer]] = {
    "adamw": _adamw,
    "adamw8bit": _adamw8bit,
    "lion": _lion,
    "sgd": _sgd,
    "adafactor": _adafactor,
    "prodigy": _prodigy,
}


# --- learning-rate schedule


class LrSchedule:
    """One interface over every schedule, so the training loop never branches on the kind.

    * ``step_per_optimizer_step()`` after ``optimizer.step()``: moves diffusers' schedules and any
      warm-up; a no-op for plateau once warmed up.
    * ``step_on_metric(value)`` after each evaluation (higher is better): moves plateau; a no-op
      for the others.
    * ``last_lr()``: the current lr of a parameter group, read from the optimizer.

    The schedule moves once per step the optimizer really took, counted by a hook on the
    optimizer: under ``accelerator.accumulate`` the wrapped optimizer steps only on the last
    micro-batch (and the fp16 loss scaler skips overflowing steps), so calling
    ``step_per_optimizer_step()`` on every micro-batch is as right as calling it once per
    optimizer step. Do not pass it to ``accelerator.prepare`` (it is returned unchanged anyway):
    accelerate's scheduler wrapper would step it once per process.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        name: str,
        per_step: torch.optim.lr_scheduler.LRScheduler | None,
        on_metric: torch.optim.lr_scheduler.ReduceLROnPlateau | None = None,
        warmup_steps: int = 0,
    ) -> None:
        self.optimizer = optimizer
        self.name = name
        self.warmup_steps = warmup_steps
        self._per_step = per_step
        self._on_metric = on_metric
        self._pending = 0  # optimizer steps the schedule has not followed yet
        optimizer.register_step_post_hook(self._count_optimizer_step)

    def _count_optimizer_step(self, *_: Any) -> None:
        self._pending += 1

    @property
    def warming_up(self) -> bool:
        return self._per_step is not None and self._per_step.last_epoch < self.warmup_steps

    def step_per_optimizer_step(self) -> None:
        pending, self._pending = self._pending, 0
        for _ in range(pending):
            if self._per_step is None or (self._on_metric is not None and not self.warming_up):
                return  # no per-step schedule, or warm-up done and plateau alone owns the lr
            self._per_step.step()

    def step_on_metric(self, value: float) -> None:
        # Metrics seen during warm-up say nothing about a plateau (the lr was still rising).
        if self._on_metric is not None and not self.warming_up:
            self._on_metric.step(float(value))

    def last_lr(self, group: int = 0) -> float:
        return float(self.optimizer.param_groups[group]["lr"])

    # torch's names, so code written against a torch scheduler keeps working.
    step = step_per_optimizer_step

    def get_last_lr(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    # Saved with the training state (accelerator.register_for_checkpointing) so a resumed run
    # continues the same curve.
    def state_dict(self) -> dict[str, Any]:
        return {
            "per_step": None if self._per_step is None else self._per_step.state_dict(),
            "on_metric": None if self._on_metric is None else self._on_metric.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._per_step is not None and state.get("per_step") is not None:
            self._per_step.load_state_dict(state["per_step"])
        if self._on_metric is not None and state.get("on_metric") is not None:
            self._on_metric.load_state_dict(state["on_metric"])


def build_lr_scheduler(optimizer: torch.optim.Optimizer, scheduler_cfg: Any, total_steps: int) -> LrSchedule:
    """The configured schedule over ``total_steps`` optimizer steps, as an ``LrSchedule``.

    ``scheduler.warmup_steps`` is a linear warm-up on every kind: ``constant`` with a warm-up
    behaves as ``constant_with_warmup`` and ``plateau`` warms up before it starts watching the
    metric. Each group's lr follows the curve scaled to its own initial lr.
    """
    from diffusers.optimization import get_scheduler  # here: the checks above run at startup, before diffusers loads

    problems = scheduler_problems(scheduler_cfg)
    if problems:
        raise ValueError("; ".join(problems))
    name = scheduler_cfg.name
    warmup = resolve_warmup_steps(scheduler_cfg.warmup_steps, total_steps)

    if name == "plateau":
        # Stepped on the eval metric (higher is better, e.g. CLIP score), not per step.
        per_step = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=warmup) if warmup else None
        on_metric = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=scheduler_cfg.plateau_factor, patience=scheduler_cfg.plateau_patience
        )
        return LrSchedule(optimizer, name, per_step, on_metric, warmup)

    kind = "constant_with_warmup" if name == "constant" and warmup else name
    per_step = get_scheduler(
        kind,
        optimizer=optimizer,
        num_warmup_steps=warmup,
        num_training_steps=total_steps,
        num_cycles=int(scheduler_cfg.num_cycles),  # read by cosine_with_restarts only
        power=float(scheduler_cfg.power),  # read by polynomial only
    )
    return LrSchedule(optimizer, name, per_step, None, warmup)
