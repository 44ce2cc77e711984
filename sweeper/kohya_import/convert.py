"""Converters from the file's values to ours: each raises ``Unfit`` with the reason a value does not fit."""

from __future__ import annotations

from typing import Any


class Unfit(Exception):
    """This option's value cannot be mapped; the message is the reason."""


def as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise Unfit(f"expected true/false, got {value!r}")


def as_int(value: Any) -> int:
    if isinstance(value, bool):
        raise Unfit(f"expected a whole number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError) as error:
        raise Unfit(f"expected a whole number, got {value!r}") from error
    if not number.is_integer():
        raise Unfit(f"expected a whole number, got {value!r}")
    return int(number)


def as_float(value: Any) -> float:
    if isinstance(value, bool):
        raise Unfit(f"expected a number, got {value!r}")
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    try:
        return float(value)
    except (TypeError, ValueError) as error:
        raise Unfit(f"expected a number, got {value!r}") from error


def as_str(value: Any) -> str:
    if isinstance(value, (dict, list, bool)):
        raise Unfit(f"expected text, got {value!r}")
    return str(value)


def as_path(value: Any) -> str:
    if isinstance(value, bool):
        raise Unfit(f"expected a path, got {value!r} (a true/false here has no meaning in sd-scripts)")
    return as_str(value)


def as_extension(value: Any) -> str:
    text = as_str(value).strip()
    return text if text.startswith(".") else "." + text


def key_values(value: Any) -> list[tuple[str, Any]]:
    """kohya's ``["weight_decay=0.1", "betas=0.9,0.99"]`` or LoRA_Easy's ``{"weight_decay": "0.1"}``."""
    if isinstance(value, dict):
        return list(value.items())
    items = value if isinstance(value, list) else str(value).split()
    pairs = []
    for item in items:
        key, _, val = str(item).partition("=")
        pairs.append((key.strip(), val.strip()))
    return pairs
