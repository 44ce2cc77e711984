"""What the embedded models (``model=toy``, ``model=tiny``) are, for runs and files to say so.

Light on purpose: the LoRA file's metadata and the startup report import it without the model code.
"""

from __future__ import annotations

# A LoRA of an embedded model loads only into that model; the tiny one's weights are random, so its
# samples are noise and every score of them means nothing (said on screen, in tags and in the file).
EMBEDDED_MODEL_NOTES = {
    "tiny": "a test model: lora-sweeper's tiny {family}-architecture model with random weights; "
    "its samples are noise and its scores mean nothing (use model=toy or a real model)",
    "toy": "lora-sweeper's toy-world base model (a small {family}-architecture model); loads only into it",
}


def embedded_model_note(source: str, family_name: str) -> str | None:
    """What a run or file of the ``toy`` or ``tiny`` model should say it is; None for real models."""
    note = EMBEDDED_MODEL_NOTES.get(source)
    return note.format(family=family_name) if note else None
