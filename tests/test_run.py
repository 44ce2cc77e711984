"""A whole run through the task: what MLflow holds afterwards, and the LoRA file it leaves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from mlflow.tracking import MlflowClient
from safetensors import safe_open

from evaluation.sampling import generate_samples, sampling_scheduler
from sweeper.run.setting import run
from training.families.loading import resolve_model_location


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One tracked run with text-encoder co-training, shared by the tests below (it is the slow part)."""
    from tests.conftest import FAST, compose_config

    tmp = tmp_path_factory.mktemp("run")
    cfg = compose_config(
        [
            f"output.dir={tmp / 'out'}",
            f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
            f"tracking.artifact_root={tmp / 'artifacts'}",
            "output.name=shapes",
            "output.comment=spine test",
            "network.dim=4",
            "network.alpha=2",
            "network.train_text_encoder=true",
            "eval.every_n_steps=10",
            *FAST,
        ]
    )
    result = run(cfg, overrides=["network.dim=4"], show_progress=False)
    return cfg, result


def test_run_returns_scores_and_paths(finished_run):
    cfg, result = finished_run
    assert result.lora_path.is_file() and result.lora_path.name == "shapes.safetensors"
    assert 0 <= result.metrics["clip_score"] <= 100
    assert 0 <= result.metrics["clip_score_baseline"] <= 100
    assert set(result.per_prompt) == set(cfg.eval.prompts)
    assert " ui --workers 1 --backend-store-uri sqlite:///" in result.ui_command
    assert result.run_id and MlflowClient(cfg.tracking.uri).get_run(result.run_id).info.run_name.startswith("shapes ")


def test_mlflow_holds_params_metrics_artifacts_and_tags(finished_run):
    cfg, result = finished_run
    client = MlflowClient(result.tracking_uri)
    mlflow_run = client.get_run(result.run_id)
    assert mlflow_run.info.status == "FINISHED"

    params = mlflow_run.data.params
    assert params["network.dim"] == "4"
    assert params["network.alpha"] == "2.0"
    assert params["optimizer.lr"] == str(cfg.optimizer.lr)
    assert params["train.max_steps"] == "20"
    assert json.loads(params["eval.prompts"]) == list(cfg.eval.prompts)

    losses = client.get_metric_history(result.run_id, "train/loss")
    assert sorted(m.step for m in losses) == list(range(1, 21))
    assert len(client.get_metric_history(result.run_id, "train/lr")) == 20
    periodic = client.get_metric_history(result.run_id, "eval/clip_score")
    assert [m.step for m in periodic] == [10]
    metrics = mlflow_run.data.metrics
    for key in ("clip_score", "clip_score_baseline", "wall_time_s", "peak_memory_mb"):
        assert key in metrics
    assert metrics["peak_memory_mb"] > 0
    assert metrics["clip_score/a red circle on a blue background"] == pytest.approx(
        result.per_prompt["a red circle on a blue background"]
    )

    tags = mlflow_run.data.tags
    assert tags["seed"] == str(cfg.train.seed) and tags["test_seed"] == str(cfg.eval.test_seed)
    assert tags["version.torch"] == torch.__version__.split("+")[0] or tags["version.torch"] == torch.__version__
    assert "version.diffusers" in tags and "git_commit" in tags
    assert tags["mlflow.note.content"] == "spine test"

    def listing(path=None):
        files = []
        for item in client.list_artifacts(result.run_id, path):
            files += listing(item.path) if item.is_dir else [item.path]
        return files

    artifacts = set(listing())
    assert {"config/resolved.yaml", "config/overrides.txt", "lora/shapes.safetensors"} <= artifacts
    grids = {"samples/step_000010.png", "samples/final.png", "samples/lora_vs_base.png", "samples/baseline.png"}
    assert grids <= artifacts
    assert "eval/clip_scores.tsv" in artifacts
    overrides = client.download_artifacts(result.run_id, "config/overrides.txt")
    assert Path(overrides).read_text().strip() == "network.dim=4"


def test_lora_file_keys_and_metadata(finished_run):
    cfg, result = finished_run
    with safe_open(str(result.lora_path), framework="pt") as lora:
        keys = set(lora.keys())
        metadata = lora.metadata()
        alpha = lora.get_tensor(next(k for k in keys if k.endswith(".alpha")))
    unet_keys = [k for k in keys if k.startswith("lora_unet_")]
    te_keys = [k for k in keys if k.startswith("lora_te_")]
    assert unet_keys and te_keys and len(unet_keys) + len(te_keys) == len(keys)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
    assert float(alpha) == 2.0
    assert metadata["ss_network_module"] == "networks.lora"
    assert metadata["ss_network_dim"] == "4"
    assert metadata["ss_network_alpha"] == "2"
    assert metadata["ss_base_model_version"] == "tiny_sd_v1"
    assert metadata["ss_output_name"] == "shapes"
    assert metadata["ss_training_comment"] == "spine test"
    assert metadata["ss_seed"] == str(cfg.train.seed)
    assert metadata["ss_steps"] == str(result.selected_step)  # the checkpoint eval.select kept
    assert json.loads(metadata["lora_sweeper_config"])["network"]["dim"] == 4
    assert not list(result.lora_path.parent.glob(".*.tmp")), "no temporary file left behind"


def test_saved_lora_loads_into_a_fresh_pipeline_with_matching_images(finished_run):
    """diffusers' load_lora_weights reproduces what the run's in-memory LoRA generated."""
    cfg, result = finished_run
    pipeline = StableDiffusionPipeline.from_pretrained(
        resolve_model_location(cfg.model), safety_checker=None, requires_safety_checker=False
    )
    pipeline.scheduler = sampling_scheduler(pipeline.scheduler.config, cfg.eval.sampler)

    def sample():
        images = generate_samples(
            pipeline,
            list(cfg.eval.prompts),
            test_seed=cfg.eval.test_seed,
            images_per_prompt=cfg.eval.images_per_prompt,
            num_inference_steps=cfg.eval.num_inference_steps,
            guidance_scale=cfg.eval.guidance_scale,
        )
        return np.stack([np.asarray(image) for row in images for image in row])

    without_lora = sample()
    pipeline.load_lora_weights(str(result.lora_path))
    with_lora = sample()
    assert not np.array_equal(with_lora, without_lora), "the LoRA must change the images"

    from evaluation.clip_score import ClipScorer
    from evaluation.evaluate import evaluate

    scores = evaluate(
        pipeline,
        ClipScorer(cfg.eval.clip_model),
        list(cfg.eval.prompts),
        test_seed=cfg.eval.test_seed,
        images_per_prompt=cfg.eval.images_per_prompt,
        num_inference_steps=cfg.eval.num_inference_steps,
        guidance_scale=cfg.eval.guidance_scale,
    )
    assert scores.per_prompt == pytest.approx(result.per_prompt, abs=1e-4)


# --- a run on a user's own images (issue 15): captions, eval prompts, buckets, resolution


def test_eval_prompts_from_captions_are_distinct_seeded_and_in_dataset_order():
    from sweeper.config.eval_prompts import prompts_from_captions

    captions = [f"a photo of sks dog {i}" for i in range(10)] + ["", "  ", "a photo of sks dog 3"]
    chosen = prompts_from_captions(captions, seed=1234)
    assert chosen == prompts_from_captions(captions, seed=1234)  # the same every time
    assert len(chosen) == 6 and len(set(chosen)) == 6 and set(chosen) <= set(captions)
    assert chosen == sorted(chosen, key=captions.index)
    assert any(prompts_from_captions(captions, seed=s) != chosen for s in range(5))  # the seed does choose
    assert prompts_from_captions(["sks, a dog", "sks, a dog", ""], seed=0) == ["sks, a dog"]  # trigger kept


def test_null_eval_prompts_mean_the_samples_prompts_or_your_captions_or_a_problem(tmp_path):
    from types import SimpleNamespace

    from sweeper.config.eval_prompts import SAMPLE_DIR, SAMPLE_PROMPTS, resolve_eval_prompts
    from training.data.scan import ImageRecord

    def cfg(train_dir, prompts=None):
        return SimpleNamespace(
            eval=SimpleNamespace(prompts=prompts, test_seed=1), data=SimpleNamespace(train_dir=train_dir)
        )

    records = [
        ImageRecord(tmp_path / "a.png", "a red cube", 1),
        ImageRecord(tmp_path / "r.png", "a cube", 1, is_reg=True),
    ]
    sample_written_oddly = str(SAMPLE_DIR / "10_star" / "..")
    assert resolve_eval_prompts(cfg(sample_written_oddly), records)[0].prompts == list(SAMPLE_PROMPTS)
    mine = resolve_eval_prompts(cfg(str(tmp_path)), records)[0]
    assert (mine.prompts, mine.source) == (["a red cube"], "your captions")  # not the regularisation caption
    given = resolve_eval_prompts(cfg(str(tmp_path), ["x"]), records)[0]
    assert (given.prompts, given.source) == (["x"], "eval.prompts")
    none, problems = resolve_eval_prompts(cfg(str(tmp_path)), [ImageRecord(tmp_path / "a.png", "", 1)])
    assert none is None and "eval.prompts" in problems[0] and "empty" in problems[0]


def test_a_resolution_far_above_the_model_or_the_images_is_warned_with_numbers():
    from training.data.resolution import resolution_warnings

    native, images = resolution_warnings(512, 64, [(64, 64), (80, 48)])
    assert "training resolution 512 px (bucket.resolution) is 8x the base model's native 64 px" in native
    assert "64x the pixels" in native and "bucket.resolution=null (= 64)" in native
    assert "8.0x the largest training image's shorter side (64 px; the 2 images' shorter sides run 48-64 px)" in images
    assert resolution_warnings(768, 512, [(1024, 768)]) == []  # a usual SD1.5 fine-tune size
    assert resolution_warnings(64, 64, []) == []


def test_a_run_on_own_images_says_what_it_captioned_evaluated_and_bucketed(make_cfg, tmp_path, capsys):
    from PIL import Image

    from sweeper.run.task import _baseline_key

    folder = tmp_path / "my_images" / "3_sks bar"
    folder.mkdir(parents=True)
    captions = ["a red bar, sks", "a blue bar", "a green bar", "a red bar, sks", None, None]
    sizes = [(48, 24), (24, 48), (60, 30), (30, 60), (40, 30), (30, 40)]
    for i, (caption, size) in enumerate(zip(captions, sizes, strict=True)):
        Image.new("RGB", size, (40 * i, 120, 200)).save(folder / f"{i}.png")
        if caption is not None:
            (folder / f"{i}.txt").write_text(caption, encoding="utf-8")
    cfg = make_cfg(
        f"data.train_dir={tmp_path / 'my_images'}",
        "data.missing_captions=class_tokens",
        "eval.prompts=null",
        "bucket.enabled=true",
        "train.max_steps=2",
    )

    result = run(cfg, show_progress=False)
    out = capsys.readouterr().out

    # 1: the images without captions are counted, named and trained on their folder's class tokens
    missing = "warning: data.train_dir: 2 of 6 images have no .txt caption file (data.caption_extension)"
    assert f"{missing}: '{folder / '4.png'}', '{folder / '5.png'}'; they are captioned with their folder's" in out
    # 3: the eval prompts are the distinct captions (4 of them: fewer than 6), said and logged as the run's prompts
    prompts = ["a red bar, sks", "a blue bar", "a green bar", "sks bar"]
    assert f"Eval prompts (from your captions, picked with eval.test_seed=1234): {'; '.join(prompts)}" in out
    assert list(cfg.eval.prompts) == prompts and set(result.per_prompt) == set(prompts)
    assert json.loads(_baseline_key(cfg, 64))["eval"]["prompts"] == prompts  # what the baseline cache is keyed by
    # 4: the default step at 64 px is 8, and the startup output shows the buckets in use
    used = "4 buckets in use (of 17): 40x88 (2 images), 88x40 (2 images), 56x72 (1 image), 72x56 (1 image)"
    assert f"Buckets (resolution 64, step 8): {used}" in out
    # 5: 64 px is over twice the largest image's shorter side (30 px)
    assert "warning: training resolution 64 px is 2.1x the largest training image's shorter side (30 px" in out

    client = MlflowClient(result.tracking_uri)
    logged = client.get_run(result.run_id).data
    assert json.loads(logged.params["eval.prompts"]) == prompts
    assert logged.tags["eval.prompts_source"] == "your captions" and logged.tags["data.uncaptioned_images"] == "2"
    assert "2.1x the largest" in logged.tags["warning.resolution"]
    table = Path(client.download_artifacts(result.run_id, "data/missing_captions.tsv", str(tmp_path)))
    assert (
        table.read_text(encoding="utf-8")
        == f"image\tcaption\n{folder / '4.png'}\tsks bar\n{folder / '5.png'}\tsks bar\n"
    )
    resolved = Path(client.download_artifacts(result.run_id, "config/resolved.yaml", str(tmp_path)))
    assert "- sks bar" in resolved.read_text(encoding="utf-8")  # what a reproduction runs with
