"""The command line's keys and group options, checked against the schema before Hydra composes.

Hydra stops at the first unknown key and suggests ``+network.dimm=16`` (which would add the typo
as a new key), and for an unknown option it lists the group's configs. Here every unknown key and
option on the command line is reported at once, each with the nearest real one (``did you mean
network.dim?``), in milliseconds: nothing heavy is imported.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable
from typing import Any

from sweeper.config.schema import Config, added_groups, group_options

_SKIPPED_ROOT_FIELDS = ("defaults",)  # the root's Hydra defaults list: not a key to set


@dataclasses.dataclass(frozen=True)
class SchemaKeys:
    """Every settable dotted key of a schema; ``open`` ones (lists, untyped) also take sub-keys."""

    keys: frozenset[str]
    open: frozenset[str]

    def known(self, key: str) -> bool:
        return key in self.keys or any(key.startswith(f"{prefix}.") for prefix in self.open)


def schema_keys(schema: type = Config, prefix: str = "") -> SchemaKeys:
    """All keys of ``schema``, walked into nested dataclasses (``network.embedding.lr``)."""
    hints = typing.get_type_hints(schema)
    keys: set[str] = set()
    open_keys: set[str] = set()
    for field in dataclasses.fields(schema):
        if not prefix and field.name in _SKIPPED_ROOT_FIELDS:
            continue
        key = f"{prefix}{field.name}"
        keys.add(key)
        nested = _dataclass_of(hints[field.name])
        if nested is not None:
            inner = schema_keys(nested, f"{key}.")
            keys |= inner.keys
            open_keys |= inner.open
        elif _takes_sub_keys(hints[field.name]):
            open_keys.add(key)  # data.subsets.0.dir, train.denoise_range.1
    return SchemaKeys(frozenset(keys), frozenset(open_keys))


def override_problems(
    overrides: Iterable[str],
    schema: SchemaKeys | None = None,
    groups: dict[str, list[str]] | None = None,
    check_options: bool = True,
) -> list[str]:
    """One line per unknown key or group option among ``overrides``, each with the nearest real one.

    ``groups=None`` reads conf/; ``check_options=False`` takes any option of a known group (other
    config folders add options: ``--config-dir``, ``hydra.searchpath``). Overrides the Hydra grammar
    refuses, and ``hydra.*`` ones, are left to Hydra's own messages.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    schema = schema if schema is not None else schema_keys()
    groups = groups if groups is not None else group_options()
    added = added_groups() if groups else []
    parser = OverridesParser.create()
    problems = []
    for line in overrides:
        try:
            override = parser.parse_override(line)
        except Exception:  # Hydra's grammar error names the position; ours would add nothing
            continue
        name = override.key_or_group
        if name == "hydra" or override.is_hydra_override():
            continue
        if name in groups or name.split("/")[0] in groups:
            if check_options:
                problems += _option_problems(override, line, name, groups, added)
        elif not schema.known(name):
            close = nearest_keys(name, schema)
            hint = f"did you mean {' or '.join(close)}?" if close else "--help lists every key"
            problems.append(f"{line}: {name} is not a config key ({hint})")
    return problems


def nearest_keys(name: str, schema: SchemaKeys) -> list[str]:
    """The real keys ``name`` was most likely meant to be, best first (difflib's similarity ratio).

    In order, the first that finds any: a near-identical full key (``network.dimm`` -> network.dim,
    ``optimzer.lr`` -> optimizer.lr), the same name in another section (``train.lr`` ->
    optimizer.lr), a loosely similar full key.
    """
    leaves = sorted(k for k in schema.keys if not any(other.startswith(f"{k}.") for other in schema.keys))
    leaf = name.rpartition(".")[2]
    full = difflib.get_close_matches(name, leaves, n=1, cutoff=0.8)
    if full:
        return full
    elsewhere = [k for k in leaves if difflib.get_close_matches(leaf, [k.rpartition(".")[2]], cutoff=0.8)]
    if elsewhere:
        return sorted(elsewhere, key=lambda k: (k.count("."), k))[:3]  # optimizer.lr before network.embedding.lr
    return difflib.get_close_matches(name, leaves, n=1, cutoff=0.6)


def unknown_names_message(problems: list[str]) -> str:
    listing = "\n".join(f"  - {p}" for p in problems)
    return (
        f"{len(problems)} unknown name(s) on the command line, nothing was run:\n{listing}\n"
        "(--help lists every option group and key)"
    )


def _option_problems(override: Any, line: str, group: str, groups: dict[str, list[str]], added: list[str]) -> list[str]:
    """``optimizer=adamm``: an option the group does not have; ``experiment=x``: a preset without its +."""
    options = groups.get(group)
    if options is None or override.is_delete() or override.package is not None:
        return []
    problems = []
    if group in added and not (override.is_add() or override.is_force_add()):
        problems.append(f"{line}: {group} is a preset outside the defaults list, added with a + (+{group}=...)")
    for value in _choices(override):
        if value not in options and value != "null":
            close = difflib.get_close_matches(value, options, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            problems.append(f"{line}: {group} has no option {value} ({hint}options: {', '.join(options)})")
    return problems


def _choices(override: Any) -> list[str]:
    """The option names an override selects: one, or each of a choice sweep (``optimizer=adamw,lion``)."""
    if not override.is_sweep_override():
        value = override.value()
        return [value] if isinstance(value, str) else []
    if override.is_choice_sweep() and type(override.value()).__name__ != "Glob":
        try:
            return [str(v) for v in override.sweep_string_iterator()]
        except Exception:  # a glob or a sweep Hydra enumerates only with its config loader
            return []
    return []


def _dataclass_of(hint: Any) -> type | None:
    """The dataclass a field holds (``X`` or ``X | None``), else None (``list[X]`` is a list)."""
    return next((c for c in _alternatives(hint) if dataclasses.is_dataclass(c) and isinstance(c, type)), None)


def _takes_sub_keys(hint: Any) -> bool:
    """Lists (``a.0``), dicts and untyped fields: their sub-keys are not in the schema."""
    return any(c is Any or c in (list, dict) or typing.get_origin(c) in (list, dict) for c in _alternatives(hint))


def _alternatives(hint: Any) -> tuple[Any, ...]:
    """``X | None`` -> (X, None); any other hint -> (hint,)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return typing.get_args(hint)
    return (hint,)
