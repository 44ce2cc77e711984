"""``model.sdpa_backend``: which kernels torch's ``scaled_dot_product_attention`` may pick.

By default (``auto``) torch picks per call among FlashAttention-2 (Dao 2023, arXiv:2307.08691),
memory-efficient attention (xFormers' kernel, Rabe & Staats 2021, arXiv:2112.05682), cuDNN's fused
attention and the math reference, in its own priority order. On Hopper the cuDNN kernel (and
FlashAttention-3 builds) may be faster for some shapes; this option lets a run pin one.

We set torch's process-wide switches (``torch.backends.cuda.enable_*_sdp``) rather than wrapping the
denoiser call in ``torch.nn.attention.sdpa_kernel``: a switch set before the first step holds for
CUDA-graph capture and compiled code alike. The chosen kernel is enabled with the math reference as
the fallback for attention it cannot run (the SDXL VAE's fp32 attention is not a FlashAttention
shape); ``math`` leaves only the reference. Like the attention kernel it is set on every run in
both directions (a worker reuses its process across trials): ``auto`` restores the switches torch
had when this module was first imported.
"""

from __future__ import annotations

import torch

from training.speed.attention_options import sdpa_backend_problem

_SWITCHES = {
    "flash": (torch.backends.cuda.flash_sdp_enabled, torch.backends.cuda.enable_flash_sdp),
    "efficient": (torch.backends.cuda.mem_efficient_sdp_enabled, torch.backends.cuda.enable_mem_efficient_sdp),
    "cudnn": (torch.backends.cuda.cudnn_sdp_enabled, torch.backends.cuda.enable_cudnn_sdp),
    "math": (torch.backends.cuda.math_sdp_enabled, torch.backends.cuda.enable_math_sdp),
}
TORCH_DEFAULTS = {name: enabled() for name, (enabled, _) in _SWITCHES.items()}


def sdpa_switches() -> dict[str, bool]:
    """Which SDPA kernels torch may pick now."""
    return {name: enabled() for name, (enabled, _) in _SWITCHES.items()}


def set_sdpa_backend(backend: str) -> dict[str, bool]:
    """Set torch's switches for ``backend`` (no checks: see ``configure_sdpa_backend``); returns them."""
    wanted = dict(TORCH_DEFAULTS) if backend == "auto" else {name: name in (backend, "math") for name in _SWITCHES}
    for name, on in wanted.items():
        _SWITCHES[name][1](on)
    return sdpa_switches()


def configure_sdpa_backend(backend: str, attention: str, device: torch.device | str) -> dict[str, bool]:
    """Check ``model.sdpa_backend`` against ``model.attention`` and the device, then set the switches."""
    cuda_available = torch.device(device).type == "cuda" and torch.cuda.is_available()
    if problem := sdpa_backend_problem(backend, attention, cuda_available):
        raise RuntimeError(problem)
    return set_sdpa_backend(backend)
