"""What a run depends on besides its config: the data files and the code, recorded so a
reproduction can say what changed."""

from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
from collections.abc import Iterable
from importlib import metadata
from typing import Any

from sweeper.config.schema import PROJECT_ROOT
from training.cache.folders import file_sha256
from training.data.scan import ImageRecord

PACKAGES = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "hydra-core", "optuna", "mlflow")
# keys of the resolved config that say where a run was written or tracked, not what it trained
WHERE_KEYS = ("output.dir", "tracking", "sweep")


def dataset_fingerprint(records: Iterable[ImageRecord], caption_extension: str) -> dict[str, dict[str, Any]]:
    """``{file: {size, sha256}}`` for every image and caption the run trained on (a record's own caption
    file when the scan found one, so a data.subsets folder's own caption extension counts)."""
    files: dict[str, dict[str, Any]] = {}
    for record in records:
        caption = record.caption_file or record.path.with_suffix(caption_extension)
        for path in (record.path, caption):
            if path.is_file() and str(path) not in files:
                files[str(path)] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    return dict(sorted(files.items()))


def fingerprint_digest(fingerprint: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


def changed_files(recorded: dict[str, dict[str, Any]], current: dict[str, dict[str, Any]]) -> list[str]:
    """Files added, removed or changed since the fingerprint was recorded, each with what happened."""
    changes = [f"{name} (missing now)" for name in recorded if name not in current]
    changes += [f"{name} (new)" for name in current if name not in recorded]
    changes += [f"{name} (changed)" for name in recorded if name in current and recorded[name] != current[name]]
    return sorted(changes)


def training_config(resolved: dict[str, Any]) -> dict[str, Any]:
    """The resolved config without where-it-was-written keys: identical for a run and its reproduction."""
    kept = json.loads(json.dumps(resolved))
    kept.pop("defaults", None)  # the schema's composition list: empty, and absent when Hydra composed it
    for dotted in WHERE_KEYS:
        *parents, leaf = dotted.split(".")
        node = kept
        for parent in parents:
            node = node.get(parent, {})
        node.pop(leaf, None)
    return kept


def code_version() -> dict[str, str]:
    """The code a run uses, as MLflow tags: git commit and dirty flag (in a checkout), package versions."""
    tags = {}
    commit, dirty = _git_state()
    if commit:
        tags.update({"git_commit": commit, "git_dirty": str(dirty).lower()})
    for package in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            tags[f"version.{package}"] = metadata.version(package)
    return tags


def _git_state() -> tuple[str | None, bool]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None, False
    return commit, bool(status.strip())
