"""The network types (``network.type``) and how each one's tensors are named in a file.

No torch import: the startup checks read these tables before anything heavy loads.

- ``lora``: kohya's LoRA, ΔW = up · down · alpha/dim (Hu et al. 2021, arXiv:2106.09685), peft's
  ``LoraConfig``; kohya's ``networks.lora`` file keys ``lora_down`` / ``lora_up``.
- ``loha``: LyCORIS' LoHa, ΔW = (w1_a · w1_b) ⊙ (w2_a · w2_b) · alpha/dim, a Hadamard product of
  two low-rank products (FedPara, Hyeon-Woo et al. 2022, arXiv:2108.06098), peft's ``LoHaConfig``,
  whose parameter names and shapes are LyCORIS' own (``hada_w1_a`` is (out, dim), ``hada_w1_b``
  (dim, in), as ``lycoris/modules/loha.py`` makes them); the file is LyCORIS' ``lycoris.kohya``.
"""

from __future__ import annotations

NETWORK_TYPES = ("lora", "loha")
# peft's parameter name (without the adapter name) -> the tensor's suffix in the file
FILE_SUFFIXES: dict[str, dict[str, str]] = {
    "lora": {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"},
    "loha": {name: name for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")},
}
# ss_network_module of each LyCORIS type's files (a LoRA's is its family's: networks.lora, lora_flux, ...)
NETWORK_MODULES = {"loha": "lycoris.kohya"}
# the file tensor whose first dimension is the rank
RANK_TENSOR = {"lora": "lora_down.weight", "loha": "hada_w1_b"}


def type_of_file(keys: list[str]) -> str:
    """The network type a file's tensor names say (LoRA when nothing else matches)."""
    return "loha" if any(key.endswith(".hada_w1_a") for key in keys) else "lora"
