"""The optimizer and schedule options and their startup checks, without loading torch
(training/optim.py builds them)."""

from __future__ import annotations

import importlib.util
import math
from typing import Any

OPTIMIZERS = ("adamw", "adamw8bit", "lion", "sgd", "adafactor", "prodigy")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial", "plateau")
# Optimizers that read optimizer.betas (adafactor and sgd ignore them).
_USES_BETAS = ("adamw", "adamw8bit", "lion", "prodigy")
# Optional packages: optimizer -> (import name, pip name).
_PACKAGES = {
    "adamw8bit": ("bitsandbytes", "bitsandbytes"),
    "lion": ("lion_pytorch", "lion-pytorch"),
    "prodigy": ("prodigyopt", "prodigyopt"),
}


def optimizer_problems(optimizer_cfg: Any, cuda_available: bool) -> list[str]:
    """Every problem of ``optimizer_cfg`` on this machine, each naming the key and the fix."""
    problems = _optimizer_value_problems(optimizer_cfg)
    availability = _availability_problem(optimizer_cfg.name, cuda_available)
    if availability:
        problems.append(availability)
    return problems


def _optimizer_value_problems(cfg: Any) -> list[str]:
    name = cfg.name
    if name not in OPTIMIZERS:
        return [f"optimizer.name: unknown optimizer '{name}'; use one of {', '.join(OPTIMIZERS)}"]
    problems = []
    if cfg.lr < 0:
        problems.append(f"optimizer.lr must be >= 0 (got {cfg.lr}); a learning rate cannot be negative")
    if cfg.weight_decay < 0:
        problems.append(f"optimizer.weight_decay must be >= 0 (got {cfg.weight_decay}); 0 disables it")
    if name in _USES_BETAS:
        betas = list(cfg.betas)
        if len(betas) != 2:
            problems.append(f"optimizer.betas needs two values, e.g. [0.9, 0.999] (got {betas})")
        elif not all(0 <= b < 1 for b in betas):
            problems.append(f"optimizer.betas must each be in [0, 1) (got {betas})")
    if name in ("adamw", "adamw8bit", "prodigy") and cfg.eps <= 0:
        problems.append(f"optimizer.eps must be > 0 (got {cfg.eps}); 1e-8 is usual")
    if name == "sgd":
        if cfg.momentum < 0:
            problems.append(f"optimizer.momentum must be >= 0 (got {cfg.momentum})")
        if cfg.nesterov and cfg.momentum <= 0:
            problems.append("optimizer.nesterov=true needs optimizer.momentum > 0; set a momentum or nesterov=false")
    if name == "prodigy" and cfg.d_coef <= 0:
        problems.append(f"optimizer.d_coef must be > 0 (got {cfg.d_coef}); 1.0 is the default, <1 is more careful")
    return problems


def _availability_problem(name: str, cuda_available: bool) -> str | None:
    """Whether ``name`` can run here, checked without importing the optional package."""
    if name == "adamw8bit" and not cuda_available:
        return _ADAMW8BIT_HELP + " (no CUDA GPU here); use optimizer=adamw on this machine"
    if name in _PACKAGES:
        module, pip_name = _PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            if name == "adamw8bit":
                return _ADAMW8BIT_HELP + " (bitsandbytes is not installed)"
            return f"optimizer={name} needs the {pip_name} package: pip install {pip_name}"
    return None


def scheduler_problems(
    scheduler_cfg: Any, total_steps: int | None = None, eval_every_n_steps: int | None = None
) -> list[str]:
    """Every problem of ``scheduler_cfg``.

    With ``total_steps`` (``train.max_steps``) it also reports a warm-up as long as the run; with
    ``eval_every_n_steps`` (``eval.every_n_steps``) a plateau schedule that would never see a metric.
    """
    name = scheduler_cfg.name
    if name not in SCHEDULERS:
        return [f"scheduler.name: unknown schedule '{name}'; use one of {', '.join(SCHEDULERS)}"]
    problems = []
    warmup = scheduler_cfg.warmup_steps
    if not math.isfinite(warmup):
        pass  # nan / inf are reported for every key at once (sweeper.config.schema_check); int() of them would raise
    elif warmup < 0:
        problems.append(f"scheduler.warmup_steps must be >= 0 (got {warmup})")
    elif warmup >= 1 and warmup != int(warmup):
        problems.append(
            f"scheduler.warmup_steps={warmup}: a value >= 1 counts steps and must be whole; "
            "a value < 1 is a fraction of the total steps (e.g. 0.1)"
        )
    elif total_steps is not None and 0 < total_steps <= (steps := resolve_warmup_steps(warmup, total_steps)):
        problems.append(f"scheduler.warmup_steps={warmup} {_warmup_advice(warmup, steps, total_steps)}")
    if name == "cosine_with_restarts" and scheduler_cfg.num_cycles < 1:
        problems.append(f"scheduler.num_cycles must be >= 1 (got {scheduler_cfg.num_cycles}); 1 = plain cosine")
    if name == "polynomial" and scheduler_cfg.power <= 0:
        problems.append(f"scheduler.power must be > 0 (got {scheduler_cfg.power}); 1 = linear decay")
    if name == "plateau":
        if not 0 < scheduler_cfg.plateau_factor < 1:
            problems.append(
                f"scheduler.plateau_factor must be in (0, 1) (got {scheduler_cfg.plateau_factor}); "
                "the LR is multiplied by it"
            )
        if scheduler_cfg.plateau_patience < 0:
            problems.append(f"scheduler.plateau_patience must be >= 0 (got {scheduler_cfg.plateau_patience})")
        if eval_every_n_steps is not None and eval_every_n_steps <= 0:
            problems.append(
                "scheduler=plateau lowers the lr when the eval metric stops improving, but eval.every_n_steps=0 "
                "evaluates only at the end: set eval.every_n_steps (e.g. 50) or choose another scheduler"
            )
    return problems


def _warmup_advice(warmup: float, steps: int, total_steps: int) -> str:
    """Why a warm-up covering the whole run is one, and the fix, for a step count or a fraction (< 1)."""
    never = "the LR would never reach its value"
    if warmup >= 1:
        return f"covers all {total_steps} steps; {never}: lower it or give a fraction such as 0.1"
    # a fraction: at least one step (resolve_warmup_steps), rounded; below (total - 0.5) / total it leaves a step
    lower = f"lower it below {(total_steps - 0.5) / total_steps:.3g}, " if total_steps > 1 else ""
    return (
        f"is a fraction of the run: {steps} warm-up step(s) of its {total_steps}, so it covers all {total_steps} "
        f"steps; {never}: {lower}train more steps (train.max_steps), or set it to 0 for no warm-up"
    )


_ADAMW8BIT_HELP = "optimizer=adamw8bit needs a CUDA GPU and bitsandbytes: pip install bitsandbytes"


def resolve_warmup_steps(warmup: float, total_steps: int) -> int:
    """Warm-up in optimizer steps: a value < 1 is a fraction of ``total_steps``, >= 1 a step count.

    A positive fraction gives at least one step, so ``0.01`` of a short run still warms up.
    """
    if warmup < 0:
        raise ValueError(f"scheduler.warmup_steps must be >= 0 (got {warmup})")
    if warmup == 0:
        return 0
    if warmup < 1:
        return max(1, round(warmup * total_steps))
    return round(warmup)
