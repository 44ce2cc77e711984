"""The toy CLIP: its loss, its batches, a short real training run, and a saved folder the scorer loads."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPModel, CLIPProcessor

from evaluation.clip_score import ClipScorer
from toy_world import pretrain_clip as pc
from toy_world.world import COLOURS, SHAPES, render, scenes, sentence_caption

# Models small enough for CPU tests; the shipped defaults are built by ``build_clip()`` with no arguments.
TINY = {"width": 32, "text_layers": 1, "vision_layers": 2}


def _first_batch(seed: int = 0, batch_size: int = 32, pool_size: int = 64) -> dict[str, torch.Tensor]:
    pool, images = pc.render_pool(seed, pool_size)
    _, processor = pc.build_clip(**TINY)
    stream = pc.CaptionedBatches(pool, images, processor.tokenizer, seed=seed, batch_size=batch_size)
    return next(iter(stream))


def test_default_model_fits_the_5_mb_budget() -> None:
    model, _ = pc.build_clip()
    assert sum(p.numel() for p in model.parameters()) * 4 <= 5_000_000


def test_contrastive_loss_is_clip_loss_with_one_positive_per_row() -> None:
    logits = torch.randn(6, 6, generator=torch.Generator().manual_seed(0)) * 3
    target = torch.arange(6)
    clip = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    assert torch.allclose(pc.contrastive_loss(logits, torch.eye(6, dtype=torch.bool)), clip)


def test_positive_mask_matches_a_brute_force_check() -> None:
    rng = random.Random(0)
    images = scenes(1, 40)
    described = scenes(2, 30) + images[:10]
    stated = [pc.sample_caption(s, rng)[1] for s in described]
    mask = pc.positive_mask(images, described, stated)
    expected = torch.tensor(
        [
            [all(getattr(i, f) == getattr(d, f) for f in fields) for d, fields in zip(described, stated, strict=True)]
            for i in images
        ]
    )
    assert torch.equal(mask, expected)
    assert mask[torch.arange(10), 30 + torch.arange(10)].all()  # a caption is true of its own scene


def test_counterfactual_captions_are_false_of_their_image() -> None:
    batch = scenes(3, 64)
    captions, mask = pc.batch_captions(batch, random.Random(0), hard_negatives=True)
    assert len(captions) == 2 * len(batch) and mask.shape == (64, 128)
    assert mask[torch.arange(64), torch.arange(64)].all()
    own_negative = mask[torch.arange(64), 64 + torch.arange(64)]
    assert own_negative.float().mean() < 0.1  # true only where a pattern became an unsaid "plain"
    assert sum(a != b for a, b in zip(captions[:64], captions[64:], strict=True)) == 64


def test_training_normalisation_matches_the_processor() -> None:
    _, processor = pc.build_clip(**TINY)
    images = [render(s) for s in scenes(4, 8)]
    expected = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    pixels = torch.from_numpy(np.stack([np.asarray(i) for i in images]))
    assert torch.allclose(pc.Normaliser(processor, torch.device("cpu"))(pixels), expected, atol=1e-5)


def test_degrade_blurs_and_noises_the_chosen_share_reproducibly() -> None:
    pixels = torch.from_numpy(np.stack([np.asarray(render(s)) for s in scenes(5, 64)])).permute(0, 3, 1, 2) / 255.0
    assert torch.equal(pc.degrade(pixels, 0.0, torch.Generator().manual_seed(0)), pixels)  # share 0: untouched
    once = pc.degrade(pixels, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(once, pc.degrade(pixels, 0.5, torch.Generator().manual_seed(0)))
    assert once.shape == pixels.shape and once.min() >= 0 and once.max() <= 1
    changed = (once - pixels).abs().flatten(1).amax(1) > 1e-6
    assert 16 <= changed.sum() <= 48  # about half the images
    assert torch.equal(once[~changed], pixels[~changed])
    assert (once - pixels)[changed].abs().mean() < 0.05  # softened and grainy, not a different picture


def test_render_pool_is_the_same_with_worker_processes() -> None:
    serial, parallel = pc.render_pool(3, 600, workers=1), pc.render_pool(3, 600, workers=2)
    assert serial[0] == parallel[0] and np.array_equal(serial[1], parallel[1])
    assert serial[1].shape == (600, 64, 64, 3) and serial[1].dtype == np.uint8


def test_a_few_training_steps_lower_the_contrastive_loss() -> None:
    model, processor = pc.build_clip(**TINY)
    batch = _first_batch()
    normalise = pc.Normaliser(processor, torch.device("cpu"))
    with torch.no_grad():
        before = pc.batch_loss(model.eval(), batch, normalise).item()
    pc.train_clip(model, processor, steps=30, batch_size=32, pool_size=64, lr=3e-3, progress=False)
    with torch.no_grad():
        after = pc.batch_loss(model.eval(), batch, normalise).item()
    assert after < before - 0.5, (before, after)


def test_zero_shot_accuracy_is_a_fraction_per_task() -> None:
    model, processor = pc.build_clip(**TINY)
    accuracy = pc.zero_shot_accuracy(model, processor, seed=10_000, count=40, device="cpu")
    assert set(accuracy) == {"shape_accuracy", "colour_accuracy"}
    assert all(0.0 <= v <= 1.0 for v in accuracy.values())


def test_command_line_writes_a_loadable_folder(tmp_path: Path) -> None:
    out = tmp_path / "clip"
    args = ["--out", str(out), "--steps", "2", "--batch-size", "8", "--pool-size", "16", "--eval-count", "16"]
    metrics = pc.main([*args, "--device", "cpu"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip"]  # no temporary folder left beside it
    written = json.loads((out / "metrics.json").read_text())
    assert written == metrics
    assert written["steps"] == 2 and written["seed"] == 0 and written["device"] == "cpu"
    assert {"shape_accuracy", "colour_accuracy", "wall_seconds", "command", "torch_version"} <= set(written)
    assert (out / "model.safetensors").stat().st_size <= 5_000_000
    CLIPModel.from_pretrained(out)
    CLIPProcessor.from_pretrained(out)
    clip = CLIPModel.from_pretrained(out)
    text = pc.text_encoder_from_clip(out)
    tokens = CLIPProcessor.from_pretrained(out).tokenizer(["a red star"], return_tensors="pt")
    with torch.no_grad():  # the same text tower: a diffusion model can use it as its text encoder
        assert torch.allclose(text(**tokens).last_hidden_state, clip.text_model(**tokens).last_hidden_state)

    metrics = pc.main([*args, "--device", "cpu", "--seed", "1"])  # an existing folder is replaced whole
    assert json.loads((out / "metrics.json").read_text())["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip"]


# --- a short real training run, shared by the tests below


SHORT_TRAINING = {"seed": 0, "steps": 300, "batch_size": 64, "lr": 3e-3, "pool_size": 128}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny toy CLIP trained for ~20 s on 128 scenes (``seed`` 0), saved as the command line saves it.

    Zero-shot shape recognition that generalises needs ~1 M pairs (a GPU run, see metrics.json of
    the shipped model); this short run learns its own 128 scenes by shape and generalises colour.
    """
    model, processor = pc.build_clip(**TINY)
    pc.train_clip(model, processor, **SHORT_TRAINING, progress=False)
    folder = tmp_path_factory.mktemp("toy-clip") / "clip"
    pc.save_atomically(model, processor, {}, folder)
    return folder


@pytest.mark.slow
def test_short_training_beats_chance_on_shape_and_colour(trained: Path) -> None:
    model, processor = CLIPModel.from_pretrained(trained), CLIPProcessor.from_pretrained(trained)
    # Its own training scenes: this checks that captions, prompts and loss teach the shape words.
    seen = pc.zero_shot_accuracy(model, processor, seed=0, count=SHORT_TRAINING["pool_size"], device="cpu")
    assert seen["shape_accuracy"] > 4 / len(SHAPES), seen  # chance is 1/8; measured 95 %
    unseen = pc.zero_shot_accuracy(model, processor, seed=10_000, count=400, device="cpu")
    assert unseen["colour_accuracy"] > 5 / len(COLOURS), unseen  # colour generalises early; measured 89 %


@pytest.mark.slow
def test_clip_scorer_prefers_matching_captions(trained: Path) -> None:
    scorer = ClipScorer(str(trained))
    shown = scenes(20_000, 64)  # scenes the model never saw
    images = [render(s) for s in shown]
    matching = scorer.score(images, [sentence_caption(s) for s in shown])
    mismatching = scorer.score(images, [sentence_caption(s) for s in shown[1:] + shown[:1]])
    assert matching.mean() > mismatching.mean() + 5, (matching.mean(), mismatching.mean())  # measured 27 vs 5
    assert (matching > mismatching).float().mean() > 0.7
