"""Aspect-ratio buckets: generation, assignment, no_upscale, the batch sampler and the table."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from training.data.bucket_sampler import BucketBatchSampler
from training.data.buckets import (
    assign_bucket,
    auto_step,
    bucket_problems,
    bucket_summary,
    bucket_table,
    fit_scale,
    generate_buckets,
    no_upscale_bucket,
    resolve_bucket_settings,
)

# --- generate_buckets


@pytest.mark.parametrize(
    ("resolution", "min_side", "max_side", "step"),
    [(512, 256, 1024, 64), (1024, 512, 2048, 32), (64, 32, 128, 16), (512, 200, 1000, 64), (768, 320, 768, 64)],
)
def test_bucket_sides_are_multiples_of_step_within_bounds_and_area_capped(resolution, min_side, max_side, step):
    buckets = generate_buckets(resolution, min_side, max_side, step)

    assert buckets
    assert buckets == sorted(set(buckets))  # deduplicated and sorted
    for width, height in buckets:
        assert width % step == 0 and height % step == 0
        assert min_side <= width <= max_side and min_side <= height <= max_side
        assert width * height <= resolution * resolution


def test_each_width_gets_the_largest_height_that_fits():
    buckets = generate_buckets(512, 256, 1024, 64)
    heights_by_width: dict[int, list[int]] = {}
    for width, height in buckets:
        heights_by_width.setdefault(width, []).append(height)
    for width, heights in heights_by_width.items():
        largest = min(1024, (512 * 512 // width) // 64 * 64)
        assert max(heights) == largest, width


def test_sd15_defaults_match_kohya():
    buckets = generate_buckets(512, 256, 1024, 64)
    for expected in [(512, 512), (576, 448), (448, 576), (640, 384), (768, 320), (1024, 256), (256, 1024)]:
        assert expected in buckets
    assert (576, 512) not in buckets  # over the area cap


def test_buckets_are_mirrored_so_portrait_and_landscape_match():
    buckets = set(generate_buckets(512, 128, 1024, 64))
    assert {(h, w) for w, h in buckets} == buckets
    assert (128, 1024) in buckets and (1024, 128) in buckets


def test_no_bucket_fits_is_reported_naming_the_keys():
    assert generate_buckets(512, 600, 1024, 64) == []
    problems = bucket_problems(512, 600, 1024, 64)
    assert len(problems) == 1
    assert "bucket.min_side" in problems[0] and "bucket.resolution" in problems[0]
    assert bucket_problems(512, 256, 1024, 64) == []


def test_config_defaults_are_half_and_twice_the_resolution():
    cfg = SimpleNamespace(resolution=None, min_side=None, max_side=None, step=64)
    assert resolve_bucket_settings(cfg, 512) == (512, 256, 1024, 64)
    cfg = SimpleNamespace(resolution=768, min_side=320, max_side=None, step=32)
    assert resolve_bucket_settings(cfg, 512) == (768, 320, 1536, 32)


@pytest.mark.parametrize(
    ("resolution", "step"),
    [(64, 8), (96, 8), (128, 16), (200, 24), (256, 32), (384, 48), (512, 64), (768, 64), (1024, 64), (2048, 64)],
)
def test_a_null_step_follows_the_resolution_up_to_kohyas_64(resolution, step):
    assert auto_step(resolution) == step
    cfg = SimpleNamespace(resolution=resolution, min_side=None, max_side=None, step=None)
    assert resolve_bucket_settings(cfg, 512)[3] == step
    assert resolve_bucket_settings(SimpleNamespace(**{**vars(cfg), "step": 16}), 512)[3] == 16  # given: kept


# 11 mixed-aspect images at the 64 px toy/tiny resolution (issue 15: all landed in one 64x64 bucket).
MIXED = [(48, 24), (24, 48), (60, 30), (30, 60), (40, 30), (30, 40), (64, 64), (50, 50), (80, 40), (36, 64), (64, 36)]


def test_mixed_aspect_images_at_64_px_get_several_buckets_with_the_default_step():
    def used(step):
        cfg = SimpleNamespace(resolution=None, min_side=None, max_side=None, step=step)
        resolution, low, high, step = resolve_bucket_settings(cfg, 64)
        buckets = generate_buckets(resolution, low, high, step)
        return {assign_bucket(w, h, buckets, resolution=resolution, step=step) for w, h in MIXED}

    assert used(64) == {(64, 64)}  # the old default: every aspect ratio squeezed into one square
    default = used(None)
    assert len(default) >= 5 and {(88, 40), (40, 88), (64, 64)} <= default
    assert all(w * h <= 64 * 64 and w % 8 == 0 and h % 8 == 0 for w, h in default)


def test_the_summary_counts_buckets_in_use_most_used_first():
    summary = bucket_summary([(64, 48), (64, 64), (64, 48), (48, 64), (64, 48)], available=13)
    assert summary == "3 buckets in use (of 13): 64x48 (3 images), 48x64 (1 image), 64x64 (1 image)"
    assert bucket_summary([(64, 64)] * 11) == "1 bucket in use: 64x64 (11 images)"


# --- assign_bucket


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((1000, 1000), (512, 512)),
        ((300, 300), (512, 512)),  # small images are upscaled to the bucket without no_upscale
        ((1600, 900), (640, 384)),  # 16:9 = 1.78: 640/384 = 1.67 beats 704/320 = 2.2
        ((900, 1600), (384, 640)),
        ((4000, 1000), (1024, 256)),
        ((1200, 900), (576, 448)),  # 4:3 = 1.33: 576/448 = 1.29 beats 640/384 = 1.67 and 512/512
    ],
)
def test_assignment_picks_the_nearest_aspect(size, expected):
    buckets = generate_buckets(512, 256, 1024, 64)
    assert assign_bucket(*size, buckets, resolution=512, step=64) == expected


def test_assignment_is_the_true_nearest_aspect_for_many_shapes():
    buckets = generate_buckets(512, 256, 1024, 64)
    for width in range(100, 2000, 37):
        for height in (150, 512, 999, 1800):
            chosen = assign_bucket(width, height, buckets, resolution=512, step=64)
            distance = abs(math.log(chosen[0] / chosen[1]) - math.log(width / height))
            assert all(distance <= abs(math.log(w / h) - math.log(width / height)) + 1e-12 for w, h in buckets)


def test_no_upscale_keeps_small_images_rounded_down_and_ignores_min_max():
    buckets = generate_buckets(512, 256, 1024, 64)
    # 200x150 is below bucket.min_side=256 on both sides: it still keeps (rounded down) its size.
    assert assign_bucket(200, 150, buckets, no_upscale=True, resolution=512, step=64) == (192, 128)
    assert assign_bucket(500, 300, buckets, no_upscale=True, resolution=512, step=64) == (448, 256)
    assert assign_bucket(512, 512, buckets, no_upscale=True, resolution=512, step=64) == (512, 512)
    # Without no_upscale the same image would be upscaled into a listed bucket.
    assert assign_bucket(200, 150, buckets, resolution=512, step=64) == (576, 448)


def test_no_upscale_scales_large_images_down_to_the_area_cap():
    for width, height in [(2000, 1000), (1000, 3000), (1024, 1024), (3000, 2000), (1500, 700)]:
        w, h = assign_bucket(width, height, None, no_upscale=True, resolution=512, step=64)
        assert w % 64 == 0 and h % 64 == 0
        assert w * h <= 512 * 512
        assert w * h >= 0.6 * 512 * 512  # scaled to the cap, not far below it
        assert abs(math.log(w / h) - math.log(width / height)) < 0.25
    # Rounding the width first gives 704x320 (2.2:1); rounding the height first 640x320 (exactly 2:1).
    assert no_upscale_bucket(2000, 1000, 512, 64) == (640, 320)
    # Extreme shapes lose area to the rounding but stay within the cap.
    assert no_upscale_bucket(5000, 600, 512, 64) == (1024, 128)


def test_no_upscale_never_gives_a_zero_side():
    assert no_upscale_bucket(40, 300, 512, 64) == (64, 256)


def test_fit_scale_covers_the_bucket_and_no_upscale_keeps_small_images():
    assert fit_scale((1000, 500), (512, 512)) == pytest.approx(512 / 500)
    assert fit_scale((200, 150), (192, 128), no_upscale=True, resolution=512) == 1.0
    assert fit_scale((200, 150), (192, 128)) == pytest.approx(192 / 200)  # the larger ratio covers both


# --- BucketBatchSampler

SAMPLE_BUCKETS = [(512, 512)] * 7 + [(640, 384)] * 5 + [(384, 640)] * 2 + [(1024, 256)]


def test_batches_never_mix_buckets_and_cover_every_index():
    sampler = BucketBatchSampler(SAMPLE_BUCKETS, 3, generator=torch.Generator().manual_seed(0))
    batches = list(sampler)

    assert len(batches) == len(sampler)
    for batch in batches:
        assert len({SAMPLE_BUCKETS[i] for i in batch}) == 1
        assert 1 <= len(batch) <= 3
    assert sorted(i for batch in batches for i in batch) == list(range(len(SAMPLE_BUCKETS)))


def test_sampler_is_deterministic_per_seed_and_varies_across_epochs_and_seeds():
    def epochs(seed: int) -> list[list[list[int]]]:
        sampler = BucketBatchSampler(SAMPLE_BUCKETS, 2, generator=torch.Generator().manual_seed(seed))
        return [list(sampler) for _ in range(3)]

    assert epochs(7) == epochs(7)
    first = epochs(7)
    assert first[0] != first[1]  # a new shuffle each epoch
    assert epochs(8) != first


def test_drop_last_keeps_buckets_smaller_than_a_batch():
    sampler = BucketBatchSampler(SAMPLE_BUCKETS, 3, generator=torch.Generator().manual_seed(0), drop_last=True)
    sizes = sorted(len(b) for b in sampler)
    # 7 -> 3+3 (1 dropped), 5 -> 3 (2 dropped), 2 -> 2 (too few for one batch: kept), 1 -> 1 (kept)
    assert sizes == [1, 2, 3, 3, 3]
    assert len(sampler) == 5


def test_without_drop_last_every_remainder_is_a_batch():
    sampler = BucketBatchSampler(SAMPLE_BUCKETS, 3, generator=torch.Generator().manual_seed(0))
    assert sorted(len(b) for b in sampler) == [1, 1, 2, 2, 3, 3, 3]


def test_sampler_drives_a_dataloader():
    data = list(range(len(SAMPLE_BUCKETS)))
    sampler = BucketBatchSampler(SAMPLE_BUCKETS, 4, generator=torch.Generator().manual_seed(1))
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler)
    for batch in loader:
        assert len({SAMPLE_BUCKETS[int(i)] for i in batch}) == 1


def test_bad_batch_size_is_refused():
    with pytest.raises(ValueError):
        BucketBatchSampler(SAMPLE_BUCKETS, 0)


# --- bucket table


def test_bucket_table_counts_images_and_samples():
    table = bucket_table([(512, 512), (640, 384), (512, 512)], repeats=[10, 2, 1])
    lines = table.splitlines()
    assert lines[0] == "width\theight\taspect\timages\tsamples"
    assert lines[1:] == ["512\t512\t1.000\t2\t11", "640\t384\t1.667\t1\t2"]
    assert bucket_table([(64, 64)]).splitlines()[1] == "64\t64\t1.000\t1\t1"
