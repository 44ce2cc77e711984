"""Hydra's sweep override grammar mapped onto Optuna distributions (pure functions).

``a,b,c`` / ``choice(a,b,c)`` -> categorical, ``range(a,b[,step])`` -> stepped int (or float),
``interval(a,b)`` -> float, ``int(interval(a,b))`` -> int, ``tag(log, ...)`` -> log scale.

A conditional dimension (``hydra.sweeper.conditional``) takes its range from the value another swept
key got in the same trial: ``optimizer.lr`` over one interval for ``network.type=lora`` and another for
``lokr``. Optuna samples it define-by-run, after the keys it depends on (Akiba et al. 2019, §2.1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

PRIMITIVE = (bool, int, float, str, type(None))


class SearchSpaceError(ValueError):
    """A sweep override that cannot become a search dimension; the message names the key."""


@dataclass
class SearchSpace:
    """The swept dimensions, plus the overrides every trial shares."""

    distributions: dict[str, BaseDistribution] = field(default_factory=dict)
    grid_values: dict[str, list[Any]] = field(default_factory=dict)  # only for finite dimensions
    fixed: list[str] = field(default_factory=list)
    # key -> (the swept key it depends on, that key's value -> this key's distribution)
    conditional: dict[str, tuple[str, dict[Any, BaseDistribution]]] = field(default_factory=dict)

    @property
    def is_finite(self) -> bool:
        """Every dimension is a finite list: a grid covers the whole space."""
        return (
            bool(self.distributions) and not self.conditional and self.grid_values.keys() == self.distributions.keys()
        )

    @property
    def keys(self) -> list[str]:
        """Every searched key: the swept ones, then the conditional ones."""
        return [*self.distributions, *self.conditional]

    def conditional_distributions(self, params: dict[str, Any]) -> dict[str, BaseDistribution]:
        """The conditional dimensions' distributions given the trial's other values, in order."""
        return {key: table[params[parent]] for key, (parent, table) in self.conditional.items()}

    @property
    def grid_size(self) -> int:
        return math.prod(len(values) for values in self.grid_values.values()) if self.is_finite else 0

    def trial_overrides(self, params: dict[str, Any]) -> list[str]:
        """The override list of one trial: the shared ones, then its sampled values."""
        return [*self.fixed, *(f"{key}={format_value(value)}" for key, value in params.items())]


CHECK_ALL_POINTS_UP_TO = 64  # grids this small are validated point by point before the first trial


def points_to_check(space: SearchSpace) -> list[dict[str, Any]]:
    """Parameter sets that together show every value a trial can get, for validation before any trial.

    A small grid: every point. Otherwise one set per value (a list's every choice, an interval's two
    bounds), the other keys at their first value; a bad value is found whatever it is combined with,
    and problems that only a combination of values causes are left to that trial.
    """
    candidates = {key: space.grid_values.get(key) or _edge_values(dist) for key, dist in space.distributions.items()}
    if space.is_finite and space.grid_size <= CHECK_ALL_POINTS_UP_TO:
        import itertools

        return [
            dict(zip(space.grid_values, point, strict=True)) for point in itertools.product(*space.grid_values.values())
        ]
    first = {key: values[0] for key, values in candidates.items()}
    points = [first]
    for key, values in candidates.items():
        points += [{**first, key: value} for value in values[1:]]
    for key, (parent, table) in space.conditional.items():  # each branch's bounds, with its parent's value
        for value, distribution in table.items():
            points += [{**first, parent: value, key: edge} for edge in _edge_values(distribution)]
    return points


def _edge_values(distribution: BaseDistribution) -> list[Any]:
    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    return [distribution.low, distribution.high]  # type: ignore[attr-defined]


def parse_search_space(arguments: list[str]) -> SearchSpace:
    """Split command-line overrides into search dimensions and shared overrides."""
    space = SearchSpace()
    for override in OverridesParser.create().parse_overrides(arguments):
        key = override.get_key_element()
        if override.is_sweep_override():
            space.distributions[key] = distribution_for(override)
            values = finite_values(override)
            if values is not None:
                space.grid_values[key] = values
        else:
            space.fixed.append(override.input_line)
    return space


def add_conditional(space: SearchSpace, conditional: dict[str, dict[str, dict[str, str]]]) -> None:
    """``hydra.sweeper.conditional`` (``{parent key: {key: {parent value: sweep}}}``) into ``space``.

    Every value the parent key is swept over needs a range, and the key must not be swept as well.
    """
    parser = OverridesParser.create()
    for parent, keys in (conditional or {}).items():
        if parent not in space.grid_values:
            raise SearchSpaceError(
                f"hydra.sweeper.conditional.{parent}: {parent} must be swept over a list of values "
                f"(e.g. {parent}=a,b) for other keys' ranges to depend on it"
            )
        for key, branches in keys.items():
            if key in space.distributions or key in space.conditional:
                raise SearchSpaceError(f"hydra.sweeper.conditional.{parent}.{key}: {key} is already swept")
            if any(line.split("=", 1)[0].lstrip("+~") == key for line in space.fixed):
                raise SearchSpaceError(
                    f"hydra.sweeper.conditional.{parent}.{key}: {key} is also given a fixed value; drop one of the two"
                )
            table: dict[Any, BaseDistribution] = {}
            for value, sweep in branches.items():
                override = parser.parse_override(f"{key}={sweep}")
                if not override.is_sweep_override():
                    raise SearchSpaceError(
                        f"hydra.sweeper.conditional.{parent}.{key}.{value}: '{sweep}' is not a sweep"
                    )
                table[value] = distribution_for(override)
            values = [str(v) for v in space.grid_values[parent]]
            missing = [v for v in values if v not in table]
            if missing:
                raise SearchSpaceError(
                    f"hydra.sweeper.conditional.{parent}.{key}: no range for {parent}={', '.join(missing)}; "
                    "give one for every value it is swept over"
                )
            chosen = dict(zip(space.grid_values[parent], (table[v] for v in values), strict=True))
            space.conditional[key] = (parent, chosen)


def distribution_for(override: Override) -> BaseDistribution:
    """The Optuna distribution one sweep override describes."""
    sweep, key = override.value(), override.get_key_element()
    log = "log" in getattr(sweep, "tags", set())
    if isinstance(sweep, ChoiceSweep):
        if log:
            raise SearchSpaceError(f"{key}: tag(log, ...) applies to interval/range, not to a list of choices")
        return CategoricalDistribution(_choices(override))
    if isinstance(sweep, RangeSweep):
        values = list(override.sweep_iterator())
        if not values:
            raise SearchSpaceError(f"{key}: {override.input_line} is an empty range")
        step = sweep.step
        if all(isinstance(v, int) for v in (sweep.start, sweep.stop, step)):
            return IntDistribution(int(values[0]), int(values[-1]), step=1 if log else int(step), log=log)
        return FloatDistribution(float(values[0]), float(values[-1]), step=None if log else float(step), log=log)
    if isinstance(sweep, IntervalSweep):
        low, high = sweep.start, sweep.end
        if low >= high:
            raise SearchSpaceError(f"{key}: interval({low}, {high}) needs low < high")
        if log and low <= 0:
            raise SearchSpaceError(f"{key}: a log interval needs low > 0 (got {low})")
        if isinstance(low, int) and isinstance(high, int):
            return IntDistribution(low, high, log=log)
        return FloatDistribution(float(low), float(high), log=log)
    raise SearchSpaceError(f"{key}: unsupported sweep '{override.input_line}'")


def finite_values(override: Override) -> list[Any] | None:
    """The values of a choice or range sweep (grid-able); None for an interval."""
    sweep = override.value()
    if isinstance(sweep, ChoiceSweep):
        return _choices(override)
    if isinstance(sweep, RangeSweep):
        return list(override.sweep_iterator())
    return None


def _choices(override: Override) -> list[Any]:
    """Primitive choices stay typed; anything else (lists, dicts) travels as its override string."""
    values = list(override.sweep_iterator())
    if all(isinstance(v, PRIMITIVE) for v in values):
        return values
    return list(override.sweep_string_iterator())


def display_value(value: Any) -> str:
    """A value as people read it: floats to 4 significant digits (``0.000123``, ``3e-05``); the
    params keep full precision (``format_value``)."""
    if isinstance(value, float) and not isinstance(value, bool):
        return f"{value:.4g}"
    return format_value(value)


def short_key(key: str) -> str:
    """``optimizer.lr`` -> ``lr``: the last part, enough to tell swept keys apart in a name."""
    return key.rsplit(".", 1)[-1]


def describe_params(params: dict[str, Any], short: bool = False) -> str:
    """``network.dim=16 optimizer.lr=0.0003`` (or ``dim=16 lr=0.0003``) for lines and run names."""
    return " ".join(f"{short_key(k) if short else k}={display_value(v)}" for k, v in params.items())


def format_value(value: Any) -> str:
    """A sampled value written back as an override value Hydra parses to the same thing."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return repr(value)
    return str(value)


def suggest(trial: Any, key: str, distribution: BaseDistribution) -> Any:
    """``key``'s value in ``trial`` from ``distribution`` (define-by-run: a conditional dimension)."""
    if isinstance(distribution, FloatDistribution):
        return trial.suggest_float(
            key, distribution.low, distribution.high, step=distribution.step, log=distribution.log
        )
    if isinstance(distribution, IntDistribution):
        return trial.suggest_int(key, distribution.low, distribution.high, step=distribution.step, log=distribution.log)
    return trial.suggest_categorical(key, list(distribution.choices))
