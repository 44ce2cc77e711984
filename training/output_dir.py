"""``output.dir`` before and after training: writable with room at startup, a rescue place at save time.

A read-only or full folder used to be found only when the LoRA was saved, after all the training;
startup now tries a real write there. If saving still fails (the disk filled up during the run, a
mount went read-only), the trained file is written to ``rescue_folders()`` instead of being lost.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from training.cache.folders import default_cache_root

RESCUE_FOLDER = "lora-sweeper-rescued"
# LoRA parameters per unit of rank (network.dim), an upper bound for the default targets:
# SD1/SD2 UNet transformer blocks (attention, proj_in/out, feed-forward) have sum(in + out) of about
# 0.43M over their targeted layers, the text encoder's attention 0.07M (SD1) / 0.19M (SD2); the
# built-in toy and tiny models stay far below 50k (their widths are 16..96).
PARAMETERS_PER_RANK = {"toy": 50_000, "tiny": 50_000}
REAL_MODEL_PARAMETERS_PER_RANK = 1_000_000
BYTES_PER_PARAMETER = {"fp32": 4, "fp16": 2, "bf16": 2}
HEADER_BYTES = 2**20  # safetensors header: key names and ss_* metadata (the dataset's tags), embeddings


def estimated_lora_bytes(dim: int, model_source: str, precision: str) -> int:
    """An upper bound of the final LoRA file's size, computed without loading the model.

    rank x (a bound of the targeted layers' in+out features, ``PARAMETERS_PER_RANK``) x the saved
    dtype's width, plus 1 MiB for the header: about 33 MB at dim 8 and 513 MB at dim 128 (fp32) for a
    real model, whatever its targets; under 3 MB for the toy and tiny models. Intermediate saves and
    training states are not counted (they are optional and their number is known only at run time).
    """
    per_rank = PARAMETERS_PER_RANK.get(model_source, REAL_MODEL_PARAMETERS_PER_RANK)
    return max(dim, 1) * per_rank * BYTES_PER_PARAMETER.get(precision, 4) + HEADER_BYTES


def output_dir_problems(output_cfg: Any, expected_bytes: int) -> list[str]:
    """Whether ``output.dir`` can be created, written and hold ``expected_bytes``; a real write is tried.

    Folders this creates, and the probe file, are removed again, so a rejected config leaves nothing.
    """
    try:
        folder = Path(str(output_cfg.dir)).expanduser()
    except Exception as error:  # e.g. ${hydra:...} outside a Hydra run
        return [f"output.dir cannot be resolved ({error}); set output.dir=/path/to/folder"]
    if folder.exists() and not folder.is_dir():
        return [f"output.dir: '{folder}' is a file, not a folder; set output.dir to a folder (or remove the file)"]
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
        free = shutil.disk_usage(folder).free
    except OSError as error:
        return [
            f"output.dir: cannot write to '{folder}' ({error.strerror or error}); the LoRA could not be saved "
            "after training: set output.dir to a writable folder, or fix its permissions"
        ]
    finally:
        for path in created:  # innermost first
            _remove_empty(path)
    if free < expected_bytes:
        return [
            f"output.dir: '{folder}' has {_mb(free)} free, but the LoRA file may need up to {_mb(expected_bytes)}; "
            "free some space, set output.dir to another disk, or save smaller (output.precision=fp16, a lower "
            "network.dim)"
        ]
    return []


def rescue_folders() -> list[Path]:
    """Where a LoRA that cannot be written to ``output.dir`` is kept, in order of preference: the user
    cache (lasts across reboots), then the system's temporary folder."""
    return [default_cache_root() / RESCUE_FOLDER, Path(tempfile.gettempdir()) / RESCUE_FOLDER]


def unique_rescue_path(folder: Path, name: str) -> Path:
    """``folder/<time>-<random>/<name>``: never overwrites an earlier rescued file."""
    return folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{secrets.token_hex(3)}" / name


def _remove_empty(path: Path) -> None:
    with contextlib.suppress(OSError):  # not empty (something else wrote there meanwhile)
        path.rmdir()


def _mb(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB"
