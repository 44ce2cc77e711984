"""What is true of a SETTING: its score over K training seeds, and comparisons between settings.

One trained file's interval (``evaluation.stats``) says nothing about the next training seed of the
same setting; a sweep's verdict must. Every setting is trained with the same K seeds (common random
numbers) and scored on the same prompts and eval images, so a run's per-image values arrange into
cells ``[seed, prompt]`` (the mean of that prompt's images).

The model is the crossed random-effects ANOVA of a balanced design (seeds x prompts, images nested
in the cell): seed and prompt are random samples of what the user cares about, so both variances
belong in an interval that claims to be about the setting (Searle, Casella & McCulloch 1992,
"Variance Components", ch. 4). Its mean squares give the variance of a mean as a linear
combination, with Satterthwaite's (1946) degrees of freedom. For balanced data this is the REML
answer of a linear mixed model with seed and prompt as random effects, in closed form and without
an iterative fit that fails on 3 seeds.

Comparisons pair by seed and image and pool the setting x seed interaction mean square of all
settings (the settings' own means and the seeds' shared effects drop out; every setting is scored
on the same eval prompts, so a comparison is about those prompts), and correct with
Holm (1979) over ALL pairs of settings: "each setting against the best" is a data-chosen subset of
those pairs, and correcting over only the k-1 comparisons with the sample best misses the selection
(with 8 equal settings, K = 5, it called some setting "worse" in 10.7% of simulated A/A sweeps;
``tests/test_verdicts.py`` measures it). The best's own interval is selection-adjusted: the
false-coverage-rate interval of Benjamini & Yekutieli (2005, JASA 100:71) for 1 selected of S,
i.e. level 1 - alpha/S.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from evaluation.stats import ALPHA, CONFIDENCE, Estimate, this_setting

POWER = 0.8  # the minimum detectable difference is the one found with this probability


def cells(values: Sequence[float], clusters: Sequence[object] | None) -> np.ndarray:
    """One run's per-image values -> the mean of each cluster (prompt), in order of first appearance.

    Without clusters (held-out images) every value is its own cell; NaN values are left out.
    """
    if clusters is None:
        return np.asarray(values, float)
    grouped: dict[object, list[float]] = {}
    for value, cluster in zip(values, clusters, strict=True):
        grouped.setdefault(cluster, [])
        if not math.isnan(value):
            grouped[cluster].append(value)
    return np.asarray([np.mean(v) if v else np.nan for v in grouped.values()], float)


@dataclass(frozen=True)
class MeanSquare:
    value: float
    df: int


def satterthwaite(terms: Sequence[tuple[float, MeanSquare]]) -> tuple[float, float]:
    """``sum(c * MS)`` and its Satterthwaite (1946) degrees of freedom."""
    total = sum(c * ms.value for c, ms in terms)
    denominator = sum((c * ms.value) ** 2 / ms.df for c, ms in terms if ms.df > 0)
    df = total**2 / denominator if denominator > 0 else math.inf
    return total, df


def _two_way(table: np.ndarray) -> tuple[MeanSquare, MeanSquare, MeanSquare]:
    """Mean squares of rows (seeds), columns (prompts) and their interaction in a K x P table."""
    k, p = table.shape
    grand = table.mean()
    rows, columns = table.mean(axis=1), table.mean(axis=0)
    residual = table - rows[:, None] - columns[None, :] + grand
    return (
        MeanSquare(p * float(((rows - grand) ** 2).sum()) / max(k - 1, 1), k - 1),
        MeanSquare(k * float(((columns - grand) ** 2).sum()) / max(p - 1, 1), p - 1),
        MeanSquare(float((residual**2).sum()) / max((k - 1) * (p - 1), 1), (k - 1) * (p - 1)),
    )


def setting_estimate(table: np.ndarray, *, confidence: float = CONFIDENCE) -> Estimate:
    """A setting's mean over seeds x prompts x images (``table``: K seeds x P cells) with its t interval.

    Var(grand mean) = s2_seed/K + s2_prompt/P + s2_cell/(KP) = (MS_seed + MS_prompt - MS_cell)/(KP),
    floored at max(MS_seed, MS_prompt)/(KP), which no variance component can go below.
    """
    table = _complete_columns(np.atleast_2d(np.asarray(table, float)))
    k, p = table.shape
    mean = float(table.mean())
    if k < 2:
        raise ValueError("a setting's interval needs at least 2 training seeds")
    if p == 1:
        terms = [(1.0 / k, MeanSquare(float(table[:, 0].var(ddof=1)), k - 1))]
    else:
        seed_ms, prompt_ms, cell_ms = _two_way(table)
        terms = [(1 / (k * p), seed_ms), (1 / (k * p), prompt_ms), (-1 / (k * p), cell_ms)]
        floor = max(seed_ms.value, prompt_ms.value) / (k * p)
        if sum(c * ms.value for c, ms in terms) < floor:
            terms = [(1 / (k * p), seed_ms if seed_ms.value >= prompt_ms.value else prompt_ms)]
    variance, df = satterthwaite(terms)
    half = _t(confidence, df) * math.sqrt(max(variance, 0.0))
    return Estimate(mean, mean - half, mean + half, int(table.size), this_setting(k))


def _complete_columns(table: np.ndarray) -> np.ndarray:
    """Drop cells (prompts) with a missing value in any seed: the design stays balanced."""
    keep = ~np.isnan(table).any(axis=0)
    return table[:, keep]


def _t(confidence: float, df: float) -> float:
    return (
        float(stats.t.ppf(0.5 + confidence / 2, df))
        if math.isfinite(df)
        else float(stats.norm.ppf(0.5 + confidence / 2))
    )


# --- comparisons of settings


@dataclass(frozen=True)
class Components:
    """The pooled setting x seed mean square of all settings over their common seeds."""

    setting_seed: MeanSquare
    common_seeds: int
    cells: int

    def difference_variance(self, seeds: int) -> tuple[float, float]:
        """Var of a paired difference of two settings' means over ``seeds`` common seeds, and its df.

        Seeds are random, the eval prompts are the ones given (every setting is scored on the same
        prompts and images, so a comparison is about them): 2 (s2_SK / K + s2_SKP / (K P)) =
        2 E[MS_SK] / (K P), so MS_SK alone is its unbiased estimate, on (S-1)(K-1) degrees of freedom.
        (Borrowing the residual's many degrees of freedom whenever MS_SK happens to be small broke the
        5% rate at K = 2: 9.9% in ``tests/test_verdicts.py``'s simulations.)
        """
        return satterthwaite([(2.0 / (seeds * self.cells), self.setting_seed)])

    def seed_sd(self) -> float:
        """The SD of one run's mean between training seeds of one setting (half a paired difference's variance)."""
        variance, _ = self.difference_variance(1)
        return math.sqrt(max(variance, 0.0) / 2)

    def detectable(self, seeds: int, pairs: int = 1, *, alpha: float = ALPHA, power: float = POWER) -> float:
        """The smallest true difference of two settings found with ``power`` at ``seeds`` seeds each,
        at Holm's first step over ``pairs`` comparisons (alpha / pairs), as the verdict tests it."""
        variance, df = self.difference_variance(seeds)
        df = max(df, 1.0)
        return (_t(1 - alpha / pairs, df) + float(stats.t.ppf(power, df))) * math.sqrt(max(variance, 0.0))

    def seeds_needed(self, difference: float, pairs: int = 1, *, limit: int = 100) -> int | None:
        """The fewest seeds per setting that detect ``difference`` (None beyond ``limit``)."""
        for seeds in range(2, limit + 1):
            if self.detectable(seeds, pairs) <= abs(difference):
                return seeds
        return None


def pooled_components(runs: Mapping[object, Mapping[int, np.ndarray]]) -> Components | None:
    """MS_SK of the S x K_c x P table over the seeds every setting has (cell = a prompt's mean).

    ``runs[setting][replicate]`` is one run's cells; replicate r of every setting pairs (the same
    seed, or with an A/A label each copy's own). None when fewer than 2 settings share 2 replicates.
    """
    if len(runs) < 2:
        return None
    common = sorted(set.intersection(*(set(by_seed) for by_seed in runs.values())))
    if len(common) < 2:
        return None
    table = np.stack([np.stack([by_seed[seed] for seed in common]) for by_seed in runs.values()])  # S, K, P
    table = table[:, :, ~np.isnan(table).any(axis=(0, 1))]
    s, k, p = table.shape
    run_means = table.mean(axis=2)  # S x K
    interaction = run_means - run_means.mean(axis=1, keepdims=True) - run_means.mean(axis=0, keepdims=True)
    interaction += run_means.mean()
    setting_seed = MeanSquare(p * float((interaction**2).sum()) / ((s - 1) * (k - 1)), (s - 1) * (k - 1))
    return Components(setting_seed, k, p)


@dataclass(frozen=True)
class Comparison:
    """One setting against another, paired by seed and image."""

    difference: Estimate  # first minus second
    p_value: float  # two-sided, unadjusted
    adjusted_p: float = 1.0  # Holm over every pair of settings
    seeds: int = 0

    @property
    def significant(self) -> bool:
        return self.adjusted_p < ALPHA


def compare(
    first: Mapping[int, np.ndarray], second: Mapping[int, np.ndarray], components: Components
) -> Comparison | None:
    """``first - second`` over their common seeds, with the pooled variance; None below 2 common seeds."""
    common = sorted(set(first) & set(second))
    if len(common) < 2:
        return None
    differences = np.stack([first[s] - second[s] for s in common])
    differences = differences[:, ~np.isnan(differences).any(axis=0)]
    mean = float(differences.mean())
    variance, df = components.difference_variance(len(common))
    se = math.sqrt(max(variance, 0.0))
    if se == 0.0:
        p = 1.0 if mean == 0.0 else 0.0
        return Comparison(
            Estimate(mean, mean, mean, int(differences.size), this_setting(len(common))), p, seeds=len(common)
        )
    t = mean / se
    p = float(2 * (stats.t.sf(abs(t), df) if math.isfinite(df) else stats.norm.sf(abs(t))))
    half = _t(CONFIDENCE, df) * se
    estimate = Estimate(mean, mean - half, mean + half, int(differences.size), this_setting(len(common)))
    return Comparison(estimate, p, seeds=len(common))


def holm(p_values: Mapping[object, float]) -> dict[object, float]:
    """Holm's (1979) step-down adjusted p-values: reject where adjusted < alpha, family-wise error <= alpha."""
    ordered = sorted(p_values.items(), key=lambda item: item[1])
    m, running, adjusted = len(ordered), 0.0, {}
    for rank, (key, p) in enumerate(ordered):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[key] = running
    return adjusted


@dataclass
class Verdict:
    """Every setting against the best: what a sweep may claim about settings."""

    best: object
    best_estimate: Estimate | None  # selection-adjusted (Benjamini & Yekutieli 2005)
    against_best: dict[object, Comparison]  # other setting -> (other - best), Holm over all pairs
    components: Components | None
    any_significant: bool  # any pair of settings, not only pairs with the best


def verdict(
    runs: Mapping[object, Mapping[int, np.ndarray]], maximize: bool = True, *, confidence: float = CONFIDENCE
) -> Verdict | None:
    """Compare settings given as ``runs[setting][seed] = cells``; None when no setting has 2 seeds."""
    if not runs:
        return None
    means = {key: float(np.nanmean(np.stack(list(by_seed.values())))) for key, by_seed in runs.items()}
    best = (max if maximize else min)(means, key=means.__getitem__)
    replicated = {key: by_seed for key, by_seed in runs.items() if len(by_seed) >= 2}
    best_estimate = None
    if best in replicated:
        adjusted_level = 1 - (1 - confidence) / max(len(runs), 1)
        best_estimate = setting_estimate(np.stack(list(runs[best].values())), confidence=adjusted_level)
    components = pooled_components(replicated)
    if components is None:
        return Verdict(best, best_estimate, {}, None, False)
    keys = list(replicated)
    pairs = {}
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            comparison = compare(replicated[a], replicated[b], components)
            if comparison is not None:
                pairs[(a, b)] = comparison
    adjusted = holm({pair: c.p_value for pair, c in pairs.items()})
    pairs = {pair: _with_adjusted(c, adjusted[pair]) for pair, c in pairs.items()}
    against: dict[object, Comparison] = {}
    for (a, b), comparison in pairs.items():
        if a == best:
            against[b] = _negated(comparison)
        elif b == best:
            against[a] = comparison
    return Verdict(best, best_estimate, against, components, any(c.significant for c in pairs.values()))


def _with_adjusted(comparison: Comparison, adjusted_p: float) -> Comparison:
    return Comparison(comparison.difference, comparison.p_value, adjusted_p, comparison.seeds)


def _negated(comparison: Comparison) -> Comparison:
    d = comparison.difference
    flipped = Estimate(-d.mean, -d.high, -d.low, d.n, d.conditions)
    return Comparison(flipped, comparison.p_value, comparison.adjusted_p, comparison.seeds)


def seed_sd_from_groups(groups: Sequence[Sequence[float]]) -> tuple[float, int] | None:
    """The pooled SD of run means within groups of runs that differ only in their training seed
    (e.g. a K = 1 sweep that swept ``train.seed``), and its degrees of freedom; None without such groups."""
    usable = [np.asarray(g, float) for g in groups if len(g) >= 2]
    if not usable:
        return None
    df = sum(len(g) - 1 for g in usable)
    pooled = sum(float(((g - g.mean()) ** 2).sum()) for g in usable) / df
    return math.sqrt(pooled), df


def detectable_from_sd(seed_sd: float, seeds: int, *, alpha: float = ALPHA, power: float = POWER) -> float:
    """Minimum detectable difference of two settings' means at ``seeds`` seeds each, from a run-mean SD."""
    return (float(stats.norm.ppf(1 - alpha / 2)) + float(stats.norm.ppf(power))) * seed_sd * math.sqrt(2 / seeds)
