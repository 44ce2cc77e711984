"""Toy base model pretraining: each stage learns, the held-out shape stays unseen, the folder is an SD pipeline."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPModel

from evaluation.tiny_clip import build_tiny_clip
from toy_world import pretrain_base as pb
from toy_world.world import HELD_OUT_SHAPE, HELD_OUT_SHAPES, SHAPES, scenes, sentence_caption

# Narrow stand-ins for the default widths: the same code paths, a fraction of the CPU time.
SMALL_VAE = (16, 16, 32)
SMALL_UNET = (16, 32)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny CLIP saved like the toy CLIP is (CLIPModel + CLIPProcessor); its vocabulary covers the world."""
    folder = tmp_path_factory.mktemp("clip")
    build_tiny_clip(folder)
    return folder


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return pb.render_pool(pb.training_scenes(0, 16))


# --- data


def test_training_scenes_never_show_a_held_out_shape() -> None:
    pool = pb.training_scenes(3, 3000)
    shapes = {scene.shape for scene in pool}
    assert HELD_OUT_SHAPE in HELD_OUT_SHAPES and not shapes & set(HELD_OUT_SHAPES)
    assert shapes == set(SHAPES) - set(HELD_OUT_SHAPES)  # every other shape is learned
    captions, _ = pb.caption_table(pool)
    assert not [c for c in captions if set(HELD_OUT_SHAPES) & set(c.replace(",", " ").split())]


def test_caption_table_indexes_sentence_and_tag_captions() -> None:
    pool = scenes(0, 50)
    captions, rows = pb.caption_table(pool)
    assert captions[pb.EMPTY_CAPTION] == ""
    assert len(set(captions)) == len(captions)
    assert rows.shape == (50, 2)
    assert captions[rows[7, 0]] == sentence_caption(pool[7])
    assert rows.min() > pb.EMPTY_CAPTION  # no scene is captioned empty: only dropout makes empty captions


def test_choose_captions_mixes_styles_and_drops_about_the_given_fraction() -> None:
    pairs = torch.tensor([[1, 2]] * 20_000)
    chosen = pb.choose_captions(pairs, 0.1, torch.Generator().manual_seed(0))
    empty = (chosen == pb.EMPTY_CAPTION).float().mean().item()
    assert 0.09 < empty < 0.11
    assert 0.4 < (chosen == 1).float().mean().item() / 0.9 < 0.6
    assert set(chosen.tolist()) == {pb.EMPTY_CAPTION, 1, 2}


def test_render_pool_matches_across_worker_counts() -> None:
    pool = pb.training_scenes(1, 40)
    serial = pb.render_pool(pool, workers=1, chunk=16)
    parallel = pb.render_pool(pool, workers=2, chunk=16)
    assert serial.dtype == torch.uint8 and serial.shape == (40, 3, 64, 64)
    assert torch.equal(serial, parallel)


# --- stages learn


@torch.no_grad()
def reconstruction_loss(vae: torch.nn.Module, images: torch.Tensor) -> float:
    pixels = pb.to_pixels(images)
    decoded = vae.decode(vae.encode(pixels).latent_dist.mean).sample
    return (decoded - pixels).abs().mean().item()


def test_a_few_vae_steps_lower_the_reconstruction_loss(images: torch.Tensor) -> None:
    vae = pb.build_vae(SMALL_VAE, seed=0).eval()
    before = reconstruction_loss(vae, images)
    record = pb.train_vae(
        vae, images, steps=30, batch_size=8, lr=3e-3, kl_weight=1e-5, warmup_fraction=0.1,
        device=torch.device("cpu"), seed=0,
    )  # fmt: skip
    after = reconstruction_loss(vae, images)
    assert record["steps_done"] == 30
    assert after < 0.85 * before, (before, after)


def test_a_few_unet_steps_lower_the_diffusion_loss() -> None:
    torch.manual_seed(0)
    # Eight smooth "latents", each tied to its own caption embedding: a small but conditional task.
    mean = torch.nn.functional.interpolate(torch.randn(8, 4, 4, 4), size=16, mode="bilinear")
    std = torch.full_like(mean, 0.05)
    embeddings = torch.randn(17, 77, 32)
    pairs = torch.arange(1, 17).view(8, 2)
    unet = pb.build_unet(32, SMALL_UNET, seed=0)
    scheduler = pb.build_scheduler()

    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(mean.shape, generator=generator)
    timesteps = torch.randint(100, 900, (8,), generator=generator)

    def loss() -> float:
        unet.eval()
        with torch.no_grad():
            return pb.diffusion_loss(unet, scheduler, mean, embeddings[pairs[:, 0]], noise, timesteps, None).item()

    before = loss()
    ema_unet, record = pb.train_unet(
        unet, scheduler, mean, std, 1.0, embeddings, pairs, steps=40, batch_size=8, lr=2e-3,
        warmup_fraction=0.1, empty_caption_prob=0.1, min_snr_gamma=5.0, ema_decay=0.9, grad_clip=1.0,
        device=torch.device("cpu"), seed=0,
    )  # fmt: skip
    after = loss()
    assert record["steps_done"] == 40
    assert after < 0.8 * before, (before, after)
    assert ema_unet is not unet  # the saved UNet is the average, not the last step's weights


def test_pretraining_is_seeded_the_same_seed_gives_the_same_weights(images: torch.Tensor) -> None:
    """Tiny VAE and UNet stages twice with one seed: identical weights; another seed: different ones."""

    def pretrain(seed: int) -> list[torch.Tensor]:
        vae = pb.build_vae(SMALL_VAE, seed=seed)
        pb.train_vae(
            vae, images, steps=3, batch_size=4, lr=3e-3, kl_weight=1e-5, warmup_fraction=0.1,
            device=torch.device("cpu"), seed=seed,
        )  # fmt: skip
        mean, std = pb.encode_pool(vae, images, torch.device("cpu"))
        embeddings = torch.randn(33, 77, 32, generator=torch.Generator().manual_seed(seed))
        pairs = torch.arange(1, 33).view(16, 2)
        unet, _ = pb.train_unet(
            pb.build_unet(32, SMALL_UNET, seed=seed + 1), pb.build_scheduler(), mean, std, 1.0, embeddings, pairs,
            steps=3, batch_size=4, lr=2e-3, warmup_fraction=0.1, empty_caption_prob=0.1, min_snr_gamma=5.0,
            ema_decay=0.9, grad_clip=1.0, device=torch.device("cpu"), seed=seed + 2,
        )  # fmt: skip
        return [t.detach().clone() for t in (*vae.parameters(), *unet.parameters())]

    first, again, other = pretrain(0), pretrain(0), pretrain(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


# --- the saved folder


def test_saved_folder_is_a_loadable_sd_pipeline_with_the_clip_text_tower(
    clip_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rendered: list[list] = []  # every scene list the script renders: the training pool first
    real_render_pool = pb.render_pool

    def recording_render_pool(pool, workers=1, chunk=256):
        rendered.append(list(pool))
        return real_render_pool(pool, workers, chunk)

    monkeypatch.setattr(pb, "render_pool", recording_render_pool)
    out = tmp_path / "base"
    args = ["--clip", str(clip_dir), "--out", str(out), "--vae-steps", "2", "--unet-steps", "2"]
    args += ["--batch-size", "4", "--vae-batch-size", "4", "--pool-size", "48", "--workers", "1"]
    args += ["--eval-prompts", "3", "--eval-steps", "2"]
    args += ["--device", "cpu", "--vae-channels", ",".join(map(str, SMALL_VAE))]
    args += ["--unet-channels", ",".join(map(str, SMALL_UNET))]
    metrics = pb.main(args)

    assert len(rendered[0]) == 48
    assert not set(HELD_OUT_SHAPES) & {scene.shape for pool in rendered for scene in pool}
    assert not list(tmp_path.glob(".base.*"))  # the temporary folder was renamed, not left behind

    pipeline = StableDiffusionPipeline.from_pretrained(out)
    image = pipeline(
        "a large red circle on a blue background", num_inference_steps=2, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert image.size == (64, 64)

    clip_text = CLIPModel.from_pretrained(clip_dir).text_model.state_dict()
    encoder = pipeline.text_encoder
    encoder_state = getattr(encoder, "text_model", encoder).state_dict()
    assert encoder_state.keys() == clip_text.keys()
    assert all(torch.equal(encoder_state[k], clip_text[k]) for k in clip_text)

    names = {name.rsplit(".", 1)[-1] for name, _ in pipeline.unet.named_modules()}
    assert {"to_q", "to_k", "to_v"} <= names and any(n.endswith("to_out.0") for n, _ in pipeline.unet.named_modules())
    assert pipeline.vae.config.scaling_factor == pytest.approx(metrics["vae"]["scaling_factor"], rel=1e-5)

    written = json.loads((out / "metrics.json").read_text())
    for key in ("matched_clip_score", "shuffled_clip_score", "margin"):
        assert isinstance(written["prompt_alignment"][key], float)
    assert written["seed"] == 0 and written["torch_version"] == torch.__version__
    assert written["command"].startswith("python -m toy_world.pretrain_base --clip")
    assert written["unet"]["steps_done"] == 2 and written["vae"]["steps_done"] == 2
    assert (out / "samples.png").is_file()


def test_text_encoder_is_the_frozen_clip_text_tower(clip_dir: Path) -> None:
    encoder, tokenizer = pb.load_text_encoder(clip_dir)
    assert not any(p.requires_grad for p in encoder.parameters())  # frozen, as SD's CLIP is
    clip = CLIPModel.from_pretrained(clip_dir).eval()
    ids = tokenizer(["a red circle on a blue background"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(encoder(ids)[0], clip.text_model(ids)[0])


def test_training_conditions_on_exactly_the_pipelines_prompt_embeddings(clip_dir: Path) -> None:
    """Training and sampling must agree, the unconditional ("" prompt) embedding of guidance included."""
    encoder, tokenizer = pb.load_text_encoder(clip_dir)
    pipeline = pb.assemble_pipeline(pb.build_vae(SMALL_VAE), pb.build_unet(32, SMALL_UNET), encoder, tokenizer)
    captions = ["a large red circle on a blue striped background", "red circle, blue background, large"]
    trained_on = pb.encode_captions([*captions, ""], tokenizer, encoder, torch.device("cpu"))
    prompt_embeds, negative_embeds = pipeline.encode_prompt(captions, "cpu", 1, True)
    assert torch.allclose(trained_on[:2], prompt_embeds, atol=1e-6)
    assert torch.allclose(trained_on[2], negative_embeds[0], atol=1e-6)


def test_problems_are_reported_together_before_any_training(tmp_path: Path) -> None:
    out = tmp_path / "exists"
    out.mkdir()
    cfg = pb.PretrainConfig(clip=tmp_path / "missing", out=out, batch_size=0, vae_channels=(16, 16))
    with pytest.raises(ValueError) as error:
        pb.pretrain(cfg)
    message = str(error.value)
    for fragment in ("--clip", "--overwrite", "--batch-size", "--vae-channels"):
        assert fragment in message


def test_size_budget_is_checked_before_training(clip_dir: Path, tmp_path: Path) -> None:
    cfg = pb.PretrainConfig(clip=clip_dir, out=tmp_path / "base", size_budget_mb=1.0, device="cpu")
    with pytest.raises(ValueError, match="size-budget"):
        pb.pretrain(cfg)
    assert not (tmp_path / "base").exists()


def test_default_models_fit_the_size_budget_with_the_toy_clip_text_tower() -> None:
    """Defaults against a 96-wide, 3-layer text tower (the toy CLIP's): the world ships within 20 MB."""
    from transformers import CLIPTextConfig, CLIPTextModel

    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=700, hidden_size=96, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4
        )
    )
    cfg = pb.PretrainConfig(clip=Path(), out=Path())
    vae, unet = pb.build_vae(cfg.vae_channels), pb.build_unet(96, cfg.unet_channels)
    assert pb.fp32_megabytes(vae, unet, text) <= cfg.size_budget_mb


# --- evaluation helpers


@pytest.mark.parametrize("count", [2, 3, 10, 33])
def test_derangement_moves_every_item(count: int) -> None:
    for seed in range(5):
        order = pb.derangement(count, seed)
        assert sorted(order) == list(range(count))
        assert all(i != j for i, j in enumerate(order))


class KeywordScorer:
    """Scores 10 per word an image's label shares with the prompt: a stand-in CLIP with a known answer."""

    def score(self, images: list, prompts: list[str]) -> torch.Tensor:
        return torch.tensor(
            [10.0 * len(set(i.info["label"].split()) & set(p.split())) for i, p in zip(images, prompts, strict=True)]
        )


def test_clip_alignment_separates_matched_from_shuffled_prompts() -> None:
    from PIL import Image

    prompts = pb.alignment_prompts(0, 6)
    images = []
    for prompt in prompts:
        image = Image.new("RGB", (64, 64))
        image.info["label"] = prompt
        images.append(image)
    result = pb.clip_alignment(KeywordScorer(), images, prompts, seed=0)
    assert result["matched_clip_score"] > result["shuffled_clip_score"]
    assert result["margin"] == pytest.approx(result["matched_clip_score"] - result["shuffled_clip_score"], abs=1e-3)
    random.Random(0).shuffle(images)  # images no longer match their prompts: the check must notice
    shuffled = pb.clip_alignment(KeywordScorer(), images, prompts, seed=0)
    assert shuffled["matched_clip_score"] < result["matched_clip_score"]


def test_alignment_prompts_are_distinct_in_world_and_free_of_the_held_out_shape(clip_dir: Path) -> None:
    prompts = pb.alignment_prompts(0, 32)
    assert len(set(prompts)) == 32
    assert not [p for p in prompts if set(HELD_OUT_SHAPES) & set(p.split())]
    for shape in HELD_OUT_SHAPES:
        with pytest.raises(ValueError, match="held-out"):
            pb.prompt_alignment(None, clip_dir, [f"a small red {shape} on a blue background", prompts[0]], 0)
