"""Reading: the file -> options by sd-scripts name, plus the dataset's subsets as they were written.

Three layouts arrive: a kohya sd-scripts TOML (flat, or sectioned like ``[model_arguments]``, with
an inline or referenced ``dataset_config``), a LoRA_Easy_Training_Scripts JSON (its own names,
renamed to sd-scripts' first), and LoRA_Easy's current TOML (``[network_args.args]``,
``[general_args.dataset_args]``, ``[[subsets]]``, ...). All become one ``{sd-scripts name: Option}``;
subsets stay subsets, since each may hold its own folder, repeats and captions (``subsets.py``).
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sweeper.kohya_import.result import ImportResult, Mapped, NotMapped, Option
from sweeper.kohya_import.tables import ALIASES, SECTION_PARTS, VALUE_TABLES


class UnreadableConfig(Exception):
    """The input file cannot be read as a kohya TOML or a LoRA_Easy JSON."""


def read_source(path: Path) -> tuple[str, dict[str, Any]]:
    """Parse the file; ``UnreadableConfig`` says why it cannot be."""
    if not path.is_file():
        raise UnreadableConfig(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise UnreadableConfig(f"{path}: cannot be read ({error})") from error
    parsers = [("toml", tomllib.loads), ("json", json.loads)]
    if path.suffix.lower() == ".json":
        parsers.reverse()
    errors = []
    for kind, parse in parsers:
        try:
            data = parse(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
            errors.append(f"not {kind.upper()}: {error}")
            continue
        if not isinstance(data, dict):
            raise UnreadableConfig(f"{path}: the {kind.upper()} holds a {type(data).__name__}, not a table of options")
        return kind, data
    raise UnreadableConfig(f"{path}: " + "; ".join(errors))


@dataclass
class Subset:
    """One ``[[subsets]]`` table of a dataset config (or of LoRA_Easy's TOML), as written."""

    label: str  # e.g. "subsets[0]" or "dataset.toml:.datasets[0].subsets[1]"
    values: dict[str, Any]

    @property
    def is_reg(self) -> bool:
        return self.values.get("is_reg") is True or str(self.values.get("is_reg")).lower() == "true"


class Collector:
    """Flattens sections, dataset configs and LoRA_Easy's names into one ``{sd-scripts name: Option}``."""

    def __init__(self, result: ImportResult, base_dir: Path) -> None:
        self.result = result
        self.base_dir = base_dir
        self.options: dict[str, Option] = {}
        self.subsets: list[Subset] = []

    def add(self, key: str, label: str, value: Any, note: str = "", wins: str = "later wins") -> None:
        name = ALIASES.get(key, key)
        self.result.order.setdefault(label, len(self.result.order))
        if value is None or (isinstance(value, str) and not value.strip()):
            self.result.empty.append(NotMapped(label, value, "empty"))
            return
        if name in self.options:
            earlier = self.options[name]
            self.result.unmapped.append(NotMapped(earlier.label, earlier.value, f"superseded by {label} ({wins})"))
        self.options[name] = Option(name, label, value, note)

    def walk(self, table: dict[str, Any], path: str = "") -> None:
        for key, value in table.items():
            label = f"{path}.{key}" if path else key
            if key == "datasets" and isinstance(value, list):
                self.datasets(value, label)
            elif key == "subsets" and isinstance(value, list):
                self.result.order.setdefault(label, len(self.result.order))
                for index, subset in enumerate(value):
                    if isinstance(subset, dict):
                        self.subsets.append(Subset(f"{label}[{index}]", subset))
                        for where in (f"{label}[{index}]", *(f"{label}[{index}].{k}" for k in subset)):
                            self.result.order.setdefault(where, len(self.result.order))
            elif key == "dataset_config" and isinstance(value, str) and value.strip():
                self.dataset_config(value, label)
            elif isinstance(value, dict) and (key not in VALUE_TABLES or self.is_section(path, value)):
                self.walk(value, label)
            else:
                self.add(key, label, value)

    @staticmethod
    def is_section(path: str, value: dict[str, Any]) -> bool:
        """LoRA_Easy's ``[network_args.args]`` (a UI section), not sd-scripts' ``network_args`` value."""
        return not path and bool(value) and set(value) <= SECTION_PARTS

    def dataset_config(self, value: str, label: str) -> None:
        candidates = [Path(value).expanduser()]
        if not candidates[0].is_absolute():
            candidates.insert(0, self.base_dir / value)
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            self.result.unmapped.append(
                NotMapped(label, value, "dataset config file not found; import it too, or set data.train_dir")
            )
            return
        try:
            data = tomllib.loads(found.read_text(encoding="utf-8-sig"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
            self.result.unmapped.append(NotMapped(label, value, f"dataset config cannot be read ({error})"))
            return
        self.result.mapped.append(Mapped(label, "", value, f"read {found}; its options are listed below"))
        self.walk(data, f"{Path(value).name}:")

    def datasets(self, datasets: list[Any], label: str) -> None:
        for index, dataset in enumerate(datasets):
            where = f"{label}[{index}]"
            if index > 0:
                self.result.unmapped.append(
                    NotMapped(
                        where,
                        "{...}",
                        "one dataset (one resolution and batch size) per run: move its subsets into the first "
                        "dataset, or import it as an experiment of its own",
                    )
                )
                continue
            if isinstance(dataset, dict):
                self.walk(dataset, where)
