"""What ``precision.fp8_matmul`` may be, and whether this machine can run it, checked at startup.

Imports torch only when the option is on (validation of a config without it stays light).
"""

from __future__ import annotations

import importlib.util

# none: the frozen layers multiply in the mixed precision; large: only the Linear layers large enough
# to gain on an H100 by torchao's table; all: every frozen Linear whose sizes are multiples of 16
FP8_MATMUL_KINDS = ("none", "large", "all")
FP8_INSTALL = "pip install -c requirements.lock 'lora-sweeper[fp8]'"


def torchao_installed() -> bool:
    return importlib.util.find_spec("torchao") is not None


def fp8_matmul_problems(kind: str, cuda: object) -> list[str]:
    """Why ``precision.fp8_matmul=kind`` cannot run here. ``cuda``: truthy when training runs on a CUDA
    GPU (the startup check's lazy ``CudaHere``, asked only when the option is on)."""
    if kind not in FP8_MATMUL_KINDS:
        return [f"precision.fp8_matmul must be one of {', '.join(FP8_MATMUL_KINDS)} (got {kind!r})"]
    if kind == "none":
        return []
    problems = []
    if not torchao_installed():
        problems.append(
            f"precision.fp8_matmul={kind} needs torchao (float8 training layers): {FP8_INSTALL}; "
            "or set precision.fp8_matmul=none"
        )
    import torch

    if cuda:
        capability = torch.cuda.get_device_capability()
        if capability < (8, 9):  # float8 tensor cores: Ada (8.9), Hopper (9.0) and later
            problems.append(
                f"precision.fp8_matmul={kind} needs a GPU with float8 matrix units (compute capability 8.9 or "
                f"later: Ada, Hopper, Blackwell); this {torch.cuda.get_device_name()} is "
                f"{capability[0]}.{capability[1]}; set precision.fp8_matmul=none"
            )
    elif not cpu_float8_matmul():
        problems.append(
            f"precision.fp8_matmul={kind}: this torch {torch.__version__} has no CPU float8 matmul "
            "(torch._scaled_mm); set precision.fp8_matmul=none (it is a GPU speed option)"
        )
    return problems


def cpu_float8_matmul() -> bool:
    """Whether torch multiplies float8 matrices on the CPU (recent releases do: slowly, but it runs)."""
    import torch

    try:
        a = torch.ones(16, 16).to(torch.float8_e4m3fn)
        one = torch.tensor(1.0)
        torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError, AttributeError):
        return False
    return True
