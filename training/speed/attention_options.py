"""The attention kernels ``model.attention`` may name and the startup check of one, without loading torch."""

from __future__ import annotations

import importlib.util

ATTENTION_KINDS = ("sdpa", "xformers", "eager")


def xformers_installed() -> bool:
    """Whether the ``xformers`` package can be found (without importing it: validation stays light)."""
    return importlib.util.find_spec("xformers") is not None


def attention_problem(kind: str, cuda_available: bool) -> str | None:
    """Why ``model.attention=kind`` cannot run here, checked at startup (None if fine)."""
    if kind not in ATTENTION_KINDS:
        return f"model.attention: unknown kind '{kind}'; use one of {', '.join(ATTENTION_KINDS)}"
    if kind != "xformers":
        return None
    if not cuda_available:
        return (
            "model.attention=xformers needs a CUDA GPU and none is available; use model.attention=sdpa "
            "(torch's scaled_dot_product_attention, as fast on current PyTorch)"
        )
    if not xformers_installed():
        return (
            "model.attention=xformers but the xformers package is not installed (pip install xformers); "
            "or use model.attention=sdpa, which is as fast on current PyTorch"
        )
    return None
