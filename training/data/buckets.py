"""Aspect-ratio bucketing: train on images near their own shape instead of square crops.

Aspect-ratio bucketing is NovelAI's (NovelAI 2022, "NovelAI Improvements on Stable Diffusion",
https://blog.novelai.net/novelai-improvements-on-stable-diffusion-e10d38db82ac): a set of
resolutions ("buckets") with about the same pixel area, each image resized to the bucket whose
aspect ratio is nearest its own and then cropped, and every batch drawn from a single bucket so
its tensors stack. A square crop of a portrait cuts off heads and feet; a bucket keeps them.

The functions follow kohya sd-scripts (PARAMETERS.md, "data, captions, buckets, augmentation"):

* ``generate_buckets``: sides are multiples of ``step`` in ``[min_side, max_side]``, area at most
  ``resolution**2``; for each width the largest height that fits, and its mirror;
* ``assign_bucket``: nearest aspect ratio; with ``no_upscale`` no list is used at all: a small
  image keeps its size (rounded down to ``step``), a large one is scaled down to the area cap;
* ``BucketBatchSampler``: shuffled batches that never mix buckets.

Everything here is a pure function of its arguments (the sampler's randomness comes from the
``torch.Generator`` it is given), so each rule has its own table-driven test.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

Bucket = tuple[int, int]  # (width, height) in pixels
MAX_AUTO_STEP = 64  # kohya's bucket_reso_steps, used at 512-1024 px


def _floor_to(value: float, step: int) -> int:
    """``value`` rounded down to a multiple of ``step`` (the integer part first, like kohya)."""
    whole = int(value)
    return whole - whole % step


def auto_step(resolution: int) -> int:
    """``bucket.step=null``: kohya's 64 from 512 px up, an eighth of the resolution below it.

    A fixed 64 leaves a 64 px model a single bucket (every side between 32 and 128 that is a
    multiple of 64 is 64 itself), so mixed aspect ratios all land in 64x64. An eighth of the
    resolution, rounded down to a multiple of 8 (at least 8), keeps kohya's ratio: 512 / 64 = 8.
    """
    return min(MAX_AUTO_STEP, max(8, resolution // 8 // 8 * 8))


def resolve_bucket_settings(bucket_cfg: Any, native_resolution: int) -> tuple[int, int, int, int]:
    """``(resolution, min_side, max_side, step)`` with the config's ``None`` defaults filled in.

    ``bucket.resolution=None`` means the model's native resolution; ``min_side``/``max_side``
    default to half and twice the resolution (kohya's 256/1024 for SD1.5's 512); ``step`` to
    ``auto_step(resolution)``.
    """
    resolution = bucket_cfg.resolution or native_resolution
    min_side = bucket_cfg.min_side if bucket_cfg.min_side is not None else resolution // 2
    max_side = bucket_cfg.max_side if bucket_cfg.max_side is not None else resolution * 2
    step = bucket_cfg.step if bucket_cfg.step is not None else auto_step(resolution)
    return resolution, min_side, max_side, step


def generate_buckets(resolution: int, min_side: int, max_side: int, step: int) -> list[Bucket]:
    """Every ``(width, height)`` bucket, sorted; empty when the bounds leave no room.

    For each width (a multiple of ``step`` in ``[min_side, max_side]``) the bucket takes the
    largest height that is a multiple of ``step``, at most ``max_side`` and keeps the area within
    ``resolution**2``; a height below ``min_side`` means that width has no bucket. Each bucket's
    mirror ``(height, width)`` is added as kohya does, so portrait and landscape images get the
    same choice of shapes even where ``max_side`` clips the heights of narrow widths.
    """
    if resolution <= 0 or step <= 0:
        raise ValueError(f"resolution and step must be positive, got resolution={resolution}, step={step}")
    max_area = resolution * resolution
    top = _floor_to(max_side, step)
    buckets: set[Bucket] = set()
    width = -(-min_side // step) * step  # the first multiple of step >= min_side
    width = max(width, step)
    while width <= top:
        height = min(top, _floor_to(max_area / width, step))
        if height >= min_side and height > 0:
            buckets.add((width, height))
            buckets.add((height, width))
        width += step
    return sorted(buckets)


def bucket_problems(resolution: int, min_side: int, max_side: int, step: int) -> list[str]:
    """Why no bucket can be built from these settings (``[]`` when at least one can)."""
    if resolution <= 0 or step <= 0 or min_side > max_side:
        return []  # reported by config validation with their own messages
    if generate_buckets(resolution, min_side, max_side, step):
        return []
    return [
        f"bucket.min_side={min_side}, bucket.max_side={max_side}, bucket.step={step} and "
        f"bucket.resolution={resolution} leave no bucket: no multiple of {step} in [{min_side}, {max_side}] "
        f"pairs with another into an area <= {resolution}²; lower bucket.min_side or raise bucket.resolution"
    ]


def _log_aspect(width: float, height: float) -> float:
    # In log space 2:1 and 1:2 are equally far from 1:1, so portraits and landscapes match alike.
    return math.log(width / height)


def no_upscale_bucket(width: int, height: int, resolution: int, step: int) -> Bucket:
    """kohya's ``bucket_no_upscale``: the image's own size, never larger, sides multiples of ``step``.

    An image within the area cap keeps its size rounded DOWN to ``step`` (``min_side``/``max_side``
    do not apply: the point is to never upscale). A larger one is scaled to the area cap with its
    aspect kept, trying both "fix the width" and "fix the height" roundings and taking the one
    whose aspect is nearer the image's. A side below ``step`` becomes ``step``: a zero-sized
    bucket cannot be trained on, and such thumbnails are the only case that upscales.
    """
    max_area = resolution * resolution
    if width * height <= max_area:
        return max(step, _floor_to(width, step)), max(step, _floor_to(height, step))
    aspect = width / height
    # Both candidates stay within the cap: w <= sqrt(A*aspect) and h <= w / aspect.
    fit_width = _floor_to(math.sqrt(max_area * aspect), step)
    by_width = (fit_width, _floor_to(fit_width / aspect, step))
    fit_height = _floor_to(math.sqrt(max_area / aspect), step)
    by_height = (_floor_to(fit_height * aspect, step), fit_height)
    candidates = [(max(step, w), max(step, h)) for w, h in (by_width, by_height)]
    return min(candidates, key=lambda b: (abs(_log_aspect(*b) - math.log(aspect)), -b[0] * b[1]))


def assign_bucket(
    width: int,
    height: int,
    buckets: Sequence[Bucket] | None,
    *,
    no_upscale: bool = False,
    resolution: int,
    step: int,
) -> Bucket:
    """The bucket an image of ``width x height`` pixels is trained at.

    Normally the bucket of ``buckets`` whose aspect ratio is nearest the image's (compared as
    log-ratios; ties go to the larger area, then the first listed). With ``no_upscale`` the list
    is ignored and ``no_upscale_bucket`` gives the image its own bucket (kohya does the same).
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if no_upscale:
        return no_upscale_bucket(width, height, resolution, step)
    if not buckets:
        raise ValueError("no buckets to choose from; see bucket_problems() for why none were generated")
    target = _log_aspect(width, height)
    return min(buckets, key=lambda b: (abs(_log_aspect(*b) - target), -b[0] * b[1]))


def fit_scale(image_size: tuple[int, int], bucket: Bucket, *, no_upscale: bool = False, resolution: int = 0) -> float:
    """The factor an image is resized by before it is cropped to ``bucket``.

    The smallest scale that covers the bucket (so the crop never needs padding). With
    ``no_upscale`` an image already within the area cap is not resized at all, only cropped to
    its rounded-down size, like kohya.
    """
    width, height = image_size
    if no_upscale and width * height <= resolution * resolution:
        return 1.0
    return max(bucket[0] / width, bucket[1] / height)


def bucket_table(image_buckets: Sequence[Bucket], repeats: Sequence[int] | None = None) -> str:
    """TSV of how many images (and samples per epoch) each bucket holds, for a run artifact.

    Columns: ``width, height, aspect, images, samples``; one row per used bucket, sorted by
    size. ``repeats[i]`` is how often image ``i`` is used per epoch (1 when not given).
    """
    if repeats is not None and len(repeats) != len(image_buckets):
        raise ValueError(f"{len(image_buckets)} buckets but {len(repeats)} repeat counts")
    images = Counter(image_buckets)
    samples: Counter[Bucket] = Counter()
    for bucket, count in zip(image_buckets, repeats or [1] * len(image_buckets), strict=True):
        samples[bucket] += count
    lines = ["width\theight\taspect\timages\tsamples"]
    for width, height in sorted(images):
        bucket = (width, height)
        lines.append(f"{width}\t{height}\t{width / height:.3f}\t{images[bucket]}\t{samples[bucket]}")
    return "\n".join(lines) + "\n"


def bucket_summary(image_buckets: Sequence[Bucket], available: int | None = None) -> str:
    """One line for the startup output: ``3 buckets in use (of 13): 64x48 (3 images), ...``.

    Most-used buckets first, so a run whose images all fell into one bucket shows it at a glance.
    """
    images = Counter(image_buckets)
    of = f" (of {available})" if available is not None else ""
    listed = ", ".join(
        f"{w}x{h} ({n} image{'s' if n != 1 else ''})"
        for (w, h), n in sorted(images.items(), key=lambda item: (-item[1], item[0]))
    )
    return f"{len(images)} bucket{'s' if len(images) != 1 else ''} in use{of}: {listed}"
