"""``from_pretrained`` that refuses weights that do not fit the model, instead of initialising randomly.

Both transformers and diffusers load a folder whose weight names do not match the model (another
layout, a renamed or missing tensor) with only a warning, leaving those parameters random: a text
encoder saved by transformers 5 loads under transformers 4 as 52 missing + 52 unexpected keys and
trains on noise. Asking for ``output_loading_info`` and raising on any missing, unexpected or
mismatched key makes such a model impossible to train on by accident.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

Model = TypeVar("Model")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
SHOWN_KEYS = 5


class IncompleteWeightsError(ValueError):
    """A model's weight files do not cover its parameters exactly; the message names file and keys."""


def load_checked(cls: type[Model], location: str | Path, subfolder: str | None = None, **kwargs: Any) -> Model:
    """``cls.from_pretrained(location, subfolder=...)`` that raises ``IncompleteWeightsError`` on any
    missing, unexpected or shape-mismatched weight."""
    if subfolder:
        kwargs["subfolder"] = subfolder
    model, info = cls.from_pretrained(str(location), output_loading_info=True, **kwargs)  # type: ignore[attr-defined]
    problems = loading_problems(info)
    if problems:
        raise IncompleteWeightsError(
            f"{weights_file(location, subfolder)}: the weights do not fit {cls.__name__} ({'; '.join(problems)}); "
            "the file is incomplete, renamed, or saved for another model or library version "
            "(the toy model needs transformers >= 5): re-save or re-download it, or install the versions of "
            "requirements.lock"
        )
    return model


def loading_problems(info: dict[str, Any]) -> list[str]:
    """What ``output_loading_info`` reports as wrong, one phrase per kind, naming the first keys."""
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(_key_name(k)) for k in info.get(kind) or ())
        if keys:
            shown = ", ".join(keys[:SHOWN_KEYS]) + (
                f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else ""
            )
            problems.append(f"{len(keys)} {kind.replace('_', ' ')}: {shown}")
    for message in info.get("error_msgs") or ():
        problems.append(str(message).strip().splitlines()[0])
    return problems


def weights_file(location: str | Path, subfolder: str | None = None) -> str:
    """The weight file(s) a folder's model was read from, for messages; the location for hub ids."""
    folder = Path(location).expanduser() / (subfolder or "")
    if not folder.is_dir():
        return f"{location}" + (f" ({subfolder})" if subfolder else "")
    files = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    return ", ".join(str(p) for p in files) if files else str(folder)


def _key_name(key: Any) -> Any:
    """transformers reports a mismatched key as (name, file shape, model shape)."""
    return key[0] if isinstance(key, tuple) else key
