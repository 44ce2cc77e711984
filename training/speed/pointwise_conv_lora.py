"""``train.lora_1x1_conv_as_matmul``: a LoRA on a 1x1 convolution runs as two matrix products.

SD1.x's transformer blocks project in and out with 1x1 convolutions (``use_linear_projection`` off; SD2
and SDXL use linear layers there), and the project's LoRA targets them, so peft makes their rank-r factors
1x1 convolutions too. cuDNN then runs each factor's weight gradient as a reduction over every pixel
(16,384 at SD1.5's 64x64 latents, batch 4) into an r x C result. On an H100 the costliest unaligned
kernel of the compiled SD1.5 step (``cutlass_80_wmma_..._16x16_..._align2``, 2.1 ms in 20 calls) survived
Inductor's product padding, which pads matrix products only; the twenty 64x64 calls of these layers'
convolution backward are the likely match (``benchmarks/RESULTS.md``, 2026-12-08; not yet confirmed).

A 1x1 convolution without bias, stride or padding is a matrix product over the channel axis. Written as
one, the same dot products go to cuBLAS (which splits long reductions over K), and, compiled, to
Inductor's padding. On a channels-last tensor moving the channels last is a view, so no copy is made.
The frozen base convolution stays cuDNN's; anything but the plain single-adapter path stays peft's.
"""

from __future__ import annotations

from types import MethodType
from typing import Any

import torch
import torch.nn.functional as F

from training.network.adapters import plain_lora_adapter, tuner_layers


def pointwise_products(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``up(down(x))`` for 1x1 convolution weights (r, C, 1, 1) and (O, r, 1, 1), as products over C."""
    pixels = x.movedim(1, -1)  # N, H, W, C: a view (contiguous when x is channels-last)
    hidden = F.linear(pixels, down.flatten(1))
    return F.linear(hidden, up.flatten(1)).movedim(-1, 1)


def _is_pointwise(conv: Any) -> bool:
    return (
        type(conv) is torch.nn.Conv2d
        and conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.padding in ((0, 0), "valid")
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.bias is None
    )


def runs_as_matmul(layer: Any) -> bool:
    """peft's plain path for one active LoRA adapter whose factors are 1x1 convolutions, nothing hooked."""
    name = plain_lora_adapter(layer)
    return name is not None and _is_pointwise(layer.lora_A[name]) and _is_pointwise(layer.lora_B[name])


def _matmul_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Stands in for peft's ``Conv2d.forward`` (the same steps, the factors as products)."""
    if args or kwargs or not runs_as_matmul(self):
        return type(self).forward(self, x, *args, **kwargs)
    name = self.active_adapters[0]
    result = self.base_layer(x)
    down, up = self.lora_A[name].weight, self.lora_B[name].weight
    x = self._cast_input_dtype(x, down.dtype)
    update = pointwise_products(self.lora_dropout[name](x), down, up) * self.scaling[name]
    return (result + update).to(result.dtype)


def lora_conv_layers(model: torch.nn.Module) -> list[Any]:
    from peft.tuners.lora.layer import Conv2d

    return [layer for layer in tuner_layers(model) if isinstance(layer, Conv2d)]


def configure_lora_1x1_conv_as_matmul(model: torch.nn.Module, enabled: bool) -> int:
    """Switch every peft LoRA Conv2d layer of ``model`` to products where its factors are 1x1 (or back: set
    on every run, since a worker reuses its base model across trials). Returns how many layers run so now."""
    switched = 0
    for layer in lora_conv_layers(model):
        if enabled and runs_as_matmul(layer):
            layer.forward = MethodType(_matmul_forward, layer)
            switched += 1
        elif "forward" in vars(layer):
            del layer.forward
    return switched
