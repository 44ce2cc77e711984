"""Textual-inversion co-training: new token vectors for the trigger word, learned beside the LoRA.

As in Gal et al. 2022 ("An Image is Worth One Word", arXiv:2208.01618): placeholder tokens are
added to the tokenizer, their embedding rows start from an existing word and are the only rows
that change; every other row is restored after each optimizer step (weight decay and momentum
would otherwise move them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


class EmbeddingSetupError(ValueError):
    """The embedding cannot be set up as configured; the message names the key."""


@dataclass
class TrainedEmbedding:
    """The placeholder tokens of one trigger word and the trainable rows behind them."""

    name: str  # the trigger word as users write it
    tokens: list[str]  # [name, name_1, ...]: one per vector
    token_ids: list[int]
    weight: torch.nn.Parameter  # the text encoder's whole input-embedding matrix
    original: torch.Tensor = field(repr=False)  # a copy, to restore the rows that must not move
    stop_step: int | None = None

    @property
    def vectors(self) -> torch.Tensor:
        return self.weight.detach()[self.token_ids].clone()

    def expand(self, text: str) -> str:
        """Write the trigger word as its placeholder tokens (a no-op for one vector)."""
        return text.replace(self.name, " ".join(self.tokens)) if len(self.tokens) > 1 else text

    def after_optimizer_step(self, step: int) -> None:
        """Restore every row but ours; freeze ours after ``stop_step``."""
        keep = torch.ones(self.weight.shape[0], dtype=torch.bool, device=self.weight.device)
        keep[self.token_ids] = False
        with torch.no_grad():
            self.weight[keep] = self.original[keep].to(self.weight.dtype)
        if self.stop_step is not None and step >= self.stop_step:
            self.weight.requires_grad_(False)


def add_embedding(tokenizer: Any, text_encoder: Any, embedding_cfg: Any, trigger_word: str | None) -> TrainedEmbedding:
    """Add ``num_vectors`` placeholder tokens for the trigger word, initialised from ``init_word``."""
    name = embedding_cfg.token or trigger_word
    if not name:
        raise EmbeddingSetupError(
            "network.embedding.enabled needs a token: set network.embedding.token or data.trigger_word"
        )
    tokens = [name] + [f"{name}_{i}" for i in range(1, embedding_cfg.num_vectors)]
    added = tokenizer.add_tokens(tokens)
    if added != len(tokens):
        raise EmbeddingSetupError(
            f"network.embedding.token: '{name}' is already a token of this tokenizer; "
            "pick a new word (e.g. 'sks_style')"
        )
    init_ids = tokenizer(embedding_cfg.init_word, add_special_tokens=False).input_ids
    if not init_ids:
        raise EmbeddingSetupError(f"network.embedding.init_word: '{embedding_cfg.init_word}' encodes to no token")
    text_encoder.resize_token_embeddings(len(tokenizer))
    weight = text_encoder.get_input_embeddings().weight
    token_ids = tokenizer.convert_tokens_to_ids(tokens)
    with torch.no_grad():
        weight[token_ids] = weight[init_ids[0]].clone()
    weight.requires_grad_(True)
    return TrainedEmbedding(name, tokens, token_ids, weight, weight.detach().clone(), stop_step=embedding_cfg.stop_step)
