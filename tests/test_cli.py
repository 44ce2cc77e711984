"""``python -m sweeper`` as a user runs it: a summary at the end, and clear errors on bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from tests.conftest import REPO, run_cli


@pytest.mark.slow
def test_a_run_on_a_users_folder_prints_the_summary(tmp_path):
    folder = tmp_path / "my_images" / "3_squares"
    folder.mkdir(parents=True)
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        Image.new("RGB", (80, 64), colour).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a square", encoding="utf-8")

    done = run_cli(
        f"data.train_dir={tmp_path / 'my_images'}",
        "network.dim=16",
        "optimizer.lr=3e-4",
        "train.max_steps=6",
        "eval.num_inference_steps=2",
        "eval.images_per_prompt=1",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert re.search(r"Scores at step 6 of this file \(95% prompt-clustered intervals", out)
    interval = r"\(-?\d+\.\d(-| to )-?\d+\.\d\) \[this file\]"  # "38.1 (37.4-38.8)", or "-5.2 to 14.2"
    gain = r"[+-]\d+\.\d \([+-]\d+\.\d to [+-]\d+\.\d\) \[this file\]"
    assert re.search(rf"clip_t \d+\.\d {interval}, base \d+\.\d, gain {gain}", out), out
    lora = Path(re.search(r"LoRA file:\s+(\S+)", out).group(1))
    assert lora.is_file() and str(lora).startswith(str(tmp_path / "outputs" / "runs"))
    run_id = re.search(r"MLflow run: (\w+)", out).group(1)
    lightweight = r"MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false (\S+) ui --workers 1 --backend-store-uri (\S+),"
    ui = re.search(rf"MLflow UI:\s+{lightweight}", out)
    assert ui and ui.group(2) == f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}"
    assert Path(ui.group(1)) == Path(sys.executable).with_name("mlflow")  # works without activating the venv
    page = r"then open http://127.0.0.1:5000/#/experiments/\d+/runs\?workflowType=machine_learning"
    assert re.search(page + r"&orderByKey=metrics.%60clip_t%60&orderByAsc=false", out)  # best first
    assert "train" in done.stderr  # the progress bar
    assert not list((tmp_path / "outputs" / "runs").rglob("*.log"))  # no empty Hydra job log

    params = MlflowClient(ui.group(2)).get_run(run_id).data.params
    assert params["network.dim"] == "16"
    assert params["optimizer.lr"] == "0.0003"
    assert params["data.train_dir"] == str(tmp_path / "my_images")


def test_a_missing_folder_stops_before_training(tmp_path):
    done = run_cli(f"data.train_dir={tmp_path / 'absent'}", cwd=tmp_path)
    assert done.returncode == 2
    assert "data.train_dir" in done.stderr and "absent" in done.stderr
    assert "train:" not in done.stderr
    # nothing but the problems: the libraries' load chatter (transformers' torchvision warning) is
    # silenced before the task imports them
    lines = done.stderr.strip().splitlines()
    assert lines[0] == "1 problem(s) in the config, nothing was trained:", done.stderr[-2000:]
    assert all(line.startswith("  - ") for line in lines[1:-1]), done.stderr[-2000:]
    assert lines[-1] == "(the model, network-file and speed options are checked once these are fixed)"


def test_the_configs_values_and_data_are_checked_without_the_model_libraries():
    """What the command line reports in about a second: neither torch nor the model libraries are imported
    for it; torch only to ask whether a CUDA GPU is here, when a CUDA-only option is set and a GPU driver
    library exists (none on a CPU machine: then the answer is no without torch)."""
    code = """
import json, sys
from tests.conftest import compose_config
from sweeper.config.validate import _gpu_driver_loadable, early_problems
loaded = lambda: sorted(m for m in ('torch', 'diffusers', 'transformers', 'peft', 'mlflow') if m in sys.modules)
plain = early_problems(compose_config(['network.dim=-3', 'data.train_dir=/absent']))
after_plain = loaded()
cuda_only = early_problems(compose_config(['optimizer=adamw8bit', 'precision=fp16']))
print(json.dumps([plain, after_plain, cuda_only, loaded(), _gpu_driver_loadable()]))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    plain, after_plain, cuda_only, after_cuda_only, driver = json.loads(done.stdout.strip().splitlines()[-1])
    assert any("network.dim must be >= 1" in p for p in plain) and any("data.train_dir" in p for p in plain)
    assert after_plain == []
    assert after_cuda_only == (["torch"] if driver else [])
    if not driver:  # this machine has no GPU: both CUDA-only options are refused, all at once
        assert any(p.startswith("precision=fp16 needs a CUDA GPU") for p in cuda_only), cuda_only
        assert any(p.startswith("optimizer=adamw8bit needs a CUDA GPU") for p in cuda_only), cuda_only


def test_help_lists_the_option_groups_without_the_internal_schemas(tmp_path):
    done = run_cli("--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "  model: diffusers, tiny, toy" in done.stdout
    assert "  +search: fidelity_vs_alignment, lora_basic, lr_grid" in done.stdout
    assert "base_model" not in done.stdout and "base_optimizer" not in done.stdout
