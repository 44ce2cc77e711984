"""Which family a model belongs to, read from its files before any weight is loaded.

Each family states how it recognises itself (``ModelFamily.folder_evidence``, ``checkpoint_markers``);
detection asks them most specific first, so a folder with two text encoders is not taken for SDXL
before SD3 and FLUX (which have them too) had their say. ``model.kind`` may be left unset (detected)
or given (checked against the files).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any


def _detectors() -> list[Any]:
    """Most specific first: the transformer families (FLUX, SD3), then SDXL, SD2, SD1."""
    from training.families import FAMILIES

    return sorted(FAMILIES.values(), key=lambda family: family.detection_rank)


def folder_kind(folder: Path) -> tuple[str, str] | None:
    """(kind, evidence) of a diffusers folder or config folder; None when it cannot tell."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        index = {}
    for detector in _detectors():
        if evidence := detector.folder_evidence(folder, index):
            return detector.kind, evidence
    return None


def checkpoint_keys(file: Path) -> list[str]:
    """The tensor names in a ``.safetensors`` file's header (no weights read); [] for other files."""
    if Path(file).suffix.lower() != ".safetensors":
        return []  # a pickle would have to be unpickled to list its keys
    try:
        with Path(file).open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            return list(json.loads(handle.read(length)))
    except (OSError, ValueError, struct.error):
        return []


def checkpoint_kind(file: Path) -> tuple[str, str] | None:
    """(kind, evidence) of a single-file ``.safetensors`` checkpoint from its header; None otherwise
    (a pickle is checked after loading)."""
    keys = checkpoint_keys(file)
    for detector in _detectors():
        for prefix, evidence in detector.checkpoint_markers:
            if any(key.startswith(prefix) for key in keys):
                return detector.kind, evidence
    return None


def loaded_kind(denoiser: Any, text_encoders: list) -> tuple[str, str]:
    """(kind, evidence) of loaded parts: the transformer's class for SD3/FLUX; two text encoders = SDXL;
    OpenCLIP ViT-H width = SD2."""
    from training.families import FAMILIES
    from training.families.sd import kind_of_text_width

    name = type(denoiser).__name__
    for family in FAMILIES.values():
        if name == getattr(family, "denoiser_class", None):
            return family.kind, f"{family.article} {family.label} model (transformer: {name})"
    if len(text_encoders) == 2:
        return "sdxl", "an SDXL model (two text encoders)"
    return kind_of_text_width(text_encoders[0].config.hidden_size)


def kind_mismatch(given: str, found: str, evidence: str, location: str) -> str:
    """The startup error when ``model.kind`` contradicts the files: names both and the fix."""
    return (
        f"model.kind={given} but '{location}' is {evidence}; set model.kind={found}, "
        "or leave model.kind unset to use what the files say"
    )
