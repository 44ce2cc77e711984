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

from training.speed.compile_options import MODE_OPTIONS, compile_problems


def compile_arguments(mode: str, pad_products: bool = False) -> dict[str, Any]:
    """torch.compile's keyword arguments: ``mode``, or, where the project adds Inductor settings, the
    mode's own settings (``torch._inductor.list_mode_options``) with them as ``options`` (torch.compile
    takes one or the other).

    ``pad_products``: Inductor's ``force_shape_pad`` pads every product whose sizes are not multiples of
    8 (a rank-4 LoRA's) with zeros to aligned sizes and slices the result: the same numbers, but cuBLAS
    can use its Hopper kernels; unaligned, it fell back to Ampere CUTLASS kernels ("..._align2"), 9% of
    an H100's kernel time at SD1.5 and SDXL batch 4 (benchmarks/RESULTS.md). Inductor's own rule pads only
    products it judges compute-bound, which the thin LoRA products are not; CUDA only.
    """
    options = dict(MODE_OPTIONS.get(mode, {}))
    if pad_products:
        options["force_shape_pad"] = True
    if not options:
        return {"mode": mode}
    from torch._inductor import list_mode_options  # Inductor's import is heavy: only when asked

    own = {} if mode in MODE_OPTIONS else list_mode_options(mode)
    return {"options": {**own, **options}}


def repeated_blocks(unet: Any) -> list[torch.nn.Module]:
    """The submodules ``compile_repeated_blocks`` compiles (by class name, as diffusers matches them)."""
    names = set(getattr(unet, "_repeated_blocks", None) or ())
    return [m for m in unet.modules() if type(m).__name__ in names]


def configure_compile(unet: Any, kind: str, mode: str, pad_products: bool = False) -> int:
    """Compile the repeated blocks (``blocks``) or the whole denoiser (``denoiser``), or neither (``none``).

    Returns how many modules are compiled (blocks, or 1 for the denoiser). Whatever an earlier trial
    compiled is undone first, so switching kinds on a shared base model never leaves both.
    """
    on_cuda = next(unet.parameters()).device.type == "cuda"
    if problems := compile_problems(kind, mode, cuda=on_cuda, pad_products=pad_products):
        raise ValueError("; ".join(problems))
    blocks = repeated_blocks(unet)
    unet._compiled_call_impl = None  # what nn.Module.compile sets; None restores eager calls
    for block in blocks:
        block._compiled_call_impl = None
    if kind == "none":
        return 0
    if kind == "denoiser":
        unet.compile(**compile_arguments(mode, pad_products))
        return 1
    if not blocks:
        raise ValueError(
            f"train.compile=blocks: {type(unet).__name__} marks no repeated blocks (_repeated_blocks); "
            "use train.compile=none"
        )
    unet.compile_repeated_blocks(**compile_arguments(mode, pad_products))
    return len(blocks)
