"""Loading base models: the tiny default and a real diffusers folder take the same from_pretrained path."""

from __future__ import annotations

import shutil

import pytest
import torch

from sweeper.validate import ConfigError, validate
from training.models import load_base_model
from training.tiny_model import build_tiny_pipeline


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory):
    """A small model written to disk in the real diffusers format (save_pretrained, safetensors)."""
    folder = tmp_path_factory.mktemp("models") / "my-sd"
    pipeline = build_tiny_pipeline(seed=7)
    pipeline.save_pretrained(folder, safe_serialization=True)
    return folder, pipeline


def test_a_diffusers_folder_loads_with_its_own_weights(make_cfg, diffusers_folder):
    folder, pipeline = diffusers_folder
    cfg = make_cfg("model=diffusers", f"model.path={folder}")
    validate(cfg)
    base = load_base_model(cfg.model)
    assert base.location == str(folder)
    expected = pipeline.unet.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in base.unet.state_dict().items())
    assert base.native_resolution == 64
    assert base.identity["weights_sha256"]
    assert not any(p.requires_grad for p in base.unet.parameters())


def test_a_diffusers_folder_trains_end_to_end(make_cfg, diffusers_folder):
    from sweeper.task import run

    folder, _ = diffusers_folder
    result = run(make_cfg("model=diffusers", f"model.path={folder}", "train.max_steps=2"), show_progress=False)
    assert result.lora_path.is_file()


def test_the_tiny_model_is_built_from_a_fixed_seed():
    first, second = build_tiny_pipeline(), build_tiny_pipeline()
    assert all(torch.equal(v, second.unet.state_dict()[k]) for k, v in first.unet.state_dict().items())


def test_model_path_problems_are_reported(make_cfg, tmp_path, diffusers_folder):
    with pytest.raises(ConfigError, match=r"model.path: folder .* does not exist"):
        validate(make_cfg("model=diffusers", f"model.path={tmp_path / 'missing'}"))
    not_a_model = tmp_path / "just-images"
    not_a_model.mkdir()
    with pytest.raises(ConfigError, match="not a diffusers folder"):
        validate(make_cfg("model=diffusers", f"model.path={not_a_model}"))
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE"):
        validate(make_cfg("model=diffusers", "model.path=someone/some-model"))


def test_a_broken_folder_fails_loudly(make_cfg, tmp_path, diffusers_folder):
    folder, _ = diffusers_folder
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(OSError):
        load_base_model(make_cfg("model=diffusers", f"model.path={broken}").model)
