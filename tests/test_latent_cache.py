"""Latent cache: keys, the memory and disk stores, batch encoding, and config incompatibilities."""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from PIL import Image

import training.cache.latents as latent_cache
from training.cache.latent_options import incompatible_with_cache
from training.cache.latents import (
    LatentStore,
    clear_memory_stores,
    fill_latent_cache,
    latent_cache_key,
    model_fingerprint,
    stacked_latent_params,
)
from training.data.dataset import CaptionedImageDataset
from training.data.scan import ImageRecord

FINGERPRINT = model_fingerprint({"source": "tiny", "weights_sha256": "abc"}, torch.float32)


@pytest.fixture(autouse=True)
def fresh_memory_stores():
    clear_memory_stores()
    yield
    clear_memory_stores()


def image_record(tmp_path: Path, name: str = "a.png", colour=(255, 0, 0)) -> ImageRecord:
    path = tmp_path / name
    Image.new("RGB", (16, 16), colour).save(path)
    return ImageRecord(path, "caption", 1)


# --- keys


def test_key_is_stable_for_the_same_inputs(tmp_path):
    record = image_record(tmp_path)
    key = latent_cache_key(FINGERPRINT, record, (64, 64), False)
    assert key == latent_cache_key(FINGERPRINT, record, (64, 64), False)
    assert len(key) == 64 and int(key, 16) >= 0  # sha256 hex


def test_key_changes_with_flip_size_crop_mode_and_model(tmp_path):
    record = image_record(tmp_path)
    key = latent_cache_key(FINGERPRINT, record, (64, 64), False)
    others = {
        latent_cache_key(FINGERPRINT, record, (64, 64), True),
        latent_cache_key(FINGERPRINT, record, (64, 48), False),
        latent_cache_key(FINGERPRINT, record, (64, 64), False, crop_mode="top_left"),
        latent_cache_key(
            model_fingerprint({"source": "tiny", "weights_sha256": "abd"}, "torch.float32"), record, (64, 64), False
        ),
        latent_cache_key(
            model_fingerprint({"source": "tiny", "weights_sha256": "abc"}, torch.float16), record, (64, 64), False
        ),
    }
    assert key not in others and len(others) == 5


def test_key_changes_when_the_file_changes(tmp_path):
    record = image_record(tmp_path)
    key = latent_cache_key(FINGERPRINT, record, (64, 64), False)

    Image.new("RGB", (16, 16), (0, 0, 255)).save(record.path)  # same size on disk is possible: pin mtime
    stat = record.path.stat()
    os.utime(record.path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert latent_cache_key(FINGERPRINT, record, (64, 64), False) != key

    other = image_record(tmp_path, "b.png")
    assert latent_cache_key(FINGERPRINT, other, (64, 64), False) != key


# --- stores


def test_memory_store_round_trips_and_is_shared_by_name(tmp_path):
    store = LatentStore("memory", tmp_path / "cache")
    tensor = torch.randn(8, 4, 4)
    assert store.get("k") is None and "k" not in store

    store.put("k", tensor)

    assert torch.equal(store.get("k"), tensor)
    assert "k" in store and len(store) == 1
    assert torch.equal(LatentStore("memory", tmp_path / "cache").get("k"), tensor)  # a later trial sees it
    assert LatentStore("memory", tmp_path / "elsewhere").get("k") is None
    tensor.add_(1)  # the store kept its own copy
    assert not torch.equal(store.get("k"), tensor)


def test_disk_store_round_trips_across_instances(tmp_path):
    tensor = torch.randn(8, 6, 4, dtype=torch.float16)
    LatentStore("disk", tmp_path / "cache").put("abc", tensor)

    again = LatentStore("disk", tmp_path / "cache")
    loaded = again.get("abc")
    assert loaded is not None and loaded.dtype == torch.float16
    assert torch.equal(loaded, tensor)
    assert "abc" in again and len(again) == 1
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["abc.safetensors"]  # no temp files left


def test_an_interrupted_disk_write_leaves_no_file(tmp_path, monkeypatch):
    store = LatentStore("disk", tmp_path / "cache")

    def crash_midway(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"half a safetensors hea")
        raise KeyboardInterrupt

    monkeypatch.setattr(latent_cache, "save_file", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        store.put("abc", torch.ones(2))

    assert list((tmp_path / "cache").iterdir()) == []
    assert store.get("abc") is None and "abc" not in store


def test_a_corrupt_disk_entry_counts_as_missing(tmp_path):
    store = LatentStore("disk", tmp_path)
    store.path("bad").write_bytes(b"garbage")
    assert store.get("bad") is None
    store.put("bad", torch.ones(3))
    assert torch.equal(store.get("bad"), torch.ones(3))


def test_bad_modes_are_refused(tmp_path):
    with pytest.raises(ValueError):
        LatentStore("none")
    with pytest.raises(ValueError):
        LatentStore("disk")


# --- encoding a batch through the cache


def test_filling_encodes_only_missing_crops_grouped_by_size(tmp_path):
    records = [image_record(tmp_path, f"{i}.png", (i * 60, 0, 0)) for i in range(3)]
    dataset = CaptionedImageDataset(records, resolution=8, flip_aug=True)
    crops = [
        (
            latent_cache_key(FINGERPRINT, records[i], (8, 8), flipped),
            (8, 8),
            lambda i=i, f=flipped: dataset.fixed_crop(i, f),
        )
        for i in range(3)
        for flipped in (False, True)
    ]
    store = LatentStore("memory")
    calls = []

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        calls.append(pixels.shape[0])
        return pixels.mean(dim=(2, 3), keepdim=True).repeat(1, 1, 2, 2)  # a stand-in "VAE"

    assert fill_latent_cache(store, crops[:2], encode, batch_size=4, show_progress=False) == 2
    assert fill_latent_cache(store, crops, encode, batch_size=3, show_progress=False) == 4
    assert fill_latent_cache(store, crops, encode, batch_size=3, show_progress=False) == 0
    assert calls == [2, 3, 1]  # the third fill encoded nothing
    stacked = stacked_latent_params(store, [key for key, _, _ in crops], torch.device("cpu"))
    assert stacked.shape == (6, 3, 2, 2)
    # each entry is its own crop's encoding (red channel of image i = i * 60 -> pixel value)
    expected_red = torch.tensor([i * 60 / 127.5 - 1 for i in range(3) for _ in range(2)])
    assert torch.allclose(stacked[:, 0, 0, 0], expected_red)


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_each_entry_keeps_its_crops_size_and_corner(tmp_path, mode):
    """SDXL's time ids need the crop a cached latent was encoded from; an entry without it is re-encoded."""
    store = LatentStore(mode, tmp_path / f"store-{mode}")
    store.put("old", torch.ones(2, 1, 1))  # as written before geometry was stored
    assert store.geometry("old") is None
    store.put("new", torch.ones(2, 1, 1), ((96, 240), (0, 37)))
    assert LatentStore(mode, tmp_path / f"store-{mode}").geometry("new") == ((96, 240), (0, 37))
    calls = []

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        calls.append(pixels.shape[0])
        return pixels[:, :, :1, :1]

    crops = [(key, (1, 1), lambda: torch.zeros(3, 1, 1)) for key in ("old", "new")]
    geometry = {"old": ((10, 20), (1, 2)), "new": ((96, 240), (0, 37))}.get
    assert fill_latent_cache(store, crops, encode, batch_size=4, show_progress=False, geometry=geometry) == 1
    assert store.geometry("old") == ((10, 20), (1, 2)) and calls == [1]


def test_a_missing_entry_is_an_error_naming_the_key():
    with pytest.raises(KeyError, match="abc123"):
        stacked_latent_params(LatentStore("memory"), ["abc123"], torch.device("cpu"))


# --- config


def data_cfg(**overrides) -> SimpleNamespace:
    values = {"cache_latents": "memory", "color_aug": False, "random_crop": False, "flip_aug": False}
    return SimpleNamespace(**{**values, **overrides})


def test_incompatibility_messages_name_both_keys():
    problems = incompatible_with_cache(data_cfg(cache_latents="disk", color_aug=True, random_crop=True))
    assert len(problems) == 2
    assert "data.cache_latents" in problems[0] and "data.color_aug" in problems[0]
    assert "data.cache_latents" in problems[1] and "data.random_crop" in problems[1]
    assert "=disk" in problems[0]


def test_flip_and_no_cache_are_compatible():
    assert incompatible_with_cache(data_cfg(flip_aug=True)) == []
    assert incompatible_with_cache(data_cfg(cache_latents="none", color_aug=True, random_crop=True)) == []


READER_LIMIT_S = 300


def _write_many(folder: str, value: float, rounds: int) -> None:
    """A worker process writing the same entries over and over (as workers sharing a cache do)."""
    store = LatentStore("disk", folder)
    big = torch.full((8, 128, 128), value)  # 512 KiB
    for _ in range(rounds):
        for key in ("shared-a", "shared-b"):
            store.put(key, big)


def _read_until(folder: str, stop: Any, seen: Any) -> None:
    """Reads straight through safetensors until told to stop: a half-written entry would raise or
    hold values of both writers. Sends back what each whole read held."""
    from safetensors.torch import load_file

    found: list = []
    deadline = time.monotonic() + READER_LIMIT_S  # never outlives a test that died without stopping it
    while not stop.is_set() and time.monotonic() < deadline:
        for key in ("shared-a", "shared-b"):
            path = Path(folder) / f"{key}.safetensors"
            if path.exists():
                values = torch.unique(next(iter(load_file(path).values()))).tolist()
                found.append(values[0] if len(values) == 1 else f"mixed {values[:4]}")
    seen.put(found)


@pytest.mark.slow
def test_workers_writing_one_disk_cache_at_once_never_leave_a_partial_entry(tmp_path):
    """Two writer processes and a reader on the same entries: every read is one writer's whole tensor."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    seen, stop = context.Queue(), context.Event()
    folder = str(tmp_path / "cache")
    writers = [context.Process(target=_write_many, args=(folder, float(v), 600)) for v in (1, 2)]
    reader = context.Process(target=_read_until, args=(folder, stop, seen))
    processes = [reader, *writers]
    try:
        for process in processes:
            process.start()
        for process in writers:
            process.join(120)
            assert process.exitcode == 0
        stop.set()
        values = seen.get(timeout=60)
        reader.join(60)
        assert reader.exitcode == 0  # a partial file would have made the reader raise
    finally:  # a failed assertion must not leave a reader spinning or a writer writing
        stop.set()
        for process in processes:
            if process.is_alive():
                process.kill()
            process.join(10)
    assert len(values) > 10 and set(values) <= {1.0, 2.0}, set(values)
    assert not list(Path(folder).glob(".*.tmp"))  # no temporary file left behind
