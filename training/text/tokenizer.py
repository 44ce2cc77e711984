"""A small CLIP BPE tokenizer whose vocabulary holds given words whole.

The embedded tiny model and tiny CLIP need a tokenizer without a download. A tokenizer trained on
our own words keeps prompts like "a red circle" as one token per word (so a tiny text encoder can
learn them), while the full byte alphabet keeps any other text encodable.
"""

from __future__ import annotations

import string
from collections import Counter
from collections.abc import Iterable
from itertools import pairwise

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTokenizer, T5TokenizerFast

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
METASPACE = "\u2581"  # SentencePiece's word-start mark
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


def build_word_t5_tokenizer(words: Iterable[str] = BASE_WORDS, max_length: int = 512) -> T5TokenizerFast:
    """A T5 (SentencePiece-unigram) tokenizer in which each of ``words`` is one ``▁word`` piece.

    The tiny SD3 and FLUX models need their T5 tokenizer without a download; it has T5's special
    tokens at T5's ids (pad 0, ``</s>`` 1, unk 2) and spells any other lower-case text in characters.
    """
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), (METASPACE, -2.0)]
    pieces += [(METASPACE + word, -1.0) for word in sorted({w.lower() for w in words})]
    pieces += [(char, -5.0) for char in string.ascii_lowercase + string.digits + string.punctuation]
    model = Tokenizer(models.Unigram(pieces, unk_id=2))
    model.normalizer = normalizers.Lowercase()
    model.pre_tokenizer = pre_tokenizers.Metaspace()
    model.decoder = decoders.Metaspace()
    model.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(
        tokenizer_object=model,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_ids=0,
        model_max_length=max_length,
    )
