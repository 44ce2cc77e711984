"""What an imported experiment cannot do on the machine it was imported on, and the override that helps.

Checked at import time with the same checks startup validation runs (``training.optim``,
``training.speed.attention``, ``training.output_dir``): an 8-bit optimizer or fp16 without CUDA, xformers
without CUDA or the package, and files or folders of another machine. A folder to write to that
cannot exist here (``F:/Desktop`` on Linux) is left out of the experiment, so runs write to their
Hydra run folder; everything else is written as the file says and reported with its override.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from omegaconf import OmegaConf

from sweeper.config import OptimizerConfig
from sweeper.kohya_import.result import ImportResult, OnThisMachine

_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")
# files or folders the experiment reads: (key, what replaces it here)
READ_PATHS = (
    ("model.vae", "model.vae=null"),
    ("network.init_weights", "network.init_weights=null"),
    ("train.resume", "train.resume=null"),
    ("data.reg_dir", "data.reg_dir=null"),
)


def on_this_machine(path: str) -> bool:
    """Whether ``path`` exists here (a Windows drive path never does on another system)."""
    if _WINDOWS_DRIVE.match(path) and os.name != "nt":
        return False
    return Path(path).expanduser().exists()


def writable_folder_problem(path: str) -> str | None:
    """Why runs could not write to ``path`` here (None if they can); nothing is left behind."""
    from training.output_dir import output_dir_problems

    if _WINDOWS_DRIVE.match(path) and os.name != "nt":
        return "a Windows folder, and this machine is not Windows"
    problems = output_dir_problems(SimpleNamespace(dir=path), 0)
    return problems[0] if problems else None


def check_here(result: ImportResult, cuda: bool | None = None) -> None:
    """Append to ``result.here`` what cannot apply on this machine, each with its override."""
    import torch

    from training.optim import optimizer_problems
    from training.speed.attention import attention_problem

    cuda = torch.cuda.is_available() if cuda is None else cuda
    here, values = result.here, result.values
    origin = result.origins.get

    optimizer = result.choices.get("optimizer")
    if optimizer:
        node = OmegaConf.merge(
            OmegaConf.structured(OptimizerConfig), {"name": optimizer}, _section(values, "optimizer")
        )
        for problem in optimizer_problems(node, cuda):
            if problem.startswith(f"optimizer={optimizer} "):  # the optimizer cannot run here (not a bad value)
                here.append(OnThisMachine(_source(result, "optimizer="), problem, "optimizer=adamw"))
    if result.choices.get("precision") == "fp16" and not cuda:
        reason = "precision=fp16 needs a CUDA GPU (loss scaling); none is here, and fp32 or bf16 run on the CPU"
        here.append(OnThisMachine(_source(result, "precision="), reason, "precision=fp32"))
    if problem := attention_problem(values.get("model.attention", "sdpa"), cuda):
        here.append(OnThisMachine(origin("model.attention", "model.attention"), problem, "model.attention=sdpa"))

    model_path = values.get("model.path")
    if model_path and not on_this_machine(model_path):
        reason = (
            f"model.path {model_path!r} is not on this machine (a hub id loads only when online): "
            "give model.path=<a model here>, or model=tiny to try the experiment"
        )
        here.append(OnThisMachine(origin("model.path", "model.path"), reason))
    for key, override in READ_PATHS:
        value = values.get(key)
        if value and not on_this_machine(value):
            here.append(OnThisMachine(origin(key, key), f"{key} {value!r} is not on this machine", override))
    train_dir = values.get("data.train_dir")
    if train_dir and not on_this_machine(train_dir):
        reason = f"data.train_dir {train_dir!r} is not on this machine: give data.train_dir=<your images>"
        here.append(OnThisMachine(origin("data.train_dir", "data.train_dir"), reason))
    missing = [e["dir"] for e in values.get("data.subsets", []) if not on_this_machine(e["dir"])]
    if missing:
        reason = (
            f"{len(missing)} data.subsets folder(s) are not on this machine ({', '.join(map(repr, missing))}): "
            "give each entry's dir, or train on one folder with data.subsets=[] data.train_dir=<your images>"
        )
        here.append(OnThisMachine(origin("data.subsets", "data.subsets"), reason))


def _section(values: dict[str, Any], section: str) -> dict[str, Any]:
    return {key.partition(".")[2]: value for key, value in values.items() if key.partition(".")[0] == section}


def _source(result: ImportResult, target: str) -> str:
    """The option a group choice came from (``optimizer=`` -> ``optimizer_args.args.optimizer_type``)."""
    return next((m.source for m in result.mapped if m.target == target), target.rstrip("="))
