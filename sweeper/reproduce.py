"""``python -m sweeper.reproduce RUN_ID|RUN_DIR|LORA_FILE [overrides...]``: run a logged run again and compare.

The logged resolved config is all a run needs; a sweep trial reproduces as a single run (its
``sweep.*`` bookkeeping is dropped). A LoRA file leads back to its run through its
``lora_sweeper_run_id`` metadata, or, when that run is not in the tracking store, through the
config it carries (``lora_sweeper_config``). Extra ``key=value`` overrides make it a variation,
which the output and the new run's tags say.

A reproduction matches when the LoRA's tensors are bit-identical and its metadata equal except the
keys that record when and by which run it was written (``VOLATILE_METADATA_KEYS``: start/finish
times, date, session and run id); the comparison names those keys.

The arguments are parsed before torch, diffusers or mlflow is imported (``--help`` and a mistyped path
answer at once): those imports live in the functions that use them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sweeper.tracking.credentials import move_passwords_to_env, with_credentials

COMPARED = ("clip_score", "clip_score_baseline", "train/final_loss", "train/steps_done")


class ReproduceError(RuntimeError):
    """The source run cannot be found or read; the message says what to give instead."""


@dataclass
class Source:
    """What was logged about the original run."""

    label: str  # run id or folder, for messages and tags
    config: dict[str, Any]
    metrics: dict[str, float]
    lora_sha256: str | None
    tags: dict[str, str] = field(default_factory=dict)
    fingerprint: dict[str, Any] | None = None
    lora_identity: dict[str, str] = field(default_factory=dict)  # tensors_sha256, metadata_sha256
    lora_metadata: dict[str, str] | None = None
    run_id: str | None = None  # the MLflow run it was, where known (names the reproduction's folder)


def load_source(source: str, tracking_uri: str | None) -> Source:
    path = Path(source)
    if path.is_dir():
        return _from_folder(path)
    if path.is_file():
        return _from_lora_file(path, tracking_uri or _default_uri())
    if looks_like_a_path(source):  # a mistyped file or folder, not a run id to look up (and no store created)
        raise ReproduceError(missing_path(source))
    return _from_mlflow(source, tracking_uri or _default_uri())


def looks_like_a_path(source: str) -> bool:
    """Whether ``source`` is meant as a file or folder: MLflow run ids are hex digits, without a ``/``, ``\\``,
    ``~``, leading ``.`` or file extension."""
    return any(sep in source for sep in "/\\") or source.startswith(("~", ".")) or bool(Path(source).suffix)


def missing_path(source: str) -> str:
    return f"no such file: {source} (nor a folder); give an existing LoRA file or run folder, or an MLflow run id"


def output_folder_name(source: Source) -> str:
    """The reproduction's folder under ``outputs/reproduce/``: the run id, else the LoRA file's stem."""
    return source.run_id or Path(source.label).stem or "reproduction"


def _from_lora_file(path: Path, tracking_uri: str) -> Source:
    """The run a LoRA file names (``lora_sweeper_run_id``), else the config the file carries."""
    from safetensors import SafetensorError

    from sweeper.config.schema import TrackingConfig
    from training.network.file import lora_identity, read_metadata
    from training.network.metadata import CONFIG_KEY, RUN_ID_KEY

    try:
        metadata = read_metadata(path)
    except (SafetensorError, OSError) as error:
        raise ReproduceError(f"{path} is not a safetensors LoRA file ({error})") from error
    run_id = metadata.get(RUN_ID_KEY)
    if run_id:
        try:
            source = _from_mlflow(run_id, tracking_uri)
        except ReproduceError as error:
            print(f"note: {error}; using the config stored in the file instead")
        else:
            source.lora_metadata = source.lora_metadata or metadata
            return source
    if CONFIG_KEY not in metadata:
        raise ReproduceError(
            f"{path} carries no lora_sweeper_config (written with output.metadata=false, or by another trainer); "
            "give its MLflow run id or run folder instead"
        )
    config = json.loads(metadata[CONFIG_KEY])
    # where-it-was-written keys are not in the file: the reproduction logs to the given (or default) store
    config.setdefault("tracking", OmegaConf.to_container(OmegaConf.structured(TrackingConfig(uri=tracking_uri))))
    return Source(
        label=str(path),
        config=config,
        metrics={},
        lora_sha256=None,
        lora_identity=lora_identity(path),
        lora_metadata=metadata,
        run_id=run_id or None,
    )


def _default_uri() -> str:
    return f"sqlite:///{(Path.cwd() / 'outputs' / 'mlflow.db').resolve()}"


def _from_folder(folder: Path) -> Source:
    from training.network.file import read_metadata

    config_file = folder / ".hydra" / "config.yaml"
    if not config_file.is_file():
        raise ReproduceError(f"{folder} has no .hydra/config.yaml: give a Hydra run folder or an MLflow run id")
    raw = OmegaConf.load(config_file)
    raw.output.dir = str(folder)  # the one interpolation only Hydra itself can resolve
    record_file = folder / "run.json"
    record = json.loads(record_file.read_text()) if record_file.is_file() else {}
    lora_file = Path(record.get("lora_file", ""))
    return Source(
        label=str(folder),
        config=OmegaConf.to_container(raw, resolve=True),
        metrics=record.get("metrics", {}),
        lora_sha256=record.get("lora_sha256"),
        lora_identity={k: record[f"lora_{k}"] for k in IDENTITY if f"lora_{k}" in record},
        lora_metadata=read_metadata(lora_file) if lora_file.suffix == ".safetensors" and lora_file.is_file() else None,
        run_id=record.get("mlflow_run_id"),
    )


def _from_mlflow(run_id: str, tracking_uri: str) -> Source:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(with_credentials(tracking_uri))  # a store it cannot open (a file store) raises too
        run = client.get_run(run_id)
    except MlflowException as error:
        raise ReproduceError(
            f"no MLflow run '{run_id}' in {tracking_uri}; pass --tracking-uri or a run folder ({error.message})"
        ) from error
    with tempfile.TemporaryDirectory() as tmp:
        config = OmegaConf.to_container(OmegaConf.load(client.download_artifacts(run_id, "config/resolved.yaml", tmp)))
        fingerprint, metadata = (_artifact_json(client, run_id, name, tmp) for name in LOGGED_JSON)
    tags = dict(run.data.tags)
    identity = {k: tags[f"lora.{k}"] for k in IDENTITY if f"lora.{k}" in tags}
    return Source(
        run_id, config, dict(run.data.metrics), tags.get("lora.sha256"), tags, fingerprint, identity, metadata, run_id
    )


LOGGED_JSON = ("data/fingerprint.json", "lora/metadata.json")
IDENTITY = ("tensors_sha256", "metadata_sha256")


def _artifact_json(client: Any, run_id: str, name: str, folder: str) -> Any:
    """A JSON artifact of the run, or None for runs logged before it existed."""
    from mlflow.exceptions import MlflowException

    try:
        return json.loads(Path(client.download_artifacts(run_id, name, folder)).read_text())
    except (MlflowException, OSError):
        return None


def build_config(source: Source, overrides: list[str], output_dir: Path) -> DictConfig:
    """The logged config on the typed schema, as a single run, with any overrides applied last."""
    from sweeper.config.schema import Config, SweepConfig

    loaded = OmegaConf.create(source.config)
    loaded.sweep = OmegaConf.structured(SweepConfig())
    loaded.output.dir = str(output_dir)
    cfg = OmegaConf.merge(OmegaConf.structured(Config), loaded)
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    return cfg


def has_final_result(source: Source) -> bool:
    """Whether the run recorded what a reproduction is compared with: a final metric or its LoRA's hashes.

    A run that crashed or was killed has its config logged (it is logged first) but none of these.
    """
    return bool(source.lora_identity or source.lora_sha256 or any(name in source.metrics for name in COMPARED))


def environment_warnings(source: Source, cfg: DictConfig) -> list[str]:
    """What differs from the original run besides the config: data files, code, packages."""
    from sweeper.run.fingerprint import PACKAGES, changed_files, code_version, dataset_fingerprint
    from training.data.scan import scan_dataset

    warnings = []
    if source.fingerprint is not None:
        scan = scan_dataset(cfg.data.train_dir, cfg.data.caption_extension, cfg.data.on_bad_image)
        changes = changed_files(source.fingerprint, dataset_fingerprint(scan.records, cfg.data.caption_extension))
        if changes:
            warnings.append("the training data changed since the run: " + "; ".join(changes[:20]))
    current = code_version()
    commit = current.get("git_commit")
    if source.tags.get("git_commit") and source.tags["git_commit"] != commit:
        warnings.append(f"code version differs: run used {source.tags['git_commit'][:12]}, this checkout is {commit}")
    if current.get("git_dirty") == "true":
        warnings.append("this checkout has uncommitted changes (git_dirty)")
    for package in PACKAGES:
        logged, installed = source.tags.get(f"version.{package}"), current.get(f"version.{package}")
        if logged and logged != installed:
            warnings.append(f"{package} {installed} is installed; the run used {logged}")
    return warnings


def comparison(
    source: Source, metrics: dict[str, float], lora_path: Path, lora_sha256: str
) -> list[tuple[str, Any, Any, float | None]]:
    """Rows of (what, original, reproduced, difference); the LoRA rows are 0 (identical) or inf."""
    from training.network.file import lora_identity

    rows: list[tuple[str, Any, Any, float | None]] = []
    for name in COMPARED:
        if name in source.metrics and name in metrics:
            rows.append((name, source.metrics[name], metrics[name], abs(metrics[name] - source.metrics[name])))
    identity = lora_identity(lora_path)
    if source.lora_identity:
        for key, value in source.lora_identity.items():
            new = identity.get(key, "")
            rows.append((f"lora {key}", value[:16], new[:16], 0.0 if value == new else float("inf")))
    elif source.lora_sha256:  # a run logged before the LoRA's tensors and metadata were hashed apart
        same = 0.0 if source.lora_sha256 == lora_sha256 else float("inf")
        rows.append(("lora_sha256", source.lora_sha256[:16], lora_sha256[:16], same))
    return rows


def metadata_differences(source: Source, lora_path: Path) -> tuple[list[str], list[str]]:
    """(keys that differ only as times/run ids do, keys that differ otherwise) between the two LoRA files."""
    if source.lora_metadata is None or lora_path.suffix != ".safetensors":
        return [], []
    from training.network.file import read_metadata
    from training.network.metadata import VOLATILE_METADATA_KEYS

    new = read_metadata(lora_path)
    keys = sorted(k for k in set(source.lora_metadata) | set(new) if source.lora_metadata.get(k) != new.get(k))
    return [k for k in keys if k in VOLATILE_METADATA_KEYS], [k for k in keys if k not in VOLATILE_METADATA_KEYS]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sweeper.reproduce", description=__doc__.splitlines()[0])
    parser.add_argument(
        "source", help="an MLflow run id, a Hydra run folder (outputs/runs/<date>/<time>) or a LoRA file it wrote"
    )
    parser.add_argument("overrides", nargs="*", help="key=value changes (makes it a variation)")
    parser.add_argument("--tracking-uri", help="MLflow store of the run (default: sqlite under ./outputs)")
    parser.add_argument("--tolerance", type=float, default=0.0, help="largest accepted metric difference (default 0)")
    parser.add_argument("--output-dir", help="where the reproduction writes (default outputs/reproduce/<id>/<time>)")
    # a URL's password (--tracking-uri, overrides) moves into the environment before anything can print or log it
    args = parser.parse_intermixed_args(move_passwords_to_env(sys.argv[1:] if argv is None else argv))

    if looks_like_a_path(args.source) and not Path(args.source).exists():  # said at once, before heavy imports
        print(f"error: {missing_path(args.source)}", file=sys.stderr)
        return 2
    from sweeper.config.versions import check_versions_or_exit

    check_versions_or_exit()  # before the libraries it checks are imported
    _quiet_libraries()
    from sweeper.config.schema import register_resolvers
    from sweeper.config.validate import ConfigError

    register_resolvers()
    try:
        source = load_source(args.source, args.tracking_uri)
    except ReproduceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    variation = bool(args.overrides)
    if not variation and not has_final_result(source):
        print(
            f"error: {source.label} has no final result (no final metrics or LoRA hashes were recorded: the run "
            "never finished), so a reproduction would have nothing to match; reproduce a finished run, or give "
            "key=value overrides to run its config as a variation",
            file=sys.stderr,
        )
        return 2
    default = Path("outputs") / "reproduce" / output_folder_name(source) / time.strftime("%Y-%m-%d_%H-%M-%S")
    output_dir = Path(args.output_dir or default)
    cfg = build_config(source, args.overrides, output_dir.resolve())
    if args.tracking_uri:
        cfg.tracking.uri = args.tracking_uri
    for warning in environment_warnings(source, cfg):
        print(f"warning: {warning}")
    print(
        ("Variation of" if variation else "Reproducing")
        + f" {source.label}"
        + (f" with {args.overrides}" if variation else "")
    )

    from sweeper.run.setting import run

    tags = {"reproduces": source.label, "reproduce.variation": str(variation).lower()}
    try:
        result = run(cfg, overrides=list(args.overrides), extra_tags=tags)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    rows = comparison(source, result.metrics, Path(result.lora_path), result.lora_sha256)
    print(f"\n{'metric':<22}{'original':>20}{'reproduced':>20}{'difference':>14}")
    for name, original, new, diff in rows:
        shown = "identical" if diff == 0.0 and name == "lora_sha256" else f"{diff:.3g}" if diff is not None else "-"
        print(f"{name:<22}{original!s:>20}{new!s:>20}{shown:>14}")
    by_time, other = metadata_differences(source, Path(result.lora_path))
    if by_time:
        print(f"\nLoRA metadata that differs only by when/which run wrote it: {', '.join(by_time)}")
    if other:
        print(f"LoRA metadata that differs otherwise: {', '.join(other)}")
    print(f"\nLoRA file:  {result.lora_path}\nMLflow run: {result.run_id}")
    exceeded = [name for name, _, _, diff in rows if diff is not None and diff > args.tolerance]
    if variation:
        print("This was a variation (overrides given), not a reproduction: differences are expected.")
        return 0
    if not rows:
        print(f"NOT reproduced: nothing of {source.label} could be compared (no shared metric or LoRA hash)")
        return 1
    if exceeded:
        print(f"NOT reproduced: {', '.join(exceeded)} differ by more than --tolerance={args.tolerance}")
        return 1
    if source.lora_identity:
        note = " (bit-identical LoRA tensors, same metadata but times and run id)"
    else:
        note = " (bit-identical LoRA file)" if source.lora_sha256 else ""
    print("Reproduced within --tolerance" + note)
    return 0


def _quiet_libraries() -> None:
    """The libraries' load chatter off before they are first imported, as ``python -m sweeper`` does (the
    transformers warning that torchvision is missing: the PIL image processors are used on purpose)."""
    from sweeper.__main__ import quiet_libraries

    quiet_libraries()


if __name__ == "__main__":
    sys.exit(main())
