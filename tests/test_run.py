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
from sweeper.task import run
from training.models import resolve_model_location


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
    assert result.ui_command.startswith("mlflow ui --backend-store-uri sqlite:///")


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
    assert {"samples/step_000010.png", "samples/final_step_000020.png", "samples/baseline.png"} <= artifacts
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
