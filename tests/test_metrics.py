"""Per-image metrics against hand computations, and the statistics that give them intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from evaluation.metrics import concept_hits, copy_risk, cosine_matrix, diversity, fidelity
from evaluation.stats import mean_interval, paired_gain

# Unit vectors and simple combinations, so the cosines are known by hand.
E1, E2, E3 = torch.eye(3)


def test_fidelity_is_the_mean_cosine_with_every_training_image():
    samples = torch.stack([E1, E1 + E2])  # cos(e1+e2, e1) = 1/sqrt(2)
    references = torch.stack([E1, E2, E3])
    expected = torch.tensor([(1 + 0 + 0) / 3, (1 / math.sqrt(2) + 1 / math.sqrt(2) + 0) / 3])
    assert torch.allclose(fidelity(samples, references), expected)


def test_fidelity_ignores_embedding_length():
    assert torch.allclose(fidelity(torch.stack([5 * E1]), torch.stack([0.1 * E1])), torch.tensor([1.0]))


def test_copy_risk_is_the_nearest_training_image():
    samples = torch.stack([E1, E2 + E3, -E1])
    references = torch.stack([E1, E2])
    assert torch.allclose(copy_risk(samples, references), torch.tensor([1.0, 1 / math.sqrt(2), 0.0]))


def test_concept_hits_with_planted_labels():
    labels = torch.stack([E1, E2, E3])  # "circle", "square", "star"
    samples = torch.stack([E3, E3 + 0.5 * E1, E1, E2 + 0.1 * E3])
    assert concept_hits(samples, labels, target=2).tolist() == [1.0, 1.0, 0.0, 0.0]


def test_diversity_is_the_mean_distance_within_a_prompt():
    samples = torch.stack([E1, E1, E2, E3, E1])
    groups = ["a", "a", "b", "b", "c"]
    values = diversity(samples, groups)
    assert values[:4].tolist() == [0.0, 0.0, 1.0, 1.0]  # identical pair; orthogonal pair
    assert math.isnan(values[4])  # alone in its prompt
    three = diversity(torch.stack([E1, E2, E1 + E2]), ["p"] * 3)
    assert torch.allclose(three[0], torch.tensor(((1 - 0) + (1 - 1 / math.sqrt(2))) / 2))


def test_cosine_matrix_shape_and_values():
    assert torch.allclose(
        cosine_matrix(torch.stack([E1, E2]), torch.stack([E1, E2, E1 + E2]))[0],
        torch.tensor([1.0, 0.0, 1 / math.sqrt(2)]),
    )


# --- intervals and significance


def test_the_bootstrap_interval_is_seeded_and_contains_the_mean():
    values = np.random.default_rng(3).normal(38.0, 3.0, size=24)
    first, again = mean_interval(values), mean_interval(values)
    assert first == again
    assert first.low < first.mean < first.high and first.n == 24
    assert mean_interval(values, seed=1) != first  # the seed is what makes it repeatable


def test_a_constant_sample_has_a_point_interval():
    assert mean_interval([0.0] * 12).text(signed=True) == "+0.0 (+0.0 to +0.0)"
    assert not mean_interval([0.0] * 12).excludes(0.0)


def test_the_95_percent_interval_covers_the_true_mean_about_95_percent_of_the_time():
    """A small simulation: 200 samples of 24 values from a skewed distribution with known mean 1."""
    rng = np.random.default_rng(0)
    covered = sum(not mean_interval(rng.exponential(1.0, size=24), seed=i).excludes(1.0) for i in range(200))
    assert 0.88 <= covered / 200 <= 0.99, covered


def test_a_paired_gain_uses_per_image_differences():
    base = np.random.default_rng(1).normal(36.0, 4.0, size=12)  # large spread across prompts
    lora = base + 1.0 + np.random.default_rng(2).normal(0, 0.2, size=12)  # a small, consistent gain
    gain = paired_gain(lora, base)
    assert gain.excludes(0.0) and 0.7 < gain.mean < 1.3
    unpaired = mean_interval(lora).low - mean_interval(base).high
    assert unpaired < 0  # without pairing the intervals overlap: pairing is what makes it visible
    assert gain.text(signed=True).startswith("+1.")


def test_paired_values_must_line_up():
    with pytest.raises(ValueError, match="length"):
        paired_gain([1.0, 2.0], [1.0])
