"""Evaluation: CLIP score arithmetic, seeded sampling, the tiny CLIP, the grid, config errors.

Every model is built in-process (a tiny SD pipeline in the style of diffusers'
``get_dummy_components``, the tiny CLIP under ``tmp_path``); nothing is downloaded.
"""

from __future__ import annotations

import math
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
)
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPModel, CLIPProcessor

from evaluation.clip_score import ClipScorer, clip_score_from_embeddings
from evaluation.evaluate import EvalResult, evaluate
from evaluation.grid import image_grid, label_height
from evaluation.metric_names import SAMPLER_NAMES
from evaluation.sampling import SAMPLERS, generate_samples, sampling_scheduler
from evaluation.tiny_clip import TINY_CLIP_NAME, build_tiny_clip, ensure_tiny_clip
from training.cache.folders import CACHE_ENV
from training.families.tiny_sd import build_tiny_pipeline
from training.text.tokenizer import build_word_tokenizer

SAMPLE_KW = {"images_per_prompt": 2, "num_inference_steps": 2, "guidance_scale": 5.0}


@pytest.fixture(autouse=True)
def _offline_and_private_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No hub access and no writes to the home cache, whatever a test forgets to pass."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once at import
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def pipeline() -> StableDiffusionPipeline:
    """The tiny SD model built in code (2-block UNet, 3-block VAE, 2-layer CLIP text encoder)."""
    return build_tiny_pipeline()


@pytest.fixture(scope="module")
def tiny_clip_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("clip-cache")
    ensure_tiny_clip(root)
    return root


def same_images(a: list[Image.Image], b: list[Image.Image]) -> bool:
    return len(a) == len(b) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b, strict=False))


# --- CLIP score arithmetic


def unit(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


@pytest.mark.parametrize(
    ("image", "text", "expected"),
    [
        ([1.0, 0.0], [0.0, 1.0], 0.0),  # orthogonal
        ([1.0, 0.0], [1.0, 0.0], 100.0),  # identical
        ([3.0, 4.0], [6.0, 8.0], 100.0),  # same direction, other lengths: normalised first
        ([1.0, 0.0], [-1.0, 0.0], 0.0),  # opposite: -100 clamped to 0
        (unit(0), unit(60), 50.0),  # cos 60° = 0.5
        ([2.0, 0.0], unit(45), 100 * math.sqrt(0.5)),
        (unit(0), unit(120), 0.0),  # cos 120° = -0.5, clamped
    ],
)
def test_clip_score_matches_hand_computation(image: list[float], text: list[float], expected: float) -> None:
    score = clip_score_from_embeddings(torch.tensor([image]), torch.tensor([text]))
    assert score.shape == (1,)
    assert score.item() == pytest.approx(expected, abs=1e-4)


def test_clip_score_pairs_rows_not_all_combinations() -> None:
    images = torch.tensor([unit(0), unit(90), unit(10)])
    texts = torch.tensor([unit(60), unit(90), unit(190)])
    expected = torch.tensor([50.0, 100.0, 0.0])
    torch.testing.assert_close(clip_score_from_embeddings(images, texts), expected, atol=1e-4, rtol=0)


def test_clip_score_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        clip_score_from_embeddings(torch.ones(2, 4), torch.ones(3, 4))


# --- tiny CLIP


def test_tiny_clip_builds_deterministically_and_loads(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    torch.manual_seed(123)  # the builder must seed itself, whatever the global state
    build_tiny_clip(first)
    torch.manual_seed(456)
    build_tiny_clip(second)

    weights_a = load_file(first / "model.safetensors")
    weights_b = load_file(second / "model.safetensors")
    assert weights_a.keys() == weights_b.keys() and len(weights_a) > 0
    for name, tensor in weights_a.items():
        assert torch.equal(tensor, weights_b[name]), name

    model = CLIPModel.from_pretrained(first)
    processor = CLIPProcessor.from_pretrained(first)
    tokenizer = build_word_tokenizer()
    assert model.config.projection_dim == 32
    assert model.config.text_config.vocab_size == len(tokenizer)
    assert model.config.text_config.max_position_embeddings == 77
    assert model.config.vision_config.image_size == 64
    assert processor.tokenizer.get_vocab() == tokenizer.get_vocab()
    assert processor.image_processor(images=[Image.new("RGB", (100, 80))], return_tensors="pt")[
        "pixel_values"
    ].shape == (1, 3, 64, 64)
    for name, tensor in model.state_dict().items():
        if name in weights_a:
            assert torch.equal(tensor, weights_a[name]), name


def test_ensure_tiny_clip_builds_once_under_the_given_root(tmp_path: Path) -> None:
    folder = ensure_tiny_clip(tmp_path)
    assert folder == tmp_path / TINY_CLIP_NAME
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_clip(tmp_path) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_ensure_tiny_clip_defaults_to_the_cache_env(tmp_path: Path) -> None:
    assert ensure_tiny_clip() == tmp_path / "cache" / TINY_CLIP_NAME  # set by the autouse fixture


# --- ClipScorer


def hand_clip_scores(model: CLIPModel, processor: CLIPProcessor, images, prompts) -> torch.Tensor:
    """max(100 cos, 0) straight from the model's feature functions, without evaluation code."""
    with torch.no_grad():
        pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        tokens = processor.tokenizer(prompts, padding=True, return_tensors="pt")
        image_out = model.get_image_features(pixel_values=pixels)
        text_out = model.get_text_features(**tokens)
    image_embeds = image_out if isinstance(image_out, torch.Tensor) else image_out.pooler_output
    text_embeds = text_out if isinstance(text_out, torch.Tensor) else text_out.pooler_output
    assert image_embeds.shape == text_embeds.shape == (len(images), model.config.projection_dim)
    cosine = F.cosine_similarity(image_embeds, text_embeds, dim=-1)
    return torch.clamp(100 * cosine, min=0)


def test_scorer_agrees_with_the_models_own_feature_functions(tiny_clip_root: Path) -> None:
    scorer = ClipScorer("tiny", cache_root=tiny_clip_root)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)) for _ in range(6)]
    images.append(Image.new("RGB", (64, 64), "red"))
    prompts = ["a red circle", "a blue square", "two green stars", "a dog", "a cat", "red", "a red circle"]

    as_built = scorer.score(images, prompts)
    torch.testing.assert_close(as_built, hand_clip_scores(scorer.model, scorer.processor, images, prompts))
    # A random CLIP's cosines often share one sign, so all could clamp to 0 and prove little. Negating
    # the text projection flips every cosine: each pair is unclamped in exactly one of the two runs.
    with torch.no_grad():
        scorer.model.text_projection.weight.neg_()
    flipped = scorer.score(images, prompts)
    torch.testing.assert_close(flipped, hand_clip_scores(scorer.model, scorer.processor, images, prompts))

    assert as_built.shape == flipped.shape == (len(images),)
    assert ((as_built > 0) ^ (flipped > 0)).all()
    assert not scorer.model.training


def test_scorer_batches_and_truncates_long_prompts(tiny_clip_root: Path) -> None:
    images = [Image.new("RGB", (64, 64), color) for color in ("red", "blue", "green")]
    prompts = ["a red circle " * 60, "a blue square", "a green star"]  # the first is ~180 tokens
    whole = ClipScorer("tiny", cache_root=tiny_clip_root).score(images, prompts)
    batched = ClipScorer("tiny", cache_root=tiny_clip_root, batch_size=2).score(images, prompts)
    torch.testing.assert_close(whole, batched, atol=1e-4, rtol=1e-4)


def test_scorer_loads_a_local_folder(tiny_clip_root: Path) -> None:
    by_name = ClipScorer("tiny", cache_root=tiny_clip_root)
    by_path = ClipScorer(str(tiny_clip_root / TINY_CLIP_NAME))
    images, prompts = [Image.new("RGB", (64, 64), "blue")], ["a blue square"]
    torch.testing.assert_close(by_name.score(images, prompts), by_path.score(images, prompts))


@pytest.mark.parametrize("make_source", [lambda tmp: str(tmp / "no-such-clip"), lambda tmp: "nobody/no-such-clip"])
def test_unknown_clip_model_names_the_config_key(tmp_path: Path, make_source) -> None:
    with pytest.raises(FileNotFoundError, match=r"eval\.clip_model") as info:
        ClipScorer(make_source(tmp_path))
    assert "'tiny'" in str(info.value)  # and says how to fix it


def test_folder_without_a_clip_names_the_config_key(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"eval\.clip_model"):
        ClipScorer(str(tmp_path / "empty"))


# --- sampling


def test_same_seed_same_images_other_seed_other_images(pipeline: StableDiffusionPipeline) -> None:
    prompts = ["a red circle", "a blue square"]
    first = generate_samples(pipeline, prompts, test_seed=7, **SAMPLE_KW)
    again = generate_samples(pipeline, prompts, test_seed=7, **SAMPLE_KW)
    other = generate_samples(pipeline, prompts, test_seed=8, **SAMPLE_KW)

    assert [len(row) for row in first] == [2, 2]
    assert all(image.size == (64, 64) for row in first for image in row)
    for a, b in zip(first, again, strict=True):
        assert same_images(a, b)
    for a, b in zip(first, other, strict=True):
        assert not any(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(np.asarray(first[0][0]), np.asarray(first[0][1]))  # images of a prompt differ


def test_global_rng_state_does_not_leak_into_samples(pipeline: StableDiffusionPipeline) -> None:
    torch.manual_seed(1)
    first = generate_samples(pipeline, ["a red circle"], test_seed=3, **SAMPLE_KW)
    torch.manual_seed(2)
    second = generate_samples(pipeline, ["a red circle"], test_seed=3, **SAMPLE_KW)
    assert same_images(first[0], second[0])


def test_a_prompts_images_do_not_depend_on_the_other_prompts(pipeline: StableDiffusionPipeline) -> None:
    # Prompt i is seeded test_seed + i, so "a blue square" at position 1 with seed 10 must match
    # "a blue square" alone at position 0 with seed 11: same seed, same prompt, and nothing else.
    # A generator shared across prompts breaks this; prompts batched in one call keep it.
    together = generate_samples(pipeline, ["a red circle", "a blue square"], test_seed=10, **SAMPLE_KW)
    alone = generate_samples(pipeline, ["a blue square"], test_seed=11, **SAMPLE_KW)
    with_other_first = generate_samples(pipeline, ["two green stars", "a blue square"], test_seed=10, **SAMPLE_KW)

    assert same_images(together[1], alone[0])
    assert same_images(together[1], with_other_first[1])
    assert not same_images(together[0], with_other_first[0])  # prompt 0 did change the images it owns


def nearly_same_images(a: list[Image.Image], b: list[Image.Image], levels: int = 2) -> bool:
    """Equal up to float rounding of a different batch size (at most ``levels`` of 255 per pixel)."""
    return len(a) == len(b) and all(
        np.abs(np.asarray(x, dtype=np.int16) - np.asarray(y, dtype=np.int16)).max() <= levels
        for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpm++", "ddpm"])
def test_prompts_batched_in_one_call_give_the_images_of_one_call_each(pipeline, sampler, monkeypatch) -> None:
    monkeypatch.setattr(pipeline, "scheduler", sampling_scheduler(pipeline.scheduler.config, sampler))
    calls = []
    original = type(pipeline).__call__
    monkeypatch.setattr(
        type(pipeline), "__call__", lambda self, **kw: calls.append(kw["latents"].shape[0]) or original(self, **kw)
    )
    prompts = ["a red circle", "a blue square", "two green stars"]
    batched = generate_samples(pipeline, prompts, test_seed=4, batch_size=16, **SAMPLE_KW)
    batched_calls, calls[:] = list(calls), []
    single = generate_samples(pipeline, prompts, test_seed=4, batch_size=2, **SAMPLE_KW)
    # DDPM draws noise at each step from the prompt's generator: it keeps one call per prompt
    assert batched_calls == ([2, 2, 2] if sampler == "ddpm" else [6]) and calls == [2, 2, 2]
    for a, b in zip(batched, single, strict=True):
        assert nearly_same_images(a, b)


def test_batches_hold_whole_prompts_up_to_the_batch_size(pipeline, monkeypatch) -> None:
    monkeypatch.setattr(pipeline, "scheduler", sampling_scheduler(pipeline.scheduler.config, "ddim"))
    calls = []
    original = type(pipeline).__call__
    monkeypatch.setattr(
        type(pipeline), "__call__", lambda self, **kw: calls.append(kw["latents"].shape[0]) or original(self, **kw)
    )
    images = generate_samples(pipeline, ["a", "b", "c", "d", "e"], test_seed=0, batch_size=5, **SAMPLE_KW)
    assert calls == [4, 4, 2] and [len(row) for row in images] == [2] * 5


def test_progress_bar_is_off_unless_asked(pipeline: StableDiffusionPipeline) -> None:
    generate_samples(pipeline, ["a dog"], test_seed=0, images_per_prompt=1, num_inference_steps=1, guidance_scale=1.0)
    assert pipeline._progress_bar_config.get("disable") is True
    generate_samples(
        pipeline,
        ["a dog"],
        test_seed=0,
        images_per_prompt=1,
        num_inference_steps=1,
        guidance_scale=1.0,
        show_progress=True,
    )
    assert pipeline._progress_bar_config.get("disable") is False


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])  # prompts batched together; one call per prompt
def test_progress_reports_every_image_a_step_at_a_time(pipeline, sampler: str) -> None:
    pipeline.scheduler = sampling_scheduler(pipeline.scheduler.config, sampler)
    reported: list[float] = []
    kw = {**SAMPLE_KW, "num_inference_steps": 4}
    generate_samples(pipeline, ["a", "b", "c"], test_seed=0, batch_size=4, on_progress=reported.append, **kw)
    assert sum(reported) == pytest.approx(3 * 2)  # every image, once
    assert len(reported) >= 4 and max(reported) <= 2.0 + 1e-9  # in steps, not whole calls


def test_evaluate_shows_a_named_bar_of_images_then_scoring(pipeline, tiny_clip_root: Path, capsys) -> None:
    scorer = ClipScorer("tiny", cache_root=tiny_clip_root)
    prompts = ["a red circle", "a blue square"]
    evaluate(pipeline, scorer, prompts, test_seed=5, progress="evaluating step 7", **SAMPLE_KW)
    shown = capsys.readouterr().err
    assert "evaluating step 7" in shown and "4/4 images" in shown and "scoring" in shown, shown
    evaluate(pipeline, scorer, ["a red circle"], test_seed=5, **SAMPLE_KW)
    assert "images" not in capsys.readouterr().err  # no bar unless named


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("ddim", DDIMScheduler),
        ("euler", EulerDiscreteScheduler),
        ("dpm++", DPMSolverMultistepScheduler),
        ("ddpm", DDPMScheduler),
        ("DDIM", DDIMScheduler),
    ],
)
def test_sampling_scheduler_keeps_the_training_schedule(name: str, cls: type) -> None:
    train = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction"
    )
    for source in (train.config, train):
        scheduler = sampling_scheduler(source, name)
        assert type(scheduler) is cls
        assert scheduler.config.prediction_type == "v_prediction"
        assert scheduler.config.beta_schedule == "scaled_linear"
        assert scheduler.config.beta_end == pytest.approx(0.012)
        assert scheduler is not train


def test_the_light_sampler_names_are_the_samplers() -> None:
    assert tuple(SAMPLERS) == SAMPLER_NAMES  # what startup validation accepts is what sampling can build


def test_unknown_sampler_names_the_config_key() -> None:
    with pytest.raises(ValueError, match=r"eval\.sampler.*'heun'.*ddim"):
        sampling_scheduler(DDPMScheduler().config, "heun")


# --- grid


def test_grid_size_and_placement() -> None:
    colors = [["red", "green", "blue"], ["yellow", "cyan", "magenta"]]
    rows = [[Image.new("RGB", (40, 30), c) for c in row] for row in colors]
    labels = ["a red circle", "a long prompt " * 20]  # the second must be wrapped/cut, not widen the grid

    grid = image_grid(rows, labels)

    strip = label_height()
    assert strip > 0
    assert grid.size == (3 * 40, 2 * (strip + 30))
    assert grid.mode == "RGB"
    for r, row in enumerate(rows):
        top = r * (strip + 30) + strip
        for c, image in enumerate(row):
            cell = grid.crop((c * 40, top, c * 40 + 40, top + 30))
            assert np.array_equal(np.asarray(cell), np.asarray(image)), (r, c)
        label = np.asarray(grid.crop((0, top - strip, grid.width, top)))
        assert (label < 128).any(), f"row {r} has no label text"
        assert (label == 255).all(axis=-1).mean() > 0.5, "label strip background is not white"


def test_grid_leaves_missing_cells_white_and_checks_labels() -> None:
    rows = [[Image.new("RGB", (20, 20), "black")] * 2, [Image.new("RGB", (20, 20), "black")]]
    grid = image_grid(rows, ["one", "two"])
    strip = label_height()
    assert grid.size == (40, 2 * (strip + 20))
    missing = np.asarray(grid.crop((20, 2 * strip + 20, 40, 2 * strip + 40)))
    assert (missing == 255).all()
    with pytest.raises(ValueError, match="one label per row"):
        image_grid(rows, ["only one"])


# --- evaluate


def test_evaluate_scores_every_image_against_its_prompt(
    pipeline: StableDiffusionPipeline, tiny_clip_root: Path
) -> None:
    scorer = ClipScorer("tiny", cache_root=tiny_clip_root)
    prompts = ["a red circle", "a blue square"]

    result = evaluate(pipeline, scorer, prompts, test_seed=5, **SAMPLE_KW)

    assert isinstance(result, EvalResult)
    assert same_images(result.images[1], generate_samples(pipeline, prompts, test_seed=5, **SAMPLE_KW)[1])
    scores = [scorer.score(row, [prompt] * len(row)) for prompt, row in zip(prompts, result.images, strict=True)]
    expected = {p: s.mean().item() for p, s in zip(prompts, scores, strict=True)}
    assert result.per_prompt == pytest.approx(expected, rel=1e-4)  # batched vs per-row float rounding
    assert result.clip_score == pytest.approx(torch.cat(scores).mean().item(), rel=1e-4)
    assert result.grid.size == (2 * 64, 2 * (label_height() + 64))
