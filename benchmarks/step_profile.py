"""Where the GPU time of a few steps of a warm trainer goes: the top kernels, and kernel time by kind."""

from __future__ import annotations

import time

import torch

from training.loop import Trainer

# kernel-name fragments of each kind (cuBLAS / CUTLASS matmuls, cuDNN and Triton convolutions, the SDPA
# kernels, Inductor's fused Triton kernels); the first kind that matches names the kernel. cuBLAS' Hopper
# kernels spell float8 operands with a q: nvjet_sm90_qqtst_... (bf16: nvjet_sm90_tst_...), seen on an H100
KERNEL_KINDS = (
    ("float8 matmul", ("e4m3", "e5m2", "f8f8", "fp8", "_qqtst", "_qrtst", "_rqtst")),
    ("convolution", ("conv", "implicit", "wgrad", "dgrad", "fprop")),  # cuDNN's are implicit GEMMs: first
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "sm90_", "sm80_", "mm_")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn_generated")),
    ("fused triton", ("triton_",)),
)


def kernel_kind(name: str) -> str:
    lower = name.lower()
    for kind, fragments in KERNEL_KINDS:
        if any(fragment in lower for fragment in fragments):
            return kind
    return "other"


def run_more(trainer: Trainer, steps: int) -> None:
    """``steps`` more optimizer steps of an already-warm trainer."""
    trainer.total_steps = trainer.position.step + steps
    trainer.cfg.train.log_every_n_steps = 10**9
    trainer.fit(show_progress=False)


def profile_steps(trainer: Trainer, steps: int = 6) -> dict:
    """Wall and GPU-kernel milliseconds per step, the top kernels, kernel time by kind, top host calls."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        run_more(trainer, steps)
        torch.cuda.synchronize()
    wall = (time.perf_counter() - started) * 1e3 / steps
    events = prof.key_averages()
    kernels = [  # kernels only: the loop's ranges also appear on the GPU timeline
        e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and not e.key.startswith("loop/")
    ]
    kernels.sort(key=lambda e: e.self_device_time_total, reverse=True)
    gpu_total = sum(e.self_device_time_total for e in kernels)
    by_kind: dict[str, float] = {}
    for e in kernels:
        kind = kernel_kind(e.key)
        by_kind[kind] = by_kind.get(kind, 0.0) + e.self_device_time_total / 1e3 / steps
    host = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
    # which operator (and at which sizes) launched the GPU time: aten calls by their kernels' time. Outside
    # a replayed CUDA graph only: a row without train.cuda_graphs shows what the compiled code calls too
    # (e.g. which operator launches the compiled step's strided-copy ``elementwise_kernel``s)
    operators = [e for e in events if e.key.startswith("aten::")]
    operators.sort(key=lambda e: e.self_device_time_total, reverse=True)
    by_shape = [e for e in prof.key_averages(group_by_input_shape=True) if e.key.startswith("aten::")]
    by_shape.sort(key=lambda e: e.self_device_time_total, reverse=True)
    return {
        "wall_ms_per_step": wall,
        "gpu_kernel_ms_per_step": gpu_total / 1e3 / steps,
        "kernels_per_step": sum(e.count for e in kernels) / steps,
        "ms_per_step_by_kind": {k: round(v, 2) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top_kernels": [
            (e.key[:90], round(e.self_device_time_total / 1e3 / steps, 2), e.count // steps) for e in kernels[:15]
        ],
        "top_host": [(e.key[:60], round(e.self_cpu_time_total / 1e3 / steps, 2), e.count // steps) for e in host[:15]],
        "top_ops": [
            (e.key, round(e.self_device_time_total / 1e3 / steps, 2), e.count // steps) for e in operators[:15]
        ],
        "top_ops_by_shape": [
            (e.key, str(e.input_shapes)[:160], round(e.self_device_time_total / 1e3 / steps, 2), e.count // steps)
            for e in by_shape[:25]
        ],
    }
