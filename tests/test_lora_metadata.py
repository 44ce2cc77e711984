"""The LoRA file as other tools see it: kohya's ss_* keys, the model spec, the hashes, the run link,
the minimal set of output.metadata=false, file permissions, and reproduce from a file."""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from sweeper import reproduce
from sweeper.run.setting import run
from training.families.sd import SD2
from training.network.file import kohya_hashes, save_lora_file, tensors_sha256
from training.network.metadata import (
    MINIMAL_METADATA_KEYS,
    VOLATILE_METADATA_KEYS,
    config_sha256,
    kohya_metadata,
    modelspec,
    stable_metadata,
)

# What A1111/Forge show or use (kohya's train_network.py names), checked on a real run's file.
DISPLAY_KEYS = (
    "ss_sd_model_name",
    "ss_clip_skip",
    "ss_resolution",
    "ss_num_train_images",
    "ss_num_reg_images",
    "ss_bucket_info",
    "ss_dataset_dirs",
    "ss_learning_rate",
    "ss_unet_lr",
    "ss_text_encoder_lr",
    "ss_lr_scheduler",
    "ss_optimizer",
    "ss_max_train_steps",
    "ss_noise_offset",
    "ss_min_snr_gamma",
    "ss_training_started_at",
    "ss_training_finished_at",
    "ss_tag_frequency",
    "ss_v2",
    "ss_network_args",
    "ss_num_epochs",
    "ss_epoch",
    "ss_batch_size_per_device",
    "ss_mixed_precision",
)
MODELSPEC_KEYS = (
    "modelspec.sai_model_spec",
    "modelspec.architecture",
    "modelspec.implementation",
    "modelspec.title",
    "modelspec.resolution",
    "modelspec.prediction_type",
    "modelspec.date",
)


def metadata_of(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as lora:
        return dict(lora.metadata())


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    from tests.conftest import FAST, compose_config

    tmp = tmp_path_factory.mktemp("meta")

    def one(name: str, *overrides: str):
        cfg = compose_config(
            [
                f"output.dir={tmp / name}",
                f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
                f"tracking.artifact_root={tmp / 'artifacts'}",
                f"output.name={name}",
                *FAST,
                "train.max_steps=4",
                *overrides,
            ]
        )
        return cfg, run(cfg, show_progress=False)

    return one


def test_a_runs_file_holds_kohyas_keys_in_kohyas_formats(lora_run):
    _, result = lora_run("full", "optimizer.lr=3e-4", "train.min_snr_gamma=5")
    meta = metadata_of(result.lora_path)
    missing = [k for k in (*DISPLAY_KEYS, *MODELSPEC_KEYS, "sshs_model_hash", "sshs_legacy_hash") if k not in meta]
    assert not missing, missing

    assert meta["ss_v2"] == "False"  # A1111 lists it as SD1, not SD2
    assert meta["ss_resolution"] == "(64, 64)"
    assert meta["ss_clip_skip"] == "1"
    assert meta["ss_learning_rate"] == "0.0003" and meta["ss_unet_lr"] == "0.0003"
    assert meta["ss_text_encoder_lr"] == "None"  # no text-encoder LoRA in this run
    assert meta["ss_min_snr_gamma"] == "5.0" and meta["ss_noise_offset"] == "None"
    assert meta["ss_lr_scheduler"] == "constant"
    assert meta["ss_optimizer"] == "torch.optim.adamw.AdamW(betas=(0.9, 0.999),weight_decay=0.01,eps=1e-08)"
    assert meta["ss_max_train_steps"] == "4" and meta["ss_steps"] == "4"
    assert float(meta["ss_training_started_at"]) <= float(meta["ss_training_finished_at"])
    assert datetime.fromisoformat(meta["modelspec.date"])
    assert json.loads(meta["ss_network_args"]) == {}

    dirs = json.loads(meta["ss_dataset_dirs"])
    assert sum(d["img_count"] * d["n_repeats"] for d in dirs.values()) == int(meta["ss_num_train_images"]) > 0
    assert all(set(d) == {"n_repeats", "img_count"} for d in dirs.values())
    assert meta["ss_num_reg_images"] == "0"
    buckets = json.loads(meta["ss_bucket_info"])
    assert [b["resolution"] for b in buckets["buckets"].values()] == [[64, 64]]
    assert sum(b["count"] for b in buckets["buckets"].values()) == int(meta["ss_num_train_images"])
    assert isinstance(buckets["mean_img_ar_error"], float)
    tags = json.loads(meta["ss_tag_frequency"])  # without data.tag_stats
    assert set(tags) == set(dirs) and all(isinstance(n, int) for t in tags.values() for n in t.values())

    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.implementation"] == "diffusers"
    assert meta["modelspec.title"] == "full"
    assert meta["modelspec.resolution"] == "64x64"
    assert meta["modelspec.prediction_type"] == "epsilon"
    # a LoRA of the random tiny model says what it is: no tool or user takes it for an SD1.x LoRA
    assert meta["ss_base_model_version"] == "tiny_sd_v1"
    assert meta["modelspec.description"].startswith("a test model: lora-sweeper's tiny SD1.x-architecture model")
    assert result.note and "scores mean nothing" in result.note

    # the file leads back to its run and its config
    assert meta["lora_sweeper_run_id"] == result.run_id
    assert meta["lora_sweeper_config_sha256"] == config_sha256(json.loads(meta["lora_sweeper_config"]))
    # UIs take sshs_model_hash instead of hashing the file: it must be A1111's hash of the data region
    assert meta["sshs_model_hash"] == tensors_sha256(result.lora_path)
    assert len(meta["sshs_legacy_hash"]) == 8


def test_metadata_false_writes_the_minimum_loaders_need(lora_run):
    _, result = lora_run("slim", "output.metadata=false")
    meta = metadata_of(result.lora_path)
    assert set(meta) == {
        *MINIMAL_METADATA_KEYS,
        *MODELSPEC_KEYS,
        "modelspec.description",  # the tiny test model says what it is
        "sshs_model_hash",
        "sshs_legacy_hash",
        "lora_sweeper_run_id",
        "lora_sweeper_config_sha256",
    }
    assert meta["ss_v2"] == "False" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["ss_network_dim"] == "8" and json.loads(meta["ss_network_args"]) == {}


def test_sd2_and_v_prediction_are_named_as_kohya_names_them():
    network = SimpleNamespace(dim=4, alpha=4.0)
    common = dict(output_name="x", comment="", seed=0, steps=1, resolved_config={})
    assert kohya_metadata(network, base_model_version="sd_v2", v2=True, **common)["ss_v2"] == "True"
    assert kohya_metadata(network, base_model_version="sd_v1", **common)["ss_v2"] == "False"
    spec = dict(title="t", resolution=768, clip_skip=2, timestep_range=(0, 500))
    v = modelspec(architecture=SD2.architecture(True), prediction_type=SD2.modelspec_prediction_type(True), **spec)
    assert v["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora" and v["modelspec.prediction_type"] == "v"
    assert v["modelspec.encoder_layer"] == "2" and v["modelspec.timestep_range"] == "0,500"
    assert (
        modelspec(architecture=SD2.architecture(False), prediction_type="epsilon", **spec)["modelspec.architecture"]
        == "stable-diffusion-v2-512/lora"
    )


def test_kohya_hashes_follow_the_additional_networks_algorithm():
    # > 1 MiB so the legacy hash's window (bytes 1 MiB .. 1 MiB + 64 KiB) lies inside the tensor data
    g = torch.Generator().manual_seed(0)
    tensors = {"lora_unet_x.lora_down.weight": torch.randn(8, 40000, generator=g)}
    metadata = {"ss_network_dim": "8", "modelspec.title": "ignored by the hashes"}
    hashes = kohya_hashes(tensors, metadata)
    other_meta = kohya_hashes(tensors, {**metadata, "modelspec.title": "changed"})
    assert hashes == other_meta  # only ss_* keys enter the serialisation that is hashed
    assert (
        hashes["sshs_model_hash"]
        == hashlib.sha256(tensors["lora_unet_x.lora_down.weight"].numpy().tobytes()).hexdigest()
    )
    changed = {"lora_unet_x.lora_down.weight": tensors["lora_unet_x.lora_down.weight"].clone()}
    changed["lora_unet_x.lora_down.weight"].view(-1)[270_000] += 1  # a value inside the legacy window
    assert kohya_hashes(changed, metadata)["sshs_legacy_hash"] != hashes["sshs_legacy_hash"]


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_the_file_mode_follows_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        path = save_lora_file(tmp_path / "lora", {"a.lora_down.weight": torch.ones(2, 2)}, {})
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == mode


def test_reproduce_from_the_lora_file_alone(lora_run, tmp_path, capsys):
    _, result = lora_run("source")
    code = reproduce.main([str(result.lora_path), "--tracking-uri", result.tracking_uri, "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"Reproducing {result.run_id}" in out  # found its run through lora_sweeper_run_id
    again = tmp_path / result.lora_path.name
    assert tensors_sha256(again) == tensors_sha256(result.lora_path)
    old, new = metadata_of(result.lora_path), metadata_of(again)
    assert stable_metadata(old) == stable_metadata(new)
    differing = sorted(k for k in old if old[k] != new.get(k))
    assert differing and set(differing) <= set(VOLATILE_METADATA_KEYS)
    assert "differs only by when/which run wrote it: " + ", ".join(differing) in out

    # without the MLflow store, the config the file carries is enough
    elsewhere = f"sqlite:///{tmp_path / 'empty.db'}"
    code = reproduce.main([str(result.lora_path), "--tracking-uri", elsewhere, "--output-dir", str(tmp_path / "b")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "using the config stored in the file" in out and "bit-identical LoRA tensors" in out
