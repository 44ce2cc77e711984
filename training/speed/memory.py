"""Giving accelerator memory back between runs of one worker process."""

from __future__ import annotations

import gc

import torch


def release_accelerator_memory() -> None:
    """Collect what finished runs left in reference cycles (a trainer and its closures), then return
    the CUDA caching allocator's free blocks, so the next run starts from the same reserved memory."""
    gc.collect()
    if torch.cuda.is_available():
        # cuBLAS keeps a workspace per (handle, stream); each trial's graph capture runs on a new
        # stream, so without this every trial left ~66 MiB reserved (measured on an H100)
        clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear_workspaces is not None:
            clear_workspaces()
        torch.cuda.empty_cache()
