"""Which family a model belongs to, read from its files before any weight is loaded.

Each family states how it recognises itself (``ModelFamily.folder_evidence``, ``checkpoint_markers``);
detection asks them most specific first, so a folder with two text encoders is not taken for SDXL
before SD3 and FLUX (which have them too) had their say. SD3 and FLUX are recognised here although
this version does not train them: such a model is refused at startup by name instead of being
misread. ``model.kind`` may be left unset (detected) or given (checked against the files).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Recognised:
    """A family this version recognises but does not train: how its files look."""

    kind: str
    label: str
    pipeline_classes: tuple[str, ...]  # model_index.json's _class_name
    denoiser_class: str  # transformer/config.json's _class_name (a config folder may lack model_index.json)
    checkpoint_markers: tuple[tuple[str, str], ...]  # (tensor-name prefix, evidence) of a single file

    def folder_evidence(self, folder: Path, index: dict[str, Any]) -> str | None:
        name = index.get("_class_name")
        if name in self.pipeline_classes:
            return f"{self.article} {self.label} model (model_index.json: {name})"
        try:
            denoiser = json.loads((folder / "transformer" / "config.json").read_text()).get("_class_name")
        except (OSError, ValueError, AttributeError):
            return None
        return (
            f"{self.article} {self.label} model (transformer: {denoiser})" if denoiser == self.denoiser_class else None
        )

    @property
    def article(self) -> str:
        return "an" if self.label.startswith("S") else "a"  # "an SD3", "a FLUX.1"


# transformer denoisers with flow matching (training/objective/flow.py); their family files come next
NOT_TRAINED_YET = (
    Recognised(
        "flux",
        "FLUX.1",
        ("FluxPipeline", "FluxImg2ImgPipeline", "FluxFillPipeline"),
        "FluxTransformer2DModel",
        (
            ("double_blocks.0.img_attn.", "a FLUX.1 checkpoint (double_blocks: the MMDiT of FLUX)"),
            ("model.diffusion_model.double_blocks.0.", "a FLUX.1 checkpoint (double_blocks: the MMDiT of FLUX)"),
        ),
    ),
    Recognised(
        "sd3",
        "SD3",
        ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline"),
        "SD3Transformer2DModel",
        (
            ("joint_blocks.0.", "an SD3 checkpoint (joint_blocks: the MMDiT of SD3)"),
            ("model.diffusion_model.joint_blocks.0.", "an SD3 checkpoint (joint_blocks: the MMDiT of SD3)"),
        ),
    ),
)


def _detectors() -> list[Any]:
    """Most specific first: the recognised transformer families, then SDXL, SD2, SD1."""
    from training.families import FAMILIES

    return [*NOT_TRAINED_YET, *sorted(FAMILIES.values(), key=lambda family: family.detection_rank)]


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
    for detector in _detectors():
        for prefix, evidence in detector.checkpoint_markers:
            if any(key.startswith(prefix) for key in keys):
                return detector.kind, evidence
    return None


def loaded_kind(text_encoders: list) -> tuple[str, str]:
    """(kind, evidence) of loaded parts: two text encoders = SDXL, OpenCLIP ViT-H width = SD2."""
    from training.families.sd import kind_of_text_width

    if len(text_encoders) == 2:
        return "sdxl", "an SDXL model (two text encoders)"
    return kind_of_text_width(text_encoders[0].config.hidden_size)


def not_trained_yet(kind: str) -> Recognised | None:
    """The recognised-but-untrained family of ``kind`` (sd3, flux), if it is one."""
    return next((family for family in NOT_TRAINED_YET if family.kind == kind), None)


def kind_mismatch(given: str, found: str, evidence: str, location: str) -> str:
    """The startup error when ``model.kind`` contradicts the files: names both and the fix."""
    return (
        f"model.kind={given} but '{location}' is {evidence}; set model.kind={found}, "
        "or leave model.kind unset to use what the files say"
    )
