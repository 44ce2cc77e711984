"""Tag-frequency statistics of a dataset's captions (``data.tag_stats=count|alpha``).

Tags are the comma-separated parts of a caption, stripped and lower-cased like kohya does (CLIP's
tokenizer lower-cases anyway, so ``Red`` and ``red`` are one tag to the model). Each caption
counts once per tag occurrence, regardless of the image's repeats: the table describes the data,
not the training schedule. ``ss_tag_frequency`` is kohya's LoRA metadata field, which tools such as
the A1111/Forge LoRA browsers read to show which tags a LoRA was trained on.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

from training.data.scan import ImageRecord
from training.text.captions import split_tags

TAG_SORTS = ("count", "alpha")


def tag_frequencies(captions: Iterable[str]) -> dict[str, int]:
    """``{tag: occurrences}`` over ``captions``, in first-seen order."""
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update(tag.lower() for tag in split_tags(caption))
    return dict(counts)


def tag_frequencies_by_folder(records: Iterable[ImageRecord]) -> dict[str, dict[str, int]]:
    """``{folder name: {tag: count}}``, kohya's grouping: ``10_mychar`` for an image in that
    subfolder, the dataset folder's own name for images directly in it."""
    captions: dict[str, list[str]] = {}
    for record in records:
        captions.setdefault(Path(record.path).parent.name, []).append(record.caption)
    return {folder: tag_frequencies(texts) for folder, texts in captions.items()}


def tag_table(freqs: Mapping[str, int], sort: str = "count") -> str:
    """TSV ``tag<TAB>count`` with a header: ``count`` = most frequent first (ties by name),
    ``alpha`` = by name (case-insensitive)."""
    if sort == "count":
        rows = sorted(freqs.items(), key=lambda item: (-item[1], item[0].casefold(), item[0]))
    elif sort == "alpha":
        rows = sorted(freqs.items(), key=lambda item: (item[0].casefold(), item[0]))
    else:
        raise ValueError(f"sort must be one of {', '.join(TAG_SORTS)}, got {sort!r}")
    # A tab or line break inside a tag would shift the columns; it shows as a space instead.
    return "tag\tcount\n" + "".join(f"{' '.join(tag.split())}\t{count}\n" for tag, count in rows)
