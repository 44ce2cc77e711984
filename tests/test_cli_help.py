"""The command line before a run: typo suggestions, --help, the lora-sweeper script and its shell
completion, and the light start-up that lets them answer in about a second."""

from __future__ import annotations

import os
import random
import re
import string
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from sweeper.config.cli_overrides import nearest_keys, override_problems, schema_keys, unknown_names_message
from sweeper.config.schema import group_options
from tests.conftest import REPO, compose_config, run_cli

SCRIPT = Path(sys.executable).with_name("lora-sweeper")  # [project.scripts] in pyproject.toml
HEAVY = ("torch", "diffusers", "transformers", "mlflow", "optuna")


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


# --- unknown keys and options: pure functions


@pytest.mark.parametrize(
    ("typo", "meant"),
    [
        ("network.dimm", ["network.dim"]),  # same section
        ("network.embedding.lrr", ["network.embedding.lr"]),  # nested two deep
        ("eval.concept.targt", ["eval.concept.target"]),
        ("optimzer.lr", ["optimizer.lr"]),  # the section misspelt
        ("data.traindir", ["data.train_dir"]),
        ("train.lr", ["optimizer.lr", "network.embedding.lr"]),  # the right name in another section
        ("dim", ["network.dim"]),
        ("colour", []),  # nothing near: no guess
    ],
)
def test_a_misspelt_key_gets_the_nearest_real_ones(typo, meant):
    assert nearest_keys(typo, schema_keys()) == meant


def test_any_one_letter_typo_of_a_key_suggests_that_key_first():
    schema = schema_keys()
    leaves = sorted(k for k in schema.keys if not any(other.startswith(f"{k}.") for other in schema.keys))
    rng = random.Random(0)
    for key in leaves:
        section, _, name = key.rpartition(".")
        for _ in range(5):  # a letter dropped, added or replaced in the key's own name
            i, letter = rng.randrange(len(name)), rng.choice(string.ascii_lowercase + "_")
            typo = rng.choice(
                [name[:i] + name[i + 1 :], name[:i] + letter + name[i:], name[:i] + letter + name[i + 1 :]]
            )
            typo = f"{section}.{typo}" if section else typo
            if typo not in schema.keys:
                assert nearest_keys(typo, schema)[0] == key, typo


def test_every_unknown_key_and_option_is_reported_at_once_without_suggesting_a_plus():
    problems = override_problems(["network.dimm=16", "+network.dimm=16", "optimizer=adamm", "network.dim=4"])
    assert problems == [
        "network.dimm=16: network.dimm is not a config key (did you mean network.dim?)",
        "+network.dimm=16: network.dimm is not a config key (did you mean network.dim?)",
        "optimizer=adamm: optimizer has no option adamm "
        "(did you mean adamw? options: adafactor, adamw, adamw8bit, lion, prodigy, sgd)",
    ]
    assert "To append" not in unknown_names_message(problems)


@pytest.mark.parametrize(
    ("override", "problem"),
    [
        ("optimizer=adamw,lionn", "optimizer has no option lionn (did you mean lion?"),  # each choice of a sweep
        ("scheduler=cosin", "scheduler has no option cosin (did you mean cosine?"),
        ("+experiment=exampel", "experiment has no option exampel (did you mean example?"),
        ("experiment=example", "experiment is a preset outside the defaults list, added with a + (+experiment=...)"),
        ("debug=fast", "debug is a preset outside the defaults list, added with a + (+debug=...)"),
        ("optimizer=base_optimizer", "optimizer has no option base_optimizer"),  # a schema, not an option
    ],
)
def test_an_unknown_group_option_names_the_nearest_option(override, problem):
    [found] = override_problems([override])
    assert found.startswith(f"{override}: {problem}")


def test_presets_from_another_config_folder_are_left_to_hydra():
    """An imported experiment written outside conf/ comes in through hydra.searchpath or --config-dir."""
    from sweeper.__main__ import _parsed_args, command_line_problems

    elsewhere = ["+experiment=easy", "hydra.searchpath=[file:///somewhere/conf]"]
    assert command_line_problems(_parsed_args(elsewhere)) == []
    assert command_line_problems(_parsed_args(["--config-dir", "/somewhere/conf", "+experiment=easy"])) == []
    (problem,) = command_line_problems(_parsed_args(["+experiment=easy"]))
    assert "experiment has no option easy" in problem


@pytest.mark.parametrize(
    "override",
    [
        "network.dim=16",
        "model=tiny",
        "optimizer=adamw,lion",
        "+experiment=example",
        "+search=lr_grid",
        "+debug=fast",
        "network.dim=range(4,9,4)",
        "network.scale=tag(log, interval(0.25, 2.0))",
        "train.denoise_range=[0.2,1.0]",
        "train.denoise_range.0=0.2",  # an element of a list
        "data.subsets.0.dir=/x",
        "~network.alpha",
        "hydra.run.dir=/tmp/x",
        "hydra/launcher=basic",
        "output.dir=${oc.env:HOME}",
    ],
)
def test_real_overrides_pass(override):
    assert override_problems([override]) == []


def test_every_key_of_the_composed_config_is_known_to_the_check():
    cfg = compose_config([])
    leaves: list[str] = []

    def walk(node: object, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            leaves.append(prefix.rstrip("."))

    from omegaconf import OmegaConf

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    assert len(leaves) > 100
    assert override_problems(f"{key}=1" for key in leaves) == []


def test_the_schemas_are_not_offered_as_options():
    assert all(not o.startswith("base_") for options in group_options().values() for o in options)
    with pytest.raises(ConfigCompositionException) as refused:  # Hydra's own list, past our check
        compose_config(["optimizer=adamm"])
    assert "adamw" in str(refused.value) and "base_optimizer" not in str(refused.value)


# --- the command line, as a user runs it


def _imported_after(*args: str) -> tuple[int, list[str], str]:
    """``python -m sweeper ARGS`` in-process: its exit status and which heavy libraries it imported."""
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['sweeper', *{list(args)!r}]\n"
        "try:\n    runpy.run_module('sweeper', run_name='__main__')\nexcept SystemExit as e:\n    status = e.code\n"
        "else:\n    status = 0\n"
        f"print('HEAVY', status, sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    status, heavy = re.search(r"HEAVY (\S+) \[(.*)\]", done.stdout).groups()
    return int(status or 0), [h.strip("' ") for h in heavy.split(",") if h], done.stderr


def test_a_typo_is_answered_without_importing_the_heavy_libraries():
    status, heavy, stderr = _imported_after("network.dimm=16", "optimizer=adamm")
    assert status == 2 and heavy == []
    assert "did you mean network.dim?" in stderr and "did you mean adamw?" in stderr
    assert "+network.dimm" not in stderr and "Traceback" not in stderr


def test_help_is_answered_without_importing_the_heavy_libraries():
    status, heavy, _ = _imported_after("--help")
    assert status == 0 and heavy == []


def test_help_shows_the_users_keys_resolved_without_the_sweep_internals(tmp_path):
    done = run_cli("--help", "network.dim=16", cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "${" not in out
    assert not re.search(r"^sweep:", out, re.MULTILINE) and "parent_run_id" not in out and "study_name" not in out
    assert "network:\n  dim: 16\n" in out  # the overrides beside --help applied
    assert f"  train_dir: {REPO / 'data' / 'sample'}\n" in out  # ${project_path:data/sample}, resolved
    assert "  dir: outputs/runs/DATE/TIME" in out  # output.dir: filled in by Hydra when a run starts
    assert "  optimizer: adafactor, adamw, adamw8bit, lion, prodigy, sgd\n" in out


def test_the_lora_sweeper_script_runs_from_any_folder(tmp_path):
    assert SCRIPT.is_file(), "pip install -e . installs the console script"
    done = subprocess.run([str(SCRIPT), "--help"], cwd=tmp_path, env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("lora-sweeper: train one LoRA")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("lora-sweeper optimizer=li", ["optimizer=lion"]),
        ("lora-sweeper network.di", ["network.dim="]),
        ("lora-sweeper model=tiny sched", ["scheduler.", "scheduler="]),
        (
            "lora-sweeper optimizer=",
            [f"optimizer={o}" for o in ("adafactor", "adamw", "adamw8bit", "lion", "prodigy", "sgd")],
        ),
    ],
)
def test_shell_completion_answers_on_the_script(tmp_path, line, expected):
    env = {**_env(), "COMP_LINE": line, "COMP_POINT": str(len(line))}
    done = subprocess.run(
        [str(SCRIPT), "-sc", "query=bash"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == expected


def test_the_completion_script_installs_for_the_script_name(tmp_path):
    done = subprocess.run(
        [str(SCRIPT), "-sc", "install=bash"], cwd=tmp_path, env=_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.rstrip().endswith("-F hydra_bash_completion lora-sweeper")
