"""What ``train.compile`` / ``train.compile_mode`` may be, checked at startup without loading torch."""

from __future__ import annotations

COMPILE_KINDS = ("none", "blocks")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_problems(kind: str, mode: str) -> list[str]:
    """Why ``train.compile`` / ``train.compile_mode`` are unusable, for startup validation."""
    problems = []
    if kind not in COMPILE_KINDS:
        problems.append(f"train.compile must be one of {', '.join(COMPILE_KINDS)} (got {kind!r})")
    if mode not in COMPILE_MODES:
        problems.append(f"train.compile_mode must be one of {', '.join(COMPILE_MODES)} (got {mode!r})")
    return problems
