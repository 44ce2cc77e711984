"""Timestep ranges, offset noise and Min-SNR weights against their definitions."""

from __future__ import annotations

import pytest
import torch

from training.objective.ddpm import (
    compute_snr,
    min_snr_weights,
    offset_noise,
    sample_timesteps,
    timestep_bounds,
    timestep_problems,
)

T = 1000


@pytest.mark.parametrize(
    ("denoise_range", "timestep_range", "bounds"),
    [
        (None, None, (0, 1000)),
        ([0.7, 1.0], None, (0, 300)),  # the last 30% of denoising: detail
        ([0.0, 0.5], None, (500, 1000)),  # the first half: composition
        ([0.5, 1.0], None, (0, 500)),  # adjacent to [0, 0.5] without overlap
        ([0.0, 1.0], None, (0, 1000)),
        (None, [100, 400], (100, 400)),
        (None, [0, 1000], (0, 1000)),
    ],
)
def test_timestep_bounds(denoise_range, timestep_range, bounds):
    assert timestep_bounds(T, denoise_range, timestep_range) == bounds


def test_denoise_range_scales_with_the_number_of_timesteps():
    assert timestep_bounds(100, denoise_range=[0.7, 1.0]) == (0, 30)


def test_giving_both_ranges_is_an_error():
    with pytest.raises(ValueError, match=r"denoise_range and train\.timestep_range both set"):
        timestep_bounds(T, denoise_range=[0.7, 1.0], timestep_range=[0, 300])


@pytest.mark.parametrize(
    ("denoise_range", "timestep_range", "needle"),
    [
        ([0.5, 0.2], None, "0 <= start < end <= 1"),
        ([0.0, 1.5], None, "0 <= start < end <= 1"),
        ([0.5], None, "needs [start, end]"),
        ([0.5, 0.5004], None, "holds no whole timestep"),
        (None, [0, 1001], "0 <= min < max <= 1000"),
        (None, [300, 300], "0 <= min < max <= 1000"),
        (None, [1, 2, 3], "needs [min, max)"),
    ],
)
def test_bad_ranges_name_the_key(denoise_range, timestep_range, needle):
    problems = timestep_problems(T, denoise_range, timestep_range)
    assert len(problems) == 1 and needle in problems[0]
    with pytest.raises(ValueError, match=r"train\."):
        timestep_bounds(T, denoise_range, timestep_range)


@pytest.mark.parametrize(("low", "high"), [(0, 300), (500, 1000), (7, 9)])
def test_samples_stay_within_bounds_and_cover_them(low, high):
    timesteps = sample_timesteps(20_000, low, high, torch.Generator().manual_seed(0), "cpu")
    assert timesteps.dtype == torch.long and timesteps.shape == (20_000,)
    assert timesteps.min().item() == low and timesteps.max().item() == high - 1


def test_samples_are_reproducible_from_the_generator():
    def draw(seed: int) -> torch.Tensor:
        return sample_timesteps(8, 0, T, torch.Generator().manual_seed(seed), "cpu")

    assert torch.equal(draw(1), draw(1)) and not torch.equal(draw(1), draw(2))


def test_zero_offset_is_plain_gaussian_noise_from_the_same_stream():
    noise = offset_noise((2, 4, 8, 8), 0.0, torch.Generator().manual_seed(3), "cpu")
    assert torch.equal(noise, torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("offset", [0.1, 0.3])
def test_offset_noise_statistics(offset):
    batch, channels, height, width = 2000, 4, 32, 32
    noise = offset_noise((batch, channels, height, width), offset, torch.Generator().manual_seed(0), "cpu")
    # The mean over H, W of each image and channel is offset·z + the mean of H·W unit normals.
    channel_means = noise.mean(dim=(2, 3))
    expected = offset**2 + 1 / (height * width)
    assert channel_means.var().item() == pytest.approx(expected, rel=0.05)
    assert noise.var().item() == pytest.approx(1 + offset**2, rel=0.02)
    # The shift is shared over H and W: within one image and channel the spread stays 1.
    assert noise.var(dim=(2, 3)).mean().item() == pytest.approx(1.0, rel=0.01)


def test_offset_noise_keeps_dtype_and_shape():
    noise = offset_noise((2, 4, 8, 8), 0.1, torch.Generator().manual_seed(0), "cpu", torch.float64)
    assert noise.dtype == torch.float64 and noise.shape == (2, 4, 8, 8)


ALPHAS_CUMPROD = torch.tensor([0.99, 0.9, 0.5, 0.1, 0.01])
# snr = a / (1 - a) = 99, 9, 1, 1/9, 1/99


def test_compute_snr():
    snr = compute_snr(ALPHAS_CUMPROD, torch.tensor([0, 1, 2, 3, 4, 2]))
    assert snr.tolist() == pytest.approx([99, 9, 1, 1 / 9, 1 / 99, 1], rel=1e-5)


@pytest.mark.parametrize(
    ("prediction_type", "expected"),
    [
        ("epsilon", [5 / 99, 5 / 9, 1, 1, 1]),  # min(snr, 5) / snr
        ("v_prediction", [5 / 100, 5 / 10, 1 / 2, (1 / 9) / (10 / 9), (1 / 99) / (100 / 99)]),  # min(snr, 5) / (snr+1)
    ],
)
def test_min_snr_weights_match_the_formula(prediction_type, expected):
    weights = min_snr_weights(torch.arange(5), ALPHAS_CUMPROD, 5.0, prediction_type)
    assert weights.tolist() == pytest.approx(expected, rel=1e-5)


def test_min_snr_weights_are_finite_at_zero_terminal_snr():
    alphas = torch.tensor([0.9, 0.0])
    eps = min_snr_weights(torch.tensor([0, 1]), alphas, 5.0, "epsilon")
    v = min_snr_weights(torch.tensor([0, 1]), alphas, 5.0, "v_prediction")
    assert eps.tolist() == pytest.approx([5 / 9, 1.0]) and v.tolist() == pytest.approx([0.5, 0.0])


def test_min_snr_rejects_bad_input():
    with pytest.raises(ValueError, match="min_snr_gamma"):
        min_snr_weights(torch.arange(5), ALPHAS_CUMPROD, 0.0, "epsilon")
    with pytest.raises(ValueError, match="prediction_type"):
        min_snr_weights(torch.arange(5), ALPHAS_CUMPROD, 5.0, "flow")
