"""Refresh ``requirements.lock``: the newest versions pyproject.toml allows, kept only if the suite passes.

    python scripts/refresh_lock.py [--torch 2.13.0] [--keep-pins] [--keep-venv] [-- pytest args]

1. a fresh virtual environment (``.lock-venv/``), torch first (the build you name: the lock never
   pins torch, which users install for their own CUDA or CPU);
2. ``pip install -e '.[test]'`` with no constraints, so pip resolves the newest allowed releases
   (``--keep-pins``: with the current lock as constraints, so only a dependency new to pyproject.toml
   is resolved and every pinned version stays: adding one package does not upgrade the rest);
3. the README's test command (``python -m pytest``) in that environment;
4. only when it passes, ``pip freeze`` (minus torch and its CUDA wheels, minus the project itself)
   replaces ``requirements.lock``, written under a temporary name and renamed.

A failing suite leaves the old lock untouched and says which versions changed, so the breaking
release can be excluded in pyproject.toml (and the startup check's ``KNOWN_CONFLICTS``) before
trying again. Exit status: 0 refreshed, 1 the suite failed, 2 the install failed.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from training.atomic_file import write_text_atomically  # noqa: E402  (no heavy imports)

LOCK = ROOT / "requirements.lock"
VENV = ROOT / ".lock-venv"
# Machine-specific: torch's own build and the CUDA runtime wheels it pulls in.
UNLOCKED = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)==", re.IGNORECASE)
PROJECT = re.compile(r"^lora[-_]sweeper\b", re.IGNORECASE)


def locked_lines(freeze: str) -> list[str]:
    """The lines of ``pip freeze`` that belong in the lock: pinned, portable, not the project itself."""
    lines = []
    for line in freeze.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "-e ")) or " @ " in line or PROJECT.match(line) or UNLOCKED.match(line):
            continue
        lines.append(line)
    return sorted(lines, key=str.lower)


def pinned(lines: list[str]) -> dict[str, str]:
    return dict(line.split("==", 1) for line in lines if "==" in line)


def changes(old: dict[str, str], new: dict[str, str]) -> list[str]:
    names = sorted(set(old) | set(new), key=str.lower)
    return [f"{n}: {old.get(n, '-')} -> {new.get(n, '-')}" for n in names if old.get(n) != new.get(n)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch", default="2.13.0", help="torch version to test with (default: CI's 2.13.0)")
    parser.add_argument(
        "--keep-pins", action="store_true", help="keep every locked version; resolve only dependencies new to the lock"
    )
    parser.add_argument("--keep-venv", action="store_true", help=f"keep {VENV.name}/ afterwards")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)

    shutil.rmtree(VENV, ignore_errors=True)
    python = VENV / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "-q"]
    steps = [
        [sys.executable, "-m", "venv", str(VENV)],
        [*pip, "--upgrade", "pip"],
        [*pip, f"torch=={args.torch}"],
        [*pip, *(["-c", str(LOCK)] if args.keep_pins else []), "-e", f"{ROOT}[test]"],
    ]
    for step in steps:
        print("+", " ".join(step), flush=True)
        if subprocess.run(step, cwd=ROOT).returncode != 0:
            print("install failed; requirements.lock is unchanged", file=sys.stderr)
            return 2
    freeze = subprocess.run([str(python), "-m", "pip", "freeze"], cwd=ROOT, capture_output=True, text=True, check=True)
    lines = locked_lines(freeze.stdout)
    old = pinned(locked_lines(LOCK.read_text())) if LOCK.is_file() else {}
    changed = changes(old, pinned(lines))
    print("versions changed against the current lock:\n  " + ("\n  ".join(changed) or "none"), flush=True)

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    print("+ python -m pytest", " ".join(args.pytest_args), flush=True)
    passed = subprocess.run([str(python), "-m", "pytest", *args.pytest_args], cwd=ROOT, env=env).returncode == 0
    if not args.keep_venv:
        shutil.rmtree(VENV, ignore_errors=True)
    if not passed:
        print("the suite failed with these versions; requirements.lock is unchanged", file=sys.stderr)
        return 1

    header = [
        "# Known-good versions: every dependency of lora-sweeper[test] except torch, tested together.",
        "# Install: pip install torch==<your build>; pip install -c requirements.lock -e '.[test]'",
        "# Refresh: python scripts/refresh_lock.py (resolves the newest allowed, runs the suite, rewrites",
        "# this file only if it passes). Do not edit by hand.",
        f"# Tested {time.strftime('%Y-%m-%d')} on Python {platform.python_version()} ({sys.platform}), "
        f"torch {args.torch}.",
    ]
    write_text_atomically(LOCK, "\n".join(header + lines) + "\n")
    print(f"wrote {LOCK} ({len(lines)} packages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
