"""Startup checks that read the composed config against its schema, not against one option's rules.

Two holes the typed schema leaves open: Hydra's ``+key=value`` (the form its own error hint
suggests for a typo) appends a key the schema does not know, which is then silently ignored; and
a float field accepts ``nan`` and ``inf``, which every ``value < 0`` range check lets through.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from sweeper.config.schema import Config

_IGNORED_ROOT_KEYS = ("hydra",)  # present only when a config is composed with Hydra's own node


def schema_problems(cfg: Any) -> list[str]:
    """Unknown keys and non-finite numbers, each naming its full key and the fix."""
    tree = _as_tree(cfg)
    return unknown_key_problems(tree) + non_finite_problems(tree)


def unknown_key_problems(tree: dict[str, Any], schema: type = Config, prefix: str = "") -> list[str]:
    """Keys of ``tree`` that ``schema`` (a dataclass, walked into nested dataclasses) has no field for."""
    hints = typing.get_type_hints(schema)
    fields = [f.name for f in dataclasses.fields(schema)]
    names = [name for name in fields if name != "defaults"]  # the root's Hydra defaults list: known, not suggested
    problems = []
    for key, value in tree.items():
        if not prefix and key in _IGNORED_ROOT_KEYS:
            continue
        if key not in fields:
            close = difflib.get_close_matches(str(key), names, n=1)
            section = prefix.rstrip(".") or "the config"
            hint = f"did you mean {prefix}{close[0]}?" if close else f"the keys of {section}: {', '.join(names)}"
            problems.append(
                f"{prefix}{key}: not a config key, so it would be ignored; fix the spelling or remove it ({hint})"
            )
            continue
        nested = _dataclass_of(hints[key])
        if nested is not None and isinstance(value, dict):
            problems += unknown_key_problems(value, nested, f"{prefix}{key}.")
    return problems


def non_finite_problems(tree: Any, prefix: str = "") -> list[str]:
    """Every ``nan`` / ``inf`` number in the config: no option means anything by them (null disables)."""
    if isinstance(tree, dict):
        return [p for key, value in tree.items() for p in non_finite_problems(value, f"{prefix}{key}.")]
    if isinstance(tree, list):
        return [p for i, value in enumerate(tree) for p in non_finite_problems(value, f"{prefix[:-1]}[{i}].")]
    if isinstance(tree, float) and not math.isfinite(tree):
        key = prefix.rstrip(".")
        return [
            f"{key}={tree} is not a finite number; give a real value (the Options tables in README.md list each range)"
        ]
    return []


def _as_tree(cfg: Any) -> Any:
    """Plain dicts/lists without resolving interpolations (``output.dir`` needs Hydra's runtime)."""
    if isinstance(cfg, DictConfig | ListConfig):
        return OmegaConf.to_container(cfg, resolve=False)
    return cfg


def _dataclass_of(hint: Any) -> type | None:
    """The dataclass a field holds (``X`` or ``X | None``), else None."""
    candidates = typing.get_args(hint) or (hint,)
    return next((c for c in candidates if dataclasses.is_dataclass(c) and isinstance(c, type)), None)
