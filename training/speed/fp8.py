"""``precision.fp8_matmul``: the frozen denoiser's Linear layers multiply in float8 (torchao).

A LoRA step spends most of its matmul FLOPs in the frozen base layers (forward, and the input
gradient in backward); the LoRA's own small matmuls are few. torchao's float8 training layer
(``Float8Linear.from_float``, the layer ``convert_to_float8_training`` swaps in; here swapped by our
own filter so it can be undone: tensorwise dynamic scaling, e4m3 for activations and weights, e5m2
for gradients; Micikevicius et al. 2022, "FP8 Formats for Deep Learning") casts each operand per
step and runs the product on Hopper/Ada float8 tensor cores at twice bf16's rate. The LoRA layers,
convolutions and attention stay in the mixed precision; the weights stay stored in it too (this
saves time, not memory: kohya's ``--fp8_base`` is the opposite). Measured on an H100 it is 7-10%
slower at SD1.5 and SDXL sizes (benchmarks/RESULTS.md): the casts cost what the products save.

torchao's layer also computes the weight gradient, which a frozen layer does not need: eagerly it is
computed and thrown away; under ``train.compile`` the unused output is dead code for Inductor to drop
(the H100 profile shows about 1,000 float8 products per SDXL step, fewer than the three per layer an
undropped gradient would give; not checked layer by layer), so use the option compiled. Like
compilation it is set on every run in both directions: a worker reuses its base model across trials,
and ``none`` swaps plain ``nn.Linear`` layers back (same weight tensors, nothing copied).
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from training.speed.fp8_options import fp8_matmul_problems


def gains_on_h100(layer: torch.nn.Linear) -> bool:
    """torchao's tensorwise-scaling table (torchao/float8 README, "Performance", H100): layers with
    K <= 4096 and N <= 1024 ran slower in float8 than in bf16 (the casts cost more than the matmul saves)."""
    out_features, in_features = layer.weight.shape
    return not (in_features <= 4096 and out_features <= 1024)


def _convertible(layer: torch.nn.Module, kind: str) -> bool:
    """A frozen Linear (not a LoRA factor) whose sizes the float8 kernels take (multiples of 16)."""
    if type(layer) is not torch.nn.Linear or layer.weight.requires_grad:
        return False
    out_features, in_features = layer.weight.shape
    if in_features % 16 or out_features % 16:
        return False
    return kind == "all" or gains_on_h100(layer)


def _plain_linear(layer: torch.nn.Linear) -> torch.nn.Linear:
    """An ``nn.Linear`` over the same weight and bias tensors (undoing a float8 layer)."""
    with torch.device("meta"):
        plain = torch.nn.Linear(layer.in_features, layer.out_features, bias=False)
    plain.weight = layer.weight
    plain.bias = layer.bias
    return plain


def _float8_layer_type() -> type | None:
    """torchao's float8 layer class if this process has loaded it; else nothing can have been converted
    (and a run without float8 does not pay torchao's import)."""
    module = sys.modules.get("torchao.float8.float8_linear")
    return None if module is None else module.Float8Linear


def _swap(model: torch.nn.Module, replace: Any) -> int:
    """Replace each submodule for which ``replace`` returns a module; returns how many were replaced."""
    swaps = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if (new := replace(child)) is not None:
                swaps.append((parent, name, new))
    for parent, name, new in swaps:
        setattr(parent, name, new)
    return len(swaps)


def configure_fp8_matmul(denoiser: torch.nn.Module, kind: str) -> int:
    """Run the denoiser's frozen Linear layers in float8 (``large`` or ``all``), or none of them.

    Returns how many layers multiply in float8. Call after the LoRA layers exist (their factors are
    trainable, so they stay as they are) and before compiling, so the compiled code contains the casts.
    """
    device = next(denoiser.parameters()).device
    if problems := fp8_matmul_problems(kind, device.type == "cuda"):
        raise ValueError("; ".join(problems))
    float8_type = _float8_layer_type()
    if float8_type is not None:  # undo what an earlier run converted
        _swap(denoiser, lambda layer: _plain_linear(layer) if isinstance(layer, float8_type) else None)
    if kind == "none":
        return 0
    from torchao.float8 import Float8LinearConfig
    from torchao.float8.float8_linear import Float8Linear

    # pad_inner_dim: a product whose inner size is the batch (the weight gradient of a layer fed one
    # vector per image: timestep and pooled-text embeddings) is padded to the kernels' multiple of 16
    config = Float8LinearConfig(pad_inner_dim=True)
    return _swap(denoiser, lambda layer: Float8Linear.from_float(layer, config) if _convertible(layer, kind) else None)


def fp8_layer_count(denoiser: torch.nn.Module) -> int:
    float8_type = _float8_layer_type()
    return 0 if float8_type is None else sum(isinstance(m, float8_type) for m in denoiser.modules())
