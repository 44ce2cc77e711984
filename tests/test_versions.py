"""The startup version check: one line per problem, naming the package and the fix, before any import."""

from __future__ import annotations

import os
import subprocess
import sys

from packaging.requirements import Requirement

from sweeper.config.versions import KNOWN_CONFLICTS, project_requirements, version_problems
from tests.conftest import REPO

GOOD = {
    "torch": "2.13.0+cpu",
    "diffusers": "0.42.1",
    "transformers": "5.23.0",
    "peft": "0.21.2",
    "accelerate": "1.15.0",
    "safetensors": "0.8.0",
}


def test_the_installed_set_passes():
    assert version_problems() == []


def test_a_known_bad_pair_is_one_line_naming_both_and_the_fix():
    installed = {**GOOD, "transformers": "5.24.0"}
    allow_any = [Requirement(name) for name in GOOD]  # as if pyproject's cap had been bypassed
    (problem,) = version_problems(installed.get, allow_any)
    assert "\n" not in problem
    assert problem.startswith("transformers 5.24.0 needs peft>=0.22, but peft 0.21.2 is installed")
    assert "pip install -c requirements.lock" in problem and "pip install 'transformers<5.24'" in problem
    assert version_problems({**installed, "peft": "0.22.0"}.get, allow_any) == []


def test_a_version_outside_the_projects_range_names_the_range():
    problems = version_problems({**GOOD, "transformers": "4.54.0", "peft": None}.get)
    assert len(problems) == 2
    transformers = next(p for p in problems if p.startswith("transformers"))
    assert "transformers 4.54.0 is installed but lora-sweeper needs transformers" in transformers
    assert "<5.24" in transformers and ">=5" in transformers
    assert any(p.startswith("peft is not installed") for p in problems)


def test_local_build_tags_do_not_matter():
    assert version_problems({**GOOD, "torch": "2.13.0+cu130"}.get) == []


def test_pyproject_excludes_the_known_conflicts():
    """pip must not be able to resolve a known-bad pair from pyproject alone where it can say so."""
    wanted = {r.name: r for r in project_requirements()}
    for conflict in KNOWN_CONFLICTS:
        first_bad = conflict.versions.removeprefix(">=")
        assert not wanted[conflict.package].specifier.contains(first_bad), conflict


def test_the_cli_stops_with_the_message_before_importing_libraries(tmp_path):
    """A real process with a package missing: the check runs before diffusers/transformers are imported."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    # a sitecustomize that hides peft's distribution metadata: importlib.metadata then reports it missing
    (shadow / "sitecustomize.py").write_text(
        "import importlib.metadata as m\n"
        "_version = m.version\n"
        "def version(name):\n"
        "    if name == 'peft':\n"
        "        raise m.PackageNotFoundError(name)\n"
        "    return _version(name)\n"
        "m.version = version\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{shadow}{os.pathsep}{REPO}", "HF_HUB_OFFLINE": "1"}
    env.pop("LORA_SWEEPER_SKIP_VERSION_CHECK", None)
    done = subprocess.run(
        [sys.executable, "-m", "sweeper", "--cfg", "job"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "error: peft is not installed; lora-sweeper needs peft>=" in done.stderr
    assert "Traceback" not in done.stderr
