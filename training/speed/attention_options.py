"""The attention kernels ``model.attention`` may name and the startup check of one, without loading torch."""

from __future__ import annotations

import importlib.util

ATTENTION_KINDS = ("sdpa", "xformers", "eager")
# model.sdpa_backend: which of torch's scaled_dot_product_attention kernels may run (auto: torch picks)
SDPA_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")
CUDA_ONLY_SDPA_BACKENDS = ("cudnn", "efficient")  # no CPU kernel (flash and math have one)


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


def sdpa_backend_problem(backend: str, attention: str, cuda_available: object = True) -> str | None:
    """Why ``model.sdpa_backend=backend`` cannot run with ``model.attention=attention`` here (None if fine).

    ``cuda_available`` is asked only for the CUDA-only kernels (so the check stays light otherwise).
    """
    if backend not in SDPA_BACKENDS:
        return f"model.sdpa_backend: unknown backend '{backend}'; use one of {', '.join(SDPA_BACKENDS)}"
    if backend == "auto":
        return None
    if attention != "sdpa":
        return (
            f"model.sdpa_backend={backend} chooses a kernel of torch's scaled_dot_product_attention, which "
            f"model.attention={attention} does not use; set model.attention=sdpa or model.sdpa_backend=auto"
        )
    if backend in CUDA_ONLY_SDPA_BACKENDS and not cuda_available:
        return (
            f"model.sdpa_backend={backend} needs a CUDA GPU and none is available; "
            "use model.sdpa_backend=auto (or flash / math, which have CPU kernels)"
        )
    return None
