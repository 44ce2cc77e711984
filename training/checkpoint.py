"""Save and restore the full training state, so a resumed run ends exactly where an uninterrupted one does.

What a state holds (nanochat's habit: everything the loop needs, nothing it can rebuild): the
trainable tensors (safetensors), the optimizer and LR-schedule states, every RNG the loop draws
from, and the loop position (step, epoch, batches consumed in the epoch, and the data order's RNG
at the start of that epoch). The folder is written under a temporary name and renamed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from training.state_files import PROGRESS, STATE, WEIGHTS


class ResumeError(ValueError):
    """The state folder cannot resume this run; the message names ``train.resume``."""


@dataclass
class TrainingState:
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    lr_schedule: dict[str, Any]
    rng: dict[str, Any]
    progress: dict[str, Any]


def save_training_state(folder: str | Path, state: TrainingState) -> Path:
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.trainable.items()}, tmp / WEIGHTS)
        torch.save({"optimizer": state.optimizer, "lr_schedule": state.lr_schedule, "rng": state.rng}, tmp / STATE)
        (tmp / PROGRESS).write_text(json.dumps(state.progress, indent=2, sort_keys=True))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_training_state(folder: str | Path) -> TrainingState:
    folder = Path(folder)
    missing = [name for name in (WEIGHTS, STATE, PROGRESS) if not (folder / name).is_file()]
    if missing:
        raise ResumeError(
            f"train.resume: '{folder}' is not a saved training state (missing {', '.join(missing)}); "
            "point it at a state-step* folder written with train.save_state=true"
        )
    blob = torch.load(folder / STATE, weights_only=True)
    return TrainingState(
        trainable=load_file(folder / WEIGHTS),
        optimizer=blob["optimizer"],
        lr_schedule=blob["lr_schedule"],
        rng=blob["rng"],
        progress=json.loads((folder / PROGRESS).read_text()),
    )
