"""``data.missing_captions``: what happens to images that have no caption file.

An image without a caption file would train on an empty caption, which is rarely what was meant:
captions saved as ``.caption`` while ``data.caption_extension`` says ``.txt``, or a few files
forgotten. kohya sd-scripts captions such images with their folder's class tokens (the ``<name>``
of ``<repeats>_<name>``, ``sks dog`` for ``10_sks dog/``) and warns. Here the choice is explicit:

* ``error`` (the default): a startup problem naming the files, and any same-stem files with another
  extension beside them (the likely captions);
* ``warn``: train them on an empty caption, printed and logged;
* ``class_tokens``: caption them with their folder's class tokens, as kohya does, printed and logged.

Every function is pure: it takes a ``DatasetScan`` and returns a new one, or text to show.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence

from training.data.scan import DatasetScan, Uncaptioned

MISSING_CAPTION_CHOICES = ("error", "warn", "class_tokens")
SHOWN_FILES = 5  # files named in a message; the run's data/missing_captions.tsv lists all


def apply_missing_captions(scan: DatasetScan, policy: str, caption_extension: str, key: str) -> DatasetScan:
    """``scan`` with ``policy`` applied: a problem (``error``), captions left empty (``warn``), or
    each uncaptioned image captioned with its folder's class tokens (``class_tokens``; an image
    directly in ``key``'s folder has none, which is a problem)."""
    if policy not in MISSING_CAPTION_CHOICES:
        raise ValueError(f"missing-caption policy {policy!r} is not one of {', '.join(MISSING_CAPTION_CHOICES)}")
    if not scan.uncaptioned:
        return scan
    problems = list(scan.problems)
    records = scan.records
    if policy == "error":
        problems.append(
            f"{describe_missing(scan, caption_extension, key)}; they would train on an empty caption."
            f"{other_extensions_hint(scan)} Add the caption files, or set data.missing_captions=class_tokens "
            "(caption each with its folder's name, as kohya does: `sks dog` for 10_sks dog/) or "
            "data.missing_captions=warn (train them uncaptioned)"
        )
    elif policy == "class_tokens":
        rootless = [u for u in scan.uncaptioned if u.class_tokens is None]
        if rootless:
            problems.append(
                f"{key}: {len(rootless)} image(s) without a caption file lie directly in the folder, so they have "
                f"no `<repeats>_<name>` folder to take class tokens from ({_file_list(rootless)}); add caption "
                "files or move them into a folder such as 1_<class tokens>/"
            )
        tokens = {u.path: u.class_tokens for u in scan.uncaptioned if u.class_tokens is not None}
        records = [dataclasses.replace(r, caption=tokens[r.path]) if r.path in tokens else r for r in records]
    return dataclasses.replace(scan, records=records, problems=problems)


def describe_missing(scan: DatasetScan, caption_extension: str, key: str) -> str:
    """How many images lack a caption file, and the first few."""
    return (
        f"{key}: {len(scan.uncaptioned)} of {len(scan.records)} images have no {caption_extension} caption file "
        f"(data.caption_extension): {_file_list(scan.uncaptioned)}"
    )


def other_extensions_hint(scan: DatasetScan) -> str:
    """`` Beside them are files with another extension ...`` (with a leading space), or ``""``."""
    missing = scan.uncaptioned
    others = Counter(path.suffix for u in missing for path in u.other_files)
    if not others:
        return ""
    extension = others.most_common(1)[0][0]
    example = next(path for u in missing for path in u.other_files if path.suffix == extension)
    listed = ", ".join(f"{ext} ({n})" for ext, n in sorted(others.items()))
    return (
        f" Beside them are files with another extension: {listed}, e.g. '{example}'; if those are the "
        f"captions, set data.caption_extension={extension}."
    )


def missing_captions_warning(scan: DatasetScan, policy: str, caption_extension: str, key: str) -> str | None:
    """The startup warning of ``warn`` and ``class_tokens`` (``None`` when every image has a caption)."""
    if not scan.uncaptioned or policy == "error":
        return None
    used = "train on an empty caption" if policy == "warn" else "are captioned with their folder's class tokens"
    described = describe_missing(scan, caption_extension, key)
    return f"warning: {described}; they {used} (data.missing_captions={policy}).{other_extensions_hint(scan)}"


def missing_captions_table(scans: Sequence[DatasetScan]) -> str:
    """TSV ``image, caption``: every image without a caption file and the caption it trains on (a
    subset's class_tokens included)."""
    rows = ["image\tcaption"]
    for scan in scans:
        captions = {r.path: r.caption for r in scan.records}
        rows += [f"{u.path}\t{captions.get(u.path, '')}" for u in [*scan.uncaptioned, *scan.by_class_tokens]]
    return "\n".join(rows) + "\n"


def class_tokens_notice(scan: DatasetScan) -> str | None:
    """The startup line for images a ``data.subsets`` entry captions with its ``class_tokens`` (as sd-scripts does)."""
    if not scan.by_class_tokens:
        return None
    captions = {r.path: r.caption for r in scan.records}
    used = sorted({captions.get(u.path, "") for u in scan.by_class_tokens})
    listed = ", ".join(f"'{c}'" for c in used)
    return (
        f"{len(scan.by_class_tokens)} image(s) of data.subsets have no caption file and train on their subset's "
        f"class_tokens ({listed}): {_file_list(scan.by_class_tokens)}"
    )


def _file_list(uncaptioned: list[Uncaptioned]) -> str:
    shown = ", ".join(f"'{u.path}'" for u in uncaptioned[:SHOWN_FILES])
    more = len(uncaptioned) - SHOWN_FILES
    return shown + (f" and {more} more" if more > 0 else "")
