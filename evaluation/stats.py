"""Uncertainty of the scores: bootstrap intervals of a mean, paired gains, and paired significance.

A run is scored on a few dozen sample images; their mean moves by a point or more with the seed.
Every aggregated metric therefore carries a 95% bootstrap confidence interval over its per-image
values (Efron & Tibshirani 1993, "An Introduction to the Bootstrap"; BCa intervals, DiCiccio & Efron
1996), computed by ``scipy.stats.bootstrap`` with a fixed seed so a rerun prints the same interval.
A gain against the base model is paired: the same prompt and seed give one difference per image, and
the interval is that of the mean difference. Two runs scored on the same prompts and seeds are
compared with the Wilcoxon signed-rank test on their per-image pairs (Wilcoxon 1945).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
RESAMPLES = 2000
SEED = 0  # the bootstrap's own seed: intervals are a function of the values alone
ALPHA = 0.05  # significance level of "significantly different"


@dataclass(frozen=True)
class Estimate:
    """A mean with its confidence interval, over ``n`` per-image values."""

    mean: float
    low: float
    high: float
    n: int

    def excludes(self, value: float = 0.0) -> bool:
        return not (self.low <= value <= self.high)

    def text(self, signed: bool = False, digits: int = 1) -> str:
        """``38.7 (36.9-40.4)``, or signed for gains: ``+1.8 (+0.4 to +3.2)``."""
        if signed:
            return f"{self.mean:+.{digits}f} ({self.low:+.{digits}f} to {self.high:+.{digits}f})"
        return f"{self.mean:.{digits}f} ({self.low:.{digits}f}-{self.high:.{digits}f})"


def mean_interval(values: Sequence[float], *, confidence: float = CONFIDENCE, seed: int = SEED) -> Estimate:
    """The mean of ``values`` and its bootstrap (BCa) interval; a constant sample has a point interval."""
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        raise ValueError("no values to estimate a mean from")
    mean = float(data.mean())
    if data.size == 1 or np.all(data == data[0]):
        return Estimate(mean, mean, mean, int(data.size))
    low, high = _bootstrap(data, confidence, seed, "BCa")
    if not (math.isfinite(low) and math.isfinite(high)):  # BCa degenerates on tiny, near-constant samples
        low, high = _bootstrap(data, confidence, seed, "percentile")
    return Estimate(mean, float(low), float(high), int(data.size))


def paired_gain(values: Sequence[float], baseline: Sequence[float], **kwargs: float) -> Estimate:
    """Mean of ``values[i] - baseline[i]`` (same prompt, same seed) and its bootstrap interval."""
    if len(values) != len(baseline):
        raise ValueError(f"paired values differ in length: {len(values)} vs {len(baseline)}")
    return mean_interval(np.asarray(values, float) - np.asarray(baseline, float), **kwargs)


def paired_p_value(values: Sequence[float], other: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p-value of the paired differences; 1.0 when they are all zero."""
    differences = np.asarray(values, float) - np.asarray(other, float)
    if differences.size == 0 or np.all(differences == 0):
        return 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # small samples: scipy warns about exactness
        result = stats.wilcoxon(differences, zero_method="zsplit")
    p = float(result.pvalue)
    return p if math.isfinite(p) else 1.0


def _bootstrap(data: np.ndarray, confidence: float, seed: int, method: str) -> tuple[float, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DegenerateDataWarning: handled by the caller's fallback
        result = stats.bootstrap(
            (data,),
            np.mean,
            n_resamples=RESAMPLES,
            confidence_level=confidence,
            method=method,
            rng=np.random.default_rng(seed),
        )
    return result.confidence_interval.low, result.confidence_interval.high
