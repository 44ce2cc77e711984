"""The metrics a run reports and which way is better: light, so the sweeper can import it at start-up."""

from __future__ import annotations

# Each metric and whether higher is better; ``clip_score`` is the former name of ``clip_t``.
DIRECTIONS = {
    "clip_t": "maximize",
    "clip_i": "maximize",
    "dino_i": "maximize",
    "concept_acc": "maximize",
    "copy_risk": "minimize",
    "diversity": "maximize",
    "val_loss": "minimize",
}
ALIASES = {"clip_score": "clip_t"}
SELECTIONS = ("best", "last")  # eval.select: which evaluated checkpoint is the run's result


def metric_name(name: str) -> str:
    """The canonical metric of an objective or config name (``clip_score`` -> ``clip_t``)."""
    return ALIASES.get(name, name)
