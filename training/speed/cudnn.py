"""``train.cudnn_benchmark``: let cuDNN time its convolution algorithms for each shape and keep the fastest.

The denoiser's convolutions (a UNet's ResNet blocks: about a quarter of an SD1.5 step's products) run
through cuDNN eagerly and, as extern kernels, inside Inductor's compiled graphs too. By default torch
asks cuDNN's heuristics for one algorithm per call; with ``torch.backends.cudnn.benchmark`` the first
call of each shape times the candidates. A bucketed training run has a handful of shapes, so the timing
is paid once per bucket, in the warm-up steps before any CUDA graph is captured.

PyTorch keeps the plan it found for a shape for the whole process, and its cache key leaves the flag out
(``aten/src/ATen/native/cudnn/Conv_v8.cpp``, ``run_single_conv``): a heuristic plan stays after the flag is
turned on, and a timed one after it is turned off. So in a sweep worker the first trial's setting holds
for every later trial of the same shapes; a change is warned about rather than silently ignored.

Off by default: the timing can pick a different algorithm in another process, so two runs of one seed
may differ in the last bits (as GPU atomics already make them).
"""

from __future__ import annotations

import warnings

import torch

_first_setting: bool | None = None  # this process's first CUDA run's setting: its plans stay cached


def configure_cudnn_benchmark(enabled: bool, device: torch.device) -> bool:
    """Set cuDNN's per-shape algorithm timing for this run; returns whether it is on (never on the CPU)."""
    global _first_setting
    on = bool(enabled) and device.type == "cuda"
    if device.type == "cuda":
        if _first_setting is None:
            _first_setting = on
        elif on != _first_setting:
            warnings.warn(
                f"train.cudnn_benchmark={str(on).lower()} in a process whose first run had "
                f"{str(_first_setting).lower()}: PyTorch keeps the convolution plans it chose per shape for the "
                "process, so shapes seen before keep their earlier plans (give each setting its own worker)",
                stacklevel=2,
            )
    torch.backends.cudnn.benchmark = on
    return on


def first_cudnn_benchmark_setting() -> bool | None:
    """The setting of this process's first CUDA run (its convolution plans stay cached), or None before one."""
    return _first_setting
