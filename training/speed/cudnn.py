"""``train.cudnn_benchmark``: let cuDNN time its convolution algorithms for each shape and keep the fastest.

The denoiser's convolutions (a UNet's ResNet blocks: about a quarter of an SD1.5 step's products) run
through cuDNN eagerly and, as extern kernels, inside Inductor's compiled graphs too. By default torch
asks cuDNN's heuristics for one algorithm per call; with ``torch.backends.cudnn.benchmark`` the first
call of each shape times the candidates and caches the winner for the process. A bucketed training
run has a handful of shapes, so the timing is paid once per bucket, in the warm-up steps before any
CUDA graph is captured.

Off by default: the timing can pick a different algorithm in another process, so two runs of one seed
may differ in the last bits (as GPU atomics already make them). Set on every run in both directions,
since a sweep worker reuses its process across trials.
"""

from __future__ import annotations

import torch


def configure_cudnn_benchmark(enabled: bool, device: torch.device) -> bool:
    """Set cuDNN's per-shape algorithm timing for this run; returns whether it is on (never on the CPU)."""
    torch.backends.cudnn.benchmark = bool(enabled) and device.type == "cuda"
    return torch.backends.cudnn.benchmark
