"""What ``train.compile`` / ``train.compile_mode`` may be, checked at startup without loading torch."""

from __future__ import annotations

COMPILE_KINDS = ("none", "blocks", "denoiser")
# torch.compile's own modes, and the project's: Inductor config patches passed as ``options``
# (compile.compile_arguments)
MODE_OPTIONS = {
    # Triton GEMM and convolution templates timed against cuBLAS / cuDNN per shape (Inductor's
    # ``max_autotune_gemm``), without max-autotune's pointwise and coordinate-descent tuning: the
    # products are where Inductor timed its templates faster on SD1.5's shapes; the rest lengthens compiling
    "max-autotune-gemm": {"max_autotune_gemm": True},
}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs", *MODE_OPTIONS)
# the modes that record Inductor's own CUDA graphs (``triton.cudagraphs``): not with train.cuda_graphs
MODES_WITH_OWN_GRAPHS = ("reduce-overhead", "max-autotune")
# whole-denoiser compilation runs only where its LoRA gradients were checked against eager ones
DENOISER_ON_CPU = (
    "train.compile=denoiser needs a CUDA GPU: on the CPU (torch 2.13, Inductor) the compiled whole UNet "
    "gave wrong LoRA gradients; use train.compile=blocks (the repeated blocks, checked equal to eager) "
    "or train.compile=none"
)


def compile_problems(kind: str, mode: str, cuda: object = None, pad_products: bool = False) -> list[str]:
    """Why ``train.compile`` / ``train.compile_mode`` / ``train.compile_pad_products`` are unusable, for
    startup validation.

    ``cuda``: truthy when training runs on a CUDA GPU (the startup check passes its lazy ``CudaHere``,
    asked only for ``train.compile=denoiser``); None: not known, not checked.
    """
    problems = []
    if kind not in COMPILE_KINDS:
        problems.append(f"train.compile must be one of {', '.join(COMPILE_KINDS)} (got {kind!r})")
    if mode not in COMPILE_MODES:
        problems.append(f"train.compile_mode must be one of {', '.join(COMPILE_MODES)} (got {mode!r})")
    if kind == "denoiser" and cuda is not None and not cuda:
        problems.append(DENOISER_ON_CPU)
    if pad_products and kind == "none":
        problems.append(
            "train.compile_pad_products=true pads products inside torch.compile's graphs: "
            "set train.compile=blocks or denoiser, or train.compile_pad_products=false"
        )
    return problems
