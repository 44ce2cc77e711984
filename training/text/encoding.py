"""Captions to the UNet's text conditioning: CLIP skip and long (chunked) captions.

``model.clip_skip`` n uses ``hidden_states[-n]`` of the text encoder, then its final layer norm
(the A1111 convention: 1 = last layer, 2 = penultimate, as NovelAI-style anime models expect).

``data.max_token_length`` 150/225 encodes a caption in 75-token chunks, each wrapped in BOS/EOS and
padded to CLIP's 77-token context like a normal prompt, and concatenates the chunks' hidden states
along the sequence (77 -> 154/231 tokens), as A1111's long prompts and kohya's max_token_length do.
The UNet's cross-attention takes any sequence length, so nothing else changes.
"""

from __future__ import annotations

from typing import Any

import torch

from training.text.encoding_options import CHUNK_TOKENS, clip_skip_problem


def tokenize_chunks(tokenizer: Any, captions: list[str], max_token_length: int = CHUNK_TOKENS) -> torch.Tensor:
    """Token ids of shape (batch, chunks, context): ``[BOS, up to 75 tokens, EOS, PAD...]`` per chunk.

    Captions longer than ``max_token_length`` tokens are truncated; chunks past a caption's end hold
    no caption tokens (``BOS, EOS, PAD...``, an empty prompt), so every caption gets the same length.
    """
    context = tokenizer.model_max_length  # 77 for CLIP
    per_chunk = context - 2
    if max_token_length < 1 or max_token_length % per_chunk:
        raise ValueError(f"max_token_length must be a positive multiple of {per_chunk} (got {max_token_length})")
    chunks = max_token_length // per_chunk
    tokens = tokenizer(list(captions), add_special_tokens=False, truncation=True, max_length=max_token_length)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id  # SD2's OpenCLIP pads with "!"
    rows = []
    for ids in tokens.input_ids:
        rows.append(
            [
                [bos, *part, eos] + [pad] * (per_chunk - len(part))
                for part in (ids[i * per_chunk : (i + 1) * per_chunk] for i in range(chunks))
            ]
        )
    return torch.tensor(rows, dtype=torch.long)


def encode_prompts(
    tokenizer: Any,
    text_encoder: torch.nn.Module,
    captions: list[str],
    device: torch.device | str,
    *,
    clip_skip: int = 1,
    max_token_length: int = CHUNK_TOKENS,
) -> torch.Tensor:
    """The UNet's ``encoder_hidden_states`` for ``captions``: (batch, 77 * chunks, hidden size).

    With ``clip_skip=1`` and ``max_token_length=75`` this is exactly what StableDiffusionPipeline
    conditions on: the text encoder's last hidden state over a max-length-padded prompt.
    """
    ids = tokenize_chunks(tokenizer, captions, max_token_length)
    batch, chunks, context = ids.shape
    hidden = encode_token_ids(text_encoder, ids.view(batch * chunks, context).to(device), clip_skip)
    return hidden.reshape(batch, chunks * context, hidden.shape[-1])


def encode_token_ids(text_encoder: torch.nn.Module, ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
    """Hidden states of one 77-token context per row, ``clip_skip`` layers from the end."""
    if clip_skip == 1:
        return text_encoder(ids)[0]  # last_hidden_state, already through the final layer norm
    # hidden_states[0] is the embedding output, [k] the output of layer k; [-n] is n-1 layers before the end.
    hidden_states = text_encoder(ids, output_hidden_states=True).hidden_states
    if problem := clip_skip_problem(clip_skip, len(hidden_states) - 1):
        raise ValueError(problem)
    return final_layer_norm(text_encoder)(hidden_states[-clip_skip])


def final_layer_norm(text_encoder: torch.nn.Module) -> torch.nn.Module:
    """The text model's final LayerNorm, wherever this transformers version (or a wrapper) keeps it.

    transformers >= 5.6 flattened CLIPTextModel (``text_encoder.final_layer_norm``); older versions
    and CLIPTextModelWithProjection have ``text_encoder.text_model.final_layer_norm``; accelerate/DDP
    wrappers nest it under ``module``.
    """
    for owner in (text_encoder, getattr(text_encoder, "text_model", None)):
        norm = getattr(owner, "final_layer_norm", None) if owner is not None else None
        if isinstance(norm, torch.nn.Module):
            return norm
    found = [m for name, m in text_encoder.named_modules() if name.split(".")[-1] == "final_layer_norm"]
    if len(found) != 1:
        raise ValueError(
            f"cannot find the text encoder's final_layer_norm ({type(text_encoder).__name__}); "
            "model.clip_skip > 1 needs a CLIP-style text encoder"
        )
    return found[0]


def pipeline_clip_skip(clip_skip: int) -> int | None:
    """Our ``model.clip_skip`` (1 = last layer) as StableDiffusionPipeline's ``clip_skip`` argument.

    diffusers counts the layers skipped: ``None`` uses the last layer and ``k`` uses
    ``hidden_states[-(k + 1)]`` then the final layer norm (``StableDiffusionPipeline.encode_prompt``),
    so ours n is theirs n - 1. Caveat: diffusers 0.42's clip_skip path reads
    ``text_encoder.text_model.final_layer_norm``, which transformers >= 5.6's flattened CLIPTextModel
    lacks; pass ``prompt_embeds`` from ``encode_prompt_pair`` instead when clip_skip > 1.
    """
    if problem := clip_skip_problem(clip_skip):
        raise ValueError(problem)
    return None if clip_skip == 1 else clip_skip - 1
