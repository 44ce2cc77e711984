"""``python -m sweeper.import_kohya``: kohya TOML / LoRA_Easy TOML or JSON -> an experiment file that composes."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from sweeper.config.validate import validate
from sweeper.import_kohya import ImportResult, import_config, main, write_experiment, yaml_value
from sweeper.kohya_import.machine import check_here
from tests.conftest import CONF_DIR, REPO, compose_config, run_main

DATA = Path(__file__).parent / "data"
KOHYA_TOML = DATA / "kohya_lora.toml"
LORA_EASY_JSON = DATA / "lora_easy.json"
LORA_EASY_TOML = DATA / "lora_easy.toml"  # LoRA_Easy's current format: [network_args.args], [[subsets]], ...
SUBSETS_TOML = DATA / "kohya_subsets.toml"  # its dataset_config: two training subsets and a reg subset
SAMPLE = REPO / "data" / "sample"


def write_and_compose(result: ImportResult, tmp_path: Path, name: str = "imported", *overrides: str):
    """Write the experiment under ``tmp_path/experiment`` and compose it exactly as the CLI would."""
    path = write_experiment(result, name, tmp_path / "experiment")
    cfg = compose_config([f"+experiment={name}", f"hydra.searchpath=[file://{tmp_path}]", *overrides])
    return path, cfg


def sources(entries) -> set[str]:
    return {e.source for e in entries}


def leaf_labels(table: dict, path: str = "") -> set[str]:
    """``section.key`` of every value in a parsed file; ``subsets[0].key`` inside arrays of tables."""
    labels = set()
    for key, value in table.items():
        label = f"{path}.{key}" if path else key
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for index, item in enumerate(value):
                labels |= leaf_labels(item, f"{label}[{index}]")
        elif isinstance(value, dict):
            labels |= leaf_labels(value, label)
        else:
            labels.add(label)
    return labels


def reported(result: ImportResult) -> set[str]:
    """Every source label the report names: mapped, not mapped, empty, or on this machine."""
    return sources(result.mapped) | sources(result.unmapped) | sources(result.empty) | sources(result.here)


# --- kohya sd-scripts TOML


def test_kohya_toml_maps_onto_a_config_that_composes(tmp_path):
    result = import_config(KOHYA_TOML)
    path, cfg = write_and_compose(result, tmp_path)
    assert path.read_text().startswith("# @package _global_\n")

    assert cfg.model.source == "diffusers"
    assert cfg.model.path == "/models/sd15/v1-5-pruned-emaonly.safetensors"
    assert cfg.model.vae.endswith("vae-ft-mse-840000-ema-pruned.safetensors")
    # v2 = false says "not SD2": SD1, or SDXL with sdxl_train_network.py, so the family is detected from the model
    assert (cfg.model.kind, cfg.model.prediction_type, cfg.model.clip_skip) == (None, "epsilon", 2)
    assert cfg.model.vae_precision == "auto"
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
    # 512 px and kohya's 256 / 1024 / 64 are SD1.5's native size and our defaults relative to it: left to
    # follow the model (null), so the experiment also trains model=tiny at its own 64 px
    assert (cfg.bucket.enabled, cfg.bucket.resolution, cfg.bucket.min_side, cfg.bucket.max_side) == (
        True,
        None,
        None,
        None,
    )
    assert cfg.bucket.step is None
    assert (cfg.train.epochs, cfg.train.max_steps, cfg.train.batch_size) == (10, None, 2)
    assert (cfg.train.grad_accum_steps, cfg.train.seed, cfg.train.noise_offset) == (2, 1337, 0.05)
    assert cfg.train.min_snr_gamma == 5.0 and cfg.train.save_every_n_epochs == 2
    assert cfg.dropout.tag_rate == 0.05 and cfg.eval.every_n_steps == 500
    assert (cfg.output.name, cfg.output.comment, cfg.output.format) == ("chara_v1", "trigger: chara_xyz", "safetensors")
    mapped = {m.source: (m.target, m.value, m.note) for m in result.mapped}
    assert mapped["model_arguments.v2"][:2] == ("", False) and "detects" in mapped["model_arguments.v2"][2]
    assert mapped["dataset_arguments.resolution"] == ("", "512,512", mapped["dataset_arguments.resolution"][2])
    assert "native resolution" in mapped["dataset_arguments.resolution"][2]
    assert {
        mapped[f"dataset_arguments.{k}"][:2] for k in ("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps")
    } == {
        ("", 256),
        ("", 1024),
        ("", 64),
    }


def test_kohya_report_lists_every_unmapped_option_with_a_reason():
    result = import_config(KOHYA_TOML)
    unmapped = {u.source: u.reason for u in result.unmapped}
    assert set(unmapped) == {
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
    assert "Not mapped (7)" in report
    for source in unmapped:
        assert source in report
    assert "not-a-real-key" not in report, "credentials are never printed"
    assert "additional_network_arguments.network_dim -> network.dim = 32" in report
    assert "optimizer_arguments.optimizer_type -> optimizer=adamw" in report
    # networks.lora with conv_dim is kohya's LoRA-C3Lier: a LoCon
    assert 'additional_network_arguments.network_module -> network.type = "locon"' in report
    assert "additional_network_arguments.network_args.conv_dim -> network.conv_dim = 4" in report


def test_every_option_in_the_file_is_reported():
    data = tomllib.loads(KOHYA_TOML.read_text())
    network_args = {"additional_network_arguments.network_args"}
    expected = leaf_labels(data) - network_args - {"optimizer_arguments.optimizer_args"}
    assert expected - reported(import_config(KOHYA_TOML)) == set()
    for fixture in (LORA_EASY_TOML, SUBSETS_TOML, DATA / "kohya_dataset.toml"):
        assert leaf_labels(tomllib.loads(fixture.read_text())) - reported(import_config(fixture)) == set(), fixture


def test_kohya_defaults_are_written_when_the_file_leaves_them_out(tmp_path):
    config = tmp_path / "minimal.toml"
    config.write_text('pretrained_model_name_or_path = "/m/sd15"\ntrain_data_dir = "/d"\nnetwork_dim = 8\n')
    _, cfg = write_and_compose(import_config(config), tmp_path)
    assert cfg.network.alpha == 1.0, "kohya's default alpha is 1, not dim"
    assert cfg.network.train_text_encoder is True
    assert cfg.train.max_steps == 1600
    assert cfg.data.caption_extension == ".caption"
    assert cfg.data.missing_captions == "class_tokens", "kohya captions them with their folder's name"


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
    # /d/chara is not named 10_<name>: its 10 repeats need a data.subsets entry (the reg folder goes with it)
    assert cfg.data.train_dir is None and cfg.data.reg_dir is None
    assert [dict(s) for s in cfg.data.subsets] == [
        _entry("/d/chara", repeats=10, keep_tokens=2),
        _entry("/d/reg", repeats=1, is_reg=True),
    ]
    assert cfg.data.shuffle_tags is True and cfg.data.keep_tokens == 0
    assert cfg.data.caption_extension == ".txt", "the leading dot is added"
    assert cfg.bucket.resolution == 768 and cfg.train.batch_size == 3
    unmapped = {u.source: u.reason for u in result.unmapped}
    assert "one dataset (one resolution and batch size) per run" in unmapped["dataset.toml:.datasets[1]"]

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
        ("network_module = 'lycoris.kohya'\nnetwork_args = ['algo=ia3']", "network_module", "algo=ia3 is not offered"),
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
        'vae = "C:\\\\loras\\\\${HOME}"\ntraining_comment = "日本語: \\"quoted\\" # not a comment"\n'
        "learning_rate = 1e-5\nnoise_offset = 0\n"
    )
    _, cfg = write_and_compose(import_config(config), tmp_path)
    assert cfg.model.vae == "C:\\loras\\${HOME}"
    assert cfg.output.comment == '日本語: "quoted" # not a comment'
    assert cfg.optimizer.lr == 1e-5 and cfg.train.noise_offset == 0.0


@pytest.mark.parametrize(
    "value", [1e-5, 0.5, 3, True, None, [0.9, 0.99], "a: b", "${x}", "C:\\p", 1e16, {"dir": "/a: b", "repeats": 2}]
)
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
        None,
        320,
        960,
    )
    assert cfg.data.max_token_length == 150 and cfg.data.tag_stats == "count" and cfg.data.cache_latents == "memory"
    assert (cfg.dropout.caption_rate, cfg.dropout.tag_rate) == (0.05, 0.1)
    assert (cfg.output.name, cfg.output.metadata) == ("chara_easy", True)


def test_lora_easy_report_lists_unmapped_and_empty_options():
    result = import_config(LORA_EASY_JSON)
    assert {u.source for u in result.unmapped} == {"save_json_folder", "save_last_n_epochs", "face_crop_aug_range"}
    assert {"vae", "max_steps", "reg_img_folder", "resume"} <= sources(result.empty)
    mapped = {(m.source, m.target) for m in result.mapped}
    assert ("net_dim", "network.dim") in mapped and ("test_seed", "train.seed") in mapped
    data = json.loads(LORA_EASY_JSON.read_text())
    assert set(data) - {"optimizer_args"} <= reported(result)
    assert "output_folder" in sources(result.here), "/out/chara: a folder of the machine the file was written on"
    report = result.report()
    assert "Not mapped (3)" in report and "face_crop_aug_range" in report and "save_json_folder" in report


# --- the command


def test_main_writes_the_file_and_prints_the_report(tmp_path, capsys):
    out = tmp_path / "experiment"
    assert main([str(KOHYA_TOML), "--name", "my.char", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (out / "my_char.yaml").is_file()
    assert "Mapped (" in printed and "Not mapped (7)" in printed and "+experiment=my_char" in printed
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


# --- LoRA_Easy_Training_Scripts' current TOML ([general_args.args], [network_args.args], [[subsets]], ...)


def test_lora_easy_toml_round_trip_keeps_every_value(tmp_path):
    result = import_config(LORA_EASY_TOML)
    assert result.kind == "LoRA_Easy_Training_Scripts TOML"
    path, cfg = write_and_compose(result, tmp_path, "easy_toml")

    assert cfg.model.source == "diffusers"
    assert cfg.model.path == "F:/Desktop/stable diffusion/LoRA/nai-fp16.safetensors"
    assert (cfg.model.clip_skip, cfg.model.attention, cfg.model.gradient_checkpointing) == (2, "xformers", True)
    assert cfg.model.vae_precision == "fp32", "no_half_vae"
    assert (cfg.network.dim, cfg.network.alpha, cfg.network.dropout) == (32, 16.0, 0.1)
    assert (cfg.network.unet_lr, cfg.network.text_encoder_lr, cfg.network.train_text_encoder) == (1e-4, 5e-5, True)
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.weight_decay) == ("adamw8bit", 1e-4, 0.1)
    assert list(cfg.optimizer.betas) == [0.9, 0.99]
    assert (cfg.scheduler.name, cfg.scheduler.num_cycles, cfg.scheduler.warmup_steps) == ("cosine", 2, 0.05)
    assert cfg.precision.mixed == "fp16"
    assert (cfg.train.epochs, cfg.train.max_steps, cfg.train.batch_size, cfg.train.grad_accum_steps) == (2, None, 2, 2)
    assert (cfg.train.seed, cfg.train.max_grad_norm, cfg.train.min_snr_gamma) == (23, 1.0, 5.0)
    assert (cfg.train.noise_offset, cfg.train.save_every_n_epochs, cfg.train.timestep_range) == (0.05, 1, None)
    assert cfg.data.train_dir == "F:/Desktop/stable diffusion/LoRA/lora_datasets/atla_data", "10_atla's parent"
    assert list(cfg.data.subsets) == []
    assert (cfg.data.caption_extension, cfg.data.keep_tokens, cfg.data.shuffle_tags) == (".txt", 1, True)
    assert (cfg.data.flip_aug, cfg.data.color_aug, cfg.data.random_crop) == (False, False, True)
    assert (cfg.data.num_workers, cfg.data.persistent_workers, cfg.data.max_token_length) == (1, True, 225)
    assert (cfg.data.prior_loss_weight, cfg.data.tag_stats, cfg.data.missing_captions) == (1.0, "count", "warn")
    assert (cfg.bucket.enabled, cfg.bucket.resolution, cfg.bucket.min_side, cfg.bucket.max_side) == (
        True,
        None,
        None,
        None,
    )
    assert (cfg.eval.sampler, cfg.eval.every_n_steps) == ("ddim", 100)
    assert (cfg.output.name, cfg.output.precision, cfg.output.format) == ("test", "fp16", "safetensors")
    assert cfg.output.comment == "atla, trigger: atla_style"
    assert OmegaConf.to_container(cfg.output)["dir"] == "${hydra:runtime.output_dir}", "F:/Desktop is not here"
    assert "override /optimizer: adamw8bit" in path.read_text()

    unmapped = {u.source: u.reason for u in result.unmapped}
    assert set(unmapped) == {
        "saving_args.args.save_last_n_epochs",
        "saving_args.args.save_toml",
        "sample_args.args.sample_prompts",
        "logging_args.args.log_with",
        "logging_args.args.logging_dir",
    }
    assert (cfg.network.type, cfg.network.conv_dim, cfg.network.conv_alpha) == ("locon", 8, 4.0), "kohya's C3Lier"
    report = result.report()
    assert "network_alpha absent" not in report and "network_args.args.network_alpha -> network.alpha = 16.0" in report
    assert "subsets[0].num_repeats = 10 -> nothing to set" in report and "10_atla/" in report
    nothing = {m.source for m in result.mapped if not m.target}
    assert {"train_mode.train_mode", "subsets[0].name", "general_args.args.lowram"} <= nothing
    assert {"network_args.args.min_timestep", "network_args.args.max_timestep"} <= nothing, "the full range"


def _entry(folder: str, **fields) -> dict:
    """A data.subsets entry as composed: the schema's defaults plus ``fields``."""
    entry = {"dir": folder, "repeats": 1, "caption_extension": None, "keep_tokens": None, "class_tokens": None}
    return {**entry, "is_reg": False, **fields}


def _lora_easy_subset(tmp_path: Path, image_dir: str, num_repeats: int = 10) -> ImportResult:
    config = tmp_path / "easy.toml"
    config.write_text(
        f"[[subsets]]\nnum_repeats = {num_repeats}\nimage_dir = '{image_dir}'\ncaption_extension = '.txt'\n"
        "[general_args.args]\nmax_train_epochs = 1\n"
    )
    return import_config(config)


def test_num_repeats_is_recognised_from_the_folder_name(tmp_path):
    """LoRA_Easy names a subset's folder <num_repeats>_<name>: its parent is data.train_dir in kohya's layout."""
    result = _lora_easy_subset(tmp_path, "F:/datasets/atla_data/10_atla")
    assert result.values["data.train_dir"] == "F:/datasets/atla_data" and "data.subsets" not in result.values
    repeats = next(m for m in result.mapped if m.source == "subsets[0].num_repeats")
    assert (repeats.target, repeats.value) == ("", 10) and "10_atla/" in repeats.note
    assert "subsets[0].num_repeats" not in sources(result.unmapped)

    # here, the parent holding only that folder is checked, and trains it 10 times per epoch
    parent = tmp_path / "atla_data"
    shutil.copytree(SAMPLE / "10_star", parent / "10_atla")
    result = _lora_easy_subset(tmp_path, str(parent / "10_atla"))
    assert result.values["data.train_dir"] == str(parent)
    _, cfg = write_and_compose(result, tmp_path, "easy", f"output.dir={tmp_path / 'out'}")
    assert {r.repeats for r in validate(cfg).dataset.records} == {10}


@pytest.mark.parametrize(
    ("image_dir", "num_repeats", "why"),
    [
        ("F:/datasets/atla", 10, "the folder name says no repeats"),
        ("F:/datasets/5_atla", 10, "the folder name says other repeats"),
        ("LOCAL/10_atla", 10, "its parent holds another folder, which would be trained too"),
    ],
)
def test_repeats_the_folder_name_does_not_give_are_a_subset_entry(tmp_path, image_dir, num_repeats, why):
    if image_dir.startswith("LOCAL"):
        (tmp_path / "data" / "10_atla").mkdir(parents=True)
        (tmp_path / "data" / "1_other").mkdir()
        image_dir = image_dir.replace("LOCAL", str(tmp_path / "data"))
    result = _lora_easy_subset(tmp_path, image_dir, num_repeats)
    assert result.values["data.train_dir"] is None, why
    assert result.values["data.subsets"] == [{"dir": image_dir, "repeats": num_repeats, "caption_extension": ".txt"}]


def test_one_repeat_is_the_folder_itself(tmp_path):
    result = _lora_easy_subset(tmp_path, "F:/datasets/atla", num_repeats=1)
    assert result.values["data.train_dir"] == "F:/datasets/atla" and "data.subsets" not in result.values


# --- several subsets (sd-scripts' dataset config)


def test_a_dataset_config_with_several_subsets_imports_every_folder(tmp_path):
    result = import_config(SUBSETS_TOML)
    _, cfg = write_and_compose(result, tmp_path, "subsets")

    where = "kohya_dataset.toml:.datasets[0].subsets"
    assert [dict(s) for s in cfg.data.subsets] == [
        _entry("/data/chara/portraits", repeats=10, keep_tokens=2, class_tokens="chara girl"),
        _entry("/data/chara/outfits", repeats=3, caption_extension=".caption", class_tokens="chara girl, outfit"),
        _entry("/data/reg/girl", repeats=1, keep_tokens=0, class_tokens="girl", is_reg=True),
    ]
    assert cfg.data.train_dir is None, "not the bundled sample: the subsets are the images"
    assert cfg.data.reg_dir is None and cfg.data.missing_captions == "warn"
    # [general]: the defaults of every folder; shared settings are one key for all folders
    assert (cfg.data.caption_extension, cfg.data.keep_tokens, cfg.data.shuffle_tags) == (".txt", 1, True)
    assert (cfg.data.flip_aug, cfg.data.color_aug, cfg.data.prior_loss_weight) == (True, False, 0.5)
    assert (cfg.bucket.resolution, cfg.train.batch_size, cfg.train.max_steps) == (None, 2, 1200)
    assert (cfg.model.path, cfg.network.dim, cfg.network.alpha, cfg.optimizer.lr) == ("/models/sd15", 16, 8.0, 1e-4)
    assert result.unmapped == []

    mapped = {(m.source, m.target) for m in result.mapped}
    assert (f"{where}[1].caption_extension", "data.subsets[1].caption_extension") in mapped
    assert (f"{where}[2].is_reg", "data.subsets[2].is_reg") in mapped
    assert (f"{where}[0].class_tokens", "data.subsets[0].class_tokens") in mapped
    text = (tmp_path / "experiment" / "subsets.yaml").read_text()
    assert (
        f'- {{dir: "/data/chara/portraits", repeats: 10, keep_tokens: 2, class_tokens: "chara girl"}}  # {where}[0]'
        in text
    )

    # on other images: the subsets give way to one folder
    here = {o.source: o.reason for o in result.here}
    assert "data.subsets=[] data.train_dir=" in here["the dataset's subsets"]
    _, cfg = write_and_compose(
        result,
        tmp_path,
        "subsets",
        "model=tiny",
        "data.subsets=[]",
        f"data.train_dir={SAMPLE}",
        f"output.dir={tmp_path}",
    )
    assert len(validate(cfg).dataset.records) == 16


def test_settings_the_subsets_disagree_on_are_reported(tmp_path):
    config = tmp_path / "dataset.toml"
    config.write_text(
        "[[datasets]]\nresolution = 512\n"
        "  [[datasets.subsets]]\n  image_dir = '/a'\n  shuffle_caption = true\n  face_crop_aug_range = [2.0, 4.0]\n"
        "  [[datasets.subsets]]\n  image_dir = '/b'\n  flip_aug = true\n"
        "  [[datasets.subsets]]\n  image_dir = '/c'\n  flip_aug = true\n  shuffle_caption = false\n"
    )
    result = import_config(config)
    unmapped = {u.source: u.reason for u in result.unmapped}
    assert "differs between subsets" in unmapped["datasets[0].subsets[0].shuffle_caption"]
    assert "data.shuffle_tags is one value for all folders" in unmapped["datasets[0].subsets[2].shuffle_caption"]
    assert "datasets[0].subsets[0]: false" in unmapped["datasets[0].subsets[1].flip_aug"], "the default counts"
    assert unmapped["datasets[0].subsets[0].face_crop_aug_range"] == "no face-crop augmentation"
    assert "data.shuffle_tags" not in result.values and "data.flip_aug" not in result.values
    assert [e["dir"] for e in result.values["data.subsets"]] == ["/a", "/b", "/c"]
    assert result.values["data.caption_extension"] == ".caption", "sd-scripts' default for the subsets"


# --- what cannot apply on this machine (point 9)


def test_what_cannot_run_without_cuda_is_reported_with_the_override(tmp_path):
    result = import_config(LORA_EASY_TOML, check=False)
    check_here(result, cuda=False)
    here = {o.source: (o.reason, o.override) for o in result.here}
    assert "needs a CUDA GPU" in here["optimizer_args.args.optimizer_type"][0]
    assert here["optimizer_args.args.optimizer_type"][1] == "optimizer=adamw"
    assert here["general_args.args.mixed_precision"] == (
        "precision=fp16 needs a CUDA GPU (loss scaling); none is here, and fp32 or bf16 run on the CPU",
        "precision=fp32",
    )
    assert here["general_args.args.xformers"][1] == "model.attention=sdpa"
    assert "not on this machine" in here["general_args.args.pretrained_model_name_or_path"][0]
    assert here["general_args.args.pretrained_model_name_or_path"][1] == "model=toy"
    assert "data.train_dir=<your images>" in here["subsets[0].image_dir"][0]
    assert here["subsets[0].image_dir"][1] == f"data.train_dir={SAMPLE}"
    cuda_free = ["optimizer=adamw", "precision=fp32", "model.attention=sdpa"]
    assert result.overrides_here == [*cuda_free, "model=toy", f"data.train_dir={SAMPLE}"]
    report = result.report(name="easy")
    assert "On this machine (6):" in report
    assert f"Run it here: python -m sweeper +experiment=easy {' '.join(cuda_free)} model=toy" in report

    plain = tmp_path / "plain.toml"  # nothing CUDA-only: nothing to report about it
    plain.write_text("optimizer_type = 'AdamW'\nmixed_precision = 'bf16'\nsdpa = true\n")
    result = import_config(plain, check=False)
    check_here(result, cuda=False)
    assert result.here == []


def test_an_output_folder_is_written_only_where_runs_can_write(tmp_path):
    config = tmp_path / "out.toml"
    config.write_text(f"output_dir = '{tmp_path / 'loras'}'\n")
    assert import_config(config).values["output.dir"] == str(tmp_path / "loras")
    config.write_text("output_dir = 'F:/Desktop'\n")
    result = import_config(config)
    assert "output.dir" not in result.values
    assert "left out" in {o.source: o.reason for o in result.here}["output_dir"]


def run_it_here(report: str, name: str) -> list[str]:
    """The overrides of the report's "Run it here" line, as the shell would split them."""
    line = next(line for line in report.splitlines() if line.startswith("Run it here: "))
    words = shlex.split(line.removeprefix("Run it here: "))
    assert words[:4] == ["python", "-m", "sweeper", f"+experiment={name}"]
    return words[4:]


def test_run_it_here_passes_startup_validation_as_printed(tmp_path):
    """The model and the images of the file's machine are replaced in the printed command, so it runs first time
    (composed and validated in-process: every startup check, nothing trained)."""
    result = import_config(LORA_EASY_TOML)  # nai-fp16.safetensors and the images are on F:/ of another machine
    overrides = run_it_here(result.report(name="easy"), "easy")
    assert "model=toy" in overrides and f"data.train_dir={SAMPLE}" in overrides
    where = [f"output.dir={tmp_path / 'out'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]  # the run folder
    _, cfg = write_and_compose(result, tmp_path, "easy", *overrides, *where)
    assert cfg.model.source == "toy" and cfg.data.train_dir == str(SAMPLE)
    validate(cfg)  # raises ConfigError naming every problem


def test_missing_subset_folders_are_replaced_by_the_sample_in_run_it_here(tmp_path):
    config = tmp_path / "subsets.toml"
    config.write_text(
        "[[datasets]]\n[[datasets.subsets]]\nimage_dir = '/nowhere/a'\nclass_tokens = 'a'\n"
        "[[datasets.subsets]]\nimage_dir = '/nowhere/b'\nnum_repeats = 3\n"
    )
    result = import_config(config)
    overrides = run_it_here(result.report(name="subsets"), "subsets")
    assert overrides == ["data.subsets=[]", f"data.train_dir={SAMPLE}", "data.caption_extension=.txt"]
    where = [f"output.dir={tmp_path / 'out'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "model=tiny"]
    _, cfg = write_and_compose(result, tmp_path, "subsets", *overrides, *where)
    assert list(cfg.data.subsets) == [] and cfg.data.caption_extension == ".txt"


def test_an_output_dir_of_another_machine_is_reported_and_left_out(tmp_path):
    """``/home/me/lora/out`` on a machine without ``/home/me/lora``: not created here, runs use their run folder."""
    elsewhere = tmp_path / "home" / "me" / "lora" / "out"
    config = tmp_path / "out.toml"
    config.write_text(f"output_dir = '{elsewhere}'\n")
    result = import_config(config)
    assert "output.dir" not in result.values
    reason = {o.source: o.reason for o in result.here}["output_dir"]
    assert f"its parent folder '{elsewhere.parent}' does not exist on this machine" in reason
    assert "runs write to their run folder" in reason
    assert not (tmp_path / "home").exists(), "nothing of the other machine's folder was made here"
    _, cfg = write_and_compose(result, tmp_path / "conf", "out")
    assert OmegaConf.to_container(cfg.output, resolve=False)["dir"] == "${hydra:runtime.output_dir}"  # the default

    (tmp_path / "home" / "me" / "lora").mkdir(parents=True)  # its parent is here: the folder is made at startup
    assert import_config(config).values["output.dir"] == str(elsewhere)


def test_clip_skip_on_the_built_in_model_is_warned_about(tmp_path):
    config = tmp_path / "skip.toml"
    config.write_text("clip_skip = 2\n")  # no model: the default toy base model, trained on the last layer
    result = import_config(config)
    (warning,) = result.warnings
    assert warning.source == "clip_skip" and "model.clip_skip=2 with model=toy" in warning.message
    assert "never saw" in warning.message and "Turn it off with model.clip_skip=1" in warning.message
    assert "Warnings (1):\n  clip_skip: model.clip_skip=2" in result.report(name="skip")
    assert "# Warnings (see the import report):" in result.yaml("skip")

    result = import_config(LORA_EASY_TOML)  # its model is not here: Run it here trains the toy model instead
    (warning,) = result.warnings
    assert "with model=toy (Run it here's)" in warning.message

    model = tmp_path / "sd15"
    model.mkdir()  # a model here: clip_skip=2 is the file's choice for it
    config.write_text(f"clip_skip = 2\npretrained_model_name_or_path = '{model}'\n")
    assert import_config(config).warnings == []
    config.write_text("clip_skip = 1\n")
    assert import_config(config).warnings == []


def test_captions_from_class_tokens_are_printed_and_written_with_the_experiment(tmp_path):
    images = tmp_path / "chara"
    images.mkdir()
    for stem in ("star_000", "star_001", "star_002"):
        shutil.copy(SAMPLE / "10_star" / f"{stem}.png", images)
    shutil.copy(SAMPLE / "10_star" / "star_000.txt", images)  # one captioned, two not
    config = tmp_path / "chara.toml"
    config.write_text(
        f"[[subsets]]\nimage_dir = '{images}'\nclass_tokens = 'chara girl'\ncaption_extension = '.txt'\n"
        "[[subsets]]\nimage_dir = '/nowhere/reg'\nclass_tokens = 'girl'\nis_reg = true\n"
    )
    result = import_config(config)
    report, written = result.report(name="chara"), result.yaml("chara")
    mine = f'{images}: images without a .txt caption file are captioned "chara girl" (subsets[0].class_tokens; '
    assert f"Captions from class_tokens (2):\n  {mine}2 image(s) there have none now)" in report
    assert '/nowhere/reg: images without a .caption caption file are captioned "girl"' in report
    assert "not on this machine to count" in report
    assert f"# Captions from class_tokens (see the import report):\n#   {mine}2 image(s)" in written


def test_a_warm_up_fraction_is_read_as_one_and_its_problem_says_so(tmp_path):
    """kohya's lr_warmup_steps < 1 is a ratio, as scheduler.warmup_steps < 1 is: a warm-up that covers the run
    is not told to 'give a fraction' when it is one."""
    from training.optim_options import scheduler_problems

    config = tmp_path / "warm.toml"
    config.write_text("lr_scheduler = 'cosine'\nlr_warmup_steps = 0.5\nmax_train_steps = 1\n")
    result = import_config(config)
    (mapped,) = [m for m in result.mapped if m.source == "lr_warmup_steps"]
    assert mapped.value == 0.5 and "fraction of the total steps, in sd-scripts too" in mapped.note
    _, cfg = write_and_compose(result, tmp_path, "warm")
    (problem,) = scheduler_problems(cfg.scheduler, cfg.train.max_steps)
    assert "fraction such as" not in problem
    assert problem.startswith("scheduler.warmup_steps=0.5 is a fraction of the run: 1 warm-up step(s) of its 1")
    assert "train more steps (train.max_steps), or set it to 0" in problem
    assert scheduler_problems(cfg.scheduler, total_steps=4) == []  # 2 of 4 steps
    (problem,) = scheduler_problems(OmegaConf.merge(cfg.scheduler, {"warmup_steps": 0.9}), total_steps=4)
    assert "4 warm-up step(s) of its 4" in problem and "lower it below 0.875" in problem


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ("", True),  # kohya trains the text-encoder LoRA unless told otherwise
        ("network_train_unet_only = true", False),
        ("text_encoder_lr = 0", False),  # a learning rate of 0 would train nothing
        ("network_train_text_encoder_only = true", True),
    ],
)
def test_the_text_encoder_trains_as_kohya_would(tmp_path, lines, expected):
    config = tmp_path / "te.toml"
    config.write_text(f"[network_args.args]\nnetwork_dim = 4\n{lines}\n")
    result = import_config(config)
    assert result.values["network.train_text_encoder"] is expected


@pytest.mark.slow
def test_an_imported_experiment_runs_on_the_bundled_data(tmp_path):
    """The experiment of a LoRA_Easy TOML trains on the bundled data with only the model and the images given,
    plus what the import reported as impossible on this CPU machine (and settings that keep the test short)."""
    result = import_config(LORA_EASY_TOML)
    write_experiment(result, "easy", tmp_path / "conf" / "experiment")
    given = ["+experiment=easy", f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "model=tiny", "eval.clip_model=tiny"]
    given.append(f"data.train_dir={SAMPLE}")
    short = ["train.max_steps=20", "eval.num_inference_steps=2", "eval.images_per_prompt=1"]  # as +debug=fast
    # the model and images "Run it here" would try are given above (the tiny model, which is faster)
    machine = [o for o in result.here if o.override and not o.override.startswith(("model=", "data.train_dir="))]

    if machine:  # without them, startup stops with the reasons the import gave
        refused = run_main(*given, *short, cwd=tmp_path)
        assert refused.returncode != 0
        assert all(o.reason.split(";")[0] in refused.stderr for o in machine)

    done = run_main(*given, *[o.override for o in machine], *short, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Buckets (resolution 64" in done.stdout + done.stderr, "the tiny model's own size, not 512"
    assert list((tmp_path / "outputs" / "runs").glob("*/*/test.safetensors")), "output.name from the file"


# --- SDXL (sd-scripts' sdxl_train_network.py; LoRA_Easy's sdxl switch)

# As kohya_ss writes it for `sdxl_train_network.py --config_file`: nothing in it says SDXL (the script does), so
# it is imported with --sdxl, or carries the kohya_ss GUI's `sdxl = true`.
KOHYA_SDXL = """
[model_arguments]
pretrained_model_name_or_path = "/models/sdxl/sd_xl_base_1.0.safetensors"
v2 = false
no_half_vae = true

[additional_network_arguments]
network_module = "networks.lora"
network_dim = 32
network_alpha = 16
unet_lr = 1e-4
text_encoder_lr = [1e-5, 2e-5]
network_train_unet_only = true

[dataset_arguments]
train_data_dir = "/data/xl/img"
caption_extension = ".txt"
resolution = 1024
enable_bucket = true
min_bucket_reso = 512
max_bucket_reso = 2048
bucket_reso_steps = 32
cache_latents = true

[training_arguments]
mixed_precision = "bf16"
max_train_steps = 2000
clip_skip = 2
gradient_checkpointing = true
cache_text_encoder_outputs = true
cache_text_encoder_outputs_to_disk = true
disable_mmap_load_safetensors = true
train_text_encoder = true
min_timestep = 100
max_timestep = 1000
"""

LORA_EASY_SDXL = """
[[subsets]]
num_repeats = 2
caption_extension = ".txt"
name = "style"
image_dir = "/data/xl/2_style"

[train_mode]
train_mode = "lora"

[general_args.args]
pretrained_model_name_or_path = "/models/sdxl/sd_xl_base_1.0.safetensors"
sdxl = true
mixed_precision = "fp16"
seed = 23
clip_skip = 2
max_train_epochs = 10
no_half_vae = true
cache_text_encoder_outputs = true
gradient_checkpointing = true

[general_args.dataset_args]
resolution = 1024
batch_size = 4

[network_args.args]
network_dim = 16
network_alpha = 8.0
network_train_unet_only = true

[optimizer_args.args]
optimizer_type = "AdamW"
lr_scheduler = "cosine"
learning_rate = 1e-4
unet_lr = 1e-4
text_encoder_lr = [5e-6, 1e-5]

[bucket_args.dataset_args]
enable_bucket = true
max_bucket_reso = 2048
bucket_reso_steps = 32
"""


def _write(tmp_path: Path, text: str, name: str = "xl.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("said", ["--sdxl", "sdxl = true"])
def test_kohya_sdxl_toml_maps_onto_a_config_that_composes(tmp_path, said):
    text = KOHYA_SDXL if said == "--sdxl" else KOHYA_SDXL.replace("v2 = false\n", "v2 = false\nsdxl = true\n")
    config = _write(tmp_path, text)
    result = import_config(config, sdxl=said == "--sdxl")
    _, cfg = write_and_compose(result, tmp_path, "xl")

    assert (cfg.model.kind, cfg.model.vae_precision, cfg.model.prediction_type) == ("sdxl", "fp32", None)
    assert result.origins["model.kind"] == ("--sdxl" if said == "--sdxl" else "model_arguments.sdxl")
    assert cfg.model.clip_skip == 1, "sd-scripts ignores clip_skip with SDXL"
    assert (cfg.network.text_encoder_lr, cfg.network.text_encoder_2_lr) == (1e-5, 2e-5)
    assert (cfg.network.unet_lr, cfg.network.train_text_encoder, cfg.network.train_unet) == (1e-4, False, True)
    assert (cfg.data.cache_text_embeddings, cfg.data.cache_latents) == (True, "memory")
    # 1024 px is SDXL's native size and 512 / 2048 our bounds relative to it: left to follow the model
    assert (cfg.bucket.enabled, cfg.bucket.resolution, cfg.bucket.min_side, cfg.bucket.max_side) == (
        True,
        None,
        None,
        None,
    )
    assert cfg.bucket.step == 32, "SDXL's buckets may step by 32"
    assert list(cfg.train.timestep_range) == [100, 1000] and cfg.train.max_steps == 2000
    assert cfg.precision.mixed == "bf16"

    unmapped = {u.source: u.reason for u in result.unmapped}
    assert set(unmapped) == {
        "training_arguments.clip_skip",
        "training_arguments.disable_mmap_load_safetensors",
        "training_arguments.train_text_encoder",
    }
    assert "ignores clip_skip when training SDXL" in unmapped["training_arguments.clip_skip"]
    assert "network_train_unet_only" in unmapped["training_arguments.train_text_encoder"]
    mapped = {(m.source, m.target): m.note for m in result.mapped}
    assert "SDXL" in mapped[("model_arguments.v2", "")]
    assert (
        "both text encoders" in mapped[("training_arguments.cache_text_encoder_outputs", "data.cache_text_embeddings")]
    )
    assert (
        "no on-disk" in mapped[("training_arguments.cache_text_encoder_outputs_to_disk", "data.cache_text_embeddings")]
    )
    assert "import with --sdxl" not in " ".join(mapped.values()), "no hint when the import knows it is SDXL"
    assert leaf_labels(tomllib.loads(text)) - reported(result) == set()


def test_the_sdxl_switch_of_the_command_is_written_into_the_experiment(tmp_path, capsys):
    config = _write(tmp_path, KOHYA_SDXL)
    assert main([str(config), "--sdxl", "--out", str(tmp_path / "experiment")]) == 0
    assert '--sdxl -> model.kind = "sdxl"' in capsys.readouterr().out
    assert 'kind: "sdxl"  # --sdxl' in (tmp_path / "experiment" / "xl.yaml").read_text()


def test_without_a_word_of_sdxl_the_family_is_detected_and_the_sdxl_options_hint_at_it(tmp_path):
    result = import_config(_write(tmp_path, KOHYA_SDXL))
    assert "model.kind" not in result.values, "model.kind=null: detected from the model files"
    assert result.values["model.clip_skip"] == 2 and result.values["bucket.resolution"] == 1024
    assert (result.values["network.text_encoder_lr"], result.values["network.text_encoder_2_lr"]) == (1e-5, 2e-5)
    notes = {(m.source, m.target): m.note for m in result.mapped}
    hint = "import with --sdxl"
    assert hint in notes[("additional_network_arguments.text_encoder_lr", "network.text_encoder_lr")]
    assert hint in notes[("training_arguments.cache_text_encoder_outputs", "data.cache_text_embeddings")]


def test_lora_easy_sdxl_toml_maps_onto_a_config_that_composes(tmp_path):
    config = _write(tmp_path, LORA_EASY_SDXL, "easy_xl.toml")
    result = import_config(config)
    assert result.kind == "LoRA_Easy_Training_Scripts TOML"
    _, cfg = write_and_compose(result, tmp_path, "easy_xl")

    assert (cfg.model.kind, cfg.model.vae_precision, cfg.model.clip_skip) == ("sdxl", "fp32", 1)
    assert result.origins["model.kind"] == "general_args.args.sdxl"
    assert (cfg.network.dim, cfg.network.alpha, cfg.network.train_text_encoder) == (16, 8.0, False)
    assert (cfg.network.text_encoder_lr, cfg.network.text_encoder_2_lr) == (5e-6, 1e-5)
    assert cfg.data.cache_text_embeddings is True and cfg.data.train_dir == "/data/xl"
    # kohya's min_bucket_reso stays 256 at 1024 px (ours would be 512): written; 2048 is ours, 32 SDXL's step
    assert (cfg.bucket.resolution, cfg.bucket.min_side, cfg.bucket.max_side, cfg.bucket.step) == (None, 256, None, 32)
    assert (cfg.precision.mixed, cfg.train.epochs, cfg.train.batch_size) == ("fp16", 10, 4)

    assert {u.source for u in result.unmapped} == {"general_args.args.clip_skip"}
    assert "(min_bucket_reso absent)" in result.origins.values()
    assert leaf_labels(tomllib.loads(LORA_EASY_SDXL)) - reported(result) == set()


@pytest.mark.parametrize("value", ["[1e-5]", "1e-5"])
def test_a_single_text_encoder_rate_serves_both_sdxl_encoders(tmp_path, value):
    result = import_config(_write(tmp_path, f"sdxl = true\ntext_encoder_lr = {value}\n"))
    assert result.values["network.text_encoder_lr"] == 1e-5
    assert "network.text_encoder_2_lr" not in result.values
    _, cfg = write_and_compose(result, tmp_path)
    assert (cfg.network.text_encoder_lr, cfg.network.text_encoder_2_lr) == (1e-5, None)
    assert "both SDXL text encoders" in next(m.note for m in result.mapped if m.target == "network.text_encoder_lr")


@pytest.mark.parametrize(
    ("lines", "rates", "trains"),
    [
        ("sdxl = true\ntext_encoder_lr = [0, 0]", (0.0, 0.0), False),  # both frozen: nothing to train
        ("sdxl = true\ntext_encoder_lr = [1e-5, 0]", (1e-5, 0.0), True),  # the second frozen only
        ("sdxl = true\ntext_encoder_lr = '1e-5 2e-5'", (1e-5, 2e-5), True),  # sd-scripts' command-line form
        ("v2 = true\ntext_encoder_lr = [1e-5, 2e-5]", (1e-5, None), True),  # SD2 has one text encoder
    ],
)
def test_text_encoder_rates_follow_sd_scripts(tmp_path, lines, rates, trains):
    result = import_config(_write(tmp_path, lines + "\n"))
    values = result.values
    assert (values["network.text_encoder_lr"], values.get("network.text_encoder_2_lr")) == rates
    assert values["network.train_text_encoder"] is trains


def test_what_sdxl_cannot_take_is_reported(tmp_path):
    result = import_config(_write(tmp_path, "sdxl = true\nv2 = true\ntext_encoder_lr = [1e-5, 2e-5, 3e-5]\n"))
    unmapped = {u.source: u.reason for u in result.unmapped}
    assert "refuses v2 with SDXL" in unmapped["v2"] and result.values["model.kind"] == "sdxl"
    assert "at most two" in unmapped["text_encoder_lr"] and "network.text_encoder_lr" not in result.values
    assert result.values["network.train_text_encoder"] is True, "kohya's default: it trains at optimizer.lr"


@pytest.mark.parametrize("sdxl", [True, False])
def test_the_kohya_ss_gui_sdxl_switches_count_only_for_sdxl(tmp_path, sdxl):
    config = tmp_path / "gui.json"
    flags = {"sdxl": sdxl, "sdxl_no_half_vae": True, "sdxl_cache_text_encoder_outputs": False}
    config.write_text(json.dumps(flags))
    result = import_config(config)
    assert result.values.get("model.vae_precision") == ("fp32" if sdxl else None)
    assert result.values.get("data.cache_text_embeddings") == (False if sdxl else None)
    assert result.unmapped == []


@pytest.mark.parametrize(("value", "expected"), [(True, "fp32"), (False, None)])
def test_no_half_vae_keeps_the_vae_in_fp32(tmp_path, value, expected):
    result = import_config(_write(tmp_path, f"no_half_vae = {str(value).lower()}\n"))
    assert result.values.get("model.vae_precision") == expected
    assert "no_half_vae" not in {u.source for u in result.unmapped}
    if not value:  # auto: SDXL's VAE stays in fp32 under fp16, where sd-scripts would overflow it in half
        assert "vae_precision=auto" in next(m.note for m in result.mapped if m.source == "no_half_vae")


def test_kohya_bucket_bounds_are_written_where_ours_differ(tmp_path):
    """sd-scripts' 256 / 1024 hold at every resolution; ours follow it (512 / 2048 at SDXL's 1024 px)."""
    result = import_config(_write(tmp_path, "sdxl = true\nresolution = 1024\nenable_bucket = true\n"))
    assert (result.values["bucket.min_side"], result.values["bucket.max_side"]) == (256, 1024)
    assert "bucket.step" not in result.values, "kohya's 64 is ours from 512 px up"
    result = import_config(_write(tmp_path, "sdxl = true\nresolution = 1024\n"))  # no buckets: no bounds
    assert "bucket.min_side" not in result.values and "bucket.max_side" not in result.values
    result = import_config(_write(tmp_path, "resolution = 512\nenable_bucket = true\n"))  # kohya's = ours
    assert "bucket.min_side" not in result.values and "bucket.max_side" not in result.values


def test_a_flux_config_maps_its_noise_levels_guidance_and_t5_and_names_what_has_no_equivalent(tmp_path):
    result = import_config(DATA / "kohya_flux.toml")
    _, cfg = write_and_compose(result, tmp_path, "flux")
    assert cfg.model.kind == "flux" and cfg.model.t5_max_length == 512 and cfg.train.guidance == 1.0
    # timestep_sampling=shift: sigmoid(N(0, sigmoid_scale)) then kohya's shift by discrete_flow_shift
    flow = cfg.train.flow
    assert (flow.weighting_scheme, flow.logit_mean, flow.logit_std, flow.shift) == ("logit_normal", 0.0, 1.0, 3.1582)
    unmapped = {u.source: u.reason for u in result.unmapped}
    assert {"clip_l", "t5xxl", "ae", "fp8_base", "apply_t5_attn_mask", "network_args.split_qkv"} <= set(unmapped)
    assert "diffusers" in unmapped["ae"] and "fused qkv" in unmapped["network_args.split_qkv"]


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ('timestep_sampling = "flux_shift"\nsigmoid_scale = 2.0', ("logit_normal", 2.0, None)),
        ('timestep_sampling = "uniform"', ("none", 1.0, 1.0)),
        ('weighting_scheme = "mode"', ("mode", 1.0, 3.0)),  # sigma (the default) over a 3.0-shifted schedule
    ],
)
def test_kohya_noise_level_options_become_train_flow(tmp_path, lines, expected):
    source = tmp_path / "sd3.toml"
    source.write_text(f'network_module = "networks.lora_sd3"\n{lines}\n')
    result = import_config(source)
    _, cfg = write_and_compose(result, tmp_path, "sd3")
    flow = cfg.train.flow
    assert cfg.model.kind == "sd3" and (flow.weighting_scheme, flow.logit_std, flow.shift) == expected


LYCORIS = 'network_module = "lycoris.kohya"\nnetwork_args = '


@pytest.mark.parametrize(
    ("lines", "network_type", "unmapped"),
    [
        (LYCORIS + '["algo=loha", "conv_dim=4", "use_tucker=True"]', "loha", {"network_args.use_tucker"}),
        (LYCORIS + '["algo=lokr", "factor=8", "decompose_both=True"]', "lokr", set()),
        (LYCORIS + '["algo=locon", "conv_dim=8", "conv_alpha=4", "dora_wd=True"]', "dora", set()),
        (LYCORIS + '["algo=lora", "conv_dim=8"]', "locon", set()),
        (LYCORIS + '["algo=lora"]', "lora", set()),
        (LYCORIS + '["algo=loha", "dora_wd=True"]', "lora", {"network_module"}),
        (LYCORIS + '["algo=ia3"]', "lora", {"network_module"}),
        (LYCORIS + '["algo=lokr", "conv_dim=0"]', "lokr", set()),
        ('network_module = "networks.lokr"\nnetwork_args = ["factor=4"]', "lokr", set()),
        ('network_module = "networks.lora"\nnetwork_args = ["factor=4"]', "lora", {"network_args.factor"}),
        ('network_module = "networks.lora"', "lora", set()),
    ],
)
def test_lycoris_configs_map_their_algo_onto_network_type(tmp_path, lines, network_type, unmapped):
    source = tmp_path / "lycoris.toml"
    source.write_text(lines + "\n")
    result = import_config(source)
    _, cfg = write_and_compose(result, tmp_path, "lycoris")
    assert cfg.network.type == network_type
    assert {u.source for u in result.unmapped} >= unmapped
    assert all(u.source != "network_args.algo" for u in result.unmapped)
