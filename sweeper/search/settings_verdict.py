"""From a study's trials to what may be said about its settings: each setting's seeds, the verdict,
the wording, and racing's next step.

A trial is one setting trained on K seeds; its per-seed cells of the objective are kept on the
trial (``replicate_cells``). Racing extends a setting by a new trial that carries the earlier one's
seeds (``extends``), so a setting is its latest completed trial.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from optuna.trial import FrozenTrial, TrialState

from evaluation.replicates import Verdict, detectable_from_sd, seed_sd_from_groups, verdict
from evaluation.stats import ALPHA
from sweeper.search.space import describe_params

CELLS_ATTR = "replicate_cells"  # trial user attr: {replicate index: [cell means of the objective]}
SEEDS_ATTR = "replicate_seeds"  # trial user attr: the training seed of each replicate
IMAGES_ATTR = "images_per_seed"  # trial user attr: how many images each seed was scored on
INTERVAL_ATTR = "objective_interval"  # trial user attr: [low, high, what the interval conditions on]
EXTENDS_ATTR = "extends"  # racing: the trial whose seeds this one carries on
TARGET_ATTR = "replicates_target"  # racing: how many seeds this trial trains up to
SEED_KEY = "train.seed"


def seeds_of(trial: FrozenTrial) -> dict[int, np.ndarray]:
    """Replicate index -> the objective's cells of that seed."""
    return {int(index): np.asarray(cells, float) for index, cells in trial.user_attrs.get(CELLS_ATTR, {}).items()}


def current_settings(trials: list[FrozenTrial]) -> dict[int, FrozenTrial]:
    """Trial number -> trial, for each setting's latest completed trial (the most seeds); a trial
    another one extends, and a duplicate of a finished one, are left out."""
    extended = {t.user_attrs.get(EXTENDS_ATTR) for t in trials if t.state == TrialState.COMPLETE}
    by_params: dict[str, FrozenTrial] = {}
    for trial in sorted(trials, key=lambda t: t.number):
        if trial.state != TrialState.COMPLETE or "duplicate_of" in trial.user_attrs or trial.number in extended:
            continue
        if not seeds_of(trial):
            continue
        key = repr(sorted(trial.params.items()))
        if key not in by_params or len(seeds_of(trial)) >= len(seeds_of(by_params[key])):
            by_params[key] = trial
    return {t.number: t for t in by_params.values()}


def judge(trials: list[FrozenTrial], maximize: bool) -> Verdict | None:
    settings = current_settings(trials)
    return verdict({n: seeds_of(t) for n, t in settings.items()}, maximize) if settings else None


@dataclass
class Wording:
    lines: list[str]
    standing: dict[int, str]  # trial number -> best | worse | not distinguishable | (no claim at K=1)
    adjusted_p: dict[int, float]


def word(trials: list[FrozenTrial], objective: str, maximize: bool) -> Wording:
    """The verdict in words, with what every interval conditions on."""
    settings = current_settings(trials)
    judged = judge(trials, maximize)
    if judged is None or len(settings) < 2:
        return Wording([], {}, {})
    best = settings[judged.best]
    counts = {n: len(seeds_of(t)) for n, t in settings.items()}
    images = best.user_attrs.get(IMAGES_ATTR) or len(next(iter(seeds_of(best).values())))
    if judged.components is None:
        if max(counts.values()) == 1:
            return _single_seed(trials, settings, judged, objective, counts)
        return Wording(["No verdict between settings: fewer than 2 of them have 2 or more seeds."], {}, {})
    lines = [
        f"Verdict on {objective} over training seeds (settings paired by seed and eval image; Holm over all "
        f"{_pairs(len(settings))} of settings; alpha {ALPHA}):"
    ]
    estimate = judged.best_estimate
    adjusted = (
        f", selection-adjusted interval {estimate.low:.4g} to {estimate.high:.4g} [{estimate.conditions}, level "
        f"1-{ALPHA}/{len(settings)}, Benjamini & Yekutieli 2005]"
        if estimate
        else ""
    )
    lines.append(f"  best: trial {best.number} {describe_params(best.params)}: {best.values[0]:.4g}{adjusted}")
    standing, p_values = {best.number: "best"}, {}
    for number, comparison in sorted(judged.against_best.items(), key=lambda item: item[1].difference.mean):
        trial, d = settings[number], comparison.difference
        p_values[number] = comparison.adjusted_p
        gap = f"{_g(d.mean)} ({_g(d.low)} to {_g(d.high)}) [{d.conditions}], adjusted p={comparison.adjusted_p:.2g}"
        worse = comparison.significant and (d.mean < 0) == maximize
        if comparison.significant:
            standing[number] = "worse" if worse else "better"
            word_ = "worse than the best" if worse else "significantly different from the best"
            lines.append(f"  trial {number} {describe_params(trial.params)}: {word_}: {gap}")
        else:
            standing[number] = "not distinguishable"
            lines.append(
                f"  trial {number} {describe_params(trial.params)}: not distinguishable from the best with "
                f"{comparison.seeds} seeds x {images} images: {gap}"
            )
    components = judged.components
    k = min(counts.values())
    pairs = len(settings) * (len(settings) - 1) // 2
    detect = ", ".join(f"K={n}: {components.detectable(n, pairs):.3g}" for n in sorted({k, 3, 5, 10}) if n >= 2)
    lines.append(
        f"  seed SD of one run's {objective}: {components.seed_sd():.3g}; smallest difference found with 80% "
        f"power at Holm's first step over {_pairs(len(settings))}: {detect}"
    )
    if "not distinguishable" in standing.values():
        rival = min(
            (n for n, s in standing.items() if s == "not distinguishable"),
            key=lambda n: abs(judged.against_best[n].difference.mean),
        )
        gap = abs(judged.against_best[rival].difference.mean)
        needed = components.seeds_needed(gap, pairs) if gap > 0 else None
        lines.append(
            f"  to tell trial {best.number} from trial {rival} (gap {gap:.3g}): "
            + (f"about {needed} seeds per setting" if needed else "more than 100 seeds per setting, or none")
        )
    return Wording(lines, standing, p_values)


def _pairs(settings: int) -> str:
    count = settings * (settings - 1) // 2
    return f"{count} pair" + ("" if count == 1 else "s")


def _g(value: float) -> str:
    return f"{value + 0.0:+.4g}"  # + 0.0: no "-0"


def _single_seed(
    trials: list[FrozenTrial], settings: dict[int, FrozenTrial], judged: Verdict, objective: str, counts: dict
) -> Wording:
    """K = 1: no claim between settings; the seed spread from trials that differ only in train.seed."""
    best = settings[judged.best]
    lines = [
        f"No verdict between settings: each was trained on one seed, so the comparison cannot see seed noise "
        f"(trial {best.number} has the highest mean). Set hydra.sweeper.replicates=3 (or more) for a verdict."
    ]
    spread = _seed_spread(list(settings.values()))
    if spread is None:
        lines.append(
            "  the seed spread is unknown here: no two trials differ only in train.seed (an A/A sweep "
            "measures it: python -m sweeper -m train.seed=1,2,3,4)"
        )
    else:
        sd, df = spread
        values = sorted((t.values[0] for t in settings.values()), reverse=True)
        gap = abs(values[0] - values[1]) if len(values) > 1 else 0.0
        detect = ", ".join(f"K={n}: {detectable_from_sd(sd, n):.3g}" for n in (1, 3, 5, 10))
        needed = next((n for n in range(1, 101) if detectable_from_sd(sd, n) <= gap), None) if gap > 0 else None
        lines.append(
            f"  seed SD of one run's {objective}, from trials that differ only in train.seed: {sd:.3g} ({df} df); "
            f"smallest difference found with 80% power: {detect}"
        )
        lines.append(
            f"  the gap between the top two ({gap:.3g}) needs about {needed} seeds per setting"
            if needed
            else f"  the gap between the top two ({gap:.3g}) is below what 100 seeds per setting detect"
        )
    return Wording(lines, dict.fromkeys(settings, "(K=1: no claim)"), {})


def _seed_spread(trials: list[FrozenTrial]) -> tuple[float, int] | None:
    groups: dict[str, list[float]] = {}
    for trial in trials:
        if SEED_KEY not in trial.params:
            continue
        others = repr(sorted((k, v) for k, v in trial.params.items() if k != SEED_KEY))
        groups.setdefault(others, []).append(trial.values[0])
    return seed_sd_from_groups(list(groups.values()))


# --- racing (grid sweeps): every setting starts on 2 seeds; contenders get one more, up to K


@dataclass
class RaceStep:
    trial: FrozenTrial  # the setting's latest completed trial
    target: int  # how many seeds its extension trains up to


def race_step(trials: list[FrozenTrial], maximize: bool, max_seeds: int) -> RaceStep | None:
    """The contender with the fewest seeds below ``max_seeds`` (ties: lowest number); None when
    every setting not yet significantly worse than the leader has ``max_seeds`` seeds (F-race:
    Birattari et al. 2002, GECCO, "A racing algorithm for configuring metaheuristics")."""
    settings = current_settings(trials)
    judged = judge(trials, maximize)
    if judged is None:
        return None
    out = {n for n, c in judged.against_best.items() if c.significant}
    contenders = [t for n, t in settings.items() if n not in out and len(seeds_of(t)) < max_seeds]
    if not contenders:
        return None
    chosen = min(contenders, key=lambda t: (len(seeds_of(t)), t.number))
    return RaceStep(chosen, len(seeds_of(chosen)) + 1)


def racing_cost(trials: list[FrozenTrial], points: int, max_seeds: int) -> tuple[int, int]:
    """Seed-runs trained (each setting's seeds, counted once) and what full replicates would have cost."""
    trained = sum(len(seeds_of(t)) for t in current_settings(trials).values())
    return trained, points * max_seeds
