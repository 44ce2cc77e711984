"""The files of a saved training state, and the startup check of ``train.resume``, without loading torch."""

from __future__ import annotations

from pathlib import Path

WEIGHTS = "trainable.safetensors"
STATE = "trainer_state.pt"  # optimizer/scheduler/RNG states: tensors and plain values (weights_only)
PROGRESS = "progress.json"


def resume_problem(path: str | None) -> str | None:
    """Startup check for ``train.resume``."""
    if path is None:
        return None
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return f"train.resume: folder '{path}' does not exist; give a state-step* folder of an earlier run"
    if not (folder / PROGRESS).is_file():
        return f"train.resume: '{path}' is not a saved training state (no {PROGRESS})"
    return None
