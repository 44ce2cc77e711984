"""Augmentations: flip mirrors, hue jitter changes colour not brightness, crops center or move."""

from __future__ import annotations

import colorsys
import random

import numpy as np
import pytest
import torch
from PIL import Image

from training.data.augment import color_jitter_hue, crop, crop_origin, flip_horizontal, shift_hue, uniform


def gradient_image(width: int = 24, height: int = 16) -> Image.Image:
    """Every pixel different: red grows to the right, green downwards."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    array = np.stack([x, y, np.full_like(x, 60)], axis=2).astype(np.uint8)
    return Image.fromarray(array, "RGB")


def colourful_image() -> Image.Image:
    rng = np.random.default_rng(0)
    hues = rng.uniform(0, 1, (16, 16))
    array = np.array([[colorsys.hsv_to_rgb(h, 0.8, 0.9) for h in row] for row in hues]) * 255
    return Image.fromarray(array.round().astype(np.uint8), "RGB")


def test_flip_mirrors_pixels():
    image = gradient_image()
    flipped = np.asarray(flip_horizontal(image))
    original = np.asarray(image)

    assert flipped.shape == original.shape
    assert np.array_equal(flipped, original[:, ::-1])
    assert not np.array_equal(flipped, original)
    assert np.array_equal(np.asarray(flip_horizontal(flip_horizontal(image))), original)


def mean_hue_and_value(image: Image.Image) -> tuple[np.ndarray, float]:
    hsv = np.asarray(image.convert("HSV")).astype(np.float64)
    return hsv[..., 0], hsv[..., 2].mean()


def test_hue_shift_changes_hue_not_brightness():
    image = colourful_image()
    hue, value = mean_hue_and_value(image)

    shifted = shift_hue(image, 0.25)
    new_hue, new_value = mean_hue_and_value(shifted)

    circular = np.minimum((new_hue - hue) % 256, (hue - new_hue) % 256)
    assert np.median(circular) == pytest.approx(64, abs=2)  # a quarter turn of PIL's 256 hue steps
    assert abs(new_value - value) < 1.5  # value (brightest channel) is kept
    assert not np.array_equal(np.asarray(shifted), np.asarray(image))


def test_hue_jitter_is_bounded_random_and_reproducible():
    image = colourful_image()
    hue, value = mean_hue_and_value(image)

    results = [np.asarray(color_jitter_hue(image, random.Random(seed), max_shift=0.1)) for seed in range(6)]
    assert len({r.tobytes() for r in results}) > 1  # different draws, different tints
    for result in results:
        new_hue, new_value = mean_hue_and_value(Image.fromarray(result))
        circular = np.minimum((new_hue - hue) % 256, (hue - new_hue) % 256)
        assert np.median(circular) <= 0.1 * 256 + 2
        assert abs(new_value - value) < 1.5

    a = color_jitter_hue(image, torch.Generator().manual_seed(3), 0.1)
    b = color_jitter_hue(image, torch.Generator().manual_seed(3), 0.1)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert np.array_equal(np.asarray(color_jitter_hue(image, random.Random(0), 0.0)), np.asarray(image))
    with pytest.raises(ValueError):
        color_jitter_hue(image, random.Random(0), -0.1)


def test_grey_pixels_have_no_hue_to_shift():
    grey = Image.new("RGB", (4, 4), (128, 128, 128))
    assert np.array_equal(np.asarray(shift_hue(grey, 0.3)), np.asarray(grey))


def test_center_crop_is_the_middle_and_never_moves():
    image = gradient_image(24, 16)
    crops = [crop(image, (8, 8), random=False)[0].tobytes() for _ in range(5)]
    assert len(set(crops)) == 1
    window, origin = crop(image, (8, 8))
    assert origin == (4, 8)
    assert np.array_equal(np.asarray(window), np.asarray(image)[4:12, 8:16])


def test_random_crop_differs_across_draws_and_stays_inside():
    image = gradient_image(24, 16)
    generator = torch.Generator().manual_seed(0)
    origins = set()
    for _ in range(30):
        window, (top, left) = crop(image, (8, 8), random=True, generator=generator)
        assert 0 <= top <= 8 and 0 <= left <= 16
        assert np.array_equal(np.asarray(window), np.asarray(image)[top : top + 8, left : left + 8])
        origins.add((top, left))
    assert len(origins) > 5


def test_random_crop_is_reproducible_per_seed_with_either_rng():
    image = gradient_image(24, 16)
    for make in (lambda: torch.Generator().manual_seed(5), lambda: random.Random(5)):
        first, second = make(), make()
        draws = [crop(image, 8, random=True, generator=first)[1] for _ in range(10)]
        assert [crop(image, 8, random=True, generator=second)[1] for _ in range(10)] == draws


def test_crop_origin_top_left_and_too_large():
    assert crop_origin((24, 16), (8, 8), random=False, center=False) == (0, 0)
    with pytest.raises(ValueError):
        crop_origin((24, 16), (32, 8), random=False)


def test_uniform_uses_the_global_torch_rng_when_none_is_given():
    torch.manual_seed(11)
    first = [uniform(None, 0.0, 1.0) for _ in range(3)]
    torch.manual_seed(11)
    assert [uniform(None, 0.0, 1.0) for _ in range(3)] == first
    assert all(0.0 <= value < 1.0 for value in first)


def test_a_third_turn_maps_primaries_onto_each_other():
    primaries = Image.fromarray(np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]]], dtype=np.uint8), "RGB")
    shifted = np.asarray(shift_hue(primaries, 1 / 3))
    assert shifted.tolist() == [[[0, 255, 0], [0, 0, 255], [255, 0, 0]]]
    assert np.array_equal(np.asarray(shift_hue(primaries, 0.0)), np.asarray(primaries))
