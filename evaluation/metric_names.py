"""The metrics a run reports and which way is better, and the sampler names: light, so the sweeper and
startup validation can import them before the model libraries."""

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
# eval.sampler's names (evaluation/sampling.py maps each to its diffusers scheduler; a test checks they agree)
SAMPLER_NAMES = ("ddim", "euler", "dpm++", "ddpm", "flow_euler")


def metric_name(name: str) -> str:
    """The canonical metric of an objective or config name (``clip_score`` -> ``clip_t``)."""
    return ALIASES.get(name, name)


def evaluated_metric(objective: str) -> str | None:
    """The per-image metric behind an objective, or None when evaluations do not measure it.

    ``clip_t_gain`` ranks trials exactly as ``clip_t`` does (the base model's values are the same
    in every trial), so a gain is measured, selected and paired by its metric.
    """
    name = metric_name(objective)
    name = metric_name(name.removesuffix("_gain")) if name.endswith("_gain") else name
    return name if name in DIRECTIONS else None


ARTICLES = ("a ", "an ", "the ")


def concept_word(target: str | None) -> str:
    """``a star`` -> ``star``: the short name of a ``concept_acc`` target."""
    text = (target or "").strip()
    for article in ARTICLES:
        if text.lower().startswith(article):
            return text[len(article) :].strip()
    return text


def shown_name(metric: str, concept: str | None = None) -> str:
    """A metric as printed: ``concept_acc[star]`` names the concept it counts; the others as they are."""
    return f"{metric}[{concept_word(concept)}]" if metric == "concept_acc" and concept else metric
