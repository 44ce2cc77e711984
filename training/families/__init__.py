"""Model families behind one seam (``training.families.base.ModelFamily``), looked up by ``model.kind``."""

from __future__ import annotations

from training.families.base import Conditioning, ImageGeometry, ModelFamily, TextPart, batch_geometry
from training.families.flux import FLUX
from training.families.sd import SD1, SD2
from training.families.sd3 import SD3
from training.families.sdxl import SDXL

FAMILIES: dict[str, ModelFamily] = {family.kind: family for family in (SD1, SD2, SDXL, SD3, FLUX)}
MODEL_KINDS = tuple(FAMILIES)


def family_of(kind: str) -> ModelFamily:
    """The family registered as ``kind`` (sd1, sd2, sdxl, sd3, flux)."""
    if kind not in FAMILIES:
        raise ValueError(f"model.kind: unknown kind '{kind}'; use one of {', '.join(MODEL_KINDS)}")
    return FAMILIES[kind]


__all__ = [
    "FAMILIES",
    "MODEL_KINDS",
    "Conditioning",
    "ImageGeometry",
    "ModelFamily",
    "TextPart",
    "batch_geometry",
    "family_of",
]
