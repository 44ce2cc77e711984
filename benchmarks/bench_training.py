"""Throughput of the project's own training loop at SD1.5 or SDXL scale (random weights, synthetic data).

SDXL (issue 16) on one H200, about 8 minutes: rows 0-19 (batch 1, 4, 8 ladders, single switches,
peak memory, the largest batch) take about 5; the compiled rows (20-23) follow while the budget lasts
(no row starts that would run past ``--budget`` seconds, 500 by default; the table is printed anyway):

    python3 benchmarks/bench_training.py --family sdxl --out $OUT --no-split
    python3 benchmarks/bench_training.py --family sdxl --out $OUT --rows 20,21,22,23 --largest 16  # compiled rows
    python3 benchmarks/bench_training.py --family sdxl --list  # the rows and their numbers
    python3 benchmarks/bench_training.py --family sdxl --tiny --steps 2 --images 8 --out /tmp/smoke  # CPU smoke run
    python3 benchmarks/sdxl_model.py  # the SDXL UNet LoRA step's FLOPs, counted on the meta device (CPU, ~30 s)
    python3 benchmarks/bench_training.py --out $OUT --no-split --rows 31,33 --profile 5  # + each row's top kernels

SD1.5 (the default family):

    python benchmarks/bench_training.py --out results/  [--steps 30] [--quick]

Builds the family's published architecture with random weights (speed does not depend on the
weights; SDXL's is built on the GPU in seconds, ``benchmarks/sdxl_model.py``), writes a synthetic
dataset at its native size (512 px, SDXL 1024 px) in the kohya layout, and runs
``training.loop.Trainer`` -- the loop ``python -m sweeper`` uses -- for each configuration:
steady-state images/s (warm-up excluded), peak GPU memory, and MFU against the FLOPs counted by
``torch.utils.flop_counter`` and the bf16 matmul peak measured in the same run. SDXL's MFU counts
the UNet's LoRA forward + backward alone (the issue's 14.5 TFLOP per 1024 px image); SD1.5's the
whole step. Each grid row sits beside the row without its optimisation; ``--rows`` picks rows by
number (``--list`` prints them). Results go to ``--out``/results.json (SDXL: results-sdxl.json)
after every row, so a run cut short keeps what it measured; a row that runs out of memory is
recorded and the next one runs.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from omegaconf import OmegaConf
from peft.helpers import disable_input_dtype_casting
from PIL import Image, ImageDraw
from transformers import CLIPTextConfig, CLIPTextModel

import training.loop
from sweeper.config.schema import Config
from training.cache.text import clear_text_caches
from training.data.scan import scan_dataset
from training.families.loading import BaseModel
from training.loop import Trainer
from training.network.lora import remove_leftover_adapters, remove_lora
from training.speed.attention_options import sdpa_backend_problem
from training.speed.compile import configure_compile
from training.speed.cudnn import first_cudnn_benchmark_setting
from training.speed.fp8 import configure_fp8_matmul
from training.speed.sdpa_backend import configure_sdpa_backend, set_sdpa_backend
from training.text.tokenizer import build_word_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sdxl_model import ISSUE_TFLOP_PER_IMAGE, sdxl_base_model, tiny_sdxl_base_model
from step_profile import profile_steps

# --- the SD1.5 architecture (runwayml/stable-diffusion-v1-5 configs)
UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    cross_attention_dim=768,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    sample_size=512,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
)
TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
    bos_token_id=0,
    eos_token_id=1,
)


def sd15_base_model() -> BaseModel:
    torch.manual_seed(0)
    tokenizer = build_word_tokenizer()  # no download; the text encoder keeps CLIP's 49408-token table
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        clip_sample=False,
    )
    parts = (UNet2DConditionModel(**UNET), AutoencoderKL(**VAE), CLIPTextModel(CLIPTextConfig(**TEXT)))
    for part in parts:
        part.requires_grad_(False).eval()
    unet, vae, text_encoder = parts
    identity = {"source": "benchmark-sd15-random", "location": "in-memory", "weights_sha256": "random-seed-0"}
    return BaseModel(unet, vae, [text_encoder], [tokenizer], scheduler, "in-memory", identity)


def tiny_base_model() -> BaseModel:
    from training.families.tiny_sd import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        part.requires_grad_(False).eval()
    identity = {"source": "tiny", "location": "in-memory", "weights_sha256": "tiny-seed-0"}
    return BaseModel(pipe.unet, pipe.vae, [pipe.text_encoder], [pipe.tokenizer], pipe.scheduler, "in-memory", identity)


def synthetic_dataset(root: Path, count: int, size: int = 512) -> Path:
    folder = root / "1_synthetic"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        image = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(image)
        x, y = rng.integers(0, size * 3 // 4, 2)
        draw.ellipse((x, y, x + size // 5, y + size // 5), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        image.save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text("a red circle on a blue background, photo, high quality")
    return root


def matmul_peak_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * 8192**3 / float(np.median(times)) / 1e12


@contextlib.contextmanager
def keep_input_casting(model, active: bool = True):
    """The loop as it was before this pass: peft casts each LoRA input to fp32 under autocast."""
    yield


class StepClock:
    """A metric sink that notes when the loop logs (right after its loss sync): step -> time."""

    def __init__(self) -> None:
        self.times: dict[int, float] = {}

    def log_metrics(self, metrics: dict, step: int) -> None:
        if "train/loss" in metrics:
            self.times[step] = time.perf_counter()


def config(
    data_dir: Path,
    out_dir: Path,
    *,
    batch: int,
    rank: int,
    cache: str,
    steps: int,
    warmup: int,
    text_cache: bool = False,
    compile_kind: str = "none",
    compile_mode: str = "default",
    channels_last: bool = False,
    cuda_graphs: bool = False,
    vae_precision: str = "auto",
    gradient_checkpointing: bool = False,
    network_type: str = "lora",
    conv_dim: int | None = None,
    sdpa_backend: str = "auto",
    fp8_matmul: str = "none",
    pad_products: bool = False,
    fuse_products: bool = False,
    cudnn_benchmark: bool = False,
    matmul_convs: bool = False,
):
    cfg = OmegaConf.merge(
        OmegaConf.structured(Config),
        OmegaConf.create(
            {
                "model": {
                    "source": "diffusers",
                    "path": "in-memory",
                    "channels_last": channels_last,
                    "vae_precision": vae_precision,
                    "gradient_checkpointing": gradient_checkpointing,
                    "sdpa_backend": sdpa_backend,
                },
                "network": {"type": network_type, "dim": rank, "alpha": rank, "conv_dim": conv_dim},
                "optimizer": {"name": "adamw", "lr": 1e-4},
                "scheduler": {"name": "constant"},
                "precision": {"mixed": "bf16", "fp8_matmul": fp8_matmul},
                "bucket": {"resolution": 512},
                "dropout": {},
                "data": {"train_dir": str(data_dir), "cache_latents": cache, "cache_text_embeddings": text_cache},
                "eval": {"prompts": ["a red circle"]},
                "tracking": {"enabled": False},
                "train": {
                    "max_steps": warmup + steps,
                    "batch_size": batch,
                    "log_every_n_steps": 1,  # every loss kept (read back without a sync)
                    "compile": compile_kind,
                    "compile_mode": compile_mode,
                    "compile_pad_products": pad_products,
                    "fuse_lora_products": fuse_products,
                    "cudnn_benchmark": cudnn_benchmark,
                    "lora_1x1_conv_as_matmul": matmul_convs,
                    "cuda_graphs": cuda_graphs,
                },
                "output": {"dir": str(out_dir)},
            }
        ),
    )
    return cfg


def time_split(cfg, base: BaseModel, records, steps: int = 8) -> dict[str, float]:
    """Host milliseconds per optimizer step in each named stage of the loop (torch.profiler ranges)."""
    from torch.profiler import ProfilerActivity, profile

    cfg = cfg.copy()
    cfg.train.max_steps = steps
    cfg.train.log_every_n_steps = steps
    trainer = Trainer(cfg, base, records, StepClock())
    trainer.fit(show_progress=False)  # warm: fills the latent cache
    cfg.train.max_steps = steps
    trainer.total_steps = 2 * steps
    activities = [ProfilerActivity.CPU]  # host time per stage; the GPU runs behind it asynchronously
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        trainer.fit(show_progress=False)
    wall = (time.perf_counter() - started) * 1e3 / steps
    remove_lora(trainer.network)
    split = {"step_wall": wall}
    for event in prof.key_averages():
        if event.key.startswith("loop/"):
            name = event.key.removeprefix("loop/")
            split[name] = max(split.get(name, 0.0), event.cpu_time_total / 1e3 / steps)
    return split


def count_flops(trainer: Trainer) -> float:
    """FLOPs of one training micro-step (forward + backward of the whole loss) per image."""
    return count_step_flops(trainer)["total"]


def count_step_flops(trainer: Trainer) -> dict[str, float]:
    """FLOPs per image of one training micro-step: the whole loss (VAE and text encoders where they run
    in the step) and the UNet's share alone (its LoRA forward + backward), from the counter's per-module
    totals."""
    from torch.utils.flop_counter import FlopCounterMode

    configure_compile(trainer.base.denoiser, "none", "default")  # count the eager operators
    # the same products as in bf16: a float8 row's MFU is over the bf16 step's FLOPs and the bf16 peak
    configure_fp8_matmul(trainer.base.denoiser, "none")
    trainer.graphed_denoiser = None  # a replayed graph runs no operators the counter could see
    trainer.position.epoch = 1
    batch = next(iter(trainer.loader))
    with FlopCounterMode(display=False) as counter:
        loss = trainer._loss(batch)
        loss.backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    images = len(batch["caption"])
    unet = sum(counter.get_flop_counts().get(type(trainer.base.denoiser).__name__, {}).values())
    return {"total": counter.get_total_flops() / images, "unet": unet / images}


# --- the SD1.5 grid: each optimisation next to the row without it, in this one invocation. Keys: b batch,
# r rank (network.dim = network.alpha), w data workers, c train.compile[/train.compile_mode] ("none" |
# "blocks" | "blocks/reduce-overhead" | "denoiser" | "denoiser/reduce-overhead"), cl channels-last,
# g train.cuda_graphs, cast: peft's fp32 cast of LoRA inputs left on (the loop before this pass),
# latents: data.cache_latents, text: data.cache_text_embeddings (on unless said), net network.type
# (lora unless said), conv network.conv_dim (None unless said), sdpa model.sdpa_backend (auto unless said),
# fp8 precision.fp8_matmul (none unless said), pad train.compile_pad_products (off unless said), fuse
# train.fuse_lora_products (off unless said).
SD15_GRID = [
    dict(b=1, w=0, c="none", cl=False, g=False, cast=True),
    dict(b=1, w=0, c="none", cl=False, g=False),
    dict(b=1, w=0, c="none", cl=True, g=False),
    dict(b=1, w=0, c="none", cl=True, g=True),
    dict(b=1, w=0, c="blocks", cl=True, g=True),
    dict(b=1, w=0, c="blocks/reduce-overhead", cl=True, g=False),
    dict(b=4, w=4, c="none", cl=False, g=False, cast=True),
    dict(b=4, w=4, c="none", cl=False, g=False),
    dict(b=4, w=4, c="none", cl=True, g=False),
    dict(b=4, w=4, c="none", cl=True, g=True),
    dict(b=4, w=4, c="blocks", cl=True, g=True),
    dict(b=4, w=4, c="blocks/reduce-overhead", cl=True, g=False),
    dict(b=16, w=4, c="blocks", cl=True, g=True),
    dict(b=32, w=4, c="none", cl=False, g=False, cast=True),
    dict(b=32, w=4, c="none", cl=True, g=False),
    dict(b=32, w=4, c="none", cl=True, g=True),
    dict(b=32, w=4, c="blocks", cl=True, g=True),
    dict(b=1, r=32, w=0, c="none", cl=True, g=True),
    dict(b=4, r=32, w=4, c="none", cl=True, g=True),
    dict(b=4, w=4, c="none", cl=True, g=True, latents="none"),
    dict(b=4, w=4, c="none", cl=True, g=True, text=False),
    dict(b=48, w=4, c="blocks", cl=True, g=True),
    dict(b=64, w=4, c="blocks", cl=True, g=True),
]


def network_type_rows(compile_kind: str = "none") -> list[dict]:
    """Issue 26: the network types at about the same trainable parameter count (LoHa's two products at
    half the rank; LoCon adds the 3x3 convolutions; LoKr at its default factor is smaller), batch 4,
    cached latents, channels-last, CUDA graphs; alpha = rank. Rows record the parameter count."""
    common = dict(b=4, w=4, c=compile_kind, cl=True, g=True)
    return [
        dict(**common, net="lora", r=8),
        dict(**common, net="locon", r=8, conv=8),
        dict(**common, net="loha", r=4),
        dict(**common, net="lokr", r=8),
        dict(**common, net="dora", r=8),
    ]


def lever_rows(batch: int) -> list[dict]:
    """Issue 27's levers at one batch, each beside its baseline in the same invocation: whole-denoiser
    compilation (train.compile=denoiser, CUDA only) against compiled blocks, with and without CUDA graphs
    (make_graphed_callables captures the compiled module's Triton kernels as it does the compiled blocks');
    cuDNN and FlashAttention SDPA kernels against torch's own choice (auto), under CUDA graphs."""
    common = dict(b=batch, w=0 if batch == 1 else 4, cl=True)
    return [
        dict(**common, c="none", g=True),  # the SDPA rows' baseline (auto)
        dict(**common, c="none", g=True, sdpa="cudnn"),
        dict(**common, c="none", g=True, sdpa="flash"),
        dict(**common, c="blocks", g=True),  # the best so far: the compiled rows' baseline
        dict(**common, c="denoiser", g=False),
        dict(**common, c="denoiser", g=True),
    ]


# issue 27, appended so the rows above keep their numbers: 23-27 network types, 28-33 levers at batch 4,
# 34-39 at batch 32 (the denoiser rows compile the whole UNet: minutes each; see README's GPU speed)
# 23-27 the types, 28-39 the levers, 40-42 LoHa, LoKr and DoRA with compiled blocks (against 25-27)
SD15_GRID += [*network_type_rows(), *lever_rows(4), *lever_rows(32), *network_type_rows("blocks")[2:]]


def fp8_rows(batch: int, kinds: tuple[str, ...] = ("large", "all")) -> list[dict]:
    """Issue 27: the frozen layers' products in float8 (``precision.fp8_matmul``) beside the rows without:
    under compiled blocks (each kind; their baseline is lever_rows' compiled-blocks row) and under
    whole-denoiser compilation (``large``; baseline: lever_rows' denoiser + graphs row)."""
    common = dict(b=batch, w=0 if batch == 1 else 4, cl=True, g=True)
    return [*(dict(**common, c="blocks", fp8=kind) for kind in kinds), dict(**common, c="denoiser", fp8="large")]


# 43-45 float8 at batch 4 (against 31 and 33), 46-48 at batch 32 (against 37 and 39), 49-50 batch 64
# whole-denoiser without and with float8 (the largest batch)
SD15_GRID += [
    *fp8_rows(4),
    *fp8_rows(32),
    dict(b=64, w=4, c="denoiser", cl=True, g=True),
    dict(b=64, w=4, c="denoiser", cl=True, g=True, fp8="large"),
]


def autotune_rows(batch: int) -> list[dict]:
    """Issue 27: Inductor's autotuned kernels (``train.compile_mode=max-autotune-no-cudagraphs``: Triton
    GEMM and convolution templates benchmarked against cuBLAS / cuDNN per shape, epilogues fused into
    them; the project's CUDA graphs on top, as in the denoiser row), and the denoiser row without data
    workers (the cached step needs none: whether restarting the workers' queue every epoch costs time)."""
    return [
        dict(b=batch, w=4, c="denoiser/max-autotune-no-cudagraphs", cl=True, g=True),
        dict(b=batch, w=0, c="denoiser", cl=True, g=True),
    ]


# 51-52 at batch 4 (against 33), 53-54 at batch 32 (against 39); 55 batch 48, the whole denoiser (batch 64
# with CUDA graphs ran out of an 80 GB card: the largest batch that fits lies between)
SD15_GRID += [*autotune_rows(4), *autotune_rows(32), dict(b=48, w=0, c="denoiser", cl=True, g=True)]

# 56-57: the project's train.compile_mode=max-autotune-gemm (Triton GEMM and convolution templates timed
# per shape, no pointwise or coordinate-descent tuning) on the whole denoiser with CUDA graphs, at batch 4
# (against 33) and 32 (against 39)
SD15_GRID += [dict(b=batch, w=4, c="denoiser/max-autotune-gemm", cl=True, g=True) for batch in (4, 32)]
# 58-59: train.compile_pad_products (rank-4 products padded to multiples of 8, so cuBLAS leaves its Ampere
# "align2" fallback kernels) on the whole denoiser with CUDA graphs, at batch 4 (against 33) and 32 (39)
SD15_GRID += [dict(b=batch, w=4, c="denoiser", cl=True, g=True, pad=True) for batch in (4, 32)]
# 60-61: train.fuse_lora_products (the LoRA's down-product and hidden gradient ride in the frozen layer's
# GEMMs) on the whole denoiser with CUDA graphs, at batch 4 (against 33) and 32 (39); 62: with padded
# products too (against 58); 63: without compilation, CUDA graphs alone (against 28: no compile time, and
# the fused layers' products are aligned where Inductor's padding cannot reach)
SD15_GRID += [dict(b=batch, w=4, c="denoiser", cl=True, g=True, fuse=True) for batch in (4, 32)]
SD15_GRID += [dict(b=4, w=4, c="denoiser", cl=True, g=True, pad=True, fuse=True)]
SD15_GRID += [dict(b=4, w=4, c="none", cl=True, g=True, fuse=True)]
# 64: both at batch 32 (against 39, 59 and 61)
SD15_GRID += [dict(b=32, w=4, c="denoiser", cl=True, g=True, pad=True, fuse=True)]
# 65-67: train.cudnn_benchmark (cuDNN times its convolution algorithms per shape), against 28, 33 and 39; a row
# with the other setting than the invocation's first is skipped (cuDNN's plans stay per process): --rows 66 alone
SD15_GRID += [dict(b=4, w=4, c="none", cl=True, g=True, bench=True)]
SD15_GRID += [dict(b=batch, w=4, c="denoiser", cl=True, g=True, bench=True) for batch in (4, 32)]
# 68-72: train.lora_1x1_conv_as_matmul (the LoRA factors of the 1x1 projections as products): batch 4 against
# 33, with padded products against 58, batch 32 against 39, with cuDNN's timed plans against 66, eager against 28
SD15_GRID += [dict(b=4, w=4, c="denoiser", cl=True, g=True, mm1x1=True)]
SD15_GRID += [dict(b=4, w=4, c="denoiser", cl=True, g=True, pad=True, mm1x1=True)]
SD15_GRID += [dict(b=32, w=4, c="denoiser", cl=True, g=True, mm1x1=True)]
SD15_GRID += [dict(b=4, w=4, c="denoiser", cl=True, g=True, bench=True, mm1x1=True)]
SD15_GRID += [dict(b=4, w=4, c="none", cl=True, g=True, mm1x1=True)]


def sdxl_ladder(batch: int) -> list[dict]:
    """One batch size four ways, each row adding one optimisation to the one before: the VAE every step,
    cached latents, + channels-last, + CUDA graphs."""
    workers = 0 if batch == 1 else 4
    return [
        dict(b=batch, w=workers, c="none", cl=False, g=False, latents="none"),
        dict(b=batch, w=workers, c="none", cl=False, g=False),
        dict(b=batch, w=workers, c="none", cl=True, g=False),
        dict(b=batch, w=workers, c="none", cl=True, g=True),
    ]


# --- the SDXL grid (issue 16) at 1024 px, rank 4 unless said (the peer comparison). More keys: vae
# model.vae_precision ("auto" is the training dtype under bf16), gc model.gradient_checkpointing, probe:
# batches tried in turn for the largest that fits (after the first that runs out of memory the larger
# ones are skipped), b="largest": the largest batch that ran. The compiled rows come last: each compiles
# for a minute or more, and rows that would run past the time budget are skipped.
SDXL_GRID = [
    *sdxl_ladder(1),  # 0-3
    *sdxl_ladder(4),  # 4-7
    *sdxl_ladder(8),  # 8-11
    dict(b=4, w=4, c="none", cl=True, g=True, text=False),  # 12: text-embedding cache off (against 7)
    dict(b=4, w=4, c="none", cl=True, g=True, latents="none", vae="half"),  # 13: VAE every step in bf16 (against 7)
    dict(b=4, w=4, c="none", cl=True, g=True, latents="none", vae="fp32"),  # 14: in fp32, kohya's --no_half_vae
    dict(b=1, r=32, w=0, c="none", cl=True, g=True),  # 15: peak memory at batch 1, rank 32 (target <= 16 GiB)
    dict(b=1, r=32, w=0, c="none", cl=True, g=False, gc=True),  # 16: the same with gradient checkpointing
    dict(b=16, w=4, c="none", cl=True, g=True, probe=True),  # 17-19: the largest batch that fits
    dict(b=24, w=4, c="none", cl=True, g=True, probe=True),
    dict(b=32, w=4, c="none", cl=True, g=True, probe=True),
    dict(b=4, w=4, c="blocks", cl=True, g=True),  # 20: + compiled blocks (against 7)
    dict(b="largest", w=4, c="blocks", cl=True, g=True),  # 21: against the largest probe that ran
    dict(b=1, w=0, c="blocks", cl=True, g=True),  # 22 (against 3)
    dict(b=8, w=4, c="blocks", cl=True, g=True),  # 23 (against 11)
    # issue 27 (the keys of the SD1.5 grid): 24-28 network types at batch 4, 29-34 the levers at batch 4
    # (29 repeats 7, 32 repeats 20: each baseline in the same invocation as its lever)
    *network_type_rows(),  # 24-28
    *lever_rows(4),  # 29-34
    # 35-37 float8 at batch 4 (against 32 and 34); 38-40 batch 8 (against 23 and 41); 41 batch 8 denoiser
    *fp8_rows(4),
    *fp8_rows(8),
    dict(b=8, w=4, c="denoiser", cl=True, g=True),
    dict(b=4, w=4, c="denoiser/max-autotune-gemm", cl=True, g=True),  # 42: autotuned products (against 34)
    dict(b=4, w=4, c="denoiser", cl=True, g=True, pad=True),  # 43: padded products (against 34)
    dict(b=4, w=4, c="blocks", cl=True, g=True, pad=True),  # 44: padded products, compiled blocks (against 32)
    dict(b=4, w=4, c="denoiser", cl=True, g=True, fuse=True),  # 45: fused LoRA products (against 34)
    dict(b=4, w=4, c="blocks", cl=True, g=True, fuse=True),  # 46: fused LoRA products, compiled blocks (against 32)
    dict(b=4, w=4, c="blocks", cl=True, g=True, pad=True, fuse=True),  # 47: both, compiled blocks (against 32)
    dict(b=8, w=4, c="blocks", cl=True, g=True, pad=True, fuse=True),  # 48: both at batch 8 (against 23)
    # 49-50: train.cudnn_benchmark, each in an invocation of its own (cuDNN's plans stay per process)
    dict(b=4, w=4, c="blocks", cl=True, g=True, bench=True),  # 49 (against 32)
    dict(b=4, w=4, c="denoiser", cl=True, g=True, bench=True),  # 50: whole denoiser (against 34)
]
SDXL_BUDGET_S = 500.0  # seconds from the start of main(); one device call has 600
SDXL_IMAGES = 32  # enough for one batch of the largest probe
SDXL_TIMED_STEPS = 6  # timed steps per row: at least this many, and at least SDXL_TIMED_IMAGES images
SDXL_TIMED_IMAGES = 16
# steps before the timed ones: graph capture (with its own 3 warm-up passes) and compilation happen in
# the first; the data workers' queue is full by the third
SDXL_WARMUP = {"eager": 3, "compiled": 4}
# what a row needs of the budget, roughly (seconds on an H200), to decide whether to start it
SDXL_ROW_COST_S = {"denoiser": 400.0, "compiled": 150.0, "probe": 45.0, "other": 25.0}
SPLITS = ((1, "memory"), (4, "memory"), (4, "none"))


class Session:
    """What the rows of one invocation share: the model, the data, the clock and what earlier rows found."""

    def __init__(
        self, args: argparse.Namespace, base: BaseModel, data_dir: Path, tmp: Path, peak: float, started: float
    ) -> None:
        self.args, self.base, self.data_dir, self.tmp, self.peak = args, base, data_dir, tmp, peak
        self.records = scan_dataset(data_dir).records
        self.cuda = torch.cuda.is_available()
        self.sdxl = args.family == "sdxl"
        self.resolution = base.native_resolution
        self.started = started  # when main() began: the budget counts the model build too
        self.flops: dict[tuple, dict[str, float]] = {}  # SDXL: (rank, latents, text cache) -> FLOPs per image
        self.largest: int | None = args.largest  # the largest probe batch that ran
        self.ran: list[int] = []  # batches of the rows that ran
        self.probe_oom: int | None = None  # the first probe batch that ran out of memory

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return self.args.budget - self.elapsed() if self.args.budget else math.inf


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def cuda_usable() -> bool:
    """Whether the GPU still runs work after an error (an OOM inside a graph capture can leave it unusable)."""
    try:
        torch.cuda.synchronize()
        return torch.ones(8, device="cuda").sum().item() == 8
    except Exception:
        return False


def fit_timed(trainer: Trainer, warmup: int, steps: int, cuda: bool) -> dict[str, float]:
    """``warmup`` steps, then ``steps`` timed ones, the GPU idle at both ends of the timed part.

    The loop reads its losses back asynchronously, so the times at which it logs them trail the
    steps by up to one step: with a few timed steps per row that would be 10% and more. The save
    hook runs right after the warm-up's last optimizer step, where the clock starts after a sync.
    """
    marks: dict[str, float] = {}

    def start_clock(step: int, epoch: int) -> None:
        if step == warmup:
            if cuda:
                torch.cuda.synchronize()
            marks["timed"] = time.perf_counter()

    trainer.cfg.train.save_every_n_steps = warmup
    started = time.perf_counter()
    losses = trainer.fit(on_save=start_clock, show_progress=False).losses
    if cuda:
        torch.cuda.synchronize()
    ended = time.perf_counter()
    return {
        "losses": losses,
        "seconds": ended - marks["timed"],
        "warmup_seconds": marks["timed"] - started,
        "run_seconds": ended - started,
    }


def row_batch(spec: dict, session: Session) -> int | None:
    if spec["b"] != "largest":
        return spec["b"]
    return session.largest or (max(session.ran) if session.ran else None)


def skip_reason(spec: dict, batch: int | None, session: Session) -> str | None:
    """Why an SDXL row does not run here (GPU-only on a CPU, a larger probe, the time budget), or None."""
    compiled = spec["c"] != "none"
    if not session.cuda and (spec["g"] or compiled or spec["cl"] or spec.get("probe") or spec["b"] == "largest"):
        return "GPU only (CUDA graphs, compiled blocks, channels-last or the memory probe): skipped on the CPU"
    if batch is None:
        return "no earlier row ran, so there is no largest batch"
    if batch > len(session.records):
        return f"batch {batch} needs --images >= {batch}"
    if spec.get("probe") and session.probe_oom is not None:
        return f"batch {session.probe_oom} already ran out of memory"
    denoiser = spec["c"].startswith("denoiser")
    need = SDXL_ROW_COST_S[
        "denoiser" if denoiser else "compiled" if compiled else "probe" if spec.get("probe") else "other"
    ]
    if session.left() < need:
        left = session.left()
        return f"time budget (--budget {session.args.budget:.0f} s): {left:.0f} s left, the row needs ~{need:.0f} s"
    return None


def cudnn_skip_reason(wanted: bool) -> str | None:
    """Why a row cannot run after the rows before it in this process: PyTorch keeps each convolution
    shape's cuDNN plan for the process whatever ``train.cudnn_benchmark`` says later (training/speed/cudnn.py),
    so a row with the other setting would time the first row's plans."""
    first = first_cudnn_benchmark_setting()
    if first is None or first == wanted:
        return None
    return (
        f"train.cudnn_benchmark={str(wanted).lower()} after a row with {str(first).lower()} in this process "
        "(cuDNN's plans stay per process): run it in an invocation of its own"
    )


def cpu_skip_reason(compile_kind: str, sdpa: str) -> str | None:
    """Why an SD1.5 row cannot run on the CPU (a ``--tiny`` smoke run), or None: there its CUDA graphs are
    left off instead (the row says so), whole-denoiser compilation and the CUDA-only kernels are refused."""
    if compile_kind == "denoiser":
        return "GPU only: train.compile=denoiser is refused on the CPU (wrong LoRA gradients there)"
    if sdpa_backend_problem(sdpa, "sdpa", False):
        return f"GPU only: model.sdpa_backend={sdpa} has no CPU kernel"
    return None


def run_row(index: int, spec: dict, session: Session) -> dict:
    """One grid row: train, time, count; an error (out of memory, a compile failure) ends the row, not the run."""
    args, base, cuda, sdxl = session.args, session.base, session.cuda, session.sdxl
    batch = row_batch(spec, session)
    rank, workers, cache = spec.get("r", 4), spec["w"], spec.get("latents", "memory")
    compile_kind, _, compile_mode = spec["c"].partition("/")
    net, conv, sdpa = spec.get("net", "lora"), spec.get("conv"), spec.get("sdpa", "auto")
    fp8, pad, fuse = spec.get("fp8", "none"), spec.get("pad", False), spec.get("fuse", False)
    timed_convs, matmul_convs = spec.get("bench", False), spec.get("mm1x1", False)
    graphs = spec["g"]
    setting = {
        "batch": batch,
        "network": net,
        "rank": rank,
        "conv_dim": conv,
        "sdpa_backend": sdpa,
        "fp8_matmul": fp8,
        "pad_products": pad,
        "fuse_lora_products": fuse,
        "cudnn_benchmark": timed_convs,
        "lora_1x1_conv_as_matmul": matmul_convs,
        "cache_latents": cache,
        "text_cache": spec.get("text", True),
        "workers": workers,
        "compile": spec["c"],
        "channels_last": spec["cl"],
        "cuda_graphs": spec["g"],
        "peft_input_cast": bool(spec.get("cast")),
    }
    if cuda and (reason := cudnn_skip_reason(timed_convs)):
        return {**({"row": index} if sdxl else {}), **setting, "skipped": reason}
    if sdxl:
        setting = {
            "row": index,
            **setting,
            "vae_precision": spec.get("vae", "auto"),
            "grad_checkpointing": spec.get("gc", False),
        }
        if reason := skip_reason(spec, batch, session):
            return {**setting, "skipped": reason}
        warmup = SDXL_WARMUP["compiled" if compile_kind != "none" else "eager"]
        steps = args.steps if args.tiny else max(args.steps, math.ceil(SDXL_TIMED_IMAGES / batch))
        setting["timed_steps"] = steps
    else:
        if not cuda:
            if reason := cpu_skip_reason(compile_kind, sdpa):
                return {**setting, "skipped": reason}
            if graphs:
                graphs = setting["cuda_graphs"] = False
                setting["note"] = "CPU smoke run: CUDA graphs off"
        warmup = math.ceil(args.images / batch) + 3  # the first epoch (and compilation / graph capture)
        steps = args.steps
    cfg = config(
        session.data_dir,
        session.tmp / "out",
        batch=batch,
        rank=rank,
        cache=cache,
        steps=steps,
        warmup=warmup,
        text_cache=spec.get("text", True),
        compile_kind=compile_kind,
        compile_mode=compile_mode or "default",
        channels_last=spec["cl"],
        cuda_graphs=graphs,
        vae_precision=spec.get("vae", "auto"),
        gradient_checkpointing=spec.get("gc", False),
        network_type=net,
        conv_dim=conv,
        sdpa_backend=sdpa,
        fp8_matmul=fp8,
        pad_products=pad,
        fuse_products=fuse,
        cudnn_benchmark=timed_convs,
        matmul_convs=matmul_convs,
    )
    torch._dynamo.reset()  # each configuration compiles from scratch, as a fresh run would
    clear_text_caches()
    cfg.bucket.resolution = session.resolution
    cfg.data.num_workers = workers
    cfg.data.persistent_workers = workers > 0
    cfg.precision.mixed = "bf16" if cuda else "fp32"
    if sdxl:
        gc.collect()  # what an earlier row left in reference cycles would count towards this row's peak
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    clock = StepClock()
    training.loop.disable_input_dtype_casting = keep_input_casting if spec.get("cast") else disable_input_dtype_casting
    trainer = None
    try:
        # the loop sets model.sdpa_backend too once it calls configure_sdpa_backend; set here either way
        configure_sdpa_backend(sdpa, cfg.model.attention, "cuda" if cuda else "cpu")
        trainer = Trainer(cfg, base, session.records, clock)
        sizes = network_size(trainer)
        if sdxl:
            timed = fit_timed(trainer, warmup, steps, cuda)
            seconds, total, warm = timed["seconds"], timed["run_seconds"], timed["warmup_seconds"]
            losses = timed["losses"]
        else:
            started = time.perf_counter()
            losses = trainer.fit(show_progress=False).losses
            total = time.perf_counter() - started
            seconds = clock.times[cfg.train.max_steps] - clock.times[warmup]
            warm = clock.times[warmup] - started  # includes compilation
        rate = steps * batch / seconds
        memory = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        # before the FLOP count, which turns compilation and graphs off
        profile = profile_steps(trainer, args.profile) if args.profile and cuda else None
        if sdxl:
            row = {
                **setting,
                "images_per_s": rate,
                "steps_per_s": steps / seconds,
                "peak_gib": memory,
                "reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else float("nan"),
                "warmup_steps": warmup,
                "warmup_seconds": warm,  # includes compilation and graph capture
                "run_seconds": total,
                **sizes,
            }
            row.update(sdxl_flops(trainer, setting, rate, session))
        else:
            flops = count_flops(trainer)  # after training: a filled latent cache is not counted
            row = {
                **setting,
                "images_per_s": rate,
                "steps_per_s": steps / seconds,
                "peak_gib": memory,
                "tflop_per_image": flops / 1e12,
                "mfu": flops * rate / (session.peak * 1e12),
                "warmup_steps": warmup,
                "warmup_seconds": warm,
                "run_seconds": total,
                **sizes,
            }
        if profile:
            row["profile"] = profile
        row["losses"] = losses  # per step, the same seed in every row: float8's against bf16's curve
    except Exception as error:  # an OOM or a compile failure ends this row, not the benchmark
        row = {**setting, "error": f"{type(error).__name__}: {str(error)[:300]}"}
        if is_oom(error):
            row["out_of_memory"] = True
            if cuda:
                row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    finally:
        if trainer is not None:
            remove_lora(trainer.network)
            # as a sweep worker does between trials: CUDA graphs' pools, optimizer state, float8 layers
            # (without it the batch-32 rows ran out of memory after the batch-4 rows' graph pools)
            trainer.release()
        else:  # the trainer failed while being built, perhaps after adding its LoRA to the shared model
            remove_leftover_adapters(base.denoiser, *base.text_encoders)
        configure_compile(base.denoiser, "none", "default")
        set_sdpa_backend("auto")
        del trainer
        training.loop.disable_input_dtype_casting = disable_input_dtype_casting
        if sdxl:
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    if "error" not in row:
        session.ran.append(batch)
        if spec.get("probe"):
            session.largest = max(session.largest or 0, batch)
    elif spec.get("probe") and row.get("out_of_memory") and session.probe_oom is None:
        session.probe_oom = batch
    return row


def network_size(trainer: Trainer) -> dict[str, int]:
    """The network's trainable parameters and the size of its file saved in bf16 (2 bytes a number)."""
    params = sum(p.numel() for p in trainer.network.parameters())
    numbers = sum(t.numel() for t in trainer.network.kohya_state_dict().values())
    return {"trainable_params": params, "file_bytes_bf16": 2 * numbers}


def sdxl_flops(trainer: Trainer, setting: dict, rate: float, session: Session) -> dict:
    """FLOPs per image (counted once per rank, latents and text-cache setting) and the MFU of the UNet's
    LoRA forward + backward, the issue's measure. Counted after training: a filled cache is not counted."""
    key = (setting["network"], setting["rank"], setting["conv_dim"], setting["cache_latents"], setting["text_cache"])
    if key not in session.flops:
        try:
            session.flops[key] = count_step_flops(trainer)
        except Exception as error:  # e.g. out of memory in the eager count of a large batch
            return {"flop_error": f"{type(error).__name__}: {str(error)[:200]}", "mfu": float("nan")}
        unet = session.flops[key]["unet"] / 1e12
        print(
            f"counted: UNet {setting['network']} forward + backward (rank {setting['rank']}) {unet:.4g} TFLOP per "
            f"image at "
            f"{session.resolution} px (issue 16: {ISSUE_TFLOP_PER_IMAGE} at 1024 px); whole step "
            f"{session.flops[key]['total'] / 1e12:.4g} (latents {setting['cache_latents']}, text cache "
            f"{'on' if setting['text_cache'] else 'off'})",
            flush=True,
        )
    counted = session.flops[key]
    return {
        "unet_tflop_per_image": counted["unet"] / 1e12,
        "step_tflop_per_image": counted["total"] / 1e12,
        "mfu": counted["unet"] * rate / (session.peak * 1e12),
    }


def describe(spec: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in spec.items())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/out")
    parser.add_argument("--family", default="sd15", choices=("sd15", "sdxl"), help="the model's architecture")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"timed steps per configuration (sd15: 30; sdxl: {SDXL_TIMED_STEPS}, and at least "
        f"{SDXL_TIMED_IMAGES} images except with --tiny)",
    )
    parser.add_argument("--images", type=int, default=None, help=f"synthetic images (sd15: 64, sdxl: {SDXL_IMAGES})")
    parser.add_argument("--quick", action="store_true", help="only the first three configurations")
    parser.add_argument("--tiny", action="store_true", help="the tiny model instead (a smoke run, CPU or GPU)")
    parser.add_argument("--split-only", action="store_true", help="only the per-stage time split")
    parser.add_argument("--no-split", action="store_true", help="skip the per-stage time split")
    parser.add_argument("--rows", default="", help="comma-separated grid row numbers to run (default: all)")
    parser.add_argument("--list", action="store_true", help="print the grid's rows with their numbers and stop")
    parser.add_argument(
        "--profile", type=int, default=0, help="GPU: profile this many more steps per row (top kernels, by kind)"
    )
    parser.add_argument(
        "--largest",
        type=int,
        default=None,
        help="SDXL: the batch of the 'largest' row when no probe row runs before it",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help=f"seconds after which no SDXL row or split starts (default {SDXL_BUDGET_S:.0f}; 0: no limit)",
    )
    args = parser.parse_args()
    began = time.perf_counter()
    sdxl = args.family == "sdxl"
    args.steps = args.steps if args.steps is not None else (SDXL_TIMED_STEPS if sdxl else 30)
    args.images = args.images if args.images is not None else (SDXL_IMAGES if sdxl else 64)
    args.budget = (args.budget if args.budget is not None else SDXL_BUDGET_S) if sdxl else 0
    grid = SDXL_GRID if sdxl else SD15_GRID
    if args.list:
        for index, spec in enumerate(grid):
            print(index, describe(spec))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        scale = "SDXL" if sdxl else "SD1.5"
        raise SystemExit(f"the {scale}-scale benchmark needs a CUDA GPU (use --tiny for a CPU smoke run)")
    peak = matmul_peak_tflops() if cuda else float("nan")
    device = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"{device}: bf16 matmul peak {peak:.0f} TFLOP/s; torch {torch.__version__}", flush=True)
    if sdxl:
        base = tiny_sdxl_base_model() if args.tiny else sdxl_base_model("cuda")
    else:
        base = tiny_base_model() if args.tiny else sd15_base_model()
    resolution = base.native_resolution
    tmp = Path(tempfile.mkdtemp())
    started = time.perf_counter()
    data_dir = synthetic_dataset(tmp / "data", args.images, resolution)
    print(
        f"{args.images} synthetic {resolution} px images written in {time.perf_counter() - started:.1f} s", flush=True
    )
    session = Session(args, base, data_dir, tmp, peak, began)
    records = session.records

    indices = list(range(len(grid)))
    if args.quick:
        indices = indices[:3]
    if args.rows:
        indices = [indices[int(i)] for i in args.rows.split(",")]
    if args.split_only:
        indices = []
    result = {
        "device": device + (" (tiny model)" if args.tiny else ""),
        "torch": torch.__version__,
        "matmul_peak_tflops": peak,
        "date": time.strftime("%Y-%m-%d"),
        "timed_steps": args.steps,
        "rows": [],
        "time_split_ms": {},
    }
    if sdxl:
        result.update(family="sdxl", resolution=resolution, images=args.images, budget_s=args.budget)
    results_file = out / ("results-sdxl.json" if sdxl else "results.json")
    rows = []
    for index in indices:
        spec = grid[index]
        print(f"[{session.elapsed():.0f} s] row {index}: {describe(spec)}", flush=True)
        row = run_row(index, spec, session)
        rows.append(row)
        result["rows"] = rows
        result["elapsed_s"] = session.elapsed()
        results_file.write_text(json.dumps(result, indent=2))  # after each row: a timeout keeps them
        print(json.dumps(row), flush=True)
        if "error" in row and cuda and not cuda_usable():
            print("the GPU no longer runs work after this error: stopping here", flush=True)
            result["stopped"] = f"the GPU was unusable after row {index}"
            break

    splits = result["time_split_ms"]
    for batch, cache in () if args.no_split or "stopped" in result else SPLITS:
        if sdxl and session.left() < 40:
            print(f"time split {batch} {cache}: skipped (time budget)", flush=True)
            continue
        cfg = config(data_dir, tmp / "out", batch=batch, rank=4, cache=cache, steps=8, warmup=1, text_cache=True)
        cfg.bucket.resolution = resolution
        cfg.precision.mixed = "bf16" if cuda else "fp32"
        try:
            split = time_split(cfg, base, records)
        except Exception as error:
            if not sdxl:
                raise
            remove_leftover_adapters(base.denoiser, *base.text_encoders)
            split = {"error": f"{type(error).__name__}: {str(error)[:200]}"}
        splits[f"batch{batch}-{cache}"] = split
        shown = {k: round(v, 2) if isinstance(v, float) else v for k, v in split.items()}
        print("time split (host ms per step)", batch, cache, json.dumps(shown), flush=True)
    result["elapsed_s"] = session.elapsed()
    results_file.write_text(json.dumps(result, indent=2))
    if sdxl:
        print_sdxl_table(rows, session)
    else:
        print_sd15_table(rows)


def network_cell(r: dict) -> str:
    """The network type, rank and conv rank of a row: ``lora 4``, ``locon 8/8``."""
    return f"{r['network']} {r['rank']}" + (f"/{r['conv_dim']}" if r.get("conv_dim") else "")


def params_cell(r: dict) -> str:
    return f"{r['trainable_params'] / 1e6:.2f}M" if "trainable_params" in r else ""


def print_measured(head: str, r: dict, *, digits: int, width: int) -> None:
    """A table row: its settings (``head``), then what it measured, or why it has no numbers."""
    if "skipped" in r or "error" in r:
        text = f"skipped: {r['skipped']}" if "skipped" in r else r["error"]
        print(f"{head} {text[:width]} | | | | |")
        return
    print(
        f"{head} {r['images_per_s']:.{digits}f} | {r['steps_per_s']:.{digits}f} | {r['peak_gib']:.1f} | "
        f"{r['mfu']:.1%} | {r['warmup_seconds']:.0f} |"
    )


def compile_cell(row: dict) -> str:
    """train.compile[/mode], "+ pad" where train.compile_pad_products is on, "+ fused LoRA" where
    train.fuse_lora_products is, "+ cuDNN timed" where train.cudnn_benchmark is, "+ 1x1 LoRA as matmul" where
    train.lora_1x1_conv_as_matmul is."""
    return (
        row["compile"]
        + (" + pad" if row.get("pad_products") else "")
        + (" + fused LoRA" if row.get("fuse_lora_products") else "")
        + (" + cuDNN timed" if row.get("cudnn_benchmark") else "")
        + (" + 1x1 LoRA as matmul" if row.get("lora_1x1_conv_as_matmul") else "")
    )


def print_sd15_table(rows: list[dict]) -> None:
    header = (
        "| batch | network | latents | workers | compile | SDPA | fp8 | channels-last | CUDA graphs | peft cast "
        "| params | img/s | it/s |"
    )
    print("\n" + header + " peak GiB | MFU | warm-up s |")
    print("|---" * 16 + "|")
    for r in rows:
        head = (
            f"| {r['batch']} | {network_cell(r)} | {r['cache_latents']} | {r['workers']} | {compile_cell(r)} | "
            f"{r['sdpa_backend']} | {r['fp8_matmul']} | {'on' if r['channels_last'] else 'off'} | "
            f"{'on' if r['cuda_graphs'] else 'off'} | "
            f"{'on' if r['peft_input_cast'] else 'off'} | {params_cell(r)} |"
        )
        print_measured(head, r, digits=1, width=60)


def print_sdxl_table(rows: list[dict], session: Session) -> None:
    def on(value: bool) -> str:
        return "on" if value else "off"

    counts = {k: float(f"{v['unet'] / 1e12:.4g}") for k, v in session.flops.items()}
    print(
        f"\nSDXL at {session.resolution} px; UNet LoRA forward + backward per image (TFLOP) by (network, rank, "
        f"conv rank, latents, text cache): {counts} (issue 16: {ISSUE_TFLOP_PER_IMAGE}); MFU against "
        f"{session.peak:.0f} TFLOP/s"
    )
    print(
        "| row | batch | network | latents | text cache | VAE | compile | SDPA | fp8 | channels-last | CUDA graphs "
        "| checkpointing | params | img/s | it/s | peak GiB | MFU | warm-up s |"
    )
    print("|---" * 18 + "|")
    for r in rows:
        head = (
            f"| {r['row']} | {r['batch']} | {network_cell(r)} | {r['cache_latents']} | {on(r['text_cache'])} | "
            f"{r['vae_precision']} | {compile_cell(r)} | {r['sdpa_backend']} | {r['fp8_matmul']} | "
            f"{on(r['channels_last'])} | {on(r['cuda_graphs'])} | {on(r['grad_checkpointing'])} | {params_cell(r)} |"
        )
        print_measured(head, r, digits=2, width=90)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
