"""A small CLIP BPE tokenizer whose vocabulary holds given words whole.

The embedded tiny model and tiny CLIP need a tokenizer without a download. A tokenizer trained on
our own words keeps prompts like "a red circle" as one token per word (so a tiny text encoder can
learn them), while the full byte alphabet keeps any other text encodable.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from itertools import pairwise

from tokenizers import pre_tokenizers
from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
MAX_LENGTH = 77  # SD's text context: 75 tokens + BOS + EOS

# The words of the bundled captions and eval prompts, plus common caption vocabulary.
BASE_WORDS = """
a an the of on in at with and or to is this that photo picture image drawing painting render
small medium large big tiny huge red green blue yellow orange purple pink white black gray grey
brown cyan magenta circle square triangle star ring diamond cross hexagon shape shapes object
background plain striped dotted checkered gradient pattern textured left right top bottom center
middle corner one two three several bright dark light colorful simple flat style portrait
landscape person man woman girl boy dog cat tree house sky sea mountain flower car city day night
sks ohwx trigger token concept high quality detailed masterpiece best
""".split()


def build_word_tokenizer(words: Iterable[str] = BASE_WORDS) -> CLIPTokenizer:
    """A CLIP tokenizer in which each of ``words`` (lower-case ASCII) is one ``word</w>`` token."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {BOS: 0, EOS: 1}
    for symbol in alphabet + [c + END_OF_WORD for c in alphabet]:
        vocab.setdefault(symbol, len(vocab))
    merges = learn_whole_word_merges(sorted({w.lower() for w in words}))
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LENGTH)


def learn_whole_word_merges(words: list[str]) -> list[tuple[str, str]]:
    """Classic BPE training run to completion, ties broken by the pair itself (deterministic).

    Encoding a training word with BPE replays the merges it saw in training, so running until no
    pair is left makes every training word a single token.
    """
    segmented = [[*w[:-1], w[-1] + END_OF_WORD] for w in words if w]
    merges: list[tuple[str, str]] = []
    while True:
        pairs = Counter(pair for parts in segmented for pair in pairwise(parts))
        if not pairs:
            return merges
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        segmented = [_merge(parts, best) for parts in segmented]


def _merge(parts: list[str], pair: tuple[str, str]) -> list[str]:
    merged, i = [], 0
    while i < len(parts):
        if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
            merged.append(parts[i] + parts[i + 1])
            i += 2
        else:
            merged.append(parts[i])
            i += 1
    return merged
