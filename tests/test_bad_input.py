"""Bad input fails before any training, with a message naming the file or key and what to do."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

import sweeper.task
from sweeper.task import run
from sweeper.validate import ConfigError


@pytest.fixture(autouse=True)
def no_model_loading(monkeypatch):
    """Any of these runs reaching the model loader has failed the test: errors come first."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("a model was loaded before the config was rejected")

    monkeypatch.setattr(sweeper.task, "load_base_model", refuse)


def image_folder(root: Path, count: int = 2) -> Path:
    folder = root / "5_things"
    folder.mkdir(parents=True)
    for i in range(count):
        Image.new("RGB", (32, 32), (200, 10 * i, 0)).save(folder / f"img_{i}.png")
        (folder / f"img_{i}.txt").write_text(f"a red square {i}", encoding="utf-8")
    return root


def rejected(cfg) -> str:
    with pytest.raises(ConfigError) as caught:
        run(cfg, show_progress=False)
    return str(caught.value)


def test_missing_train_dir(make_cfg, tmp_path):
    message = rejected(make_cfg(f"data.train_dir={tmp_path / 'nowhere'}"))
    assert "data.train_dir" in message and "nowhere" in message and "does not exist" in message


def test_folder_without_images(make_cfg, tmp_path):
    (tmp_path / "empty").mkdir()
    message = rejected(make_cfg(f"data.train_dir={tmp_path / 'empty'}"))
    assert "data.train_dir" in message and "no images" in message.lower()


def test_corrupt_image_is_an_error_by_default(make_cfg, tmp_path):
    root = image_folder(tmp_path / "data")
    (root / "5_things" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    message = rejected(make_cfg(f"data.train_dir={root}"))
    assert "broken.png" in message and "data.on_bad_image=skip" in message


def test_corrupt_image_skipped_when_asked(make_cfg, tmp_path, capsys):
    from sweeper.validate import validate

    root = image_folder(tmp_path / "data")
    (root / "5_things" / "broken.png").write_bytes(b"garbage")
    validated = validate(make_cfg(f"data.train_dir={root}", "data.on_bad_image=skip"))
    assert [p.name for p, _ in validated.dataset.skipped] == ["broken.png"]
    assert len(validated.dataset.records) == 2


def test_caption_not_utf8(make_cfg, tmp_path):
    root = image_folder(tmp_path / "data")
    (root / "5_things" / "img_0.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    message = rejected(make_cfg(f"data.train_dir={root}"))
    assert "img_0.txt" in message and "UTF-8" in message


def test_alpha_and_scale_together(make_cfg):
    message = rejected(make_cfg("network.alpha=4", "network.scale=0.5"))
    assert "network.alpha" in message and "network.scale" in message


@pytest.mark.parametrize("key", ["optimizer.lr", "network.unet_lr", "network.text_encoder_lr"])
def test_negative_learning_rate(make_cfg, key):
    message = rejected(make_cfg(f"{key}=-0.001"))
    assert key in message and "negative" in message


def test_every_problem_is_reported_at_once(make_cfg, tmp_path):
    message = rejected(
        make_cfg(f"data.train_dir={tmp_path / 'nowhere'}", "optimizer.lr=-1", "network.alpha=1", "network.scale=1")
    )
    assert "3 problem(s)" in message
    assert "data.train_dir" in message and "optimizer.lr" in message and "network.scale" in message
