"""Hydra finds our sweeper from the repo root and from an installed (editable) package, cheaply."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata

import pytest

from tests.conftest import REPO

DISCOVER = (
    "from hydra.core.plugins import Plugins; from hydra.plugins.sweeper import Sweeper; "
    "print(sorted(c.__module__ + '.' + c.__name__ for c in Plugins.instance().discover(Sweeper)))"
)
SHIM = "hydra_plugins.lora_sweeper.optuna_sweeper.LoraOptunaSweeper"


def python(code: str, cwd) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_discovered_from_the_repo_root():
    assert SHIM in python(DISCOVER, REPO)


def test_discovered_from_the_installed_package(tmp_path):
    try:
        metadata.distribution("lora-sweeper")
    except metadata.PackageNotFoundError:
        pytest.skip("the project is not installed (pip install -e .)")
    assert SHIM in python(DISCOVER, tmp_path)


def test_the_shim_imports_nothing_heavy():
    code = (
        "import sys, hydra_plugins.lora_sweeper.optuna_sweeper; "
        "print([m for m in ('torch', 'optuna', 'diffusers', 'mlflow') if m in sys.modules])"
    )
    assert python(code, REPO).strip() == "[]"
