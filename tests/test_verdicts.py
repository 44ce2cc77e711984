"""Calibration of a sweep's verdicts (``evaluation.replicates``) and of one run's intervals
(``evaluation.stats``), by simulation: pure numpy, no training.

Run with ``-s`` to see the measured rates; CI logs keep them.
"""

from __future__ import annotations

import functools
import itertools
import math
import time

import numpy as np
import pytest
from scipy import stats

from evaluation.replicates import (
    Components,
    MeanSquare,
    compare,
    holm,
    pooled_components,
    seed_sd_from_groups,
    setting_estimate,
    verdict,
)
from evaluation.stats import ALPHA, mean_interval, this_setting

PROMPTS, IMAGES = 6, 8
SWEEPS = 1000  # simulated sweeps per configuration
LIMIT = ALPHA + 2 * math.sqrt(ALPHA * (1 - ALPHA) / SWEEPS)  # 5% plus two Monte-Carlo standard errors

# Variance structures (SDs of the run effect, the run-by-prompt effect and the per-image noise).
STRUCTURES = {
    "image-noise": {"sd_run": 0.3, "sd_runprompt": 0.5, "sd_img": 4.0},
    "run-effect": {"sd_run": 1.0, "sd_runprompt": 0.2, "sd_img": 1.0},
    "small-run": {"sd_run": 0.1, "sd_runprompt": 0.3, "sd_img": 4.0},
}


def simulate_images(
    rng: np.random.Generator,
    sweeps: int,
    settings: int,
    seeds: int,
    *,
    shift: np.ndarray | None = None,
    sd_run: float,
    sd_runprompt: float,
    sd_img: float,
    sd_prompt: float = 3.0,
    sd_eval: float = 2.0,
    prompts: int = PROMPTS,
    images: int = IMAGES,
) -> np.ndarray:
    """Per-image scores ``[sweep, setting, seed, prompt, image]`` of ``sweeps`` independent sweeps.

    What is planted, per sweep::

        y[s, k, p, i] = shift[s]                      the setting's true effect (0 without ``shift``)
                      + prompt[p]       ~ N(0, sd_prompt)      shared by every run
                      + eval[p, i]      ~ N(0, sd_eval)        shared by every run (the same eval
                                                               seeds: common random numbers)
                      + run[s, k]       ~ N(0, sd_run)         the training seed's effect
                      + runprompt[s, k, p] ~ N(0, sd_runprompt)
                      + noise[s, k, p, i]  ~ N(0, sd_img)      per image of one run

    All effects are independent; settings share nothing but the prompts and eval images, so with
    ``shift=None`` the settings are identical (an A/A sweep) and only seed noise separates them.
    The population mean of setting ``s`` (over prompts, seeds and images) is ``shift[s]``.
    """
    mu = np.zeros(settings) if shift is None else np.asarray(shift, float)
    return (
        mu[None, :, None, None, None]
        + rng.normal(0, sd_prompt, (sweeps, 1, 1, prompts, 1))
        + rng.normal(0, sd_eval, (sweeps, 1, 1, prompts, images))
        + rng.normal(0, sd_run, (sweeps, settings, seeds, 1, 1))
        + rng.normal(0, sd_runprompt, (sweeps, settings, seeds, prompts, 1))
        + rng.normal(0, sd_img, (sweeps, settings, seeds, prompts, images))
    )


def simulate(rng: np.random.Generator, sweeps: int, settings: int, seeds: int, **kwargs: float) -> np.ndarray:
    """Cells ``[sweep, setting, seed, prompt]``: each run's per-prompt mean of its images."""
    return simulate_images(rng, sweeps, settings, seeds, **kwargs).mean(axis=-1)


def as_runs(sweep: np.ndarray) -> dict[int, dict[int, np.ndarray]]:
    """One sweep's cells ``[setting, seed, prompt]`` as ``runs[setting][seed] = cells``."""
    return {s: {k: sweep[s, k] for k in range(sweep.shape[1])} for s in range(sweep.shape[0])}


def seed_sd(sd_run: float, sd_runprompt: float, sd_img: float, prompts: int = PROMPTS, images: int = IMAGES) -> float:
    """The SD of one run's overall mean between training seeds of one setting."""
    return math.sqrt(sd_run**2 + sd_runprompt**2 / prompts + sd_img**2 / (prompts * images))


@functools.cache
def aa_sweeps(structure: str, settings: int, seeds: int) -> np.ndarray:
    """``SWEEPS`` A/A sweeps, the same for every test that asks (seeded by the configuration)."""
    rng = np.random.default_rng([list(STRUCTURES).index(structure), settings, seeds])
    return simulate(rng, SWEEPS, settings, seeds, **STRUCTURES[structure])


@functools.cache
def aa_verdict_rate(structure: str, settings: int, seeds: int) -> float:
    """Share of A/A sweeps where ``verdict`` calls any pair of settings significantly different."""
    return float(np.mean([verdict(as_runs(sweep)).any_significant for sweep in aa_sweeps(structure, settings, seeds)]))


def naive_any_significant(runs: dict[int, dict[int, np.ndarray]]) -> bool:
    """Holm over only the comparisons of each setting with the sample best (what ``verdict`` avoids)."""
    components = pooled_components(runs)
    assert components is not None
    means = {key: float(np.mean(list(by_seed.values()))) for key, by_seed in runs.items()}
    best = max(means, key=means.__getitem__)
    p_values = {key: compare(runs[key], runs[best], components).p_value for key in runs if key != best}
    return any(p < ALPHA for p in holm(p_values).values())


# --- the verdict's family-wise error and power

AA_CONFIGS = [
    ("run-effect", 2, 2),  # racing starts every setting on 2 seeds
    ("run-effect", 3, 2),
    ("image-noise", 4, 3),
    ("image-noise", 4, 5),
    ("image-noise", 8, 3),
    ("image-noise", 8, 5),
    ("run-effect", 4, 3),
    ("run-effect", 4, 5),
    ("run-effect", 8, 3),
    ("run-effect", 8, 5),  # also the sweeps of test_holm_against_sample_best_only_is_not_enough
]


@pytest.mark.slow
def test_aa_family_wise_rate() -> None:
    """A/A sweeps (identical settings): any "significantly different" at most 5% of the time."""
    rates = {}
    for structure, settings, seeds in AA_CONFIGS:
        start = time.perf_counter()
        rates[structure, settings, seeds] = rate = aa_verdict_rate(structure, settings, seeds)
        print(
            f"A/A {structure:11s} S={settings} K={seeds}: family-wise rate {rate:.3f} "
            f"(limit {LIMIT:.3f}, N={SWEEPS}, {time.perf_counter() - start:.1f} s)"
        )
    assert all(rate <= LIMIT for rate in rates.values()), rates


def power(structure: str, settings: int, seeds: int, difference_in_seed_sds: float) -> tuple[float, float]:
    """Share of sweeps that find the shifted setting 0 best and some other setting significantly worse;
    and the mean of ``Components.detectable(seeds)`` in true seed-SDs (its own power-0.8 yardstick)."""
    sd = seed_sd(**STRUCTURES[structure])
    shift = np.zeros(settings)
    shift[0] = difference_in_seed_sds * sd
    rng = np.random.default_rng([99, list(STRUCTURES).index(structure), settings, seeds])
    found, detectable = 0, []
    for sweep in simulate(rng, SWEEPS, settings, seeds, shift=shift, **STRUCTURES[structure]):
        v = verdict(as_runs(sweep))
        found += v.best == 0 and any(c.significant for c in v.against_best.values())
        detectable.append(v.components.detectable(seeds, settings * (settings - 1) // 2) / sd)
    return found / SWEEPS, float(np.mean(detectable))


def test_power_at_two_seed_sds() -> None:
    """A true difference of 2 seed-SDs in one of 4 settings: the issue asks 80% power at K = 5. Holm over
    all 6 pairs puts the first test at alpha/6, and the seed-by-setting mean square has (S-1)(K-1) = 12
    degrees of freedom, so an honest verdict finds it about 72% of the time at K = 5 and 80% at K = 6."""
    at_five = {name: power(name, 4, 5, 2.0) for name in ("small-run", "run-effect")}
    at_six = {name: power(name, 4, 6, 2.0) for name in ("small-run", "run-effect")}
    for name in at_five:
        print(
            f"power {name:10s} S=4 at 2 seed-SDs: K=5 {at_five[name][0]:.3f}, K=6 {at_six[name][0]:.3f} "
            f"(detectable(5) at Holm's first step = {at_five[name][1]:.2f} seed-SDs)"
        )
    assert all(found > 0.65 for found, _ in at_five.values())
    assert all(found >= 0.80 for found, _ in at_six.values())


def test_holm_against_sample_best_only_is_not_enough() -> None:
    """With 8 identical settings, Holm over the 7 comparisons with the sample best misses the
    selection and errs too often; Holm over all 28 pairs (``verdict``) keeps 5%."""
    sweeps = aa_sweeps("run-effect", 8, 5)
    naive = float(np.mean([naive_any_significant(as_runs(sweep)) for sweep in sweeps]))
    rate = aa_verdict_rate("run-effect", 8, 5)
    print(f"A/A run-effect  S=8 K=5: Holm against the sample best only {naive:.3f}, verdict {rate:.3f}")
    assert naive > 0.08
    assert rate <= LIMIT


# --- the pieces


def test_holm_hand_computed() -> None:
    adjusted = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.005})
    # sorted d, a, c, b: 4 * 0.005, 3 * 0.01, 2 * 0.03, max(1 * 0.04, 0.06)
    assert adjusted == pytest.approx({"d": 0.02, "a": 0.03, "c": 0.06, "b": 0.06})
    assert holm({"x": 0.6, "y": 0.7}) == {"x": 1.0, "y": 1.0}  # capped at 1, then monotone
    assert holm({"only": 0.2}) == {"only": 0.2}
    assert holm({}) == {}


@pytest.mark.parametrize("structure", ["image-noise", "run-effect"])
def test_setting_estimate_covers_the_true_mean(structure: str) -> None:
    """The t interval over 3 seeds x 6 prompts covers the setting's population mean about 95% of the time."""
    rng = np.random.default_rng([7, list(STRUCTURES).index(structure)])
    truth = 1.5
    tables = simulate(rng, 500, 1, 3, shift=np.array([truth]), **STRUCTURES[structure])[:, 0]
    estimates = [setting_estimate(table) for table in tables]
    coverage = float(np.mean([e.low <= truth <= e.high for e in estimates]))
    print(f"setting_estimate coverage, {structure}, K=3 P={PROMPTS}: {coverage:.3f}")
    assert estimates[0].conditions == this_setting(3)
    assert 0.90 <= coverage <= 0.99


def test_clustered_interval_is_wider_and_covers_better() -> None:
    """One run's images come from 6 prompts with strong shared effects: the prompt-clustered bootstrap
    is wider than the one that treats images as independent, and covers the population mean more often."""
    rng = np.random.default_rng(11)
    clusters = np.repeat(np.arange(PROMPTS), IMAGES).tolist()
    runs = simulate_images(rng, 200, 1, 1, sd_run=0.0, sd_runprompt=0.0, sd_img=2.0)[:, 0, 0]  # truth 0
    clustered = [mean_interval(images.ravel(), clusters=clusters) for images in runs]
    plain = [mean_interval(images.ravel()) for images in runs]
    widths = np.array([[c.high - c.low, p.high - p.low] for c, p in zip(clustered, plain, strict=True)])
    cover_clustered = float(np.mean([c.low <= 0 <= c.high for c in clustered]))
    cover_plain = float(np.mean([p.low <= 0 <= p.high for p in plain]))
    print(
        f"one run, {PROMPTS} prompts x {IMAGES} images: coverage clustered {cover_clustered:.3f}, "
        f"unclustered {cover_plain:.3f}; mean width {widths[:, 0].mean():.2f} vs {widths[:, 1].mean():.2f}"
    )
    assert np.all(widths[:, 0] > widths[:, 1])
    assert cover_clustered > cover_plain + 0.15
    assert cover_clustered >= 0.90  # the small-sample expansion for 6 prompts


def test_detectable_falls_with_seeds_and_seeds_needed_is_the_first_enough() -> None:
    components = Components(MeanSquare(3.0, 12), common_seeds=5, cells=6)
    # Var = 2 * MS_SK / (K * 6) = 1 / K on 12 df
    factor = stats.t.ppf(0.975, 12) + stats.t.ppf(0.8, 12)
    for seeds in (2, 3, 5, 10):
        assert components.detectable(seeds) == pytest.approx(factor / math.sqrt(seeds))
    # at Holm's first step over 6 pairs the test runs at alpha / 6
    holm_factor = stats.t.ppf(1 - 0.05 / 12, 12) + stats.t.ppf(0.8, 12)
    assert components.detectable(4, 6) == pytest.approx(holm_factor / 2)
    detectable = [components.detectable(k) for k in range(2, 101)]
    assert all(a > b for a, b in itertools.pairwise(detectable))
    for difference in (*np.linspace(detectable[-1] * 0.5, detectable[0] * 1.5, 40), detectable[3]):
        expected = next((k for k in range(2, 101) if components.detectable(k) <= difference), None)
        assert components.seeds_needed(difference) == expected
        assert components.seeds_needed(-difference) == expected
    assert components.seeds_needed(components.detectable(5)) == 5  # exactly detectable counts
    assert components.seeds_needed(components.detectable(5) * 0.999) == 6
    assert components.seeds_needed(components.detectable(100) * 0.999) is None
    assert components.seeds_needed(components.detectable(7, 6), 6) == 7


def test_seed_sd_from_groups_on_hand_data() -> None:
    # groups: mean 2, squares 1 + 1; mean 4, squares 4 + 0 + 4; a lone run adds nothing
    sd, df = seed_sd_from_groups([[1.0, 3.0], [2.0, 4.0, 6.0], [5.0]])
    assert df == 3
    assert sd == pytest.approx(math.sqrt(10 / 3))
    assert seed_sd_from_groups([[5.0], [7.0]]) is None
    assert seed_sd_from_groups([]) is None
