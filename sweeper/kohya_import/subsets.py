"""A dataset's subsets -> ``data.train_dir`` / ``data.reg_dir``, or ``data.subsets`` entries.

sd-scripts' dataset config lists image folders as subsets, each with its own ``num_repeats``,
``caption_extension``, ``keep_tokens`` and ``class_tokens``. When one training folder (and at most
one regularisation folder) says nothing our plain folders cannot, it stays a plain folder, so the
experiment runs on other images with one override, ``data.train_dir=...``; a folder named
``<num_repeats>_<name>`` (LoRA_Easy names them so) becomes its parent in kohya's layout. Anything
more becomes one ``data.subsets`` entry per subset. Settings that are one key here for all folders
(``shuffle_caption`` -> ``data.shuffle_tags``, ...) are mapped when every subset agrees, and
reported when they differ.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sweeper.kohya_import.convert import Unfit, as_extension, as_int, as_path, as_str
from sweeper.kohya_import.reading import Collector, Subset
from sweeper.kohya_import.result import Mapped, NotMapped
from sweeper.kohya_import.tables import ALIASES, FOLDER_KEYS, NO_EQUIVALENT, SUBSET_DEFAULTS
from training.data.scan import is_image_file  # PIL and numpy only: the importer stays light

_REPEATS_FOLDER = re.compile(r"^(\d+)_(.+)$")
# where a shared setting goes, for the message when subsets disagree
SHARED_KEYS = {
    "shuffle_caption": "data.shuffle_tags",
    "flip_aug": "data.flip_aug",
    "color_aug": "data.color_aug",
    "random_crop": "data.random_crop",
    "caption_dropout_rate": "dropout.caption_rate",
    "caption_dropout_every_n_epochs": "dropout.caption_every_n_epochs",
    "caption_tag_dropout_rate": "dropout.tag_rate",
}


@dataclass
class SubsetPlan:
    """What the subsets became: ``data.subsets`` entries (empty when they are plain folders)."""

    entries: list[dict[str, Any]] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)  # the subset each entry came from
    inherits_extension: bool = False  # some folder reads captions with data.caption_extension


def plan_subsets(c: Collector) -> SubsetPlan:
    """Turn ``c.subsets`` into options of ``c`` (plain folders) or a ``SubsetPlan`` of entries."""
    subsets = [s for s in c.subsets if _usable(c, s)]
    if not subsets:
        return SubsetPlan()
    for s in subsets:
        if "name" in s.values:
            _nothing(c, f"{s.label}.name", s.values["name"], "LoRA_Easy's label of the subset")
        if "is_reg" in s.values and not s.is_reg:
            _nothing(c, f"{s.label}.is_reg", s.values["is_reg"], "training images")
    _share_settings(c, subsets)
    general_class = c.options.pop("class_tokens", None)
    if general_class is None and _as_plain_folders(c, subsets):
        return SubsetPlan(inherits_extension=not any("caption_extension" in s.values for s in subsets))
    if general_class is not None:
        _nothing(c, general_class.label, general_class.value, "given to each data.subsets entry without its own")
    for name in ("train_data_dir", "reg_data_dir"):
        if name in c.options:
            option = c.options.pop(name)
            c.result.unmapped.append(
                NotMapped(option.label, option.value, "sd-scripts ignores it when a dataset config gives subsets")
            )
    plan = SubsetPlan()
    for s in subsets:
        entry = _entry(c, s, len(plan.entries), general_class.value if general_class else None)
        plan.entries.append(entry)
        plan.labels.append(s.label)
    plan.inherits_extension = any("caption_extension" not in e for e in plan.entries)
    return plan


def _usable(c: Collector, s: Subset) -> bool:
    image_dir = s.values.get("image_dir")
    if isinstance(image_dir, str) and image_dir.strip():
        return True
    c.result.unmapped.append(NotMapped(s.label, "{...}", "a subset without an image_dir: sd-scripts refuses it"))
    return False


def _as_plain_folders(c: Collector, subsets: list[Subset]) -> bool:
    """One training folder and at most one regularisation folder, with nothing a subset entry needs:
    map them to data.train_dir / data.reg_dir and return True."""
    train = [s for s in subsets if not s.is_reg]
    reg = [s for s in subsets if s.is_reg]
    if len(train) > 1 or len(reg) > 1 or any(_text(s.values.get("class_tokens")) for s in subsets):
        return False
    folders = {id(s): _plain_folder(s) for s in subsets}
    if any(folder is None for folder in folders.values()):
        return False
    if train and reg and any(_differs(c, train[0], reg[0], key) for key in ("caption_extension", "keep_tokens")):
        return False
    for s in subsets:
        path, note = folders[id(s)]
        role = "reg_data_dir" if s.is_reg else "train_data_dir"
        c.add(role, f"{s.label}.image_dir", path, note=note, wins="the dataset config wins")
        if "num_repeats" in s.values:
            repeats = s.values["num_repeats"]
            why = "images directly in the folder are used once per epoch" if path == s.values["image_dir"] else note
            _nothing(c, f"{s.label}.num_repeats", repeats, why)
        if "is_reg" in s.values and s.is_reg:
            _nothing(c, f"{s.label}.is_reg", s.values["is_reg"], "regularisation images: data.reg_dir")
        for key in ("caption_extension", "keep_tokens"):
            if key not in s.values:
                continue
            if s.is_reg and train:
                _nothing(c, f"{s.label}.{key}", s.values[key], "the same as the training folder's")
            else:
                c.add(key, f"{s.label}.{key}", s.values[key], wins="a subset's own setting wins")
    return True


def _plain_folder(s: Subset) -> tuple[str, str] | None:
    """``(folder for data.train_dir/reg_dir, note)``, or None when its repeats need a subset entry."""
    image_dir = str(s.values["image_dir"])
    try:
        repeats = as_int(s.values.get("num_repeats", 1))
    except Unfit:
        return None
    if repeats == 1:
        return image_dir, ""
    stripped = image_dir.rstrip("/\\")
    cut = max(stripped.rfind("/"), stripped.rfind("\\"))
    name = stripped[cut + 1 :]
    match = _REPEATS_FOLDER.match(name)
    if cut <= 0 or match is None or int(match.group(1)) != repeats:
        return None
    parent = stripped[:cut]
    note = f"{repeats} repeats recognised from the folder name {name}/: its parent is given, kohya's layout"
    local = Path(parent).expanduser()
    if local.is_dir():
        beside = [p for p in local.iterdir() if p.name != name and not p.name.startswith(".")]
        if any(p.is_dir() or is_image_file(p) for p in beside):
            return None  # the parent holds more than this folder: a subset entry keeps to it
    else:
        note += " (not on this machine to look into: any other folder in it would be trained too)"
    return parent, note


def _differs(c: Collector, a: Subset, b: Subset, key: str) -> bool:
    general = c.options.get(key)
    fallback = general.value if general else None
    values = [s.values.get(key, fallback) for s in (a, b)]
    try:
        if key == "caption_extension":
            values = [None if v is None else as_extension(v) for v in values]
        else:
            values = [None if v is None else as_int(v) for v in values]
    except Unfit:
        return True
    return values[0] != values[1]


def _share_settings(c: Collector, subsets: list[Subset]) -> None:
    """The settings every folder shares here: mapped once when the subsets agree, else reported."""
    keys = list(dict.fromkeys(k for s in subsets for k in s.values if k not in FOLDER_KEYS))
    for key in keys:
        written = [(f"{s.label}.{key}", s.values[key]) for s in subsets if key in s.values]
        name = ALIASES.get(key, key)
        if name in NO_EQUIVALENT:
            for label, value in written:
                if value is False:
                    _nothing(c, label, value, "off: nothing to set")
                else:
                    c.result.unmapped.append(NotMapped(label, value, NO_EQUIVALENT[name]))
            continue
        general = c.options.get(name)
        fallback = general.value if general else SUBSET_DEFAULTS.get(key)
        effective = [s.values.get(key, fallback) for s in subsets]
        if len({json.dumps(v, sort_keys=True) for v in effective}) == 1:
            (first, value), rest = written[0], written[1:]
            c.add(key, first, value, wins="a subset's own setting wins")
            for label, same in rest:
                _nothing(c, label, same, f"the same in every subset: mapped from {first}")
            continue
        shown = ", ".join(f"{s.label}: {json.dumps(v)}" for s, v in zip(subsets, effective, strict=True))
        target = SHARED_KEYS.get(key, "the setting")
        for label, value in written:
            c.result.unmapped.append(
                NotMapped(label, value, f"differs between subsets ({shown}); {target} is one value for all folders")
            )


def _entry(c: Collector, s: Subset, index: int, general_class: Any) -> dict[str, Any]:
    """One data.subsets entry; each field's source is reported as mapped (or why it is not)."""
    target = f"data.subsets[{index}]"
    entry: dict[str, Any] = {"dir": as_path(s.values["image_dir"])}
    c.result.mapped.append(Mapped(f"{s.label}.image_dir", f"{target}.dir", entry["dir"]))
    fields = (
        ("num_repeats", "repeats", as_int),
        ("caption_extension", "caption_extension", as_extension),
        ("keep_tokens", "keep_tokens", as_int),
        ("class_tokens", "class_tokens", as_str),
    )
    for key, ours, convert in fields:
        value = s.values.get(key)
        label = f"{s.label}.{key}"
        if key == "class_tokens" and not _text(value) and _text(general_class):
            value, label = general_class, f"{label} (the dataset's class_tokens)"
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        try:
            entry[ours] = convert(value)
        except Unfit as unfit:
            c.result.unmapped.append(NotMapped(label, value, str(unfit)))
            continue
        note = "the caption of its images without a caption file" if ours == "class_tokens" else ""
        c.result.mapped.append(Mapped(label, f"{target}.{ours}", entry[ours], note))
    if s.is_reg:
        entry["is_reg"] = True
        c.result.mapped.append(Mapped(f"{s.label}.is_reg", f"{target}.is_reg", True, "regularisation images"))
    return entry


def uncaptioned_images(folder: str, caption_extension: str) -> int | None:
    """How many images under ``folder`` (its ``<repeats>_<name>/`` subfolders too) have no caption file;
    None when the folder is not on this machine."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        return None
    images = [
        p for p in root.rglob("*") if is_image_file(p) and not any(s.startswith(".") for s in p.relative_to(root).parts)
    ]
    return sum(not p.with_suffix(caption_extension).is_file() for p in images)


def _nothing(c: Collector, label: str, value: Any, note: str) -> None:
    c.result.order.setdefault(label, len(c.result.order))
    c.result.mapped.append(Mapped(label, "", value, note))


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""
