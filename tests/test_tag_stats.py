"""Tag statistics: counting, the sorted TSV table and kohya's ss_tag_frequency metadata."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.data.scan import ImageRecord
from training.network.metadata import tag_frequency_json
from training.text.tag_stats import tag_frequencies, tag_frequencies_by_folder, tag_table

CAPTIONS = ["sks, red, circle", "sks, Blue , square,", "sks, red, triangle", "", "zebra"]


def test_tags_are_counted_stripped_and_lower_cased():
    assert tag_frequencies(CAPTIONS) == {
        "sks": 3,
        "red": 2,
        "circle": 1,
        "blue": 1,
        "square": 1,
        "triangle": 1,
        "zebra": 1,
    }
    assert tag_frequencies([]) == {}


def test_table_sorted_by_count_then_name():
    lines = tag_table(tag_frequencies(CAPTIONS), sort="count").splitlines()
    assert lines[0] == "tag\tcount"
    assert lines[1:] == [
        "sks\t3",
        "red\t2",
        "blue\t1",
        "circle\t1",
        "square\t1",
        "triangle\t1",
        "zebra\t1",
    ]


def test_table_sorted_alphabetically():
    lines = tag_table({"b": 5, "A": 1, "c": 9}, sort="alpha").splitlines()
    assert lines == ["tag\tcount", "A\t1", "b\t5", "c\t9"]


def test_table_rejects_unknown_sort_and_keeps_columns():
    with pytest.raises(ValueError, match="count, alpha"):
        tag_table({"a": 1}, sort="size")
    assert tag_table({"odd\ttag": 2}).splitlines()[1] == "odd tag\t2"


def test_ss_tag_frequency_is_kohya_json():
    records = [
        ImageRecord(Path("/data/10_dog/a.png"), "sks, dog", 10),
        ImageRecord(Path("/data/10_dog/b.png"), "sks, dog, grass", 10),
        ImageRecord(Path("/data/2_bg/c.png"), "grass", 2),
    ]
    by_folder = tag_frequencies_by_folder(records)
    text = tag_frequency_json(by_folder)

    assert isinstance(text, str)
    assert json.loads(text) == {"10_dog": {"sks": 2, "dog": 2, "grass": 1}, "2_bg": {"grass": 1}}
