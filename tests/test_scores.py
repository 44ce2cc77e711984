"""Scoring samples: every metric from real (tiny) models, per image, with the base model's paired gain,
and the DINO embedder on a tiny random ViT saved to disk."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from evaluation.clip_score import ClipScorer, clip_score_from_embeddings
from evaluation.dino import DinoEmbedder
from evaluation.evaluate import EvalResult, Scorers, score_images, summary_lines
from evaluation.metrics import concept_hits, copy_risk, diversity, fidelity


def solid(color: tuple[int, int, int], size: int = 32) -> Image.Image:
    return Image.new("RGB", (size, size), color)


@pytest.fixture(scope="module")
def clip():
    return ClipScorer("tiny")


@pytest.fixture(scope="module")
def dino_folder(tmp_path_factory):
    """A tiny random DINOv2 ViT with its image processor, saved as a real model folder."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    folder = tmp_path_factory.mktemp("dino") / "tiny-dinov2"
    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=28, patch_size=14
    )
    Dinov2Model(config).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(folder)
    return folder


def test_scores_equal_the_metrics_on_the_same_embeddings(clip, dino_folder):
    images = [solid((255, 0, 0)), solid((0, 255, 0)), solid((0, 0, 255)), solid((250, 10, 10))]
    prompts = ["red", "red", "blue", "blue"]
    training = [solid((255, 0, 0)), solid((0, 0, 250))]
    scorers = Scorers(clip, DinoEmbedder(str(dino_folder)))
    scorers.references = scorers.reference_embeddings(training)
    scorers.concept = scorers.concept_for(["a red square", "a green square", "a blue square"], "a blue square")
    values = score_images(scorers, images, prompts)

    image_embeds, text_embeds = clip.embed_images(images).float(), clip.embed_texts(prompts).float()
    expected = {
        "clip_t": clip_score_from_embeddings(image_embeds, text_embeds),
        "clip_i": fidelity(image_embeds, scorers.references.clip),
        "copy_risk": copy_risk(image_embeds, scorers.references.clip),
        "concept_acc": concept_hits(image_embeds, scorers.concept.embeds, 2),
        "diversity": diversity(image_embeds, prompts),
        "dino_i": fidelity(scorers.dino.embed_images(images), scorers.references.dino),
    }
    assert set(values) == set(expected)
    for name, tensor in expected.items():
        assert torch.allclose(torch.tensor(values[name]), tensor.cpu(), atol=1e-5), name
    # the first image is a training image: its nearest training image is itself
    assert values["copy_risk"][0] == pytest.approx(1.0, abs=1e-5)


def test_the_dino_embedding_is_the_class_token(dino_folder):
    from transformers import AutoImageProcessor, Dinov2Model

    embedder = DinoEmbedder(str(dino_folder))
    image = solid((10, 200, 30))
    model, processor = Dinov2Model.from_pretrained(dino_folder), AutoImageProcessor.from_pretrained(dino_folder)
    with torch.no_grad():
        expected = model(**processor(images=[image], return_tensors="pt")).last_hidden_state[:, 0]
    assert torch.allclose(embedder.embed_images([image]), expected, atol=1e-6)


def test_a_broken_dino_model_names_eval_dino_model(tmp_path):
    with pytest.raises(ValueError, match=r"eval\.dino_model"):
        DinoEmbedder(str(tmp_path))


def test_without_references_or_labels_those_metrics_are_off(clip):
    values = score_images(Scorers(clip), [solid((1, 2, 3)), solid((4, 5, 6))], ["a", "b"])
    assert set(values) == {"clip_t"}  # one image per prompt: no diversity either


def test_the_summary_prints_value_interval_base_and_paired_gain():
    base = EvalResult({"clip_t": [30.0, 34.0, 36.0, 40.0] * 3}, ["p"] * 12, [], Image.new("RGB", (1, 1)))
    lora = EvalResult({"clip_t": [v + 2.0 for v in base.values["clip_t"]]}, ["p"] * 12, [], base.grid)
    (line,) = summary_lines(lora, base)
    assert line.startswith("clip_t 37.0 (") and "[this file], base 35.0, gain +2.0 (+2.0 to +2.0) [this file]" in line
    same = summary_lines(base, base)[0]
    assert same.endswith("gain +0.0 (+0.0 to +0.0) [this file] (not distinguishable from 0 in this file)")
    assert math.isclose(lora.clip_score, 37.0)
