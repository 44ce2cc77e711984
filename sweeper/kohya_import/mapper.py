"""Mapping: options -> our keys, through rules registered per option (``rules.py`` holds them)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sweeper.config.schema import GROUP_SCHEMAS, OutputConfig, TrainConfig
from sweeper.kohya_import.convert import Unfit
from sweeper.kohya_import.result import ClassTokenCaptions, ImportResult, Mapped, NotMapped, Option
from sweeper.kohya_import.subsets import SubsetPlan, uncaptioned_images
from sweeper.kohya_import.tables import NO_EQUIVALENT

SCHEMAS: dict[str, type] = {**GROUP_SCHEMAS, "train": TrainConfig, "output": OutputConfig}

Rule = Callable[["Mapper", dict[str, Option]], None]
RULES: list[tuple[tuple[str, ...], Rule, bool]] = []


def rule(*keys: str, always: bool = False) -> Callable[[Rule], Rule]:
    """Register a mapping of ``keys``; ``always`` runs it even when none is present (kohya defaults)."""

    def register(fn: Rule) -> Rule:
        RULES.append((keys, fn, always))
        return fn

    return register


def simple(key: str, target: str, convert: Callable[[Any], Any], note: str = "") -> None:
    """A one-to-one option; a value that does not convert is reported with the reason."""

    def apply(m: Mapper, taken: dict[str, Option]) -> None:
        option = taken[key]
        try:
            m.set(target, convert(option.value), option, note)
        except Unfit as unfit:
            m.unmapped(option, str(unfit))

    RULES.append(((key,), apply, False))


def _nested(leaf: str, value: Any) -> dict[str, Any]:
    """``{"flow": {"shift": 3.0}}`` for ``flow.shift``: a sub-section's key (train.flow.*) merges into its schema."""
    head, _, rest = leaf.partition(".")
    return {head: _nested(rest, value) if rest else value}


class Mapper:
    def __init__(self, result: ImportResult, options: dict[str, Option], conf_dir: Path, plan: SubsetPlan) -> None:
        self.result = result
        self.options = options
        self.all_options = dict(options)  # as read, for rules that depend on another option's value
        self.resolution: int | None = None  # the training resolution the file gives (bucket sides follow it)
        self.conf_dir = conf_dir
        self.plan = plan

    def set(self, target: str, value: Any, option: Option | str, note: str = "") -> None:
        """Record ``target = value`` (checked against the schema) for ``option``."""
        source = option.label if isinstance(option, Option) else option
        if isinstance(option, Option) and not note:
            note = option.note
        previous, old = self.result.origins.get(target), self.result.values.get(target)
        value = self.put(target, value, source)
        if previous is not None and previous != source and old != value:
            note = "; ".join(filter(None, [note, f"replaces the value from {previous}"]))
        self.result.mapped.append(Mapped(source, target, value, note))

    def put(self, target: str, value: Any, source: str) -> Any:
        """Store ``target = value`` (checked against the schema) without a report line; the value as stored."""
        section, _, leaf = target.partition(".")
        node = OmegaConf.structured(SCHEMAS[section])
        try:
            stored = OmegaConf.to_container(OmegaConf.merge(node, _nested(leaf, value)), resolve=False)
            for part in leaf.split("."):
                stored = stored[part]
            # the schema's type (16 -> 16.0); a list of tables (data.subsets) keeps only the fields given
            value = value if isinstance(value, list) and value and isinstance(value[0], dict) else stored
        except OmegaConfBaseException as error:
            raise Unfit(f"{value!r} does not fit {target}: {str(error).splitlines()[0]}") from error
        self.result.values[target] = value
        self.result.origins[target] = source
        return value

    def choose(self, group: str, option_name: str, option: Option | str, note: str = "") -> None:
        """A group choice, written as ``override /group: option`` (only if conf/<group>/<option>.yaml exists)."""
        source = option.label if isinstance(option, Option) else option
        available = sorted(p.stem for p in (self.conf_dir / group).glob("*.yaml"))
        if option_name not in available:
            raise Unfit(
                f"{group} '{option_name}' has no option file conf/{group}/{option_name}.yaml in this checkout "
                f"(available: {', '.join(available) or 'none'})"
            )
        self.result.choices[group] = option_name
        self.result.mapped.append(Mapped(source, f"{group}=", option_name, note))

    def nothing(self, option: Option, note: str) -> None:
        self.nothing_for(option.label, option.value, note)

    def nothing_for(self, source: str, value: Any, note: str) -> None:
        """A source (an option, or one of its ``network_args``) that rightly sets nothing."""
        self.result.mapped.append(Mapped(source, "", value, note))

    def unmapped(self, option: Option, reason: str) -> None:
        self.result.unmapped.append(NotMapped(option.label, option.value, reason))

    def run(self) -> None:
        for keys, fn, always in RULES:
            taken = {k: self.options.pop(k) for k in keys if k in self.options}
            if not taken and not always:
                continue
            try:
                fn(self, taken)
            except Unfit as unfit:  # the rule's options that were not recorded yet
                recorded = {m.source for m in self.result.mapped} | {u.source for u in self.result.unmapped}
                for option in taken.values():
                    if option.label not in recorded:
                        self.unmapped(option, str(unfit))
        self.apply_subsets()
        for option in self.options.values():
            reason = NO_EQUIVALENT.get(option.name)
            if reason and option.value is False:
                self.nothing(option, "off: nothing to set")
            else:
                self.unmapped(option, reason or "not an option this importer knows (kohya sd-scripts / LoRA_Easy)")
        order = self.result.order
        self.result.mapped.sort(key=lambda m: order.get(m.source, len(order)))
        self.result.unmapped.sort(key=lambda u: order.get(u.source, order.get(u.source.rpartition(".")[0], len(order))))

    def apply_subsets(self) -> None:
        """The dataset's subsets as data.subsets entries (their report lines are written already)."""
        if not self.plan.entries:
            return
        self.put("data.subsets", self.plan.entries, "the dataset's subsets")
        self.result.entry_origins["data.subsets"] = list(self.plan.labels)
        default_extension = self.result.values.get("data.caption_extension", ".txt")  # ours, when the file is silent
        for entry, label in zip(self.plan.entries, self.plan.labels, strict=True):
            if entry.get("class_tokens"):  # sd-scripts captions a subset's uncaptioned images with them
                extension = entry.get("caption_extension") or default_extension
                self.result.class_captions.append(
                    ClassTokenCaptions(
                        f"{label}.class_tokens",
                        entry["dir"],
                        entry["class_tokens"],
                        extension,
                        uncaptioned_images(entry["dir"], extension),
                    )
                )
        if "data.train_dir" not in self.result.values:
            self.set("data.train_dir", None, "(the dataset's subsets)", "the images are the data.subsets folders")
