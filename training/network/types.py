"""The network types (``network.type``) and how each one's tensors are named in a file.

No torch import: the startup checks read these tables before anything heavy loads.

- ``lora``: kohya's LoRA, ΔW = up · down · alpha/dim (Hu et al. 2021, arXiv:2106.09685), peft's
  ``LoraConfig``; kohya's ``networks.lora`` file keys ``lora_down`` / ``lora_up``.
- ``locon``: LyCORIS' LoCon, the same LoRA also on the UNet's ResNet and resampler convolutions
  (3x3 kernels at ``network.conv_dim`` / ``conv_alpha``), peft's ``LoraConfig`` with conv targets;
  the same ``lora_down`` / ``lora_up`` keys, a 3x3 down being (conv_dim, in, 3, 3).
- ``loha``: LyCORIS' LoHa, ΔW = (w1_a · w1_b) ⊙ (w2_a · w2_b) · alpha/dim, a Hadamard product of
  two low-rank products (FedPara, Hyeon-Woo et al. 2022, arXiv:2108.06098), peft's ``LoHaConfig``,
  whose parameter names and shapes are LyCORIS' own (``hada_w1_a`` is (out, dim), ``hada_w1_b``
  (dim, in), as ``lycoris/modules/loha.py`` makes them).
- ``lokr``: LyCORIS' LoKr, ΔW = w1 ⊗ w2 · alpha/dim, a Kronecker product of a small factor and a
  large one, either factor low-rank when ``dim`` is below half its sides (KronA, Edalati et al.
  2022, arXiv:2212.10650; Yeh et al. 2024, arXiv:2309.14859), peft's ``LoKrConfig``, whose names,
  factorisation and use-the-full-matrix rules are LyCORIS' own.
- ``dora``: DoRA, W' = m · (W + ΔW) / ‖W + ΔW‖ with the LoRA's ΔW and a learned magnitude m per
  output feature (Liu et al. 2024, arXiv:2402.09353, eq. 5), peft's ``LoraConfig(use_dora=True)``;
  LyCORIS writes it as a LoRA with ``dora_scale`` (``algo=lora``, ``dora_wd=True``).

Every type but ``lora`` is written as LyCORIS' ``lycoris.kohya`` writes it: the family's kohya
module names, one ``alpha`` per module, ``ss_network_args`` naming the ``algo``.
"""

from __future__ import annotations

from typing import Any

NETWORK_TYPES = ("lora", "locon", "loha", "lokr", "dora")
_LORA = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
# peft's parameter name (without the adapter name) -> the tensor's suffix in the file
FILE_SUFFIXES: dict[str, dict[str, str]] = {
    "lora": _LORA,
    "locon": _LORA,
    "loha": {name: name for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")},
    "lokr": {name: name for name in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")},
    "dora": {**_LORA, "lora_magnitude_vector": "dora_scale"},
}
# the types an original layer that fuses several modules (SD3/FLUX's qkv) can hold: the file tensors
# stacked along the rank (downs), and those placed block-diagonally at each module's rows (ups)
FUSED_FACTORS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "lora": (("lora_down.weight",), ("lora_up.weight",)),
    "loha": (("hada_w1_b", "hada_w2_b"), ("hada_w1_a", "hada_w2_a")),
}
# the file tensors whose first dimension is the rank (a LoKr of two full factors has none)
RANK_TENSORS = {
    "lora": ("lora_down.weight",),
    "locon": ("lora_down.weight",),
    "loha": ("hada_w1_b",),
    "lokr": ("lokr_w1_b", "lokr_w2_b"),
    "dora": ("lora_down.weight",),
}
LYCORIS_MODULE = "lycoris.kohya"
# LyCORIS' ``algo`` of each type (DoRA is its LoRA with weight decomposition, ``dora_wd``)
LYCORIS_ALGOS = {"locon": "locon", "loha": "loha", "lokr": "lokr", "dora": "lora"}
# the types whose file is a LyCORIS one, with its ss_network_module
NETWORK_MODULES = dict.fromkeys(LYCORIS_ALGOS, LYCORIS_MODULE)
# the types that may also adapt the UNet's convolutions (network.conv_dim); locon always does
CONV_TYPES = ("locon", "loha", "lokr", "dora")
# network options that only some types have, and those types
TYPE_OPTIONS: dict[str, tuple[str, ...]] = {
    "dropout": ("lora", "locon", "dora"),  # kohya's rank dropout acts on lora_down's output
    "max_norm": ("lora", "locon"),  # kohya's scale_weight_norms rescales lora_down / lora_up
    "conv_dim": CONV_TYPES,
    "conv_alpha": CONV_TYPES,
    "lokr_factor": ("lokr",),
    "decompose_both": ("lokr",),
}
# each option's "off" value (what a type without it must leave it at)
OPTION_OFF: dict[str, Any] = {
    "dropout": 0.0,
    "max_norm": None,
    "conv_dim": None,
    "conv_alpha": None,
    "lokr_factor": -1,
    "decompose_both": False,
}


def type_of_file(keys: list[str]) -> str:
    """The network type a file's tensor names say (a LoCon file reads as a LoRA: its keys are the same)."""
    for suffix, network_type in ((".lokr_w1", "lokr"), (".lokr_w1_a", "lokr"), (".hada_w1_a", "loha")):
        if any(key.endswith(suffix) for key in keys):
            return network_type
    return "dora" if any(key.endswith(".dora_scale") for key in keys) else "lora"


def conv_dim_of(network_cfg: Any) -> int | None:
    """The rank of the conv layers' adapters: ``network.conv_dim``, ``network.dim`` for a LoCon without
    one, or None (the convolutions stay untouched)."""
    if network_cfg.conv_dim is not None:
        return int(network_cfg.conv_dim)
    return int(network_cfg.dim) if network_cfg.type == "locon" else None


def conv_alpha_of(network_cfg: Any, alpha: float) -> float | None:
    """``network.conv_alpha``, or the linear layers' strength alpha/dim carried over to conv_dim."""
    conv_dim = conv_dim_of(network_cfg)
    if conv_dim is None:
        return None
    if network_cfg.conv_alpha is not None:
        return float(network_cfg.conv_alpha)
    return alpha * conv_dim / network_cfg.dim


def network_args(network_cfg: Any, alpha: float) -> dict[str, str]:
    """``ss_network_args`` as LyCORIS' kohya wrapper records them (strings); empty for a kohya LoRA."""
    network_type = network_cfg.type
    if network_type not in LYCORIS_ALGOS:
        return {}
    args = {"algo": LYCORIS_ALGOS[network_type]}
    conv_dim = conv_dim_of(network_cfg)
    if conv_dim is not None:
        args.update(conv_dim=str(conv_dim), conv_alpha=f"{conv_alpha_of(network_cfg, alpha):g}")
    if network_type == "lokr":
        args.update(factor=str(network_cfg.lokr_factor), decompose_both=str(bool(network_cfg.decompose_both)))
    if network_type == "dora":
        args["dora_wd"] = "True"
    return args
