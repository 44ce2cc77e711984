"""Training images: find them on disk (kohya folder layout) and serve them as tensors.

``scan_dataset`` is the startup check: it walks the folder once, fully decodes every image and reads
every caption, and returns what it found plus human-readable problems instead of raising, so config
validation can report every mistake at once before any model is loaded.

``CaptionedImageDataset`` turns the scanned records into ``[-1, 1]`` tensors: each image is resized
to cover its bucket (``training.data.buckets``; the square ``resolution`` when bucketing is off) and
center or random cropped to it, then optionally flipped and hue-jittered (``training.data.augment``).
Caption transforms (shuffle, dropout) live in ``training.text.captions`` because they depend on the
epoch and a seeded RNG, not on the image. Regularisation images join the training records through
``match_reg_records``.
"""

from __future__ import annotations

import bisect
import itertools
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from training.data.augment import DEFAULT_MAX_HUE_SHIFT, color_jitter_hue, crop_origin, flip_horizontal, uniform
from training.data.buckets import Bucket, assign_bucket, fit_scale
from training.data.scan import (
    ImageRecord,
    eight_bit,
)

# --- images -> tensors


def load_rgb(path: Path) -> Image.Image:
    """Decode ``path`` as upright RGB.

    EXIF orientation is applied (phone photos are stored sideways), transparent pixels are
    composited onto white rather than whatever colour happens to sit under the alpha channel, and
    16-bit / float grayscale is scaled to 8 bits (``eight_bit``) instead of clipped to white.
    """
    with Image.open(path) as opened:
        try:
            image = eight_bit(ImageOps.exif_transpose(opened))
        except ValueError as error:
            raise ValueError(f"image '{path}': {error}") from error
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")


SMALL_IMAGE_FRACTION = 4  # warn when the shorter side is below resolution / 4 (>4x upscaling)


def small_images(records: Sequence[ImageRecord], resolution: int) -> list[tuple[Path, tuple[int, int]]]:
    """``(path, (width, height))`` of the images whose shorter side is under a quarter of ``resolution``.

    Training upscales them to the resolution, so a 1x1 or thumbnail-sized file becomes a flat or
    blurred sample; beyond 4x (under 128 px at 512) that clearly loses detail, while a
    256 px image at 512 is still a usual dataset. Sizes come from the file headers.
    """
    found = []
    for path in dict.fromkeys(r.path for r in records):  # a regularisation image may also be a training image
        size = oriented_size(path)
        if min(size) * SMALL_IMAGE_FRACTION < resolution:
            found.append((path, size))
    return found


def resize_short_side(image: Image.Image, size: int) -> Image.Image:
    """Scale so the shorter side is ``size`` (aspect kept; the long side rounds, never below
    ``size``): ``resize_to_cover`` for a square. LANCZOS keeps downscaled detail; it also upscales
    cleanly enough for small images."""
    return resize_to_cover(image, (size, size), size / min(image.size))


def oriented_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` of ``path`` as ``load_rgb`` will return it (EXIF rotation applied), read
    from the header where the format allows, so bucket assignment does not decode every image."""
    with Image.open(path) as image:
        width, height = image.size
        if image.getexif().get(0x0112) in (5, 6, 7, 8):  # EXIF orientations that swap the axes
            return height, width
    return width, height


def covering_size(image_size: tuple[int, int], size: tuple[int, int], scale: float) -> tuple[int, int]:
    """``(width, height)`` that ``resize_to_cover`` gives an image of ``image_size``."""
    return max(size[0], round(image_size[0] * scale)), max(size[1], round(image_size[1] * scale))


def resize_to_cover(image: Image.Image, size: tuple[int, int], scale: float) -> Image.Image:
    """Scale by ``scale``, never below ``size = (width, height)`` on either side (rounding could
    otherwise leave the crop one pixel short). A scale of 1 returns the image untouched."""
    new_size = covering_size(image.size, size, scale)
    if new_size == image.size:
        return image
    return image.resize(new_size, Image.Resampling.LANCZOS)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 ``[3, H, W]`` in ``[-1, 1]``, the range the SD VAE encodes."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


class CaptionedImageDataset(torch.utils.data.Dataset):
    """Crops of the scanned images at their bucket's size; index ``i`` walks each record ``repeats`` times.

    Size: with ``buckets`` (from ``training.data.buckets.generate_buckets``) each image gets the bucket
    nearest its aspect ratio (``no_upscale``: its own size rounded down to ``step``, the list is
    then unused); with ``buckets=None`` every item is the square ``resolution``. The image is
    resized to cover that size, then cropped to it.

    Crop: ``random_crop`` takes a uniformly random window; otherwise ``center_crop`` takes the
    middle, and with both off the top-left window is used. Then ``flip_aug`` mirrors the crop with
    probability 0.5 and ``color_aug`` rotates its hue (``training.data.augment``). All draws use torch's
    global RNG (in the order crop, flip, hue), which the loop seeds and the DataLoader re-seeds
    per worker, so a fixed seed repeats every augmentation.

    Decoded, resized images are kept in a per-process LRU cache of ``cache_size`` records, since
    LoRA datasets are small and repeats re-read each image many times per epoch.

    Items carry ``pixel_values`` (unless ``load_pixels`` is off: every crop's latent is cached and
    nothing is decoded), ``caption``, ``index`` (the record), ``is_reg``, ``flipped``,
    ``bucket`` as ``(width, height)``, and ``original_size`` and ``crop_top_left`` as ``(y, x)``
    pairs, which SDXL's micro-conditioning (``add_time_ids``) needs; after a flip
    ``crop_top_left`` is measured in the flipped image, as kohya does.
    """

    def __init__(
        self,
        records: list[ImageRecord],
        resolution: int,
        random_crop: bool = False,
        center_crop: bool = True,
        *,
        cache_size: int = 64,
        flip_aug: bool = False,
        color_aug: bool = False,
        buckets: list[Bucket] | None = None,
        no_upscale: bool = False,
        step: int = 64,
        max_hue_shift: float = DEFAULT_MAX_HUE_SHIFT,
    ) -> None:
        if resolution <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.records = list(records)
        self.resolution = resolution
        self.random_crop = random_crop
        self.center_crop = center_crop
        self.cache_size = cache_size
        self.flip_aug = flip_aug
        self.color_aug = color_aug
        self.bucketed = buckets is not None
        self.no_upscale = no_upscale and self.bucketed
        self.step = step
        self.max_hue_shift = max_hue_shift
        # ends[k] = number of samples up to and including record k
        self._ends = list(itertools.accumulate(max(0, r.repeats) for r in self.records))
        self._cache: OrderedDict[int, tuple[Image.Image, tuple[int, int]]] = OrderedDict()
        # False once every crop's latent is cached: items then carry no pixels and nothing is decoded
        self.load_pixels = True
        if buckets is None:
            self.record_buckets: list[Bucket] = [(resolution, resolution)] * len(self.records)
        else:
            self.record_buckets = [
                assign_bucket(*oriented_size(r.path), buckets, no_upscale=no_upscale, resolution=resolution, step=step)
                for r in self.records
            ]

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    @property
    def crop_mode(self) -> str:
        """How pixels are derived from a file besides the size: part of the latent cache key."""
        mode = "random" if self.random_crop else "center" if self.center_crop else "top_left"
        return mode + ("+no_upscale" if self.no_upscale else "")

    def record_index(self, index: int) -> int:
        """The record behind sample ``index`` (negative indices count from the end)."""
        length = len(self)
        if index < 0:
            index += length
        if not 0 <= index < length:
            raise IndexError(f"sample index {index} out of range for {length} samples")
        return bisect.bisect_right(self._ends, index)

    def bucket_of(self, index: int) -> Bucket:
        """``(width, height)`` of sample ``index``, without loading it (for the batch sampler)."""
        return self.record_buckets[self.record_index(index)]

    def sample_buckets(self) -> list[Bucket]:
        """``bucket_of(i)`` for every sample, in order: what ``BucketBatchSampler`` takes."""
        return [bucket for bucket, r in zip(self.record_buckets, self.records, strict=True) for _ in range(r.repeats)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        record_idx = self.record_index(index)
        record = self.records[record_idx]
        bucket = self.record_buckets[record_idx]
        if self.load_pixels:
            image, original_size = self._resized(record_idx)
            resized_size = image.size
        else:  # the geometry alone, from the file header: no decoding
            image, (resized_size, original_size) = None, self._geometry(record_idx)
        top, left = crop_origin(resized_size, bucket, random=self.random_crop, center=self.center_crop)
        flipped = self.flip_aug and uniform(None, 0.0, 1.0) < 0.5
        item = {
            "caption": record.caption,
            "index": record_idx,
            "is_reg": record.is_reg,
            "flipped": flipped,
            "bucket": bucket,
            "original_size": original_size,
            # after a flip, measured in the flipped image
            "crop_top_left": (top, resized_size[0] - left - bucket[0] if flipped else left),
        }
        if image is not None:
            item["pixel_values"] = self._crop_pixels(image, top, left, bucket, flipped)
        return item

    def fixed_crop_geometry(self, record_idx: int, flipped: bool) -> tuple[tuple[int, int], tuple[int, int]]:
        """``(original size (h, w), crop top-left)`` of ``fixed_crop``, from the file header alone."""
        resized_size, original_size = self._geometry(record_idx)
        bucket = self.record_buckets[record_idx]
        top, left = crop_origin(resized_size, bucket, random=False, center=self.center_crop)
        return original_size, (top, resized_size[0] - left - bucket[0] if flipped else left)

    def fixed_crop(self, record_idx: int, flipped: bool) -> torch.Tensor:
        """The pixels of record ``record_idx`` as ``__getitem__`` gives them with this flip, drawing
        nothing at random: what the latent cache encodes ahead of training (no random crop, no hue)."""
        if self.random_crop or self.color_aug:
            raise ValueError("a fixed crop needs random_crop and color_aug off")
        image, _ = self._resized(record_idx)
        bucket = self.record_buckets[record_idx]
        top, left = crop_origin(image.size, bucket, random=False, center=self.center_crop)
        return self._crop_pixels(image, top, left, bucket, flipped)

    def _crop_pixels(self, image: Image.Image, top: int, left: int, bucket: Bucket, flipped: bool) -> torch.Tensor:
        crop = image.crop((left, top, left + bucket[0], top + bucket[1]))
        if flipped:
            crop = flip_horizontal(crop)
        if self.color_aug:
            crop = color_jitter_hue(crop, None, self.max_hue_shift)
        return to_tensor(crop)

    def _geometry(self, record_idx: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """``(resized (w, h), original (h, w))`` of a record without decoding it (same as ``_resized``)."""
        width, height = oriented_size(self.records[record_idx].path)
        bucket = self.record_buckets[record_idx]
        scale = fit_scale((width, height), bucket, no_upscale=self.no_upscale, resolution=self.resolution)
        return covering_size((width, height), bucket, scale), (height, width)

    def _resized(self, record_idx: int) -> tuple[Image.Image, tuple[int, int]]:
        cached = self._cache.get(record_idx)
        if cached is not None:
            self._cache.move_to_end(record_idx)
            return cached
        image = load_rgb(self.records[record_idx].path)
        bucket = self.record_buckets[record_idx]
        scale = fit_scale(image.size, bucket, no_upscale=self.no_upscale, resolution=self.resolution)
        entry = (resize_to_cover(image, bucket, scale), (image.height, image.width))
        if self.cache_size > 0:
            self._cache[record_idx] = entry
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return entry


def collate_captioned(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack ``pixel_values`` (when items carry them) into ``[B, 3, H, W]`` (one bucket per batch);
    every other field becomes a list."""
    collated: dict[str, Any] = {}
    if "pixel_values" in batch[0]:
        collated["pixel_values"] = torch.stack([item["pixel_values"] for item in batch])
    for name in batch[0]:
        if name != "pixel_values":
            collated[name] = [item[name] for item in batch]
    return collated
