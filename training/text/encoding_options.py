"""Token-length and clip-skip options and their startup checks, without loading torch."""

from __future__ import annotations

CHUNK_TOKENS = 75  # caption tokens per chunk: CLIP's 77-token context minus BOS and EOS
MAX_TOKEN_LENGTHS = (75, 150, 225)


def max_token_length_problem(max_token_length: int) -> str | None:
    """Why ``data.max_token_length`` is unusable, for startup validation (None if fine)."""
    if max_token_length not in MAX_TOKEN_LENGTHS:
        return (
            f"data.max_token_length must be one of {', '.join(map(str, MAX_TOKEN_LENGTHS))} "
            f"(75-token chunks; got {max_token_length})"
        )
    return None


def clip_skip_problem(clip_skip: int, num_layers: int | None = None) -> str | None:
    """Why ``model.clip_skip`` is unusable (None if fine); ``num_layers`` once the encoder is known."""
    if clip_skip < 1:
        return f"model.clip_skip must be >= 1 (1 = last layer, 2 = penultimate; got {clip_skip})"
    if num_layers is not None and clip_skip > num_layers:
        return f"model.clip_skip={clip_skip} but the text encoder has only {num_layers} layers"
    return None
