"""What one import produced: the options as read, what they became, the report and the experiment YAML."""

from __future__ import annotations

import json
import math
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SECTIONS = ("model", "network", "optimizer", "scheduler", "precision", "bucket", "dropout", "data", "eval")
SECTIONS += ("tracking", "train", "output")


@dataclass
class Option:
    name: str  # the sd-scripts name, after renaming LoRA_Easy's
    label: str  # where and how the file spelled it, e.g. "network_arguments.network_dim" or "net_dim"
    value: Any
    note: str = ""  # how the importer read it (e.g. a folder recognised as <repeats>_<name>)


@dataclass
class Mapped:
    source: str
    target: str  # our key, "<group>=" for a group choice, or "" when nothing needs setting
    value: Any
    note: str = ""


@dataclass
class NotMapped:
    source: str
    value: Any
    reason: str


@dataclass
class OnThisMachine:
    """A value that cannot apply where the import ran (no CUDA, a folder of another machine)."""

    source: str  # the key or option it concerns
    reason: str
    override: str | None = None  # what makes the experiment run here, e.g. "optimizer=adamw"


@dataclass
class ImportWarning:
    """A value that runs but does not do here what it did for the file's model, and how to turn it off."""

    source: str
    message: str


@dataclass
class ClassTokenCaptions:
    """A folder whose images without a caption file train on its subset's ``class_tokens`` (as in sd-scripts)."""

    source: str  # the subset's class_tokens label
    folder: str
    tokens: str
    caption_extension: str
    uncaptioned: int | None = None  # images without a caption file there now; None when the folder is not here

    def line(self) -> str:
        count = (
            "not on this machine to count"
            if self.uncaptioned is None
            else f"{self.uncaptioned} image(s) there have none now"
        )
        return (
            f"{self.folder}: images without a {self.caption_extension} caption file are captioned "
            f"{json.dumps(self.tokens, ensure_ascii=False)} ({self.source}; {count})"
        )


@dataclass
class ImportResult:
    """What one import produced: group choices, values by dotted key, and the report."""

    source: Path
    kind: str
    choices: dict[str, str] = field(default_factory=dict)  # group -> option (defaults-list override)
    values: dict[str, Any] = field(default_factory=dict)  # "network.dim" -> 32
    mapped: list[Mapped] = field(default_factory=list)
    unmapped: list[NotMapped] = field(default_factory=list)
    empty: list[NotMapped] = field(default_factory=list)  # null / "" in the file: our default stays
    here: list[OnThisMachine] = field(default_factory=list)  # what cannot apply on this machine
    warnings: list[ImportWarning] = field(default_factory=list)  # runs, but not as it did for the file's model
    class_captions: list[ClassTokenCaptions] = field(default_factory=list)  # captions filled from class_tokens
    origins: dict[str, str] = field(default_factory=dict)  # our key -> source label (YAML comments)
    entry_origins: dict[str, list[str]] = field(default_factory=dict)  # a list of tables' key -> each entry's
    order: dict[str, int] = field(default_factory=dict)  # source label -> position in the file (report order)

    @property
    def overrides_here(self) -> list[str]:
        """The command-line overrides that make the experiment run on this machine (the report's last line)."""
        return list(dict.fromkeys(o.override for o in self.here if o.override))

    def report(self, written: Path | None = None, name: str | None = None) -> str:
        lines = [f"Imported {self.source} ({self.kind})" + (f" -> {written}" if written else "")]
        lines.append(f"\nMapped ({len(self.mapped)}):")
        for m in self.mapped:
            if not m.target:
                shown = f"{m.source} = {show(m.source, m.value)} -> nothing to set"
            elif m.target.endswith("="):
                shown = f"{m.source} -> {m.target}{m.value} (defaults list)"
            else:
                shown = f"{m.source} -> {m.target} = {show(m.target, m.value)}"
            lines.append(f"  {shown}" + (f"   [{m.note}]" if m.note else ""))
        lines.append(f"\nNot mapped ({len(self.unmapped)}):")
        lines += [f"  {u.source} = {show(u.source, u.value)}: {u.reason}" for u in self.unmapped] or ["  (none)"]
        if self.empty:
            lines.append(f"\nEmpty in the file, our default stays ({len(self.empty)}):")
            lines.append("  " + ", ".join(e.source for e in self.empty))
        if self.class_captions:
            lines.append(f"\nCaptions from class_tokens ({len(self.class_captions)}):")
            lines += [f"  {c.line()}" for c in self.class_captions]
        if self.here:
            lines.append(f"\nOn this machine ({len(self.here)}):")
            for o in self.here:
                lines.append(f"  {o.source}: {o.reason}" + (f" -> add {o.override}" if o.override else ""))
        if self.warnings:
            lines.append(f"\nWarnings ({len(self.warnings)}):")
            lines += [f"  {w.source}: {w.message}" for w in self.warnings]
        if name:
            lines.append(f"\nRun it: {self.command(name)}")
            if self.overrides_here:
                lines.append(f"Run it here: {self.command(name, self.overrides_here)}")
        return "\n".join(lines)

    @staticmethod
    def command(name: str, overrides: list[str] = ()) -> str:
        """The shell command that runs the experiment with ``overrides`` (each quoted where the shell needs it)."""
        return " ".join(["python -m sweeper", f"+experiment={name}", *map(shlex.quote, overrides)])

    def yaml(self, name: str) -> str:
        """The experiment file: ``# @package _global_``, the group choices, then plain keys."""
        out = [
            "# @package _global_",
            f"# Imported from {self.source} ({self.kind}) by `python -m sweeper.import_kohya`.",
            f"# Use it: python -m sweeper +experiment={name}   (command-line overrides still win)",
        ]
        if self.choices:
            out.append("defaults:")
            out += [f"  - override /{group}: {option}" for group, option in self.choices.items()]
        nested: dict[str, dict[str, Any]] = {}
        for key, value in self.values.items():
            section, _, leaf = key.partition(".")
            nested.setdefault(section, {})[leaf] = value
        for section in sorted(nested, key=lambda s: SECTIONS.index(s) if s in SECTIONS else len(SECTIONS)):
            out.append("")
            out.append(f"{section}:")
            heads_written: set[str] = set()
            for leaf, value in nested[section].items():
                origin = one_line(self.origins.get(f"{section}.{leaf}", ""))
                comment = f"  # {origin}" if origin else ""
                head, _, rest = leaf.partition(".")
                if rest:  # a sub-section's key (train.flow.shift): under its own heading, once
                    if head not in heads_written:
                        heads_written.add(head)
                        out.append(f"  {head}:")
                        for sub, sub_value in nested[section].items():
                            if sub.startswith(f"{head}."):
                                sub_origin = one_line(self.origins.get(f"{section}.{sub}", ""))
                                note = f"  # {sub_origin}" if sub_origin else ""
                                out.append(f"    {sub.partition('.')[2]}: {yaml_value(sub_value)}{note}")
                    continue
                if value and isinstance(value, list) and all(isinstance(v, dict) for v in value):
                    out.append(f"  {leaf}:")  # a list of tables (data.subsets): one entry a line
                    labels = self.entry_origins.get(f"{section}.{leaf}", [])
                    for index, entry in enumerate(value):
                        label = one_line(labels[index]) if index < len(labels) else ""
                        out.append(f"    - {yaml_value(entry)}" + (f"  # {label}" if label else ""))
                else:
                    out.append(f"  {leaf}: {yaml_value(value)}{comment}")
        if self.unmapped:
            out.append("")
            out.append("# Not mapped (see the import report):")
            out += [f"#   {one_line(u.source)}: {one_line(u.reason)}" for u in self.unmapped]
        if self.class_captions:
            out.append("")
            out.append("# Captions from class_tokens (see the import report):")
            out += [f"#   {one_line(c.line())}" for c in self.class_captions]
        if self.warnings:
            out.append("")
            out.append("# Warnings (see the import report):")
            out += [f"#   {one_line(w.source)}: {one_line(w.message)}" for w in self.warnings]
        if self.here:
            out.append("")
            out.append("# On the machine it was imported on (see the import report):")
            out += [
                f"#   {one_line(o.source)}: {one_line(o.reason)}" + (f" -> {o.override}" if o.override else "")
                for o in self.here
            ]
        return "\n".join(out) + "\n"


def yaml_value(value: Any) -> str:
    """One YAML flow value that OmegaConf reads back as the same value (floats keep a dot, ``${`` escaped)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return {math.inf: ".inf", -math.inf: "-.inf"}.get(value, ".nan")
        text = repr(value)
        mantissa, e, exponent = text.partition("e")
        if e and "." not in mantissa:
            text = f"{mantissa}.0e{exponent}"
        return text
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        keys = [k if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(k)) else yaml_value(str(k)) for k in value]
        return "{" + ", ".join(f"{k}: {yaml_value(v)}" for k, v in zip(keys, value.values(), strict=True)) + "}"
    # OmegaConf would resolve "${...}": escape it as \${, doubling any backslashes right before it
    text = re.sub(r"(\\*)\$\{", lambda found: found.group(1) * 2 + "\\${", str(value))
    return json.dumps(text, ensure_ascii=False)


_SECRET = re.compile(r"(api_key|secret|password|(^|_)token)$", re.IGNORECASE)


def show(label: str, value: Any) -> str:
    """A value for the report; credentials (``wandb_api_key``, ``hf_token``) are never printed."""
    if _SECRET.search(re.split(r"[.:\]]", label)[-1] or label):
        return "***"
    return json.dumps(value, ensure_ascii=False)


def one_line(text: str) -> str:
    return " ".join(str(text).split())
