"""Image folders on disk read into records (image, caption, repeats, subset options) with every
problem named: what startup validation scans, without loading torch (training/data/dataset.py
turns the records into training batches)."""

from __future__ import annotations

import dataclasses
import errno
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

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
