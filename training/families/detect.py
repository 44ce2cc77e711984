"""Which family a model belongs to, read from its files before any weight is loaded.

A diffusers folder (or a single file's config folder) says it in ``model_index.json`` and its text
encoder config; an original-layout ``.safetensors`` checkpoint in its tensor names, read from the
header alone. ``model.kind`` may be left unset (detected) or given (checked against the files).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

SD2_TEXT_HIDDEN_SIZE = 1024  # OpenCLIP ViT-H/14; SD1's CLIP ViT-L/14 is 768
# original-layout checkpoints: the text encoder's key prefix names the family
CHECKPOINT_TEXT_PREFIXES = (
    ("conditioner.embedders.1.", "sdxl", "an SDXL checkpoint (conditioner.embedders.1: OpenCLIP bigG)"),
    ("cond_stage_model.model.", "sd2", "an SD2 checkpoint (cond_stage_model.model: OpenCLIP ViT-H)"),
    ("cond_stage_model.transformer.", "sd1", "an SD1 checkpoint (cond_stage_model.transformer: CLIP ViT-L)"),
)


def folder_kind(folder: Path) -> tuple[str, str] | None:
    """(kind, evidence) of a diffusers folder or config folder; None when it cannot tell."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        index = {}
    if "text_encoder_2" in index or (folder / "text_encoder_2").is_dir():
        return "sdxl", "an SDXL model (it has text_encoder_2)"
    try:
        hidden_size = json.loads((folder / "text_encoder" / "config.json").read_text())["hidden_size"]
    except (OSError, ValueError, KeyError):
        return None
    if hidden_size == SD2_TEXT_HIDDEN_SIZE:
        return "sd2", f"an SD2 model (text encoder hidden size {hidden_size}: OpenCLIP ViT-H)"
    return "sd1", f"an SD1 model (text encoder hidden size {hidden_size}, not SD2's 1024)"


def checkpoint_kind(file: Path) -> tuple[str, str] | None:
    """(kind, evidence) of a single-file ``.safetensors`` checkpoint from its header; None otherwise."""
    if file.suffix.lower() != ".safetensors":
        return None  # a pickle would have to be unpickled to list its keys; checked after loading
    try:
        with file.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            keys = json.loads(handle.read(length))
    except (OSError, ValueError, struct.error):
        return None
    for prefix, kind, evidence in CHECKPOINT_TEXT_PREFIXES:
        if any(key.startswith(prefix) for key in keys):
            return kind, evidence
    return None


def loaded_kind(text_encoders: list) -> tuple[str, str]:
    """(kind, evidence) of loaded parts: two text encoders = SDXL, OpenCLIP ViT-H width = SD2."""
    if len(text_encoders) == 2:
        return "sdxl", "an SDXL model (two text encoders)"
    hidden_size = text_encoders[0].config.hidden_size
    if hidden_size == SD2_TEXT_HIDDEN_SIZE:
        return "sd2", f"an SD2 model (text encoder hidden size {hidden_size}: OpenCLIP ViT-H)"
    return "sd1", f"an SD1 model (text encoder hidden size {hidden_size}, not SD2's 1024)"


def kind_mismatch(given: str, found: str, evidence: str, location: str) -> str:
    """The startup error when ``model.kind`` contradicts the files: names both and the fix."""
    return (
        f"model.kind={given} but '{location}' is {evidence}; set model.kind={found}, "
        "or leave model.kind unset to use what the files say"
    )
