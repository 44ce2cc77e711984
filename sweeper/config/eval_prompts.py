"""Which prompts a run is evaluated on when ``eval.prompts`` is null.

The bundled sample teaches the toy world's star, so its prompts are six star prompts. Any other
``data.train_dir`` is evaluated on its own captions: star prompts would score a LoRA of something
else by how well it draws stars (a user's run reported a change of -9 for that reason). The choice
is made once, at startup, from the scanned captions and ``eval.test_seed``; the run then writes the
prompts into its config, so the logged params, the baseline cache and a reproduction all see them.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sweeper.config.schema import PROJECT_ROOT
from toy_world.world import article
from training.data.scan import ImageRecord

SAMPLE_DIR = PROJECT_ROOT / "data" / "sample"  # the default run's dataset: the star
# Every bundled dataset of the toy world: one held-out shape each (scripts/make_sample_dataset.py).
BUNDLED_SAMPLES: dict[str, Path] = {
    "star": SAMPLE_DIR,
    "moon": PROJECT_ROOT / "data" / "sample_moon",
    "arrow": PROJECT_ROOT / "data" / "sample_arrow",
}
# (shape colour, background) of the eval prompts: combinations the bundled images do not have.
PROMPT_COLOURS = (
    ("blue", "white"),
    ("yellow", "red"),
    ("orange", "blue"),
    ("white", "black"),
    ("green", "purple"),
    ("red", "yellow"),
)
MAX_DERIVED = 6  # as many as the sample's prompts: the same sampling cost


def concept_prompts(shape: str) -> tuple[str, ...]:
    """The six eval prompts of a bundled dataset: ``a blue star on a white background``, ..."""
    return tuple(
        f"{article(colour)} {colour} {shape} on {article(background)} {background} background"
        for colour, background in PROMPT_COLOURS
    )


# The star prompts of the bundled sample (data/sample/README.md); the README's scores are measured on them.
SAMPLE_PROMPTS = concept_prompts("star")


@dataclass(frozen=True)
class EvalPrompts:
    """The prompts a run evaluates, and where they came from (for the startup line and a tag)."""

    prompts: list[str]
    source: str  # "eval.prompts" | "the bundled sample" | "your captions"


def bundled_concept(train_dir: str | Path | None) -> str | None:
    """The held-out shape whose bundled dataset ``data.train_dir`` is (however the path is written), or None."""
    if not train_dir:
        return None
    resolved = Path(train_dir).expanduser().resolve()
    return next((shape for shape, folder in BUNDLED_SAMPLES.items() if resolved == folder.resolve()), None)


def is_bundled_sample(train_dir: str | Path | None) -> bool:
    """Whether ``data.train_dir`` is one of this checkout's bundled toy-world datasets."""
    return bundled_concept(train_dir) is not None


def prompts_from_captions(captions: Sequence[str], seed: int, count: int = MAX_DERIVED) -> list[str]:
    """Up to ``count`` distinct non-empty captions, picked with ``random.Random(seed)``, in dataset order.

    Captions are taken as written (a trigger word in them stays; ``data.trigger_word`` is put in
    front at generation time as for any prompt). The same captions and seed give the same prompts.
    """
    distinct = list(dict.fromkeys(c.strip() for c in captions if c.strip()))
    chosen = set(random.Random(seed).sample(range(len(distinct)), min(count, len(distinct))))
    return [caption for i, caption in enumerate(distinct) if i in chosen]


def resolve_eval_prompts(cfg: Any, records: Sequence[ImageRecord]) -> tuple[EvalPrompts | None, list[str]]:
    """``(prompts, [])``, or ``(None, [problem])`` when none are given and the captions offer none."""
    if cfg.eval.prompts is not None:
        return EvalPrompts(list(cfg.eval.prompts), "eval.prompts"), []
    if (shape := bundled_concept(cfg.data.train_dir)) is not None:
        return EvalPrompts(list(concept_prompts(shape)), "the bundled sample"), []
    prompts = prompts_from_captions([r.caption for r in records if not r.is_reg], cfg.eval.test_seed)
    if not prompts:
        return None, [
            "eval.prompts is null and every caption in data.train_dir is empty, so there is nothing to evaluate "
            "the LoRA on; give prompts, e.g. eval.prompts='[a photo of sks dog,sks dog on the beach]'"
        ]
    return EvalPrompts(prompts, "your captions"), []
