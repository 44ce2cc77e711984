"""The toy world's trained weights, shipped inside this package, and their manifest.

``weights/clip`` (a CLIPModel + CLIPProcessor) and ``weights/base`` (a StableDiffusionPipeline
folder) are made by ``pretrain_clip`` and ``pretrain_base``; ``weights/manifest.json`` records the
sha256 and size of every file, the command and seed that made each part, and its metrics. A
changed or missing file is caught by ``manifest_problems`` (and by the tests) rather than silently
scoring with other weights.

    python -m toy_world.shipped install --clip CLIP_DIR --base BASE_DIR   # copy in, write the manifest
    python -m toy_world.shipped check                                     # verify files against it
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from toy_world.world import HELD_OUT_SHAPES, SHAPES
from training.cache.folders import file_sha256

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
CLIP_DIR = WEIGHTS_DIR / "clip"
BASE_DIR = WEIGHTS_DIR / "base"
MANIFEST = WEIGHTS_DIR / "manifest.json"
PARTS = {"clip": CLIP_DIR, "base": BASE_DIR}
SIZE_LIMIT_MB = 20.0
REGENERATE = (
    "regenerate them with `python -m toy_world.pretrain_clip --out CLIP` and "
    "`python -m toy_world.pretrain_base --clip CLIP --out BASE`, then "
    "`python -m toy_world.shipped install --clip CLIP --base BASE` (README: The toy world)"
)
# what pretraining writes beside the weights that need not ship (the metrics go into the manifest)
NOT_SHIPPED = {"metrics.json", "samples.png"}


def shipped_folder(part: str) -> Path:
    """``weights/<part>``, or a clear error if this checkout lacks it."""
    folder = PARTS[part]
    if not (folder / "model_index.json").exists() and not (folder / "config.json").exists():
        raise FileNotFoundError(f"the toy world's {part} weights are missing from {folder}; {REGENERATE}")
    return folder


def file_table(folder: Path) -> dict[str, dict[str, Any]]:
    """Relative path -> {sha256, bytes} for every file under ``folder``."""
    return {
        str(path.relative_to(folder)): {"sha256": file_sha256(path), "bytes": path.stat().st_size}
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _manifest_parts(manifest_path: Path) -> dict[str, Any]:
    """The manifest's ``parts``, read once per version of the file (keyed by its modification time)."""
    if not manifest_path.exists():
        return {}
    return _read_parts(manifest_path, manifest_path.stat().st_mtime_ns)


@lru_cache(maxsize=8)
def _read_parts(manifest_path: Path, mtime_ns: int) -> dict[str, Any]:
    return json.loads(manifest_path.read_text())["parts"]


def clip_shapes(manifest_path: Path = MANIFEST) -> tuple[str, ...]:
    """The shapes the shipped toy CLIP was trained on, in the world's order: what it can tell apart.

    Weights made before the world grew know fewer shapes than ``world.SHAPES``; a zero-shot label
    the CLIP never saw would be noise. Read from the manifest (``shapes``, or the keys of
    ``per_shape_accuracy`` in older ones); without a manifest, every shape of the world.
    """
    metrics = _manifest_parts(manifest_path).get("clip", {}).get("metrics", {})
    known = metrics.get("shapes") or list(metrics.get("per_shape_accuracy", {})) or SHAPES
    return tuple(s for s in SHAPES if s in known)


def held_out_shapes(manifest_path: Path = MANIFEST) -> tuple[str, ...]:
    """The world's held-out shapes that the shipped base model never saw and the shipped CLIP knows.

    These are the concepts a LoRA can be taught and judged on with the shipped weights: all of
    ``world.HELD_OUT_SHAPES`` once the weights are made by this version's pretraining, only the star
    with weights from before the world had a moon and an arrow.
    """
    base = _manifest_parts(manifest_path).get("base", {}).get("metrics", {})
    trained = set(base.get("train_shapes", ()))
    known = clip_shapes(manifest_path)
    return tuple(s for s in HELD_OUT_SHAPES if s in known and s not in trained)


def manifest_problems(manifest_path: Path = MANIFEST) -> list[str]:
    """Every file that is missing, extra or changed against the manifest, and a size over the limit."""
    if not manifest_path.exists():
        return [f"no manifest at {manifest_path}; {REGENERATE}"]
    manifest = json.loads(manifest_path.read_text())
    root = manifest_path.parent
    problems = []
    for part, entry in manifest["parts"].items():
        actual = file_table(root / part)
        for name in sorted(set(entry["files"]) | set(actual)):
            expected = entry["files"].get(name)
            if expected is None:
                problems.append(f"{part}/{name}: not in the manifest")
            elif name not in actual:
                problems.append(f"{part}/{name}: missing")
            elif actual[name]["sha256"] != expected["sha256"]:
                problems.append(f"{part}/{name}: sha256 differs from the manifest")
    total_mb = sum(f["bytes"] for e in manifest["parts"].values() for f in e["files"].values()) / 1e6
    if total_mb > SIZE_LIMIT_MB:
        problems.append(f"the shipped weights take {total_mb:.1f} MB, over the {SIZE_LIMIT_MB:.0f} MB limit")
    return problems


def install(sources: dict[str, Path], weights_dir: Path = WEIGHTS_DIR) -> dict[str, Any]:
    """Copy pretrained folders into ``weights_dir`` and write the manifest (all-or-nothing)."""
    parts: dict[str, Any] = {}
    weights_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".weights-", dir=weights_dir.parent))
    try:
        for part, source in sources.items():
            metrics_file = source / "metrics.json"
            if not metrics_file.exists():
                raise FileNotFoundError(f"{source} has no metrics.json: is it a pretrain_{part} output folder?")
            metrics = json.loads(metrics_file.read_text())
            shutil.copytree(source, staging / part, ignore=shutil.ignore_patterns(*NOT_SHIPPED))
            parts[part] = {
                "command": metrics.get("command"),
                "seed": metrics.get("seed"),
                "metrics": {k: v for k, v in metrics.items() if k not in ("command", "config")},
                "files": file_table(staging / part),
            }
        manifest = {"parts": parts, "total_bytes": sum(f["bytes"] for e in parts.values() for f in e["files"].values())}
        (staging / MANIFEST.name).write_text(json.dumps(manifest, indent=2) + "\n")
        if weights_dir.exists():
            shutil.rmtree(weights_dir)
        staging.rename(weights_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    install_cmd = commands.add_parser("install", help="copy pretrained folders in and write the manifest")
    install_cmd.add_argument("--clip", type=Path, required=True)
    install_cmd.add_argument("--base", type=Path, required=True)
    commands.add_parser("check", help="verify the shipped files against the manifest")
    args = parser.parse_args(argv)
    if args.command == "install":
        manifest = install({"clip": args.clip, "base": args.base})
        print(f"installed {WEIGHTS_DIR} ({manifest['total_bytes'] / 1e6:.1f} MB)")
        return 0
    problems = manifest_problems()
    for problem in problems:
        print(problem, file=sys.stderr)
    print("manifest ok" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
