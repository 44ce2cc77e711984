"""Startup check of the installed libraries against what the project needs, before any of them is imported.

A version outside the project's ranges (pyproject.toml, read from the installed package's metadata)
or a pair known not to work together otherwise surfaces as a traceback from deep inside a library,
minutes into a run. Here each one is a single line naming the package and the command that fixes it.
Only metadata is read (``importlib.metadata``), so the check costs milliseconds and works even when
the broken library cannot be imported at all.
"""

from __future__ import annotations

import os
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

PROJECT = "lora-sweeper"
PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
LOCK_FILE = "requirements.lock"
SKIP_ENV = "LORA_SWEEPER_SKIP_VERSION_CHECK"
# The libraries whose versions decide whether training works at all (the list, plus the file format).
CHECKED = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors")


@dataclass(frozen=True)
class Conflict:
    """Two releases that install together (pip allows it) but fail together."""

    package: str
    versions: str  # specifier of the package's affected releases
    other: str
    needs: str  # what the other package must satisfy with those releases
    why: str


# Pairs that pip cannot rule out from pyproject.toml alone: a requirement cannot depend on another
# package's version. pyproject caps transformers below 5.24 for this one; the check catches an
# install that bypassed the cap (a newer transformers put in by hand).
KNOWN_CONFLICTS = (
    Conflict(
        "transformers",
        ">=5.24",
        "peft",
        ">=0.22",
        "transformers 5.24 refuses to load any LoRA into a text encoder with older peft",
    ),
)


def installed_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def project_requirements() -> list[Requirement]:
    """The project's own dependencies (no extras): from the installed metadata, else pyproject.toml."""
    try:
        lines = metadata.requires(PROJECT) or []
    except metadata.PackageNotFoundError:
        lines = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"] if PYPROJECT.is_file() else []
    requirements = [Requirement(line) for line in lines]
    return [r for r in requirements if r.marker is None or r.marker.evaluate({"extra": ""})]


def version_problems(
    installed: Callable[[str], str | None] = installed_version,
    requirements: list[Requirement] | None = None,
    conflicts: tuple[Conflict, ...] = KNOWN_CONFLICTS,
) -> list[str]:
    """One line per library that is missing, outside the project's range, or in a known-bad pair."""
    wanted = {r.name.lower(): r for r in (requirements if requirements is not None else project_requirements())}
    problems = []
    for package in CHECKED:
        requirement = wanted.get(package)
        if requirement is None:
            continue
        version = installed(package)
        if version is None:
            problems.append(f"{package} is not installed; lora-sweeper needs {_spec(requirement)}: {_fix(requirement)}")
        elif not requirement.specifier.contains(_release(version), prereleases=True):
            problems.append(
                f"{package} {version} is installed but lora-sweeper needs {_spec(requirement)}: {_fix(requirement)}"
            )
    for conflict in conflicts:
        version, other = installed(conflict.package), installed(conflict.other)
        if version is None or other is None:
            continue
        if _release(version) in SpecifierSet(conflict.versions) and _release(other) not in SpecifierSet(conflict.needs):
            problems.append(
                f"{conflict.package} {version} needs {conflict.other}{conflict.needs}, but {conflict.other} {other} "
                f"is installed ({conflict.why}): install the lock file's versions, "
                f"pip install -c {LOCK_FILE} -e ., or pip install '{conflict.package}{_negate(conflict.versions)}'"
            )
    return problems


def check_versions_or_exit() -> None:
    """Print every version problem and exit 2 (as a config error does); ``LORA_SWEEPER_SKIP_VERSION_CHECK=1`` skips."""
    if os.environ.get(SKIP_ENV, "") not in ("", "0"):
        return
    problems = version_problems()
    if problems:
        for line in problems:
            print(f"error: {line}", file=sys.stderr)
        print(f"(set {SKIP_ENV}=1 to run anyway)", file=sys.stderr)
        sys.exit(2)


def _release(version: str) -> Version:
    """The release part: a local build tag (``2.13.0+cpu``) does not change compatibility."""
    return Version(Version(version).base_version)


def _spec(requirement: Requirement) -> str:
    return f"{requirement.name}{requirement.specifier}" if requirement.specifier else requirement.name


def _fix(requirement: Requirement) -> str:
    if requirement.name.lower() == "torch":
        return f"install a torch build in that range for your machine first (pip install '{_spec(requirement)}')"
    return f"pip install '{_spec(requirement)}' (or all tested versions: pip install -c {LOCK_FILE} -e .)"


def _negate(specifier: str) -> str:
    """``>=5.24`` -> ``<5.24``: the releases outside a conflict's range."""
    return specifier.replace(">=", "<", 1) if specifier.startswith(">=") else f"!={specifier.lstrip('=')}"
