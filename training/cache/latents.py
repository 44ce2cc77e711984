"""Encode each training image with the VAE once and reuse the result (``data.cache_latents``).

What is cached is the VAE's latent *distribution* (``latent_dist.parameters``: mean and log-variance
stacked on the channel axis), not a sample of it, so every use still draws a fresh latent from the
loop's seeded generator and training sees the same noise as without the cache.

Two stores: ``memory`` keeps tensors in a dict registered per name in this process, so the trials
of a sweep that run in one worker share it; ``disk`` writes one ``.safetensors`` per entry under a
folder (shared by processes and later runs), each written under a temporary name and renamed, so
an interrupted write never leaves a file that looks complete.

A key covers everything that decides the pixels: the model (its fingerprint, dtype included), the
file (path, size, modification time), the bucket size, the flip and the crop/resize mode. Flipped
crops are cached as their own entries, which is why ``flip_aug`` works with the cache; hue jitter
and random crops differ every time an image is used, so they cannot be cached
(``incompatible_with_cache``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from training.atomic_file import write_atomically

if TYPE_CHECKING:
    from training.data.scan import ImageRecord

_TENSOR_NAME = "latent_params"

# name -> {key: tensor}; lives as long as the process, so sweep trials in one worker share it.
_MEMORY_STORES: dict[str, dict[str, torch.Tensor]] = {}
_MEMORY_GEOMETRY: dict[str, dict[str, tuple[tuple[int, int], tuple[int, int]]]] = {}
_GEOMETRY_KEY = "crop_geometry"  # disk entries: the crop's original size and top-left corner, as JSON


def model_fingerprint(identity: Mapping[str, str], dtype: torch.dtype | str) -> str:
    """One string for "these VAE weights at this precision" (``BaseModel.identity`` + weight dtype):
    an fp16 VAE encodes slightly differently from an fp32 one, so they must not share entries."""
    return json.dumps({**dict(identity), "dtype": str(dtype)}, sort_keys=True)


def latent_cache_key(
    model_fingerprint: str,
    record: ImageRecord,
    size: tuple[int, int],
    flipped: bool,
    *,
    crop_mode: str = "center",
) -> str:
    """sha256 hex of everything that decides an encoded crop (see the module docstring).

    File size and modification time (ns) stand in for the content: hashing every image on every
    run would cost more than it saves, and an edited or replaced file changes at least one.
    ``crop_mode`` is ``CaptionedImageDataset.crop_mode`` (it also records ``no_upscale``).
    """
    stat = Path(record.path).stat()
    fields = [
        model_fingerprint,
        str(Path(record.path).resolve()),
        stat.st_size,
        stat.st_mtime_ns,
        [int(size[0]), int(size[1])],
        bool(flipped),
        crop_mode,
    ]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()


class LatentStore:
    """Cached latent-distribution tensors by key: ``mode`` is ``"memory"`` or ``"disk"``.

    ``memory``: ``folder`` only names the shared in-process dict (stores with the same name see
    the same entries); tensors are kept on the CPU. ``disk``: ``folder`` holds one
    ``<key>.safetensors`` per entry and is created when needed.
    """

    def __init__(self, mode: str, folder: str | Path | None = None) -> None:
        if mode not in ("memory", "disk"):
            raise ValueError(f"latent store mode must be memory or disk, got {mode!r}")
        self.mode = mode
        self.folder = Path(folder).expanduser() if folder is not None else None
        if mode == "disk":
            if self.folder is None:
                raise ValueError("a disk latent store needs a folder")
            self._entries: dict[str, torch.Tensor] | None = None
        else:
            self._entries = _MEMORY_STORES.setdefault(str(self.folder) if self.folder else "default", {})
            self._geometry = _MEMORY_GEOMETRY.setdefault(str(self.folder) if self.folder else "default", {})

    def path(self, key: str) -> Path:
        """Where ``key`` lives in a disk store."""
        assert self.folder is not None
        return self.folder / f"{key}.safetensors"

    def get(self, key: str) -> torch.Tensor | None:
        """The cached tensor (on the CPU; do not modify it in place), or None when absent.

        A disk entry that cannot be read counts as absent: it is re-encoded and overwritten.
        """
        if self._entries is not None:
            return self._entries.get(key)
        try:
            return load_file(self.path(key))[_TENSOR_NAME]
        except (FileNotFoundError, SafetensorError, KeyError, OSError):
            return None

    def geometry(self, key: str) -> tuple[tuple[int, int], tuple[int, int]] | None:
        """``(original size (h, w), crop top-left (top, left))`` stored with the entry: the crop it
        was encoded from, what SDXL's size/crop conditioning needs; None when absent or unreadable."""
        if self._entries is not None:
            return self._geometry.get(key)
        try:
            with safe_open(str(self.path(key)), "pt") as handle:
                stored = json.loads((handle.metadata() or {})[_GEOMETRY_KEY])
        except (FileNotFoundError, SafetensorError, KeyError, OSError, ValueError):
            return None
        return tuple(stored["original_size"]), tuple(stored["crop_top_left"])

    def put(
        self, key: str, tensor: torch.Tensor, geometry: tuple[tuple[int, int], tuple[int, int]] | None = None
    ) -> None:
        """Store a CPU copy of ``tensor`` under ``key`` (replacing any previous entry), with its crop's
        ``geometry`` (``(original size, crop top-left)``) when given."""
        value = tensor.detach().to("cpu").contiguous().clone()
        if self._entries is not None:
            self._entries[key] = value
            if geometry is not None:
                self._geometry[key] = geometry
            return
        assert self.folder is not None
        metadata = None
        if geometry is not None:
            original, crop = geometry
            metadata = {_GEOMETRY_KEY: json.dumps({"original_size": list(original), "crop_top_left": list(crop)})}
        # atomic: readers see the old entry or the new one
        write_atomically(self.path(key), lambda tmp: save_file({_TENSOR_NAME: value}, str(tmp), metadata=metadata))

    def __contains__(self, key: str) -> bool:
        if self._entries is not None:
            return key in self._entries
        return self.path(key).is_file()

    def __len__(self) -> int:
        if self._entries is not None:
            return len(self._entries)
        return len(list(self.folder.glob("*.safetensors"))) if self.folder and self.folder.is_dir() else 0


def clear_memory_stores() -> None:
    """Forget every in-memory store (tests; or to free memory after a sweep)."""
    _MEMORY_STORES.clear()
    _MEMORY_GEOMETRY.clear()


def fill_latent_cache(
    store: LatentStore,
    crops: Sequence[tuple[str, Hashable, Callable[[], torch.Tensor]]],
    encode: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int,
    show_progress: bool = True,
    geometry: Callable[[str], tuple[tuple[int, int], tuple[int, int]]] | None = None,
) -> int:
    """Encode every crop whose entry is missing (or unreadable), before training; returns how many.

    ``crops`` holds ``(key, size, pixels)``: crops of one ``size`` are encoded together, up to
    ``batch_size`` at a time, ``pixels()`` giving one ``[3, H, W]`` crop. ``encode`` returns the
    VAE's ``latent_dist.parameters`` for a batch; ``geometry(key)``, when given, is stored with each
    entry (an entry without it counts as missing), as kohya keeps each crop's size and corner.
    Filling ahead (as kohya does) means the training steps never decode an image or wait on the VAE.
    """
    groups: dict[Hashable, list[tuple[str, Callable[[], torch.Tensor]]]] = {}
    for key, size, pixels in crops:
        if store.get(key) is None or (geometry is not None and store.geometry(key) is None):
            groups.setdefault(size, []).append((key, pixels))
    missing = sum(len(items) for items in groups.values())
    with tqdm(total=missing, desc="caching latents", unit="image", disable=not show_progress or not missing) as bar:
        for items in groups.values():
            for start in range(0, len(items), batch_size):
                chunk = items[start : start + batch_size]
                encoded = encode(torch.stack([pixels() for _, pixels in chunk]))
                for (key, _), params in zip(chunk, encoded, strict=True):
                    store.put(key, params, geometry(key) if geometry is not None else None)
                bar.update(len(chunk))
    return missing


def stacked_latent_params(store: LatentStore, keys: Sequence[str], device: torch.device) -> torch.Tensor:
    """The entries of ``keys`` as one batch on ``device``, copied without a host sync.

    A pageable host-to-GPU copy waits for the GPU to drain, which left the GPU idle while the
    host dispatched the next step; one pinned, non-blocking copy per batch does not.
    """
    tensors = []
    for key in keys:
        tensor = store.get(key)
        if tensor is None:
            raise KeyError(f"latent cache entry {key} is missing although the cache was filled before training")
        tensors.append(tensor)
    batch = torch.stack(tensors)
    if device.type == "cuda":
        batch = batch.pin_memory()
    return batch.to(device, non_blocking=True)
