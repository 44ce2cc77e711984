"""What the speed paths for peft's plain LoRA layers (``train.fuse_lora_products``,
``train.lora_1x1_conv_as_matmul``) need of the other keys, checked at startup without loading torch."""

from __future__ import annotations

# the network types whose layers are peft's plain LoRA layers (a lora_A / lora_B pair; LoCon's on convolutions
# too): DoRA rescales the product by the weight's norm, LoHa and LoKr have no such pair
PLAIN_LORA_TYPES = ("lora", "locon")


def plain_lora_problems(key: str, enabled: bool, network_type: str) -> list[str]:
    """Why a speed path for peft's plain LoRA layers (``key``) has nothing to act on with this network type."""
    if not enabled or network_type in PLAIN_LORA_TYPES:
        return []
    return [
        f"{key}=true acts on plain LoRA layers (network.type={' or '.join(PLAIN_LORA_TYPES)}); "
        f"network.type={network_type} has none: set {key}=false"
    ]


def fused_lora_problems(enabled: bool, network_type: str, dropout: float, fp8_matmul: str) -> list[str]:
    """Why ``train.fuse_lora_products=true`` cannot run with these settings (empty when off)."""
    if not enabled:
        return []
    problems = plain_lora_problems("train.fuse_lora_products", enabled, network_type)
    if dropout > 0:
        problems.append(
            f"train.fuse_lora_products=true computes lora_down inside the base layer's product, where "
            f"network.dropout={dropout} cannot drop its output: set network.dropout=0 or "
            "train.fuse_lora_products=false"
        )
    if fp8_matmul != "none":
        problems.append(
            f"train.fuse_lora_products=true multiplies the frozen weight with the LoRA's in one product, which "
            f"precision.fp8_matmul={fp8_matmul} runs in float8: set one of them off"
        )
    return problems
