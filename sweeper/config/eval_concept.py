"""Which concept ``concept_acc`` counts, or why it is off.

``concept_acc`` is the share of samples a zero-shot CLIP classifier labels as the target concept.
It means something only where the concept is the one the LoRA was taught: the toy world's held-out
shape on its bundled dataset (star, moon or arrow: ``data=toy_star`` ...), or labels the user gives
(``eval.concept``). On any other data the count is noise that can look like a gain (a LoRA of
moons once "gained" +0.19 stars), so it is switched off and the run says why. The target is named
wherever the metric is shown: ``concept_acc[star]`` (``shown_name``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sweeper.config.eval_prompts import bundled_concept
from toy_world.shipped import clip_shapes, held_out_shapes
from toy_world.world import HELD_OUT_SHAPES


@dataclass(frozen=True)
class ConceptChoice:
    """The zero-shot labels and target of ``concept_acc``; ``labels`` empty = off, for ``why``."""

    labels: list[str]
    target: str | None
    why: str  # where the concept comes from, or why the metric is off (printed and tagged)

    @property
    def enabled(self) -> bool:
        return bool(self.labels)

    @property
    def tag(self) -> str:
        return f"{self.target} ({self.why})" if self.enabled else f"off: {self.why}"


def choose_concept(cfg: Any) -> ConceptChoice:
    """``eval.concept`` when its labels are given; the star on the toy model with the bundled sample; else off."""
    concept = cfg.eval.concept
    if concept.labels is not None:
        if not concept.labels:
            return ConceptChoice([], None, "eval.concept.labels=[]")
        return ConceptChoice(list(concept.labels), concept.target, "eval.concept")
    shape = bundled_concept(cfg.data.train_dir)
    if cfg.model.source == "toy" and shape is not None:
        if shape not in held_out_shapes():
            why = (
                f"the shipped toy weights predate the {shape} (their CLIP does not know it, or their base model "
                "saw it); regenerate them (README: The toy world) to measure it"
            )
            return ConceptChoice([], None, why)
        target = concept.target or f"a {shape}"
        return ConceptChoice([f"a {s}" for s in clip_shapes()], target, "the bundled sample's held-out shape")
    if cfg.model.source == "toy":
        why = (
            f"the toy world's concepts ({', '.join(HELD_OUT_SHAPES)}) are the bundled samples'; "
            "data.train_dir is your own data. "
            "To count your concept, set eval.concept.labels='[a moon,a star,a circle]' eval.concept.target='a moon'"
        )
    else:
        why = "no concept is defined for this model and data; set eval.concept.labels and eval.concept.target"
    return ConceptChoice([], None, why)
