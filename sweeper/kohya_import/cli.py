"""The command: read, map, check on this machine, write ``conf/experiment/<name>.yaml``, print the report."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import sweeper.kohya_import.flow_rules
import sweeper.kohya_import.rules  # noqa: F401  (registers the mapping rules)
from sweeper.config.schema import PROJECT_ROOT
from sweeper.kohya_import.convert import Unfit, as_bool
from sweeper.kohya_import.machine import check_here, warn_model_settings
from sweeper.kohya_import.mapper import Mapper
from sweeper.kohya_import.reading import Collector, UnreadableConfig, read_source
from sweeper.kohya_import.result import ImportResult, Option
from sweeper.kohya_import.subsets import plan_subsets
from sweeper.kohya_import.tables import LORA_EASY_MARKERS
from training.atomic_file import write_text_atomically

CONF_DIR = PROJECT_ROOT / "conf"
DEFAULT_OUT = CONF_DIR / "experiment"


def import_config(
    path: str | Path, conf_dir: str | Path = CONF_DIR, *, check: bool = True, sdxl: bool = False
) -> ImportResult:
    """Read and map one config file (``UnreadableConfig`` if it cannot be read); writes nothing.

    ``check`` also lists what cannot apply on this machine (``result.here``). ``sdxl``: the file is for sd-scripts'
    ``sdxl_train_network.py``, which a kohya TOML does not say (as ``sdxl = true`` in the file would).
    """
    path = Path(path)
    kind, data = read_source(path)
    easy = bool(LORA_EASY_MARKERS & set(data)) or any(
        isinstance(value, dict) and Collector.is_section("", value) for value in data.values()
    )
    label = {
        ("toml", False): "kohya sd-scripts TOML",
        ("toml", True): "LoRA_Easy_Training_Scripts TOML",
        ("json", True): "LoRA_Easy_Training_Scripts JSON",
        ("json", False): "JSON with sd-scripts option names",
    }[(kind, easy)]
    result = ImportResult(source=path, kind=label)
    collector = Collector(result, path.parent)
    collector.walk(data)
    if sdxl and not _switched_on(collector.options.get("sdxl")):
        result.order["--sdxl"] = -1  # reported first
        collector.add("sdxl", "--sdxl", True, "given to the import", wins="the import's --sdxl wins")
    plan = plan_subsets(collector)
    Mapper(result, collector.options, Path(conf_dir), plan).run()
    if check:
        check_here(result)
    warn_model_settings(result)  # after the checks: "Run it here" may replace the model
    return result


def _switched_on(option: Option | None) -> bool:
    try:
        return option is not None and as_bool(option.value)
    except Unfit:
        return False


def write_experiment(result: ImportResult, name: str, out_dir: str | Path = DEFAULT_OUT) -> Path:
    """Write ``<out_dir>/<name>.yaml`` under a temporary name, then rename it into place."""
    return write_text_atomically(Path(out_dir) / f"{name}.yaml", result.yaml(name))


def experiment_name(path: str | Path) -> str:
    """A Hydra-friendly option name from a file name: letters, digits, ``_`` and ``-``."""
    return _safe_name(Path(path).stem)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "imported"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sweeper.import_kohya",
        description="Turn a kohya sd-scripts TOML or a LoRA_Easy_Training_Scripts TOML/JSON into a Hydra experiment.",
    )
    parser.add_argument("config", help="the kohya .toml, or LoRA_Easy .toml / .json file")
    parser.add_argument("--name", help="experiment name (default: the file name)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder to write <name>.yaml in (conf/experiment)")
    parser.add_argument(
        "--sdxl", action="store_true", help="the config is for sd-scripts' sdxl_train_network.py (model.kind=sdxl)"
    )
    parser.add_argument("--conf-dir", default=str(CONF_DIR), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        result = import_config(args.config, args.conf_dir, sdxl=args.sdxl)
    except UnreadableConfig as error:
        print(f"cannot import: {error}", file=sys.stderr)
        return 2
    name = experiment_name(args.config) if args.name is None else _safe_name(args.name)
    written = write_experiment(result, name, args.out)
    print(result.report(written, name))
    return 0
