"""Caption transforms applied each time a caption is used: trigger word, shuffle and dropout.

Every function is pure: the randomness comes from the ``random.Random`` passed in and the epoch
is an argument, so a seeded run repeats exactly and each rule is unit-tested on its own. Semantics
follow kohya sd-scripts (see PARAMETERS.md, "data, captions"):

* tags are the comma-separated parts of a caption;
* ``keep_tokens`` leading tags of the caption stay in place and are never dropped (it counts
  TAGS, not tokenizer tokens);
* ``trigger_word`` is prepended as the first tag and always kept, in addition to the
  ``keep_tokens`` tags of the caption (so ``keep_tokens`` means the same with or without it);
* ``caption_rate`` empties the whole caption, trigger word included (this trains the
  unconditional prediction classifier-free guidance relies on);
* ``caption_every_n_epochs=n`` empties every caption in epochs n, 2n, ... (epochs count from 1).
"""

from __future__ import annotations

import random


def split_tags(caption: str) -> list[str]:
    """Comma-separated tags, stripped, empty ones removed (``"a,, b "`` -> ``["a", "b"]``)."""
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def join_tags(tags: list[str]) -> str:
    """Tags back into one caption, separated by ``", "``."""
    return ", ".join(tags)


def prepend_trigger(tags: list[str], trigger_word: str | None) -> tuple[list[str], int]:
    """Put the trigger word's tags first; returns the tags and how many were prepended.

    A tag equal to the trigger that the caption already has is moved rather than duplicated, so
    datasets captioned kohya-style (trigger already the first tag) train the same.
    """
    trigger_tags = split_tags(trigger_word or "")
    if not trigger_tags:
        return list(tags), 0
    rest = [tag for tag in tags if tag not in trigger_tags]
    return trigger_tags + rest, len(trigger_tags)


def with_trigger(prompt: str, trigger_word: str | None) -> str:
    """An eval prompt as training captions looked: the trigger word first, unless the prompt uses it.

    Prompts written with the trigger (``a photo of sks dog``) are left as they are; prompts that
    only describe the content (``a red star``) get it prepended, as every training caption had it.
    """
    trigger_tags = split_tags(trigger_word or "")
    words = set(prompt.replace(",", " ").split())
    if not trigger_tags or all(word in words for tag in trigger_tags for word in tag.split()):
        return prompt
    return join_tags(prepend_trigger(split_tags(prompt), trigger_word)[0])


def shuffle_tags(tags: list[str], rng: random.Random, keep: int = 0) -> list[str]:
    """A copy of ``tags`` with the first ``keep`` in place and the rest in random order."""
    fixed, flexible = tags[:keep], tags[keep:]
    rng.shuffle(flexible)
    return fixed + flexible


# ``transform_caption``'s keyword ``shuffle_tags`` (named like the config key) shadows the function.
_shuffle_tags = shuffle_tags


def drop_tags(tags: list[str], rng: random.Random, rate: float, keep: int = 0) -> list[str]:
    """A copy of ``tags`` where each tag after the first ``keep`` is dropped with probability ``rate``."""
    if rate <= 0.0:
        return list(tags)
    return tags[:keep] + [tag for tag in tags[keep:] if rng.random() >= rate]


def is_caption_dropout_epoch(epoch: int, every_n_epochs: int) -> bool:
    """Whether ``epoch`` (counting from 1) is one of n, 2n, 3n, ... whose captions are all empty."""
    return every_n_epochs > 0 and epoch % every_n_epochs == 0


def transform_caption(
    caption: str,
    rng: random.Random,
    epoch: int,
    *,
    caption_rate: float = 0.0,
    caption_every_n_epochs: int = 0,
    tag_rate: float = 0.0,
    keep_tokens: int = 0,
    shuffle_tags: bool = False,
    trigger_word: str | None = None,
) -> str:
    """The caption to train on this time (see the module docstring for each option).

    Order: whole-caption dropout (by epoch, then by ``caption_rate``), trigger word, tag dropout,
    shuffle. With no tag-level option active the caption is returned as written (stripped), so
    sentence captions that contain commas ("1,000 birds") are not re-spaced.

    Raises ``ValueError`` for out-of-range arguments: those are caught by config validation, so
    reaching here with one is a programming error.
    """
    _check_arguments(epoch, caption_rate, caption_every_n_epochs, tag_rate, keep_tokens)
    if is_caption_dropout_epoch(epoch, caption_every_n_epochs):
        return ""
    if caption_rate > 0.0 and rng.random() < caption_rate:
        return ""
    if not (shuffle_tags or tag_rate > 0.0 or (trigger_word and trigger_word.strip())):
        return caption.strip()

    tags, num_trigger = prepend_trigger(split_tags(caption), trigger_word)
    keep = num_trigger + keep_tokens
    tags = drop_tags(tags, rng, tag_rate, keep)
    if shuffle_tags:
        tags = _shuffle_tags(tags, rng, keep)
    return join_tags(tags)


def _check_arguments(epoch: int, caption_rate: float, every_n_epochs: int, tag_rate: float, keep_tokens: int) -> None:
    if epoch < 1:
        raise ValueError(f"epoch counts from 1, got {epoch}")
    for name, rate in (("caption_rate", caption_rate), ("tag_rate", tag_rate)):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {rate}")
    if every_n_epochs < 0:
        raise ValueError(f"caption_every_n_epochs must be >= 0, got {every_n_epochs}")
    if keep_tokens < 0:
        raise ValueError(f"keep_tokens must be >= 0, got {keep_tokens}")
