"""Build-once folders in the user's cache (tiny models), written atomically.

A folder is built under a temporary name next to its final place and renamed when complete, so an
interrupted build never leaves a folder that looks finished; concurrent builders race harmlessly
(the loser discards its copy).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

CACHE_ENV = "LORA_SWEEPER_CACHE"


def default_cache_root() -> Path:
    """``$LORA_SWEEPER_CACHE``, else ``~/.cache/lora-sweeper``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lora-sweeper").expanduser()


def cached_folder(root: str | Path, name: str, build: Callable[[Path], None]) -> Path:
    """Return ``root/name``, calling ``build(tmp_dir)`` to create it first if it does not exist."""
    final = Path(root).expanduser() / name
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=final.parent))
    try:
        build(tmp)
        try:
            tmp.rename(final)
        except OSError:  # another process finished first
            if not final.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def file_sha256(path: str | Path) -> str:
    """sha256 hex of a file's bytes, read in 1 MiB blocks (weights files can be GBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
