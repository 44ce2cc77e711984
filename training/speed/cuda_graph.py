"""``train.cuda_graphs``: replay the UNet's training forward and backward as CUDA graphs.

At small batches a LoRA step on a GPU is bound by the host: the SD1.5 UNet with its LoRA layers is
~4,500 kernel launches per step, each dispatched by Python. A CUDA graph records them once and
replays them with one launch, so the GPU no longer waits on the host.

We capture with ``torch.cuda.make_graphed_callables`` (eager kernels, no compiler): capture costs a
few warm-up steps, not minutes of compilation, and the kernels are the eager ones, so gradients are
the eager gradients. That matters for sweeps of short trials, where each trial adds new LoRA
weights and a compiled whole UNet would recompile. It composes with ``train.compile=blocks``
(Inductor kernels are recorded like any other) but not with ``compile_mode=reduce-overhead``
or ``max-autotune`` (those replay their own graphs; ``max-autotune-no-cudagraphs`` composes).

One graph is captured per input shape (each aspect-ratio bucket), each with its own activation
memory, so memory grows with the number of buckets.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.helpers import disable_input_dtype_casting

from training.speed.compile_options import MODES_WITH_OWN_GRAPHS


def cuda_graph_problems(
    enabled: bool,
    *,
    grad_accum_steps: int,
    compile_mode: str,
    checkpointing: bool,
    device: torch.device | None = None,
) -> list[str]:
    """Why ``train.cuda_graphs=true`` cannot be combined with the rest of the config (or ``device``)."""
    if not enabled:
        return []
    problems = []
    if device is not None and device.type != "cuda":
        problems.append(
            f"train.cuda_graphs=true needs a CUDA GPU (training runs on {device}); set train.cuda_graphs=false"
        )
    if grad_accum_steps != 1:
        problems.append(
            "train.cuda_graphs=true needs train.grad_accum_steps=1 (a replayed backward writes its gradients "
            "into the same buffers each time, so micro-steps cannot add up); raise train.batch_size instead"
        )
    if compile_mode in MODES_WITH_OWN_GRAPHS:
        problems.append(
            f"train.cuda_graphs=true cannot be combined with train.compile_mode={compile_mode} (that mode replays "
            "its own CUDA graphs); use train.compile_mode=default or max-autotune-no-cudagraphs"
        )
    if checkpointing:
        problems.append(
            "train.cuda_graphs=true cannot be combined with model.gradient_checkpointing=true "
            "(checkpointing saves memory, graphs save host time: pick one)"
        )
    return problems


class _Prediction(torch.nn.Module):
    """The family's denoiser call as a function of positional tensors (what ``make_graphed_callables`` takes)."""

    def __init__(self, denoiser: torch.nn.Module, family: Any, mixed: bool) -> None:
        super().__init__()
        self.denoiser, self.family, self.mixed = denoiser, family, mixed

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        # as in the eager loop: under autocast, peft's cast of LoRA inputs to fp32 is wasted work
        with disable_input_dtype_casting(self.denoiser, active=self.mixed):
            return self.family.predict(self.denoiser, noisy, timesteps, self.family.from_graph_inputs(cond))


class GraphedDenoiser:
    """The denoiser's training call (``family.predict``), replayed from one CUDA graph per shape.

    Capture happens on the first call with a new shape (under the loop's autocast dtype, as
    ``make_graphed_callables`` requires autocast's weight cache off). A trainer owns one: new
    LoRA weights (a new trial) need a new capture, which takes a few steps' time.
    """

    def __init__(self, denoiser: Any, family: Any, autocast_dtype: torch.dtype | None, warmup_steps: int = 3) -> None:
        if next(denoiser.parameters()).device.type != "cuda":
            raise RuntimeError("train.cuda_graphs=true needs the model on a CUDA GPU; set train.cuda_graphs=false")
        self.prediction = _Prediction(denoiser, family, mixed=autocast_dtype is not None)
        self.family = family
        self.autocast_dtype = autocast_dtype
        self.warmup_steps = warmup_steps
        self.graphs: dict[tuple, Any] = {}

    def __call__(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = (noisy, timesteps, *self.family.graph_inputs(cond))
        key = tuple((tuple(t.shape), t.dtype, t.requires_grad) for t in inputs)
        graphed = self.graphs.get(key)
        if graphed is None:
            graphed = self.graphs[key] = self._capture(inputs)
        return graphed(*inputs)

    def _capture(self, inputs: tuple[torch.Tensor, ...]) -> Any:
        samples = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in inputs)
        enabled = self.autocast_dtype is not None
        with torch.autocast("cuda", dtype=self.autocast_dtype, enabled=enabled, cache_enabled=False):
            return torch.cuda.make_graphed_callables(self.prediction, samples, num_warmup_iters=self.warmup_steps)
