"""Shared test set-up: offline, tiny models cached per session, configs composed like the CLI does."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

os.environ["HF_HUB_OFFLINE"] = "1"
# One thread per test process (and every process it starts): pytest-xdist runs a worker per core, and
# two torch processes with a thread per core each spin-wait on each other's cores (OpenMP): measured on
# 2 cores beside one other process, a 60-step toy run took 62 CPU-s with 2 threads and 31 with 1.
os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
from sweeper.config.schema import register_configs, register_resolvers
from tests.servers import (  # noqa: F401  (fixtures: a fresh database per test, a real mlflow server)
    mariadb_db,
    mariadb_url,
    mlflow_server,
    postgres_db,
    postgres_password_url,
    postgres_url,
)

pytest_plugins = ["tests.cpu_time"]  # per-test CPU seconds, the costliest listed at the end

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"

# Small but real (conf/debug/fast.yaml: the random tiny model and tiny CLIP, 20 steps, 2 sampling steps,
# one image for each of two prompts); the toy world's own tests use model=toy explicitly.
FAST = ["+debug=fast"]


@pytest.fixture(scope="session", autouse=True)
def tiny_model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny SD and tiny CLIP are built once per test session, outside the user's home."""
    cache = tmp_path_factory.mktemp("model-cache")
    os.environ["LORA_SWEEPER_CACHE"] = str(cache)
    return cache


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with the most slow tests first (order kept inside a file). pytest-xdist hands out whole
    files (``--dist loadfile``) in this order, so the long ones start early and the short ones fill the
    end instead of one worker finishing a long file alone."""
    slow_tests: dict[Path, int] = {}
    for item in items:
        slow_tests[item.path] = slow_tests.get(item.path, 0) + (item.get_closest_marker("slow") is not None)
    items.sort(key=lambda item: -slow_tests[item.path])  # stable: a file's own order is kept


_started: list[Any] = []  # processes a test started: none may outlive it (a failed assertion included)


def ended_at_teardown(process: Any) -> Any:
    """``process`` (a ``subprocess.Popen`` or ``multiprocessing.Process``), killed when its test ends if still alive."""
    _started.append(process)
    return process


@pytest.fixture(autouse=True)
def _no_process_outlives_its_test() -> Iterator[None]:
    yield
    while _started:
        process = _started.pop()
        if isinstance(process, subprocess.Popen):
            if process.poll() is None:
                process.kill()
            process.wait(30)
        else:
            if process.is_alive():
                process.kill()
            process.join(30)


def seed_mlflow_store(path: Path) -> None:
    """An empty MLflow SQLite store, already migrated, at ``path`` (unless one is there): a new store costs
    ~3.7 CPU-s of MLflow's schema migrations, a copy nothing. A store's own first opening (workers
    migrating together) is tested in test_tracking_store, on stores made there."""
    if path.exists():
        return
    template = Path(os.environ["LORA_SWEEPER_CACHE"]) / "mlflow-template.db"
    if not template.exists():
        from mlflow.tracking import MlflowClient

        building = template.with_suffix(".building")
        MlflowClient(f"sqlite:///{building}").search_experiments()  # creates and migrates it
        building.replace(template)
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, path)


def _seed_default_store(args: tuple[str, ...], cwd: Path) -> None:
    """The store a command line uses when it names none (``outputs/mlflow.db`` under ``cwd``)."""
    if not any(arg.startswith(("tracking.uri=", "tracking=", "tracking.enabled=")) for arg in args):
        seed_mlflow_store(cwd / "outputs" / "mlflow.db")


def compose_config(overrides: list[str]) -> DictConfig:
    register_resolvers()
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """``make_cfg(*overrides, fast=True)``: the CLI's config, writing only under ``tmp_path``."""

    def make(*overrides: str, fast: bool = True) -> DictConfig:
        if importlib.util.find_spec("mlflow"):  # a bare GPU machine lacks it; its model-only tests need no store
            seed_mlflow_store(tmp_path / "mlflow.db")
        base = [
            f"output.dir={tmp_path / 'out'}",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"tracking.artifact_root={tmp_path / 'artifacts'}",
        ]
        return compose_config(base + (FAST if fast else []) + list(overrides))

    return make


def run_main(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m sweeper ARGS`` inside this process: the same entry point, output and exit status as
    ``run_cli``, without a new interpreter's ~10 CPU-s of imports and with the loaded models reused.

    For tests of what a run or sweep does; a test of the command line itself, signals or several
    processes uses ``run_cli``.
    """
    import sweeper.__main__ as cli
    from sweeper.tracking.credentials import move_passwords_to_env

    _seed_default_store(args, cwd)
    saved = (os.getcwd(), sys.argv[:], dict(os.environ), signal.getsignal(signal.SIGTERM))
    out, err, status = io.StringIO(), io.StringIO(), 0
    try:
        os.chdir(cwd)
        sys.argv[:] = move_passwords_to_env(["sweeper", *args])  # as __main__ does at import
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.entry()
            except SystemExit as exit_:
                if isinstance(exit_.code, str):
                    print(exit_.code, file=sys.stderr)
                status = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        os.chdir(saved[0])
        sys.argv[:] = saved[1]
        os.environ.clear()
        os.environ.update(saved[2])
        signal.signal(signal.SIGTERM, saved[3])
    return subprocess.CompletedProcess(["python", "-m", "sweeper", *args], status, out.getvalue(), err.getvalue())


def run_cli(*args: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    """``python -m sweeper ARGS`` in ``cwd``, as a user runs it (outputs/ lands in ``cwd``)."""
    _seed_default_store(args, cwd)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "sweeper", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
