"""Captions to UNet conditioning: CLIP skip (A1111 convention) and 75-token chunks for long captions."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from training.families.sd import SD1
from training.families.tiny_sd import build_tiny_pipeline
from training.text.encoding import encode_prompts, final_layer_norm, pipeline_clip_skip, tokenize_chunks
from training.text.encoding_options import max_token_length_problem
from training.text.tokenizer import BASE_WORDS

COLORS = ["red", "green", "blue", "yellow", "orange", "purple", "pink", "white", "black", "gray"]


def words(count: int, offset: int = 0) -> str:
    """A caption of exactly ``count`` tokens: each base word is one token of the tiny tokenizer."""
    return " ".join(COLORS[(offset + i) % len(COLORS)] for i in range(count))


@pytest.fixture(scope="module")
def tiny():
    pipeline = build_tiny_pipeline()
    pipeline.text_encoder.eval()
    return pipeline.tokenizer, pipeline.text_encoder


def old_encode_captions(tokenizer, text_encoder, captions):
    """What training/loop.py did before: the last hidden state of a max-length-padded prompt."""
    ids = tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return text_encoder(ids)[0]


@torch.no_grad()
def test_defaults_give_exactly_the_previous_encoding(tiny):
    tokenizer, text_encoder = tiny
    captions = ["a red circle on a blue background", "", words(90)]  # short, empty, truncated
    assert torch.equal(encode_prompts(tokenizer, text_encoder, captions, "cpu"), old_encode_captions(*tiny, captions))


@torch.no_grad()
def test_clip_skip_2_is_the_penultimate_layer_through_the_final_layer_norm(tiny):
    tokenizer, text_encoder = tiny
    captions = ["a red circle on a blue background", "a green square"]
    ids = tokenizer(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
    hidden_states = text_encoder(ids, output_hidden_states=True).hidden_states
    by_hand = text_encoder.final_layer_norm(hidden_states[-2])
    skipped = encode_prompts(tokenizer, text_encoder, captions, "cpu", clip_skip=2)
    assert torch.equal(skipped, by_hand)
    assert not torch.allclose(skipped, encode_prompts(tokenizer, text_encoder, captions, "cpu"))


@torch.no_grad()
def test_clip_skip_2_equals_a_text_encoder_cut_one_layer_short(tiny):
    """Independent of how transformers indexes hidden_states: drop the last layer, keep the final norm."""
    tokenizer, text_encoder = tiny
    config = CLIPTextConfig(
        **{**text_encoder.config.to_dict(), "num_hidden_layers": text_encoder.config.num_hidden_layers - 1}
    )
    shorter = CLIPTextModel(config).eval()
    last = f"encoder.layers.{config.num_hidden_layers}."
    shorter.load_state_dict({k: v for k, v in text_encoder.state_dict().items() if not k.startswith(last)})
    captions = ["a red circle on a blue background"]
    ids = tokenizer(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.allclose(encode_prompts(tokenizer, text_encoder, captions, "cpu", clip_skip=2), shorter(ids)[0])


def test_clip_skip_beyond_the_encoder_depth_names_the_key(tiny):
    tokenizer, text_encoder = tiny
    with pytest.raises(ValueError, match=r"model.clip_skip=5 but the text encoder has only 2 layers"):
        encode_prompts(tokenizer, text_encoder, ["a"], "cpu", clip_skip=5)


def test_final_layer_norm_is_found_with_or_without_a_text_model_level(tiny):
    _, text_encoder = tiny
    assert final_layer_norm(text_encoder) is text_encoder.final_layer_norm

    class Nested(torch.nn.Module):  # transformers < 5.6 and CLIPTextModelWithProjection
        def __init__(self) -> None:
            super().__init__()
            self.text_model = text_encoder

    class Wrapped(torch.nn.Module):  # DDP / accelerate
        def __init__(self) -> None:
            super().__init__()
            self.module = Nested()

    assert final_layer_norm(Nested()) is text_encoder.final_layer_norm
    assert final_layer_norm(Wrapped()) is text_encoder.final_layer_norm
    with pytest.raises(ValueError, match="final_layer_norm"):
        final_layer_norm(torch.nn.Linear(2, 2))


def test_chunks_are_wrapped_in_bos_eos_and_padded(tiny):
    tokenizer, _ = tiny
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    ids = tokenize_chunks(tokenizer, [words(80), words(3)], max_token_length=150)
    assert ids.shape == (2, 2, 77)
    long_first, long_second = ids[0].tolist()
    assert long_first[0] == bos and long_first[76] == eos  # 75 caption tokens fill the first chunk
    assert long_second[:7] == [bos, *tokenizer(words(5, offset=75), add_special_tokens=False).input_ids, eos]
    assert long_second[7:] == [pad] * 70
    assert ids[1, 1].tolist() == [bos, eos] + [pad] * 75  # an empty chunk for the short caption


@torch.no_grad()
@pytest.mark.parametrize(("max_token_length", "length"), [(75, 77), (150, 154), (225, 231)])
def test_long_captions_are_encoded_in_chunks(tiny, max_token_length, length):
    tokenizer, text_encoder = tiny
    captions = ["a red circle", words(200)]
    encoded = encode_prompts(tokenizer, text_encoder, captions, "cpu", max_token_length=max_token_length)
    assert encoded.shape == (2, length, text_encoder.config.hidden_size)
    # the first chunk is the ordinary (single-chunk) encoding of the caption
    assert torch.equal(encoded[:, :77], encode_prompts(tokenizer, text_encoder, captions, "cpu"))


@torch.no_grad()
def test_each_chunk_encodes_its_own_75_tokens(tiny):
    tokenizer, text_encoder = tiny
    caption = words(120)
    encoded = encode_prompts(tokenizer, text_encoder, [caption], "cpu", max_token_length=150)
    rest = encode_prompts(tokenizer, text_encoder, [words(45, offset=75)], "cpu")
    assert torch.equal(encoded[:, 77:], rest)
    assert not torch.allclose(encoded[:, :77], encoded[:, 77:])


@torch.no_grad()
def test_captions_longer_than_max_token_length_are_truncated(tiny):
    tokenizer, text_encoder = tiny
    long = encode_prompts(tokenizer, text_encoder, [words(200)], "cpu", max_token_length=150)
    exact = encode_prompts(tokenizer, text_encoder, [words(150)], "cpu", max_token_length=150)
    assert torch.equal(long, exact)


@torch.no_grad()
def test_chunking_and_clip_skip_combine(tiny):
    tokenizer, text_encoder = tiny
    caption = [words(100)]
    both = encode_prompts(tokenizer, text_encoder, caption, "cpu", clip_skip=2, max_token_length=150)
    assert both.shape[1] == 154
    assert torch.equal(both[:, :77], encode_prompts(tokenizer, text_encoder, caption, "cpu", clip_skip=2))


def test_max_token_length_must_be_whole_chunks(tiny):
    tokenizer, _ = tiny
    with pytest.raises(ValueError, match="multiple of 75"):
        tokenize_chunks(tokenizer, ["a"], max_token_length=100)
    assert max_token_length_problem(150) is None
    assert "data.max_token_length" in max_token_length_problem(100)


@torch.no_grad()
def test_prompt_pair_for_the_pipeline(tiny):
    tokenizer, text_encoder = tiny
    base = SimpleNamespace(tokenizers=[tokenizer], text_encoders=[text_encoder])
    cond = SD1.encode_text(base, [words(100), ""], "cpu", clip_skip=2, max_token_length=150)
    inputs = SD1.pipeline_inputs(cond)
    positive, negative = inputs["prompt_embeds"], inputs["negative_prompt_embeds"]
    assert positive.shape == negative.shape == (1, 154, text_encoder.config.hidden_size)
    empty = encode_prompts(tokenizer, text_encoder, [""], "cpu", clip_skip=2, max_token_length=150)
    assert torch.equal(negative, empty)


@pytest.mark.parametrize(("ours", "diffusers"), [(1, None), (2, 1), (3, 2), (12, 11)])
def test_pipeline_clip_skip_conversion(ours, diffusers):
    assert pipeline_clip_skip(ours) == diffusers


def test_pipeline_clip_skip_rejects_zero():
    with pytest.raises(ValueError, match=r"model\.clip_skip must be >= 1"):
        pipeline_clip_skip(0)


@torch.no_grad()
def test_pipeline_clip_skip_matches_diffusers_own_encode_prompt():
    """Run StableDiffusionPipeline.encode_prompt with the converted value and compare."""
    pipeline = build_tiny_pipeline()
    text_encoder = pipeline.text_encoder.eval()
    if not hasattr(text_encoder, "text_model"):
        # diffusers 0.42 reads text_encoder.text_model.final_layer_norm, gone from transformers >= 5.6's
        # flattened CLIPTextModel; give it the alias so its layer arithmetic can be compared.
        text_encoder.__dict__["text_model"] = text_encoder
    prompt = "a red circle on a blue background"
    for ours in (1, 2):
        theirs, _ = pipeline.encode_prompt(prompt, "cpu", 1, False, clip_skip=pipeline_clip_skip(ours))
        mine = encode_prompts(pipeline.tokenizer, text_encoder, [prompt], "cpu", clip_skip=ours)
        assert torch.allclose(theirs, mine), ours


def test_every_tiny_word_is_one_token(tiny):
    """The caption helper above relies on it."""
    tokenizer, _ = tiny
    assert all(len(tokenizer(w, add_special_tokens=False).input_ids) == 1 for w in COLORS)
    assert set(COLORS) <= set(BASE_WORDS)
