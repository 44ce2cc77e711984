"""Training images: find them on disk (kohya folder layout) and serve them as tensors.

``scan_dataset`` is the startup check: it walks the folder once, fully decodes every image and reads
every caption, and returns what it found plus human-readable problems instead of raising, so config
validation can report every mistake at once before any model is loaded.

``CaptionedImageDataset`` turns the scanned records into square ``[-1, 1]`` tensors (resize the short
side, then center or random crop). Caption transforms (shuffle, dropout) live in
``training.captions`` because they depend on the epoch and a seeded RNG, not on the image.
"""

from __future__ import annotations

import bisect
import itertools
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
ON_BAD_IMAGE_CHOICES = ("error", "skip")

# kohya's layout: a subfolder "10_shapes" repeats its images 10 times per epoch.
_REPEATS_FOLDER = re.compile(r"^(\d+)_(.+)$")


@dataclass(frozen=True)
class ImageRecord:
    """One training image, its caption (``""`` when it has no caption file) and repeats per epoch."""

    path: Path
    caption: str
    repeats: int


@dataclass
class DatasetScan:
    """What ``scan_dataset`` found: usable records, deliberately skipped files, and problems.

    ``problems`` is empty when the folder can be trained on; each entry names the key or file at
    fault and how to fix it.
    """

    records: list[ImageRecord] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (file, reason)
    problems: list[str] = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        """Images seen per epoch: each record counts ``repeats`` times."""
        return sum(r.repeats for r in self.records)


def is_image_file(path: Path) -> bool:
    """Whether ``path`` has one of ``IMAGE_EXTENSIONS`` (case-insensitive: ``.JPG`` counts)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def scan_dataset(
    train_dir: str | Path | None,
    caption_extension: str = ".txt",
    on_bad_image: str = "error",
    key: str = "data.train_dir",
) -> DatasetScan:
    """Find the images and captions of a kohya-layout folder; never raises for user-data problems.

    Images directly in ``train_dir`` are used once per epoch; images in a subfolder named
    ``<repeats>_<name>`` are used ``repeats`` times. Subfolders are not searched further, and hidden
    entries (``.ipynb_checkpoints``, ``.DS_Store``) are ignored. Order is sorted by name, so two scans
    of the same folder give the same records. ``key`` is the config key named in messages (e.g.
    ``data.reg_dir`` when scanning regularisation images).
    """
    scan = DatasetScan()
    if on_bad_image not in ON_BAD_IMAGE_CHOICES:
        scan.problems.append(
            f"data.on_bad_image: {on_bad_image!r} is not one of {', '.join(ON_BAD_IMAGE_CHOICES)}; "
            "set data.on_bad_image=error (stop on unreadable images) or data.on_bad_image=skip"
        )
        on_bad_image = "error"  # keep scanning so every other problem is reported too
    if not caption_extension.startswith(".") or len(caption_extension) < 2:
        scan.problems.append(
            f"data.caption_extension: {caption_extension!r} must start with a dot; "
            f"set e.g. data.caption_extension=.{caption_extension.lstrip('.') or 'txt'}"
        )
        return scan

    if train_dir is None or str(train_dir).strip() == "":
        scan.problems.append(f"{key}: not set; set {key}=/path/to/images")
        return scan
    root = Path(train_dir).expanduser()
    if not root.exists():
        scan.problems.append(f"{key}: folder '{root}' does not exist; set {key}=/path/to/images")
        return scan
    if not root.is_dir():
        scan.problems.append(f"{key}: '{root}' is a file, not a folder; set {key} to the folder that holds the images")
        return scan

    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    groups: list[tuple[list[Path], int]] = [([p for p in entries if p.is_file() and is_image_file(p)], 1)]
    for folder in (p for p in entries if p.is_dir()):
        match = _REPEATS_FOLDER.match(folder.name)
        if match is None:
            scan.problems.append(
                f"{key}: folder '{folder}' does not follow the kohya `<repeats>_<name>` layout, so its "
                f"images would be ignored; rename it e.g. to 1_{folder.name} (used once per epoch)"
            )
            continue
        repeats = int(match.group(1))
        if repeats == 0:
            scan.problems.append(
                f"{key}: folder '{folder}' has 0 repeats, so its images would never be used; "
                f"rename it e.g. to 1_{match.group(2)}, or move it out of {key}"
            )
            continue
        images = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        groups.append(([p for p in images if is_image_file(p)], repeats))

    num_found = 0
    for images, repeats in groups:
        for image in images:
            num_found += 1
            reason = _unreadable_image_reason(image)
            if reason is not None:
                if on_bad_image == "skip":
                    scan.skipped.append((image, reason))
                else:
                    scan.problems.append(
                        f"{key}: image '{image}' cannot be read ({reason}); fix or remove it, "
                        "or set data.on_bad_image=skip to leave unreadable images out"
                    )
                continue
            caption = _read_caption(image.with_name(image.stem + caption_extension), scan.problems)
            if caption is not None:
                scan.records.append(ImageRecord(path=image, caption=caption, repeats=repeats))

    if num_found == 0:
        scan.problems.append(
            f"{key}: no images found in '{root}' (accepted extensions: {', '.join(IMAGE_EXTENSIONS)}); "
            "put images directly in it or in kohya-style subfolders named <repeats>_<name>, "
            "e.g. 10_mychar/"
        )
    elif not scan.records and scan.skipped:
        scan.problems.append(
            f"{key}: all {len(scan.skipped)} images in '{root}' were skipped as unreadable; "
            "replace them with valid images"
        )
    return scan


def _unreadable_image_reason(path: Path) -> str | None:
    """``None`` when PIL fully decodes ``path``; else why not. Opening alone only reads the header,
    so a truncated file would pass and then crash training hours later; ``load()`` decodes it all."""
    try:
        with Image.open(path) as image:
            image.load()
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return f"{type(error).__name__}: {error}"
    return None


def _read_caption(path: Path, problems: list[str]) -> str | None:
    """The stripped caption, ``""`` when there is no caption file, ``None`` (and a problem) when
    it cannot be read. ``utf-8-sig`` accepts the byte-order mark Windows editors add."""
    if not path.exists():
        return ""
    try:
        return path.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError as error:
        problems.append(f"caption file '{path}' is not valid UTF-8 (byte {error.start}); re-save it as UTF-8")
    except OSError as error:
        problems.append(f"caption file '{path}' cannot be read ({error}); fix its permissions or remove it")
    return None


# --- images -> tensors


def load_rgb(path: Path) -> Image.Image:
    """Decode ``path`` as upright RGB.

    EXIF orientation is applied (phone photos are stored sideways), and transparent pixels are
    composited onto white rather than whatever colour happens to sit under the alpha channel.
    """
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened)
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")


def resize_short_side(image: Image.Image, size: int) -> Image.Image:
    """Scale so the shorter side is ``size`` (aspect kept; the long side rounds, never below
    ``size``). LANCZOS keeps downscaled detail; it also upscales cleanly enough for small images."""
    width, height = image.size
    if min(width, height) == size:
        return image
    scale = size / min(width, height)
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    return image.resize(new_size, Image.Resampling.LANCZOS)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 ``[3, H, W]`` in ``[-1, 1]``, the range the SD VAE encodes."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


class CaptionedImageDataset(torch.utils.data.Dataset):
    """Square crops of the scanned images; index ``i`` walks each record ``repeats`` times.

    Crop: ``random_crop`` takes a uniformly random window (``torch.randint`` on the global RNG,
    which the DataLoader seeds per worker); otherwise ``center_crop`` takes the middle, and with
    both off the top-left window is used. Decoded, resized images are kept in a per-process LRU
    cache of ``cache_size`` records, since LoRA datasets are small and repeats re-read each image
    many times per epoch.

    Items also carry ``original_size`` and ``crop_top_left`` as ``(y, x)`` pairs, which SDXL's
    micro-conditioning (``add_time_ids``) needs.
    """

    def __init__(
        self,
        records: list[ImageRecord],
        resolution: int,
        random_crop: bool = False,
        center_crop: bool = True,
        *,
        cache_size: int = 64,
    ) -> None:
        if resolution <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.records = list(records)
        self.resolution = resolution
        self.random_crop = random_crop
        self.center_crop = center_crop
        self.cache_size = cache_size
        # ends[k] = number of samples up to and including record k
        self._ends = list(itertools.accumulate(max(0, r.repeats) for r in self.records))
        self._cache: OrderedDict[int, tuple[Image.Image, tuple[int, int]]] = OrderedDict()

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def record_index(self, index: int) -> int:
        """The record behind sample ``index`` (negative indices count from the end)."""
        length = len(self)
        if index < 0:
            index += length
        if not 0 <= index < length:
            raise IndexError(f"sample index {index} out of range for {length} samples")
        return bisect.bisect_right(self._ends, index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record_idx = self.record_index(index)
        record = self.records[record_idx]
        image, original_size = self._resized(record_idx)
        top, left = self._crop_origin(image.size)
        size = self.resolution
        crop = image.crop((left, top, left + size, top + size))
        return {
            "pixel_values": to_tensor(crop),
            "caption": record.caption,
            "index": record_idx,
            "original_size": original_size,
            "crop_top_left": (top, left),
        }

    def _resized(self, record_idx: int) -> tuple[Image.Image, tuple[int, int]]:
        cached = self._cache.get(record_idx)
        if cached is not None:
            self._cache.move_to_end(record_idx)
            return cached
        image = load_rgb(self.records[record_idx].path)
        entry = (resize_short_side(image, self.resolution), (image.height, image.width))
        if self.cache_size > 0:
            self._cache[record_idx] = entry
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return entry

    def _crop_origin(self, image_size: tuple[int, int]) -> tuple[int, int]:
        width, height = image_size
        slack_y, slack_x = height - self.resolution, width - self.resolution
        if self.random_crop:
            return (
                int(torch.randint(0, slack_y + 1, (1,)).item()),
                int(torch.randint(0, slack_x + 1, (1,)).item()),
            )
        if self.center_crop:
            return slack_y // 2, slack_x // 2
        return 0, 0


def collate_captioned(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack ``pixel_values`` into ``[B, 3, R, R]``; every other field becomes a list."""
    collated: dict[str, Any] = {"pixel_values": torch.stack([item["pixel_values"] for item in batch])}
    for name in batch[0]:
        if name != "pixel_values":
            collated[name] = [item[name] for item in batch]
    return collated
