"""What an imported experiment cannot do on the machine it was imported on, and the override that helps.

Checked at import time with the same checks startup validation runs (``training.optim``,
``training.speed.attention``, ``training.output_dir``): an 8-bit optimizer or fp16 without CUDA, xformers
without CUDA or the package, and files or folders of another machine. A folder to write to that is
another machine's (``F:/Desktop`` on Linux, ``/home/me/lora/out`` where ``/home/me/lora`` does not exist)
is left out of the experiment, so runs write to their Hydra run folder; everything else is written as
the file says and reported with its override. The overrides together are the report's "Run it here"
command, which runs as printed: a model that is not here is replaced by the built-in one (``model=toy``,
``model=tiny`` for SDXL) and images that are not here by the bundled sample, to try the experiment.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from omegaconf import OmegaConf

from sweeper.config.schema import PROJECT_ROOT, OptimizerConfig
from sweeper.kohya_import.result import ImportResult, ImportWarning, OnThisMachine

_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")
# files or folders the experiment reads: (key, what replaces it here)
READ_PATHS = (
    ("model.vae", "model.vae=null"),
    ("network.init_weights", "network.init_weights=null"),
    ("train.resume", "train.resume=null"),
    ("data.reg_dir", "data.reg_dir=null"),
)
SAMPLE_DIR = PROJECT_ROOT / "data" / "sample"  # the bundled images "Run it here" tries an experiment on
SAMPLE_CAPTIONS = ".txt"


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
    folder = Path(path).expanduser()
    if folder.is_absolute() and not folder.parent.is_dir():
        # a folder of the machine the config was written on: /home/me/lora/out is not made here
        parent = str(folder.parent)
        return f"its parent folder {parent!r} does not exist on this machine (the config's machine's folder)"
    problems = output_dir_problems(SimpleNamespace(dir=path), 0)
    return problems[0] if problems else None


def check_here(result: ImportResult, cuda: bool | None = None) -> None:
    """Append to ``result.here`` what cannot apply on this machine, each with its override."""
    import torch

    from training.optim_options import optimizer_problems
    from training.speed.attention_options import attention_problem

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
        here += _model_replacement(result, model_path)
    for key, override in READ_PATHS:
        value = values.get(key)
        if value and not on_this_machine(value):
            here.append(OnThisMachine(origin(key, key), f"{key} {value!r} is not on this machine", override))
    here += _images_replacement(result)


def _model_replacement(result: ImportResult, model_path: str) -> list[OnThisMachine]:
    """A model that is not here: the built-in one runs the experiment (toy: SD1 only; tiny: SD1 or SDXL)."""
    kind = result.values.get("model.kind")
    builtin = "tiny" if kind == "sdxl" else "toy"
    what = "the tiny random SDXL-architecture model" if builtin == "tiny" else "the toy world's base model"
    reason = (
        f"model.path {model_path!r} is not on this machine (a hub id loads only when online): give "
        f"model.path=<a model here>, or try the experiment on {what} with model={builtin}"
    )
    found = [OnThisMachine(result.origins.get("model.path", "model.path"), reason, f"model={builtin}")]
    if kind == "sd2":  # the built-in models have no SD2 form
        reason = f"model.kind=sd2 names the file's model; model={builtin} is SD1-architecture"
        found.append(OnThisMachine(result.origins.get("model.kind", "model.kind"), reason, "model.kind=null"))
    return found


def _images_replacement(result: ImportResult) -> list[OnThisMachine]:
    """Images that are not here: the bundled sample (.txt captions) runs the experiment."""
    values, origin = result.values, result.origins.get
    sample = [f"data.train_dir={SAMPLE_DIR}"]
    if values.get("data.caption_extension", SAMPLE_CAPTIONS) != SAMPLE_CAPTIONS:
        sample.append(f"data.caption_extension={SAMPLE_CAPTIONS}")
    found = []
    train_dir = values.get("data.train_dir")
    if train_dir and not on_this_machine(train_dir):
        reason = (
            f"data.train_dir {train_dir!r} is not on this machine: give data.train_dir=<your images>, "
            "or try the experiment on the bundled sample images"
        )
        found.append(OnThisMachine(origin("data.train_dir", "data.train_dir"), reason, sample[0]))
    missing = [e["dir"] for e in values.get("data.subsets", []) if not on_this_machine(e["dir"])]
    if missing:
        reason = (
            f"{len(missing)} data.subsets folder(s) are not on this machine ({', '.join(map(repr, missing))}): "
            "give each entry's dir, or train on one folder with data.subsets=[] data.train_dir=<your images> "
            "(the bundled sample images to try the experiment)"
        )
        found.append(OnThisMachine(origin("data.subsets", "data.subsets"), reason, "data.subsets=[]"))
        if not any(o.override == sample[0] for o in found):
            reason = "data.train_dir: the bundled sample images in place of the subsets' folders, to try it"
            found.append(OnThisMachine(origin("data.train_dir", "data.train_dir"), reason, sample[0]))
    if found and len(sample) > 1:
        reason = f"the bundled sample's captions are {SAMPLE_CAPTIONS} files"
        found.append(OnThisMachine(origin("data.caption_extension", "data.caption_extension"), reason, sample[1]))
    return found


def runs_on(result: ImportResult) -> str:
    """The model "Run it here" trains: ``toy`` / ``tiny`` (built in), or ``diffusers`` (a model file or folder)."""
    replaced = [o.override for o in result.here if o.override in ("model=toy", "model=tiny")]
    if replaced:
        return replaced[0].partition("=")[2]
    return "diffusers" if result.choices.get("model") == "diffusers" else "toy"  # our default model is toy


def warn_model_settings(result: ImportResult) -> None:
    """``clip_skip`` chosen for the file's own model, where the built-in one runs: it runs, and misleads."""
    model = runs_on(result)
    if model == "diffusers":
        return
    how = f"with model={model}" + (" (Run it here's)" if result.choices.get("model") == "diffusers" else "")
    clip_skip = result.values.get("model.clip_skip", 1)
    if clip_skip > 1:
        what = (
            "the toy base model's UNet was trained on its text encoder's last layer; "
            f"clip_skip={clip_skip} feeds it the output of a layer {clip_skip - 1} before the last instead, which "
            "it never saw, so its samples follow the prompts less and the CLIP scores drop"
            if model == "toy"
            else f"the tiny random model is built for its text encoder's last layer; clip_skip={clip_skip} uses a "
            f"layer {clip_skip - 1} before it"
        )
        result.warnings.append(
            ImportWarning(
                result.origins.get("model.clip_skip", "model.clip_skip"),
                f"model.clip_skip={clip_skip} {how}: {what}. Turn it off with model.clip_skip=1 "
                "(keep it with the SD1.5-family model the file was written for)",
            )
        )


def _section(values: dict[str, Any], section: str) -> dict[str, Any]:
    return {key.partition(".")[2]: value for key, value in values.items() if key.partition(".")[0] == section}


def _source(result: ImportResult, target: str) -> str:
    """The option a group choice came from (``optimizer=`` -> ``optimizer_args.args.optimizer_type``)."""
    return next((m.source for m in result.mapped if m.target == target), target.rstrip("="))
