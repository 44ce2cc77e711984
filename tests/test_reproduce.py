"""Reproducing a run from its MLflow record or its run folder gives the same LoRA tensors, bit for bit,
and the same metadata but for the times and run id it records."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from sweeper import reproduce
from sweeper.run.fingerprint import file_sha256
from sweeper.run.setting import run
from tests.conftest import FAST, REPO, compose_config, run_main
from training.network.file import lora_identity, tensors_sha256


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """One finished run, trained once for the tests that reproduce it (reproducing does not change it)."""
    folder = tmp_path_factory.mktemp("original")
    where = [f"output.dir={folder / 'out'}", f"tracking.uri=sqlite:///{folder / 'mlflow.db'}"]
    where.append(f"tracking.artifact_root={folder / 'artifacts'}")
    options = ["train.max_steps=6", "data.flip_aug=true", "dropout.caption_rate=0.3", "network.dim=4"]
    cfg = compose_config([*where, *FAST, *options])
    with contextlib.chdir(folder):
        return cfg, run(cfg, show_progress=False)


def test_a_run_reproduces_bit_identically_from_its_mlflow_record(original, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg, result = original
    code = reproduce.main(
        [result.run_id, "--tracking-uri", result.tracking_uri, "--output-dir", str(tmp_path / "again")]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    again = tmp_path / "again" / f"{cfg.output.name}.safetensors"
    assert lora_identity(again) == lora_identity(result.lora_path)  # tensors and stable metadata
    assert file_sha256(again) != file_sha256(result.lora_path)  # the times and the run id differ
    assert "bit-identical LoRA tensors" in out and "identical" in out
    assert "differs only by when/which run wrote it: lora_sweeper_run_id" in out
    runs = MlflowClient(result.tracking_uri).search_runs(
        [MlflowClient(result.tracking_uri).get_run(result.run_id).info.experiment_id],
        filter_string=f"tags.reproduces = '{result.run_id}'",
    )
    runs = [r for r in runs if r.data.tags["reproduce.variation"] == "false"]  # not the variation test's run
    assert len(runs) == 1
    assert runs[0].data.metrics["clip_score"] == result.metrics["clip_score"]


def test_overrides_make_a_variation(original, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, result = original
    code = reproduce.main(
        [result.run_id, "--tracking-uri", result.tracking_uri, "--output-dir", str(tmp_path / "v"), "network.dim=8"]
    )
    out = capsys.readouterr().out
    assert code == 0 and "Variation of" in out and "not a reproduction" in out


def test_changed_data_is_named_and_the_difference_fails(make_cfg, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    shutil.copytree(REPO / "data" / "sample", data)
    result = run(make_cfg(f"data.train_dir={data}", "train.max_steps=4"), show_progress=False)
    caption = sorted(data.rglob("*.txt"))[0]
    caption.write_text("a completely different caption", encoding="utf-8")

    code = reproduce.main([result.run_id, "--tracking-uri", result.tracking_uri, "--output-dir", str(tmp_path / "d")])
    out = capsys.readouterr().out
    assert f"warning: the training data changed since the run: {caption} (changed)" in out
    assert code == 1 and "NOT reproduced" in out


def test_a_missing_run_is_a_clear_error(tmp_path, capsys):
    code = reproduce.main(["0123456789abcdef", "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}"])
    assert code == 2 and "no MLflow run" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("source", "is_path"),
    [
        ("outputs/runs/2026-11-23/00-50-3", True),
        ("lora.safetensors", True),
        ("./lora", True),
        ("~/loras/style", True),
        ("C:\\loras\\style.safetensors", True),
        ("0123456789abcdef0123456789abcdef", False),  # an MLflow run id
        ("m-7f3a", False),
    ],
)
def test_what_looks_like_a_path(source, is_path):
    assert reproduce.looks_like_a_path(source) is is_path


@pytest.mark.parametrize("mistyped", ["outputs/runs/2026-11-23/00-50-3", "my_lora.safetensors"])
def test_a_mistyped_path_is_no_such_file_not_an_unknown_run(tmp_path, capsys, monkeypatch, mistyped):
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "mlflow.db"
    code = reproduce.main([mistyped, "--tracking-uri", f"sqlite:///{store}"])
    err = capsys.readouterr().err
    assert code == 2 and f"error: no such file: {mistyped} (nor a folder)" in err
    assert "no MLflow run" not in err and not store.exists(), "no run looked up, no store created"


def fake_lora(path: Path, metadata: dict[str, str]) -> Path:
    """A LoRA file as far as reproduce reads it: tensors and our metadata (no training needed)."""
    import torch
    from safetensors.torch import save_file

    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(path), metadata=metadata)
    return path


def test_the_reproduction_folder_is_named_by_the_run_id_or_the_file_stem(make_cfg, tmp_path):
    """Not ``outputs/reproduce/lora.safetensors/``: the run's id where known, else the file's stem."""
    from omegaconf import OmegaConf

    from training.network.metadata import CONFIG_KEY, RUN_ID_KEY

    config = json.dumps(OmegaConf.to_container(make_cfg("train.max_steps=4"), resolve=True))
    empty_store = (tmp_path / "mlruns").as_uri()  # a store without the run (a file store opens at once)
    named = fake_lora(tmp_path / "lora.safetensors", {CONFIG_KEY: config, RUN_ID_KEY: "a" * 32})
    source = reproduce.load_source(str(named), empty_store)  # the run is not in the store: the file's config
    assert reproduce.output_folder_name(source) == "a" * 32
    plain = fake_lora(tmp_path / "my_style.safetensors", {CONFIG_KEY: config})
    assert reproduce.output_folder_name(reproduce.load_source(str(plain), empty_store)) == "my_style"

    folder = tmp_path / "runs" / "2026-11-23" / "00-50-36"  # a run folder: the run id its run.json records
    (folder / ".hydra").mkdir(parents=True)
    OmegaConf.save(make_cfg("train.max_steps=4"), folder / ".hydra" / "config.yaml")
    (folder / "run.json").write_text(json.dumps({"mlflow_run_id": "b" * 32}))
    assert reproduce.output_folder_name(reproduce.load_source(str(folder), None)) == "b" * 32


def test_help_answers_without_importing_torch_diffusers_or_mlflow():
    """``--help`` parses its arguments before the heavy libraries load (it took ~20 s with them)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "PYTHONPROFILEIMPORTTIME": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "sweeper.reproduce", "--help"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.startswith("usage: python -m sweeper.reproduce"), done.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time")}
    assert not imported & {"torch", "diffusers", "transformers", "mlflow"}


def test_the_command_prints_no_torchvision_warnings(tmp_path):
    """transformers warns that torchvision is missing when its image processors load: reproduce quiets the
    libraries first, as ``python -m sweeper`` does (the PIL processors are used on purpose)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    not_a_run = tmp_path / "not-a-run"  # refused after every library is imported, before any store is opened
    not_a_run.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "sweeper.reproduce", str(not_a_run)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and "has no .hydra/config.yaml" in done.stderr
    assert "torchvision" not in done.stdout + done.stderr


@pytest.mark.slow
def test_a_run_folder_and_a_sweep_trial_reproduce_from_the_command_line(tmp_path):
    fast = ["train.max_steps=4", "train.batch_size=2", "eval.num_inference_steps=2", "eval.images_per_prompt=1"]
    single = run_main(*fast, cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-2000:]
    folder = next((tmp_path / "outputs" / "runs").glob("*/*"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    again = subprocess.run(
        [sys.executable, "-m", "sweeper.reproduce", str(folder)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "bit-identical LoRA tensors" in again.stdout

    sweep = run_main("-m", *fast, "network.dim=4,8", cwd=tmp_path)
    assert sweep.returncode == 0, sweep.stderr[-2000:]
    trial_dir = next((tmp_path / "outputs" / "multirun").glob("*/*/1"))
    record = json.loads((trial_dir / "run.json").read_text())
    trial = subprocess.run(
        [sys.executable, "-m", "sweeper.reproduce", record["mlflow_run_id"]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert trial.returncode == 0, trial.stdout[-2000:] + trial.stderr[-2000:]
    reproduced = Path(trial.stdout.split("LoRA file:")[1].split()[0])
    assert tensors_sha256(reproduced) == record["lora_tensors_sha256"]


def test_a_run_that_never_finished_is_refused(make_cfg, tmp_path, capsys, monkeypatch):
    """A run that failed mid-way logged its config but no result: nothing to reproduce against."""
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    cfg = make_cfg("train.max_steps=4", "eval.every_n_steps=2", "eval.prompts=[a red circle]")

    def interrupt(step, value, values):
        raise RuntimeError("the machine went away")

    with pytest.raises(RuntimeError, match="went away"):
        run(cfg, show_progress=False, report=interrupt)
    client = MlflowClient(cfg.tracking.uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    (failed,) = client.search_runs([experiment])
    assert failed.info.status == "FAILED"

    code = reproduce.main([failed.info.run_id, "--tracking-uri", cfg.tracking.uri, "--output-dir", str(tmp_path / "r")])
    captured = capsys.readouterr()
    assert code == 2 and "has no final result" in captured.err and failed.info.run_id in captured.err
    assert "Reproduced" not in captured.out
    assert len(client.search_runs([experiment])) == 1 and not (tmp_path / "r").exists()  # nothing was run


def test_a_run_folder_without_its_record_is_refused(make_cfg, tmp_path, capsys):
    """Hydra writes .hydra/config.yaml when a run starts, the task run.json when it ends."""
    from omegaconf import OmegaConf

    folder = tmp_path / "outputs" / "runs" / "2024-01-01" / "00-00-00"
    (folder / ".hydra").mkdir(parents=True)
    OmegaConf.save(make_cfg("train.max_steps=4"), folder / ".hydra" / "config.yaml")
    code = reproduce.main([str(folder), "--output-dir", str(tmp_path / "r")])
    captured = capsys.readouterr()
    assert code == 2 and f"{folder} has no final result" in captured.err
    assert not (tmp_path / "r").exists()
