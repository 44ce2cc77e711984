"""``python -m sweeper`` as a user runs it: a summary at the end, and clear errors on bad input."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from tests.conftest import run_cli


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
    assert re.search(r"Scores at step 6 \(95% intervals", out)
    interval, gain = r"\(\d+\.\d-\d+\.\d\)", r"[+-]\d+\.\d \([+-]\d+\.\d to [+-]\d+\.\d\)"
    assert re.search(rf"clip_t \d+\.\d {interval}, base \d+\.\d, gain {gain}", out)
    lora = Path(re.search(r"LoRA file:\s+(\S+)", out).group(1))
    assert lora.is_file() and str(lora).startswith(str(tmp_path / "outputs" / "runs"))
    run_id = re.search(r"MLflow run: (\w+)", out).group(1)
    ui = re.search(r"MLflow UI:\s+(mlflow ui --backend-store-uri (\S+))", out)
    assert ui and ui.group(2) == f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}"
    assert "train" in done.stderr  # the progress bar

    params = MlflowClient(ui.group(2)).get_run(run_id).data.params
    assert params["network.dim"] == "16"
    assert params["optimizer.lr"] == "0.0003"
    assert params["data.train_dir"] == str(tmp_path / "my_images")


def test_a_missing_folder_stops_before_training(tmp_path):
    done = run_cli(f"data.train_dir={tmp_path / 'absent'}", cwd=tmp_path)
    assert done.returncode == 2
    assert "data.train_dir" in done.stderr and "absent" in done.stderr
    assert "train:" not in done.stderr
