"""Encode each distinct caption with the frozen text encoder once and reuse it (``data.cache_text_embeddings``).

With a frozen text encoder (no text-encoder LoRA, no trained embedding) a caption's conditioning
is a pure function of its text, so re-running the 12-layer CLIP every step only costs time: on a
GPU the step is bound by host dispatch, and the text encoder is several hundred kernel launches.
Caption transforms (shuffle, tag/caption dropout, trigger word) still run every step; the cache
is keyed by the text they produce, so it stays exact whatever they do.

One store per (model, precision, clip skip, token length) lives in the process, so the trials of
a sweep in one worker share it, as the latent cache does. It is bounded (least recently used
entries go first): heavy tag shuffling makes almost every caption new, and an unbounded cache
would then only grow.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Mapping

import torch

DEFAULT_MAX_ENTRIES = 4096  # 4096 x 77 x 768 bf16 SD1.5 rows = 0.5 GB at most

# (captions) -> named conditioning tensors, batch first (the family's text encoding: hidden states,
# and SDXL's pooled embedding): the text encoder call the cache stands in front of
Encoder = Callable[[list[str]], dict[str, torch.Tensor]]


class TextEmbeddingCache:
    """Caption text -> its conditioning tensors (one row of each), least recently used evicted first."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1 (got {max_entries})")
        self.max_entries = max_entries
        self._rows: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._rows)

    def encode(self, captions: list[str], encoder: Encoder) -> dict[str, torch.Tensor]:
        """The batch's conditioning; only captions not yet cached go through ``encoder`` (in one call)."""
        missing = list(dict.fromkeys(c for c in captions if c not in self._rows))
        if missing:
            encoded = {name: value.detach() for name, value in encoder(missing).items()}
            for index, caption in enumerate(missing):
                self._rows[caption] = {name: value[index] for name, value in encoded.items()}
        self.misses += len(missing)
        self.hits += len(captions) - len(missing)
        for caption in captions:
            self._rows.move_to_end(caption)
        rows = [self._rows[c] for c in captions]
        batch = {name: torch.stack([row[name] for row in rows]) for name in rows[0]}
        while len(self._rows) > self.max_entries:
            self._rows.popitem(last=False)
        return batch


# store key -> cache; lives as long as the process, so sweep trials in one worker share it.
_STORES: dict[str, TextEmbeddingCache] = {}


def text_cache_key(identity: Mapping[str, str], **settings: object) -> str:
    """One string for "this text encoder under these encoding settings" (model, dtype, clip skip, ...)."""
    return json.dumps({**dict(identity), **{k: str(v) for k, v in settings.items()}}, sort_keys=True)


def shared_text_cache(key: str, max_entries: int = DEFAULT_MAX_ENTRIES) -> TextEmbeddingCache:
    """The process-wide cache for ``key`` (see ``text_cache_key``), created on first use."""
    cache = _STORES.get(key)
    if cache is None:
        cache = _STORES[key] = TextEmbeddingCache(max_entries)
    return cache


def clear_text_caches() -> None:
    """Drop every cached embedding (tests; a worker about to load another model)."""
    _STORES.clear()
