"""``python -m sweeper.import_kohya``: kohya TOML / LoRA_Easy JSON -> an experiment file that composes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from sweeper.import_kohya import ImportResult, import_config, main, write_experiment, yaml_value
from tests.conftest import CONF_DIR, REPO, compose_config

DATA = Path(__file__).parent / "data"
KOHYA_TOML = DATA / "kohya_lora.toml"
LORA_EASY_JSON = DATA / "lora_easy.json"


def write_and_compose(result: ImportResult, tmp_path: Path, name: str = "imported", *overrides: str):
    """Write the experiment under ``tmp_path/experiment`` and compose it exactly as the CLI would."""
    path = write_experiment(result, name, tmp_path / "experiment")
    cfg = compose_config([f"+experiment={name}", f"hydra.searchpath=[file://{tmp_path}]", *overrides])
    return path, cfg


def sources(entries) -> set[str]:
    return {e.source for e in entries}


def leaf_labels(table: dict, path: str = "") -> set[str]:
    labels = set()
    for key, value in table.items():
        label = f"{path}.{key}" if path else key
        labels |= leaf_labels(value, label) if isinstance(value, dict) and key != "optimizer_args" else {label}
    return labels


# --- kohya sd-scripts TOML


def test_kohya_toml_maps_onto_a_config_that_composes(tmp_path):
    result = import_config(KOHYA_TOML)
    path, cfg = write_and_compose(result, tmp_path)
    assert path.read_text().startswith("# @package _global_\n")

    assert cfg.model.source == "diffusers"
    assert cfg.model.path == "/models/sd15/v1-5-pruned-emaonly.safetensors"
    assert cfg.model.vae.endswith("vae-ft-mse-840000-ema-pruned.safetensors")
    assert (cfg.model.kind, cfg.model.prediction_type, cfg.model.clip_skip) == ("sd1", "epsilon", 2)
    assert cfg.model.attention == "xformers" and cfg.model.gradient_checkpointing is True
    assert (cfg.network.dim, cfg.network.alpha, cfg.network.dropout) == (32, 16.0, 0.1)
    assert (cfg.network.unet_lr, cfg.network.text_encoder_lr) == (1e-4, 5e-5)
    assert cfg.network.train_text_encoder is True and cfg.network.train_unet is True
    assert cfg.optimizer.name == "adamw" and cfg.optimizer.lr == 1e-4
    assert list(cfg.optimizer.betas) == [0.9, 0.99] and cfg.optimizer.weight_decay == 0.1
    assert cfg.scheduler.name == "cosine" and cfg.scheduler.warmup_steps == 100
    assert cfg.precision.mixed == "fp16" and cfg.output.precision == "fp16"
    assert (cfg.data.train_dir, cfg.data.reg_dir) == ("/data/chara/img", "/data/chara/reg")
    assert (cfg.data.caption_extension, cfg.data.shuffle_tags, cfg.data.keep_tokens) == (".txt", True, 1)
    assert (cfg.data.max_token_length, cfg.data.cache_latents, cfg.data.flip_aug) == (225, "disk", True)
    assert (cfg.bucket.enabled, cfg.bucket.resolution, cfg.bucket.min_side, cfg.bucket.max_side) == (
        True,
        512,
        256,
        1024,
    )
    assert (cfg.train.epochs, cfg.train.max_steps, cfg.train.batch_size) == (10, None, 2)
    assert (cfg.train.grad_accum_steps, cfg.train.seed, cfg.train.noise_offset) == (2, 1337, 0.05)
    assert cfg.train.min_snr_gamma == 5.0 and cfg.train.save_every_n_epochs == 2
    assert cfg.dropout.tag_rate == 0.05 and cfg.eval.every_n_steps == 500
    assert (cfg.output.dir, cfg.output.name, cfg.output.comment) == ("/out/chara", "chara_v1", "trigger: chara_xyz")
    assert cfg.output.format == "safetensors"


def test_kohya_report_lists_every_unmapped_option_with_a_reason():
    result = import_config(KOHYA_TOML)
    unmapped = {u.source: u.reason for u in result.unmapped}
    assert set(unmapped) == {
        "additional_network_arguments.network_args.conv_dim",
        "additional_network_arguments.network_args.conv_alpha",
        "training_arguments.max_train_steps",
        "training_arguments.logging_dir",
        "training_arguments.log_prefix",
        "training_arguments.multires_noise_iterations",
        "training_arguments.wandb_api_key",
        "training_arguments.my_own_flag",
        "sample_prompt_arguments.sample_sampler",
    }
    assert "max_train_epochs" in unmapped["training_arguments.max_train_steps"]
    assert "MLflow" in unmapped["training_arguments.logging_dir"]
    assert "not an option this importer knows" in unmapped["training_arguments.my_own_flag"]
    assert "euler_a" in unmapped["sample_prompt_arguments.sample_sampler"]

    report = result.report()
    assert "Not mapped (9)" in report
    for source in unmapped:
        assert source in report
    assert "not-a-real-key" not in report, "credentials are never printed"
    assert "additional_network_arguments.network_dim -> network.dim = 32" in report
    assert "optimizer_arguments.optimizer_type -> optimizer=adamw" in report


def test_every_option_in_the_file_is_reported():
    data = tomllib.loads(KOHYA_TOML.read_text())
    reported = sources(import_config(KOHYA_TOML).mapped) | sources(import_config(KOHYA_TOML).unmapped)
    network_args = {"additional_network_arguments.network_args"}
    expected = leaf_labels(data) - network_args - {"optimizer_arguments.optimizer_args"}
    assert expected - reported == set()


def test_kohya_defaults_are_written_when_the_file_leaves_them_out(tmp_path):
    config = tmp_path / "minimal.toml"
    config.write_text('pretrained_model_name_or_path = "/m/sd15"\ntrain_data_dir = "/d"\nnetwork_dim = 8\n')
    _, cfg = write_and_compose(import_config(config), tmp_path)
    assert cfg.network.alpha == 1.0, "kohya's default alpha is 1, not dim"
    assert cfg.network.train_text_encoder is True
    assert cfg.train.max_steps == 1600
    assert cfg.data.caption_extension == ".caption"


def test_the_dataset_config_is_read_inline_and_by_reference(tmp_path):
    (tmp_path / "dataset.toml").write_text(
        "[general]\nshuffle_caption = true\ncaption_extension = 'txt'\n"
        "[[datasets]]\nresolution = 768\nbatch_size = 3\n"
        "  [[datasets.subsets]]\n  image_dir = '/d/chara'\n  num_repeats = 10\n  keep_tokens = 2\n"
        "  [[datasets.subsets]]\n  image_dir = '/d/reg'\n  is_reg = true\n  num_repeats = 1\n"
        "[[datasets]]\nresolution = 512\n"
    )
    config = tmp_path / "train.toml"
    config.write_text("network_dim = 4\ndataset_config = 'dataset.toml'\n")
    result = import_config(config)
    _, cfg = write_and_compose(result, tmp_path)
    assert cfg.data.train_dir == "/d/chara" and cfg.data.reg_dir == "/d/reg"
    assert cfg.data.shuffle_tags is True and cfg.data.keep_tokens == 2
    assert cfg.data.caption_extension == ".txt", "the leading dot is added"
    assert cfg.bucket.resolution == 768 and cfg.train.batch_size == 3
    unmapped = {u.source: u.reason for u in result.unmapped}
    assert "10_<name>" in unmapped["dataset.toml:.datasets[0].subsets[0].num_repeats"]
    assert "one dataset per run" in unmapped["dataset.toml:.datasets[1]"]

    config.write_text("dataset_config = 'missing.toml'\n")
    assert "not found" in {u.source: u.reason for u in import_config(config).unmapped}["dataset_config"]


def test_group_choices_need_an_option_file(tmp_path):
    conf = tmp_path / "conf"
    (conf / "optimizer").mkdir(parents=True)
    (conf / "optimizer" / "adamw.yaml").write_text("name: adamw\n")
    config = tmp_path / "lion.toml"
    config.write_text("optimizer_type = 'Lion'\nlr_scheduler = 'cosine'\n")
    result = import_config(config, conf_dir=conf)
    unmapped = {u.source: u.reason for u in result.unmapped}
    assert "conf/optimizer/lion.yaml" in unmapped["optimizer_type"] and "adamw" in unmapped["optimizer_type"]
    assert "conf/scheduler/cosine.yaml" in unmapped["lr_scheduler"]
    assert result.choices == {}

    (conf / "optimizer" / "lion.yaml").write_text("name: lion\n")
    assert import_config(config, conf_dir=conf).choices == {"optimizer": "lion"}


@pytest.mark.parametrize(
    ("line", "source", "reason"),
    [
        ("network_dim = 'wide'", "network_dim", "whole number"),
        ("clip_skip = true", "clip_skip", "number of layers"),
        ("resolution = '512,768'", "resolution", "bucket.resolution=640"),
        ("optimizer_type = 'DAdaptAdam'", "optimizer_type", "not offered"),
        ("save_model_as = 'ckpt'", "save_model_as", "output.allow_pickle=true"),
        ("network_module = 'lycoris.kohya'", "network_module", "only plain LoRA"),
        ("max_token_length = 100", "max_token_length", "75, 150 or 225"),
        ("lr_scheduler = 'adafactor'", "lr_scheduler", "not offered"),
    ],
)
def test_values_that_do_not_fit_are_reported_not_written(tmp_path, line, source, reason):
    config = tmp_path / "bad.toml"
    config.write_text(line + "\n")
    result = import_config(config)
    unmapped = {u.source: u.reason for u in result.unmapped}
    assert reason in unmapped[source]
    assert source not in result.origins.values()
    write_and_compose(result, tmp_path)  # still composes


def test_special_values_survive_the_yaml(tmp_path):
    config = tmp_path / "odd.toml"
    config.write_text(
        'output_dir = "C:\\\\loras\\\\${HOME}"\ntraining_comment = "日本語: \\"quoted\\" # not a comment"\n'
        "learning_rate = 1e-5\nnoise_offset = 0\n"
    )
    _, cfg = write_and_compose(import_config(config), tmp_path)
    assert cfg.output.dir == "C:\\loras\\${HOME}"
    assert cfg.output.comment == '日本語: "quoted" # not a comment'
    assert cfg.optimizer.lr == 1e-5 and cfg.train.noise_offset == 0.0


@pytest.mark.parametrize("value", [1e-5, 0.5, 3, True, None, [0.9, 0.99], "a: b", "${x}", "C:\\p", 1e16])
def test_yaml_value_reads_back_as_the_same_value(value):
    read = OmegaConf.create(f"key: {yaml_value(value)}")
    assert OmegaConf.to_container(read, resolve=True)["key"] == value


# --- LoRA_Easy_Training_Scripts JSON


def test_lora_easy_json_maps_onto_a_config_that_composes(tmp_path):
    result = import_config(LORA_EASY_JSON)
    assert result.kind == "LoRA_Easy_Training_Scripts JSON"
    _, cfg = write_and_compose(result, tmp_path, "easy")
    assert cfg.model.source == "diffusers" and cfg.model.path == "/models/anything-v4.5-pruned.safetensors"
    assert (cfg.network.dim, cfg.network.alpha) == (32, 16.0)
    assert cfg.network.train_text_encoder is True  # unet_only = false
    assert cfg.data.train_dir == "/data/chara/img" and cfg.data.reg_dir is None
    assert cfg.optimizer.name == "adamw" and list(cfg.optimizer.betas) == [0.9, 0.99]
    assert cfg.scheduler.name == "cosine" and cfg.scheduler.warmup_steps == 0.05
    assert cfg.precision.mixed == "bf16" and cfg.output.precision == "fp16"
    assert cfg.train.seed == 23, "LoRA_Easy hands test_seed to sd-scripts as --seed"
    assert (cfg.train.epochs, cfg.train.max_steps, cfg.train.batch_size) == (8, None, 2)
    assert (cfg.bucket.enabled, cfg.bucket.resolution, cfg.bucket.min_side, cfg.bucket.max_side) == (
        True,
        512,
        320,
        960,
    )
    assert cfg.data.max_token_length == 150 and cfg.data.tag_stats == "count" and cfg.data.cache_latents == "memory"
    assert (cfg.dropout.caption_rate, cfg.dropout.tag_rate) == (0.05, 0.1)
    assert (cfg.output.dir, cfg.output.name, cfg.output.metadata) == ("/out/chara", "chara_easy", True)


def test_lora_easy_report_lists_unmapped_and_empty_options():
    result = import_config(LORA_EASY_JSON)
    assert {u.source for u in result.unmapped} == {"save_json_folder", "save_last_n_epochs", "face_crop_aug_range"}
    assert {"vae", "max_steps", "reg_img_folder", "resume"} <= sources(result.empty)
    mapped = {(m.source, m.target) for m in result.mapped}
    assert ("net_dim", "network.dim") in mapped and ("test_seed", "train.seed") in mapped
    data = json.loads(LORA_EASY_JSON.read_text())
    everything = sources(result.mapped) | sources(result.unmapped) | sources(result.empty)
    assert set(data) - {"optimizer_args"} <= everything
    report = result.report()
    assert "Not mapped (3)" in report and "face_crop_aug_range" in report and "save_json_folder" in report


# --- the command


def test_main_writes_the_file_and_prints_the_report(tmp_path, capsys):
    out = tmp_path / "experiment"
    assert main([str(KOHYA_TOML), "--name", "my.char", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (out / "my_char.yaml").is_file()
    assert "Mapped (" in printed and "Not mapped (9)" in printed and "+experiment=my_char" in printed
    assert main([str(KOHYA_TOML), "--name", "my.char", "--out", str(out)]) == 0  # replaced atomically
    assert sorted(p.name for p in out.iterdir()) == ["my_char.yaml"], "no temporary file left behind"


@pytest.mark.parametrize(
    ("name", "content"),
    [("broken.toml", "network_dim = = 4\n"), ("broken.json", "{'net_dim': 4"), ("list.json", "[1, 2]")],
)
def test_unreadable_input_exits_non_zero_and_writes_nothing(tmp_path, capsys, name, content):
    (tmp_path / name).write_text(content)
    out = tmp_path / "experiment"
    assert main([str(tmp_path / name), "--out", str(out)]) == 2
    assert "cannot import" in capsys.readouterr().err
    assert not out.exists()
    assert main([str(tmp_path / "missing.toml"), "--out", str(out)]) == 2


def test_the_module_runs_as_a_command(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "sweeper.import_kohya", str(LORA_EASY_JSON), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "lora_easy.yaml").is_file() and "Not mapped (3)" in done.stdout


def test_every_shipped_experiment_composes():
    shipped = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
    assert shipped
    for name in shipped:
        cfg = compose_config([f"+experiment={name}"])
        assert cfg.network.dim >= 1
