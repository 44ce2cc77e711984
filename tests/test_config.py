"""Every config group composes and validates; typos and wrong types fail at startup, naming the key."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from sweeper.config.schema import GROUP_SCHEMAS
from sweeper.config.validate import ConfigError, validate
from tests.conftest import CONF_DIR, REPO, compose_config

GROUP_OPTIONS = [
    (group, option.stem) for group in GROUP_SCHEMAS for option in sorted((CONF_DIR / group).glob("*.yaml"))
]
NEEDS_INPUT = {("model", "diffusers")}  # mandatory model.path, tested in test_models.py
NEEDS_CUDA = {("precision", "fp16"): "fp16", ("optimizer", "adamw8bit"): "adamw8bit"}
COMPANIONS = {("scheduler", "plateau"): ["eval.every_n_steps=10"]}  # plateau reduces on eval results


def test_every_group_has_options():
    assert {group for group, _ in GROUP_OPTIONS} == set(GROUP_SCHEMAS)


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS)
def test_every_group_option_composes_and_validates(group, option, tmp_path):
    if (group, option) in NEEDS_INPUT:
        pytest.skip("needs a model folder: tests/test_models.py")
    cfg = compose_config([f"{group}={option}", f"output.dir={tmp_path}", *COMPANIONS.get((group, option), [])])
    if (group, option) in NEEDS_CUDA and not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=NEEDS_CUDA[group, option]):  # clear error on a CPU-only machine
            validate(cfg)
        return
    assert cfg[group] is not None
    validate(cfg)


def test_unknown_key_fails_naming_it():
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as caught:
        compose_config(["network.dimm=16"])
    assert "dimm" in str(caught.value) + str(caught.value.__cause__)


def test_wrong_type_fails_naming_the_key():
    with pytest.raises((ConfigCompositionException, ValidationError)) as caught:
        compose_config(["network.dim=sixteen"])
    message = str(caught.value) + str(caught.value.__cause__)
    assert "network.dim" in message or "dim" in message
    assert "sixteen" in message


def test_cli_rejects_a_typo_before_training():
    done = subprocess.run(
        [sys.executable, "-m", "sweeper", "network.dimm=16"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    assert "dimm" in done.stderr
    assert "train:" not in done.stderr  # the progress bar never started
