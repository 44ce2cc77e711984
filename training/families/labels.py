"""How messages name a family."""

from __future__ import annotations


def article_for(label: str) -> str:
    """The article before a family's label: "an SD1.x", "an SDXL", "an SD3", "a FLUX.1"."""
    return "an" if label.startswith("S") else "a"
