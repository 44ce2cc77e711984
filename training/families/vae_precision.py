"""The VAE's own precision (``model.vae_precision``): fp32 where a family's VAE overflows in fp16.

SDXL's VAE produces inf/NaN in fp16 (kohya's ``--no_half_vae``; diffusers marks it
``force_upcast``), so under fp16 mixed precision it keeps fp32 weights, and its encode/decode run
outside autocast in the weights' own dtype: autocast would otherwise run its convolutions in fp16
again.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

_WRAPPED = "_lora_sweeper_own_precision"


def vae_dtype(setting: str, overflows_in_fp16: bool, weight_dtype: torch.dtype) -> torch.dtype:
    """The VAE's weight dtype: ``fp32``, ``half`` (the training dtype), or ``auto`` (fp32 only where
    the family's VAE overflows in fp16 and training runs in fp16; bf16 has fp32's range)."""
    if setting == "fp32":
        return torch.float32
    if setting == "auto" and overflows_in_fp16 and weight_dtype == torch.float16:
        return torch.float32
    return weight_dtype


def run_in_own_precision(vae: Any) -> None:
    """Make ``vae.encode`` / ``vae.decode`` compute in the VAE's weight dtype, outside any autocast.

    Idempotent (the base model is shared by the trials of a sweep); the dtype is read at call time,
    so a later trial that moves the VAE to another dtype is followed.
    """
    if getattr(vae, _WRAPPED, False):
        return
    for name in ("encode", "decode"):
        original = getattr(vae, name)

        @functools.wraps(original)
        def own_precision(sample: torch.Tensor, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            dtype = next(vae.parameters()).dtype
            with torch.autocast(sample.device.type, enabled=False):
                return _original(sample.to(dtype), *args, **kwargs)

        setattr(vae, name, own_precision)
    setattr(vae, _WRAPPED, True)
