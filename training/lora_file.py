"""The LoRA file on disk: kohya-compatible safetensors with ``ss_*`` metadata, written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from training.network import LoraNetwork


def save_lora_file(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write safetensors under a temporary name, then rename: a crash never leaves a look-alike file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={k: str(v) for k, v in metadata.items()})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def kohya_metadata(
    network: LoraNetwork,
    *,
    output_name: str,
    base_model_version: str,
    comment: str,
    seed: int,
    steps: int,
    resolved_config: dict[str, Any],
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """kohya's ``ss_*`` keys (strings, as in sd-scripts) plus our resolved config as JSON."""
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(network.dim),
        "ss_network_alpha": f"{network.alpha:g}",
        "ss_base_model_version": base_model_version,
        "ss_output_name": output_name,
        "ss_training_comment": comment,
        "ss_seed": str(seed),
        "ss_steps": str(steps),
        "ss_network_args": json.dumps({}),
        "lora_sweeper_config": json.dumps(resolved_config, sort_keys=True),
    }
    metadata.update(extra or {})
    return metadata
