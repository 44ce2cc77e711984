"""Writing a file so that it appears complete or not at all, with the permissions any output gets.

The content goes to a hidden temporary name in the same folder, then ``os.replace`` renames it:
readers (a web UI listing LoRAs, another worker reading the cache) never see half a file. The
temporary file is created with mode 0666 filtered by the umask, as ``open()`` would, not with
``mkstemp``'s 0600, so a LoRA written by the trainer can be read by a UI running as another user.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: str | Path, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` fills a temporary file next to ``path``; then it is renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomically(path: str | Path, text: str) -> Path:
    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
