"""Caption transforms: kohya semantics of keep_tokens, shuffle, tag/caption dropout, trigger word."""

from __future__ import annotations

import random

import pytest

from training.text.captions import (
    drop_tags,
    is_caption_dropout_epoch,
    join_tags,
    prepend_trigger,
    shuffle_tags,
    split_tags,
    transform_caption,
    with_trigger,
)

TAGS = [f"tag{i}" for i in range(10)]
CAPTION = ", ".join(TAGS)


def test_split_and_join_tags():
    assert split_tags(" a red circle ,blue,, , sks ") == ["a red circle", "blue", "sks"]
    assert split_tags("") == []
    assert join_tags(["a", "b c"]) == "a, b c"


def test_shuffle_keeps_the_first_keep_tags_in_place_and_moves_the_rest():
    rng = random.Random(0)
    orders = set()
    for _ in range(50):
        shuffled = shuffle_tags(TAGS, rng, keep=3)
        assert shuffled[:3] == TAGS[:3]
        assert sorted(shuffled) == sorted(TAGS)
        orders.add(tuple(shuffled))
    assert len(orders) > 10
    assert [f"tag{i}" for i in range(10)] == TAGS  # input not mutated


def test_drop_tags_never_drops_kept_tags_and_rate_is_close_to_expected():
    rng = random.Random(1)
    trials, rate, keep = 4000, 0.3, 2
    dropped = 0
    for _ in range(trials):
        out = drop_tags(TAGS, rng, rate, keep=keep)
        assert out[:keep] == TAGS[:keep]
        assert out == [t for t in TAGS if t in out]  # order kept
        dropped += len(TAGS) - len(out)
    observed = dropped / (trials * (len(TAGS) - keep))
    assert observed == pytest.approx(rate, abs=0.015)


def test_drop_tags_with_zero_rate_keeps_everything():
    assert drop_tags(TAGS, random.Random(0), 0.0) == TAGS


def test_tag_dropout_through_transform_caption():
    rng = random.Random(2)
    trials, rate = 3000, 0.5
    kept_counts = [0] * len(TAGS)
    for _ in range(trials):
        out = split_tags(transform_caption(CAPTION, rng, 1, tag_rate=rate, keep_tokens=1))
        assert out[0] == "tag0"
        for i, tag in enumerate(TAGS):
            kept_counts[i] += tag in out
    assert kept_counts[0] == trials
    for count in kept_counts[1:]:  # each non-kept tag independently
        assert count / trials == pytest.approx(1 - rate, abs=0.04)


def test_caption_dropout_rate_empties_whole_captions_including_trigger():
    rng = random.Random(3)
    trials, rate = 5000, 0.2
    outputs = [transform_caption(CAPTION, rng, 1, caption_rate=rate, trigger_word="sks") for _ in range(trials)]
    empty = sum(out == "" for out in outputs)
    assert empty / trials == pytest.approx(rate, abs=0.02)
    assert all(out == "" or out.startswith("sks, ") for out in outputs)


def test_caption_rate_one_always_empties_and_zero_never_does():
    rng = random.Random(4)
    assert all(transform_caption(CAPTION, rng, 1, caption_rate=1.0) == "" for _ in range(20))
    assert all(transform_caption(CAPTION, rng, 1, caption_rate=0.0) == CAPTION for _ in range(20))


@pytest.mark.parametrize(("epoch", "empty"), [(1, False), (2, True), (3, False), (4, True), (5, False), (6, True)])
def test_every_n_epochs_empties_epochs_n_2n(epoch, empty):
    out = transform_caption(CAPTION, random.Random(0), epoch, caption_every_n_epochs=2, trigger_word="sks")
    assert (out == "") is empty


def test_every_n_epochs_counts_from_one():
    assert [e for e in range(1, 10) if is_caption_dropout_epoch(e, 3)] == [3, 6, 9]
    assert not any(is_caption_dropout_epoch(e, 0) for e in range(1, 10))


def test_trigger_word_is_prepended_and_kept_by_shuffle_and_dropout():
    rng = random.Random(5)
    for _ in range(200):
        out = split_tags(transform_caption(CAPTION, rng, 1, trigger_word="sks", shuffle_tags=True, tag_rate=0.5))
        assert out[0] == "sks"


def test_trigger_word_counts_in_addition_to_keep_tokens():
    rng = random.Random(6)
    for _ in range(200):
        out = split_tags(
            transform_caption(CAPTION, rng, 1, trigger_word="sks", keep_tokens=2, shuffle_tags=True, tag_rate=0.5)
        )
        assert out[:3] == ["sks", "tag0", "tag1"]


def test_trigger_word_already_in_caption_is_not_duplicated():
    tags, num = prepend_trigger(["photo", "sks", "dog"], "sks")
    assert (tags, num) == (["sks", "photo", "dog"], 1)
    assert transform_caption("sks, dog", random.Random(0), 1, trigger_word="sks") == "sks, dog"
    assert transform_caption("dog", random.Random(0), 1, trigger_word=" sks ") == "sks, dog"
    assert transform_caption("", random.Random(0), 1, trigger_word="sks") == "sks"


def test_no_options_leaves_the_caption_as_written():
    caption = "a flock of 1,000 birds over a lake"
    assert transform_caption(f"  {caption} ", random.Random(0), 1) == caption


def test_shuffle_through_transform_caption_keeps_leading_tags_and_all_tags():
    rng = random.Random(7)
    outputs = set()
    for _ in range(100):
        out = transform_caption(CAPTION, rng, 1, shuffle_tags=True, keep_tokens=4)
        tags = split_tags(out)
        assert tags[:4] == TAGS[:4]
        assert sorted(tags) == sorted(TAGS)
        outputs.add(out)
    assert len(outputs) > 20


def test_same_seed_same_captions():
    options = {"shuffle_tags": True, "tag_rate": 0.3, "caption_rate": 0.1, "keep_tokens": 1}
    first = [transform_caption(CAPTION, rng, 1, **options) for rng in [random.Random(9)] for _ in range(50)]
    second = [transform_caption(CAPTION, rng, 1, **options) for rng in [random.Random(9)] for _ in range(50)]
    assert first == second


@pytest.mark.parametrize(
    "kwargs",
    [
        {"caption_rate": 1.5},
        {"tag_rate": -0.1},
        {"keep_tokens": -1},
        {"caption_every_n_epochs": -2},
    ],
)
def test_out_of_range_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        transform_caption(CAPTION, random.Random(0), 1, **kwargs)


def test_epoch_zero_is_rejected_rather_than_treated_as_a_dropout_epoch():
    with pytest.raises(ValueError, match="epoch"):
        transform_caption(CAPTION, random.Random(0), 0, caption_every_n_epochs=2)


@pytest.mark.parametrize(
    ("prompt", "trigger", "expected"),
    [
        ("a red star", "sks", "sks, a red star"),  # a description gets the trigger, as captions had it
        ("a photo of sks dog", "sks", "a photo of sks dog"),  # written with the trigger: left alone
        ("sks, a red star", "sks", "sks, a red star"),
        ("a red star", None, "a red star"),
        ("a red star", "ohwx man", "ohwx man, a red star"),
    ],
)
def test_eval_prompts_get_the_trigger_word_unless_they_use_it(prompt, trigger, expected):
    assert with_trigger(prompt, trigger) == expected
