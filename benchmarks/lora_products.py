"""The matrix products of one UNet LoRA training step, with and without ``train.fuse_lora_products``,
counted on the meta device (no GPU, no weights, seconds on a CPU).

Each ``aten.mm`` / ``aten.addmm`` the step dispatches (the linear layers' products; attention and the
convolutions are left out) is recorded with its sizes. A product is *thin* when one of its sizes is the
LoRA's rank or its padding (at most 8): those are memory-bound, and their count and the bytes they move
(bf16 operands, ``addmm``'s added matrix and the result) are what fusing the LoRA into the frozen
layer's products is for. The stacked weights the fused path builds each step cost copies
(``aten.cat`` / ``constant_pad_nd`` outputs, read and written); the script counts those too.
Counts and bytes, not time: the GPU rows (``bench_training.py`` SD1.5 60-63, SDXL 45-46) say what
they are worth. peft's adds of the LoRA's output are pointwise, so not counted here (the fused
path's ``addmm`` does them inside its product, and is counted).

    python benchmarks/lora_products.py --out benchmarks/results/lora-products-meta.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode

from training.families.loading import BaseModel
from training.families.sd import SD1
from training.families.sdxl import SDXL
from training.network.lora import add_lora
from training.speed.fused_lora import ALIGNMENT, configure_fused_lora

aten = torch.ops.aten
PRODUCTS = (aten.mm, aten.addmm)
COPIES = (aten.cat, aten.constant_pad_nd)
BYTES = 2  # bf16


class ProductLog(TorchDispatchMode):
    """Every linear product's (m, k, n) and the elements every cat / pad writes."""

    def __init__(self) -> None:
        super().__init__()
        self.products: list[tuple[int, int, int, int]] = []  # m, k, n and the elements of addmm's added matrix
        self.copied = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        packet = func.overloadpacket
        if packet in PRODUCTS:
            left, right = args[-2], args[-1]  # addmm(c, a, b) and mm(a, b) end with the two factors
            added = args[0].numel() if packet is aten.addmm and args[0].dim() == 2 else 0  # a bias is a row
            self.products.append((left.shape[0], left.shape[1], right.shape[1], added))
        elif packet in COPIES:
            self.copied += out.numel()
        return out


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Inputs made in the products' dtype (the meta device has no autocast)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def summary(log: ProductLog) -> dict[str, float]:
    thin = [p for p in log.products if min(p[:3]) <= ALIGNMENT]

    def gigabytes(products, with_added: bool = True) -> float:  # both factors, the added matrix, the result
        return sum(m * k + k * n + added * with_added + m * n for m, k, n, added in products) * BYTES / 1e9

    return {
        "products": len(log.products),
        "thin_products": len(thin),
        "product_gb": round(gigabytes(log.products), 3),
        "thin_product_gb": round(gigabytes(thin), 3),
        "product_gb_without_added": round(gigabytes(log.products, with_added=False), 3),
        "copy_gb": round(2 * log.copied * BYTES / 1e9, 3),  # each copied element read and written
    }


def sd15_unet_and_inputs(batch: int):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from benchmarks.bench_training import TEXT, UNET

    with torch.device("meta"), default_dtype(torch.bfloat16):
        unet, encoder = UNet2DConditionModel(**UNET), CLIPTextModel(CLIPTextConfig(**TEXT))
        inputs = (torch.randn(batch, 4, 64, 64), torch.randint(0, 1000, (batch,)), torch.randn(batch, 77, 768))
    return unet, [encoder], lambda: unet(*inputs).sample


def sdxl_unet_and_inputs(batch: int):
    from benchmarks.sdxl_model import CLIP_BIG_G, UNET, sdxl_parts

    unet, _, encoder, encoder_2 = sdxl_parts("meta")
    with torch.device("meta"), default_dtype(torch.bfloat16):
        noisy, timesteps = torch.randn(batch, 4, 128, 128), torch.randint(0, 1000, (batch,))
        cond = {
            "hidden": torch.randn(batch, 77, UNET["cross_attention_dim"]),
            "text_embeds": torch.randn(batch, CLIP_BIG_G["projection_dim"]),
            "time_ids": torch.randn(batch, 6),
        }
    return unet, [encoder, encoder_2], lambda: SDXL.predict(unet, noisy, timesteps, cond)


def count(family: str, batch: int, fuse: bool, rank: int = 4) -> dict[str, float]:
    """One forward + backward of the family's UNet with the project's LoRA (bf16, meta device)."""
    from sweeper.config.schema import NetworkConfig

    build = sd15_unet_and_inputs if family == "sd15" else sdxl_unet_and_inputs
    unet, encoders, predict = build(batch)
    unet.requires_grad_(False).to(torch.bfloat16)
    for encoder in encoders:
        encoder.requires_grad_(False)
    base = BaseModel(
        unet, None, encoders, [None] * len(encoders), None, "meta", family=SD1 if family == "sd15" else SDXL
    )
    add_lora(base, OmegaConf.structured(NetworkConfig(dim=rank, alpha=rank)), 1e-4)
    unet.to(torch.bfloat16)  # the LoRA factors too: the products' operands are bf16 under autocast
    layers = configure_fused_lora(unet, fuse)
    log = ProductLog()
    with log:
        predict().float().pow(2).mean().backward()
    return {"family": family, "batch": batch, "rank": rank, "fused": fuse, "lora_linear_layers": layers, **summary(log)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="a JSON file for the rows")
    args = parser.parse_args()
    rows = [
        count(family, batch, fuse)
        for family, batch in (("sd15", 4), ("sd15", 32), ("sdxl", 4))
        for fuse in (False, True)
    ]
    print(
        "| family | batch | fused | products | thin | GB in products | GB in thin products "
        "| GB in products without addmm's added matrix | GB copied (cat, pad) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['family']} | {r['batch']} | {'yes' if r['fused'] else 'no'} | {r['products']} | "
            f"{r['thin_products']} | {r['product_gb']} | {r['thin_product_gb']} | {r['product_gb_without_added']} | "
            f"{r['copy_gb']} |"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
