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
import dataclasses
import errno
import itertools
import os
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from training.data.augment import DEFAULT_MAX_HUE_SHIFT, color_jitter_hue, crop_origin, flip_horizontal, uniform
from training.data.buckets import Bucket, assign_bucket, fit_scale

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
ON_BAD_IMAGE_CHOICES = ("error", "skip")
# Files beside an image that are not captions under another extension: latent caches, other pictures.
NOT_CAPTION_EXTENSIONS = (".npz", ".npy", ".safetensors", ".pt", ".gif", ".tif", ".tiff", ".psd", ".avif", ".heic")
SHOWN_FOLDERS = 5  # folders named in a message before "and N more"
WALK_LIMIT = 1000  # folders looked into when searching for images a scan does not read

# kohya's layout: a subfolder "10_shapes" repeats its images 10 times per epoch.
_REPEATS_FOLDER = re.compile(r"^(\d+)_(.+)$")


@dataclass(frozen=True)
class ImageRecord:
    """One training image, its caption (``""`` when it has no caption file) and repeats per epoch.

    ``is_reg`` marks regularisation (class) images, whose loss is weighted by
    ``data.prior_loss_weight``.
    """

    path: Path
    caption: str
    repeats: int
    is_reg: bool = False
    keep_tokens: int | None = None  # its folder's own keep_tokens (a data.subsets entry); None = data.keep_tokens
    caption_file: Path | None = None  # the caption file read, under its folder's own extension (None: none)


@dataclass(frozen=True)
class Uncaptioned:
    """An image without a caption file, for ``data.missing_captions`` to decide about.

    ``class_tokens`` is the ``<name>`` of its ``<repeats>_<name>`` folder (kohya's class tokens,
    ``sks dog`` for ``10_sks dog/``), ``None`` for an image directly in the scanned folder.
    ``other_files`` are same-stem files with another extension: captions saved as ``.caption``
    while ``data.caption_extension`` says ``.txt`` are the usual cause.
    """

    path: Path
    class_tokens: str | None
    other_files: tuple[Path, ...] = ()


@dataclass
class DatasetScan:
    """What ``scan_dataset`` found: usable records, deliberately skipped files, and problems.

    ``problems`` is empty when the folder can be trained on; each entry names the key or file at
    fault and how to fix it.
    """

    records: list[ImageRecord] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (file, reason)
    problems: list[str] = field(default_factory=list)
    uncaptioned: list[Uncaptioned] = field(default_factory=list)  # records whose caption file is missing
    # images of a data.subsets entry without a caption file, captioned with the entry's class_tokens
    by_class_tokens: list[Uncaptioned] = field(default_factory=list)

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
    ``<repeats>_<name>`` are used ``repeats`` times. Subfolders are not searched further (kohya's
    layout; a problem names deeper folders that hold images), and hidden entries
    (``.ipynb_checkpoints``, ``.DS_Store``) are ignored. Order is sorted by name, so two scans of the
    same folder give the same records. ``key`` is the config key named in messages (e.g.
    ``data.reg_dir`` when scanning regularisation images). Images without a caption file get ``""``
    and are listed in ``uncaptioned``; ``training.data.missing_captions`` applies ``data.missing_captions``.
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
    scan.problems += _broken_link_problems(entries, key)
    # (the folder's entries, its repeats, its class tokens): the root itself, then each <repeats>_<name>
    groups: list[tuple[list[Path], int, str | None]] = [(entries, 1, None)]
    hollow: list[tuple[Path, list[tuple[Path, int]]]] = []  # repeats folders whose images sit deeper
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
        contents = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
        scan.problems += _broken_link_problems(contents, key)
        groups.append((contents, repeats, match.group(2)))
        if not any(_is_image_entry(p) for p in contents) and (deeper := image_folders_below(folder)):
            hollow.append((folder, deeper))

    num_found = 0
    for contents, repeats, class_tokens in groups:
        others = _non_image_files_by_stem(contents)
        for image in (p for p in contents if _is_image_entry(p)):
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
            caption_file = image.with_name(image.stem + caption_extension)
            caption = _read_caption(caption_file, scan.problems)
            if caption is None:
                continue
            found = caption_file if caption_file.exists() else None
            scan.records.append(ImageRecord(path=image, caption=caption, repeats=repeats, caption_file=found))
            if not caption_file.exists():
                scan.uncaptioned.append(Uncaptioned(image, class_tokens, tuple(others.get(image.stem, ()))))

    if num_found == 0:
        scan.problems.append(_no_images_problem(root, key))
    elif not scan.records and scan.skipped:
        scan.problems.append(
            f"{key}: all {len(scan.skipped)} images in '{root}' were skipped as unreadable; "
            "replace them with valid images"
        )
    else:
        for folder, deeper in hollow:  # with no images at all, the message above names these folders
            scan.problems.append(
                f"{key}: folder '{folder}' holds no images itself, only in its subfolders "
                f"{_folder_listing(deeper, folder)}, which are not read (a scan reads {key} and its "
                "`<repeats>_<name>` folders, one level deep); move the images up into it, or make each "
                f"subfolder a `<repeats>_<name>` folder directly in {key}"
            )
    return scan


def _no_images_problem(root: Path, key: str) -> str:
    """Why a folder gave no images; when deeper folders hold some, name them (they are not read)."""
    deeper = image_folders_below(root)
    if not deeper:
        return (
            f"{key}: no images found in '{root}' (accepted extensions: {', '.join(IMAGE_EXTENSIONS)}); "
            "put images directly in it or in kohya-style subfolders named <repeats>_<name>, "
            "e.g. 10_mychar/"
        )
    return (
        f"{key}: no images found in '{root}' or in its `<repeats>_<name>` subfolders; sub-subfolders are "
        f"not read, and the images are in {_folder_listing(deeper, root)}. Move them up into a "
        f"`<repeats>_<name>` folder directly in {key} (e.g. 10_mychar/, not 10_mychar/batch1/), "
        "or make each of those folders one"
    )


def image_folders_below(folder: Path, limit: int = WALK_LIMIT) -> list[tuple[Path, int]]:
    """``(folder, image count)`` of every folder strictly below ``folder`` that holds images, sorted.

    What a scan does not read. Hidden folders are skipped and links not followed; the walk stops
    after ``limit`` folders, so a ``data.train_dir`` pointed at a home folder still answers quickly.
    """
    found = []
    for visited, (current, dirs, files) in enumerate(os.walk(folder)):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        count = sum(1 for name in files if is_image_file(Path(name)))
        if count and Path(current) != folder:
            found.append((Path(current), count))
        if visited >= limit:
            break
    return sorted(found)


def _folder_listing(folders: list[tuple[Path, int]], relative_to: Path) -> str:
    """``'10_x/batch1' (5 images), ...``: the first ``SHOWN_FOLDERS``, then how many more."""
    shown = ", ".join(
        f"'{path.relative_to(relative_to)}' ({count} image{'s' if count != 1 else ''})"
        for path, count in folders[:SHOWN_FOLDERS]
    )
    more = len(folders) - SHOWN_FOLDERS
    return shown + (f" and {more} more folder(s)" if more > 0 else "")


def _non_image_files_by_stem(entries: list[Path]) -> dict[str, list[Path]]:
    """Files that could be captions, by stem: a wrong ``data.caption_extension`` shows up here."""
    others: dict[str, list[Path]] = {}
    for path in entries:
        if path.suffix.lower() in IMAGE_EXTENSIONS or path.suffix.lower() in NOT_CAPTION_EXTENSIONS:
            continue
        if path.suffix and path.is_file():
            others.setdefault(path.stem, []).append(path)
    return others


def scan_folders(data: Any, *, reg: bool = False) -> DatasetScan | None:
    """``data.train_dir`` and the training entries of ``data.subsets`` as one scan (``reg``: ``data.reg_dir``
    and the ``is_reg`` entries; ``None`` when there are none).

    A subset folder is scanned like ``train_dir``, with its own caption extension; each image is used
    ``repeats`` times (times a ``<repeats>_<name>/`` subfolder's own) and keeps its folder's
    ``keep_tokens``; an image without a caption file is captioned with the entry's ``class_tokens``
    when it has them (kohya's DreamBooth subsets), else left to ``data.missing_captions``.
    """
    folder = data.reg_dir if reg else data.train_dir
    subsets = [(i, s) for i, s in enumerate(data.subsets) if bool(s.is_reg) == reg]
    if reg and folder is None and not subsets:
        return None
    scans = []
    if folder is not None or not subsets:  # neither given: scan_dataset names the missing key
        key = "data.reg_dir" if reg else "data.train_dir"
        scans.append(scan_dataset(folder, data.caption_extension, data.on_bad_image, key=key))
    scans += [_scan_subset(subset, data, f"data.subsets[{index}]") for index, subset in subsets]
    merged = DatasetScan()
    for scan in scans:
        for name in (f.name for f in dataclasses.fields(DatasetScan)):
            getattr(merged, name).extend(getattr(scan, name))
    return merged


def _scan_subset(subset: Any, data: Any, key: str) -> DatasetScan:
    """One ``data.subsets`` entry: its folder scanned, then its repeats, keep_tokens and class tokens applied."""
    extension = subset.caption_extension or data.caption_extension
    scan = scan_dataset(subset.dir, extension, data.on_bad_image, key=f"{key}.dir")
    if subset.repeats < 1:
        scan.problems.insert(0, f"{key}.repeats must be >= 1 (got {subset.repeats}); remove the entry to leave it out")
    if subset.keep_tokens is not None and subset.keep_tokens < 0:
        scan.problems.insert(0, f"{key}.keep_tokens must be >= 0 (got {subset.keep_tokens}); null = data.keep_tokens")
    class_tokens = (subset.class_tokens or "").strip()
    captioned = {u.path for u in scan.uncaptioned} if class_tokens else set()
    scan.by_class_tokens = [u for u in scan.uncaptioned if u.path in captioned]
    scan.uncaptioned = [u for u in scan.uncaptioned if u.path not in captioned]
    scan.records = [
        dataclasses.replace(
            record,
            repeats=record.repeats * subset.repeats,
            keep_tokens=subset.keep_tokens,
            caption=class_tokens if record.path in captioned else record.caption,
        )
        for record in scan.records
    ]
    return scan


def _is_image_entry(path: Path) -> bool:
    """An image file, or a link named like one that does not resolve (a loop): it is then reported
    as an unreadable image rather than silently left out."""
    return is_image_file(path) and (path.is_file() or (path.is_symlink() and not path.exists()))


def _broken_link_problems(entries: list[Path], key: str) -> list[str]:
    """Links that resolve to nothing and are not named like images (those are unreadable images):
    a looping or dangling link where a folder or caption was meant would otherwise vanish silently."""
    problems = []
    for path in entries:
        if path.is_symlink() and not path.exists() and not is_image_file(path):
            what = "loops back on itself" if _link_loops(path) else f"points to '{os.readlink(path)}', which is missing"
            problems.append(f"{key}: symlink '{path}' {what}; remove it or point it at a real file or folder")
    return problems


def _link_loops(path: Path) -> bool:
    try:
        path.stat()
    except OSError as error:
        return error.errno == errno.ELOOP
    return False


def _unreadable_image_reason(path: Path) -> str | None:
    """``None`` when PIL fully decodes ``path`` and ``load_rgb`` can convert its mode; else why not.
    Opening alone only reads the header, so a truncated file would pass and then crash training
    hours later; ``load()`` decodes it all."""
    if path.is_symlink() and _link_loops(path):
        return "a symlink that loops back on itself"
    try:
        with Image.open(path) as image:
            image.load()
            eight_bit(image)
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


def match_reg_records(reg_records: Sequence[ImageRecord], n_train_samples: int) -> list[ImageRecord]:
    """Regularisation records whose repeats add up to exactly ``n_train_samples``, marked ``is_reg``.

    kohya's DreamBooth rule: prior preservation wants as many class samples per epoch as training
    samples. The records are walked in order, the first pass adding each one's own folder repeats,
    later passes one more use each, until the count is reached; so few regularisation images are
    repeated and many are truncated (the images past the count are left out, the last one used
    may get fewer repeats than its folder says). Records with 0 repeats are ignored.
    """
    candidates = [record for record in reg_records if record.repeats > 0]
    if not candidates or n_train_samples <= 0:
        return []
    counts = [0] * len(candidates)
    total, first_pass = 0, True
    while total < n_train_samples:
        for i, record in enumerate(candidates):
            add = min(record.repeats if first_pass else 1, n_train_samples - total)
            counts[i] += add
            total += add
            if total >= n_train_samples:
                break
        first_pass = False
    return [
        dataclasses.replace(record, repeats=count, is_reg=True)
        for record, count in zip(candidates, counts, strict=True)
        if count > 0
    ]


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


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # "I": 32-bit ints, what 16-bit PNGs were in old Pillow


def eight_bit(image: Image.Image) -> Image.Image:
    """A grayscale image of more than 8 bits as 8-bit ``L``; any other mode unchanged.

    PIL's own conversion clips such pixels to 0..255, so a 16-bit PNG trained as almost all white.
    16-bit and ``I`` pixels are read as 0..65535 (a 16-bit PNG's range) and divided by 257; float
    (``F``) pixels as 0..1 and multiplied by 255. Values outside those ranges have no known scale:
    ``ValueError`` says so, rather than guessing a brightness.
    """
    if image.mode not in (*SIXTEEN_BIT_MODES, "F"):
        return image
    values = np.asarray(image, dtype=np.float64)
    top = 65535.0 if image.mode in SIXTEEN_BIT_MODES else 1.0
    if values.size and not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= top):
        low, high = np.nanmin(values), np.nanmax(values)
        raise ValueError(
            f"mode {image.mode} pixels run from {low:g} to {high:g}, outside 0..{top:g}, so their brightness "
            "scale is unknown; save the image as 8-bit (or 16-bit) RGB or grayscale PNG"
        )
    return Image.fromarray(np.rint(values * (255.0 / top)).astype(np.uint8))  # uint8 2-D: mode L


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
