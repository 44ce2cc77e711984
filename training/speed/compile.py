"""``train.compile``: torch.compile the UNet's repeated transformer blocks, or the whole denoiser.

On a GPU a LoRA step at small batch is bound by the host dispatching thousands of small kernels;
compiling fuses them, and ``train.compile_mode=reduce-overhead`` also replays them as CUDA graphs.
``max-autotune-gemm`` (the project's mode) times Inductor's Triton templates for the products and
convolutions against cuBLAS / cuDNN per shape and keeps the faster, at the price of compilation time.

``blocks`` (regional compilation) compiles the blocks diffusers marks as repeated
(``UNet2DConditionModel._repeated_blocks``, through ``ModelMixin.compile_repeated_blocks``): one
compiled graph serves every block of the same shape, so compilation takes seconds, not minutes.

``denoiser`` compiles the whole peft-adapted UNet / transformer (``nn.Module.compile``): Inductor
sees the convolutions, norms and the LoRA layers between the blocks too, at the price of a longer
compilation, and a new one for every trial (new LoRA weights). It is offered on CUDA only:
compiling the whole peft-adapted UNet with Inductor gave wrong LoRA gradients on the CPU (torch
2.13: to_v / to_out LoRA gradients of some blocks differed from eager while the forward matched;
``backend="aot_eager"`` and per-block compilation matched eager). The tests check that a compiled
step's gradients equal the eager ones (the whole-denoiser check runs where a GPU is).

Like attention and checkpointing, the setting is applied on every run in both directions: a worker
reuses its base model across trials, so a trial with ``compile=none`` must undo an earlier one.
"""

from __future__ import annotations

from typing import Any

import torch

from training.speed.compile_options import compile_arguments, compile_problems


def repeated_blocks(unet: Any) -> list[torch.nn.Module]:
    """The submodules ``compile_repeated_blocks`` compiles (by class name, as diffusers matches them)."""
    names = set(getattr(unet, "_repeated_blocks", None) or ())
    return [m for m in unet.modules() if type(m).__name__ in names]


def configure_compile(unet: Any, kind: str, mode: str) -> int:
    """Compile the repeated blocks (``blocks``) or the whole denoiser (``denoiser``), or neither (``none``).

    Returns how many modules are compiled (blocks, or 1 for the denoiser). Whatever an earlier trial
    compiled is undone first, so switching kinds on a shared base model never leaves both.
    """
    on_cuda = next(unet.parameters()).device.type == "cuda"
    if problems := compile_problems(kind, mode, cuda=on_cuda):
        raise ValueError("; ".join(problems))
    blocks = repeated_blocks(unet)
    unet._compiled_call_impl = None  # what nn.Module.compile sets; None restores eager calls
    for block in blocks:
        block._compiled_call_impl = None
    if kind == "none":
        return 0
    if kind == "denoiser":
        unet.compile(**compile_arguments(mode))
        return 1
    if not blocks:
        raise ValueError(
            f"train.compile=blocks: {type(unet).__name__} marks no repeated blocks (_repeated_blocks); "
            "use train.compile=none"
        )
    unet.compile_repeated_blocks(**compile_arguments(mode))
    return len(blocks)
