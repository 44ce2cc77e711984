"""``train.fuse_lora_products``: each LoRA linear layer's thin products share the frozen layer's own.

A rank-r LoRA layer computes ``y = x W^T + b + s (x A^T) B^T`` (Hu et al. 2021, eq. 3). peft runs it as
three products forward (``x W^T``, ``x A^T``, ``h B^T``) and five backward. The thin ones (r = 4 columns)
each read a whole activation, and at SD sizes they are about a quarter of a compiled step's kernels
(192 adapted layers in SD1.5, 722 in SDXL, six thin products each). Two of them share an operand with
the frozen layer's products, so they can ride along in the same GEMM:

- forward, ``x A^T`` shares ``x`` with ``x W^T``: one product against ``[W; A]`` gives both;
- backward, ``g B`` (the LoRA's hidden gradient) shares ``g`` with the input gradient ``g W``: one
  product against ``[W | s B]`` gives both.

The up-product is added into the base output by the GEMM itself (``addmm``), as the LoRA's input
gradient is into the base one. Every output element is the same dot product as in peft's three layers,
so the numbers differ only by the kernels' summation order. The rank is padded with zeros to a multiple
of 8, so each product has aligned sizes (rank 4 puts cuBLAS on its slower unaligned kernels).

The stacked weights are built each step (the LoRA factors change every step): that copies the frozen
weight twice, which pays only where the activation is larger than the weight; layers where it is not
(low resolutions, the text's keys and values) keep peft's own products (``fusion_pays``).
"""

from __future__ import annotations

import contextlib
from types import MethodType
from typing import Any

import torch
import torch.nn.functional as F

from training.network.adapters import plain_lora_adapter, tuner_layers

ALIGNMENT = 8  # elements: 16 bytes of bf16, the operand alignment of cuBLAS' fast kernels


def aligned(size: int) -> int:
    return -(-size // ALIGNMENT) * ALIGNMENT


def fusion_pays(rows: int, in_features: int, out_features: int) -> bool:
    """Whether the activation passes saved (``x`` forward, ``g`` backward) outweigh copying the frozen
    weight into the two stacked weights (read and written twice)."""
    return rows * (in_features + out_features) > 4 * in_features * out_features


class LoraProduct(torch.autograd.Function):
    """``x W^T + b + s (x A^T) B^T`` for a 2-D ``x`` whose W and b are frozen, in two products each way."""

    @staticmethod
    def forward(ctx: Any, x, weight, bias, down, up, scale: float):
        out_features, rank = up.shape
        padded = aligned(rank)
        down = F.pad(down, (0, 0, 0, padded - rank))  # (r', in), zero rows
        up = F.pad(up, (0, padded - rank))  # (out, r'), zero columns
        stacked_bias = None if bias is None else F.pad(bias, (0, padded))
        both = F.linear(x, torch.cat([weight, down]), stacked_bias)  # (N, out + r'): x W^T + b | x A^T | 0
        base, hidden = both.split([out_features, padded], dim=1)
        hidden = hidden.contiguous()  # kept for B's gradient; a view would keep the whole product alive
        ctx.save_for_backward(x, weight, down, up, hidden)
        ctx.scale, ctx.rank = scale, rank
        return torch.addmm(base, hidden, up.t(), alpha=scale)

    @staticmethod
    def backward(ctx: Any, grad):
        x, weight, down, up, hidden = ctx.saved_tensors
        scale, rank = ctx.scale, ctx.rank
        grad_x = grad_down = grad_up = None
        if ctx.needs_input_grad[0]:
            in_features = weight.shape[1]
            both = grad @ torch.cat([weight, up * scale], dim=1)  # (N, in + r'): g W | s g B | 0
            grad_base, grad_hidden = both.split([in_features, down.shape[0]], dim=1)
            grad_x = torch.addmm(grad_base, grad_hidden, down)  # + s g B A
        else:
            grad_hidden = grad @ (up * scale)  # (N, r')
        if ctx.needs_input_grad[3]:
            grad_down = (grad_hidden.t() @ x)[:rank]  # (r, in)
        if ctx.needs_input_grad[4]:
            grad_up = (grad.t() @ hidden)[:, :rank] * scale  # (out, r)
        return grad_x, None, None, grad_down, grad_up, None


def lora_linear(x: torch.Tensor, weight, bias, down, up, scale: float, fuse: bool | None = None) -> torch.Tensor:
    """A LoRA linear layer's output, in the autocast dtype where autocast is on (as peft's layers under
    it). ``fuse``: None decides by ``fusion_pays``; False runs peft's products (the reference)."""
    device = x.device.type
    autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)  # not on meta
    dtype = torch.get_autocast_dtype(device) if autocast else weight.dtype
    flat = x.reshape(-1, x.shape[-1]).to(dtype)
    out_features, in_features = weight.shape
    if fuse is None:
        fuse = fusion_pays(flat.shape[0], in_features, out_features)
    weight, down, up = weight.to(dtype), down.to(dtype), up.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    with torch.autocast(device, enabled=False) if autocast else contextlib.nullcontext():
        if fuse:
            y = LoraProduct.apply(flat, weight, bias, down, up, scale)
        else:
            y = F.linear(flat, weight, bias) + F.linear(F.linear(flat, down), up) * scale
    return y.reshape(*x.shape[:-1], out_features)


def _fusable(layer: Any) -> bool:
    """peft's plain path for one active LoRA adapter on a frozen ``nn.Linear``, nothing hooked on it."""
    name = plain_lora_adapter(layer)
    if name is None:
        return False
    base, up = layer.get_base_layer(), layer.lora_B[name]
    if type(base) is not torch.nn.Linear or base.weight.requires_grad or up.bias is not None:
        return False
    if not isinstance(layer.lora_dropout[name], torch.nn.Identity):
        return False
    return not (base._forward_hooks or base._forward_pre_hooks)


def _fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Stands in for peft's ``Linear.forward``; anything but the plain single-adapter path goes to it."""
    if args or kwargs or not _fusable(self):
        return type(self).forward(self, x, *args, **kwargs)
    name = self.active_adapters[0]
    base = self.get_base_layer()
    down, up = self.lora_A[name].weight, self.lora_B[name].weight
    return lora_linear(x, base.weight, base.bias, down, up, self.scaling[name])


def lora_linear_layers(model: torch.nn.Module) -> list[Any]:
    from peft.tuners.lora.layer import Linear

    return [layer for layer in tuner_layers(model) if isinstance(layer, Linear)]


def configure_fused_lora(model: torch.nn.Module, enabled: bool) -> int:
    """Switch every peft LoRA linear layer of ``model`` to the fused products (or back: set on every run,
    since a worker reuses its base model across trials). Returns how many layers are switched on; a
    layer that stops being fusable (a second adapter, merged weights) falls back to peft by itself."""
    layers = lora_linear_layers(model)
    for layer in layers:
        if enabled:
            layer.forward = MethodType(_fused_forward, layer)
        elif "forward" in vars(layer):
            del layer.forward
    return len(layers) if enabled else 0
