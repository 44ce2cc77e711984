"""Throughput of the project's own training loop at SD1.5 scale (random weights, synthetic data).

Builds an SD1.5-architecture model from its published configs with random weights (speed does not
depend on the weights), writes a synthetic 512px dataset in the kohya layout, and runs
``training.loop.Trainer`` -- the loop ``python -m sweeper`` uses -- for each configuration:
steady-state images/s (warm-up excluded), peak GPU memory, and MFU against the FLOPs counted by
``torch.utils.flop_counter`` and the bf16 matmul peak measured in the same run.

    python benchmarks/bench_training.py --out results/  [--steps 30] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
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
from sweeper.config import Config
from training.compile import configure_compile
from training.data import scan_dataset
from training.loop import Trainer
from training.models import BaseModel
from training.network import remove_lora
from training.text_cache import clear_text_caches
from training.tokenizer import build_word_tokenizer

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
    from training.tiny_model import build_tiny_pipeline

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
):
    cfg = OmegaConf.merge(
        OmegaConf.structured(Config),
        OmegaConf.create(
            {
                "model": {"source": "diffusers", "path": "in-memory", "channels_last": channels_last},
                "network": {"dim": rank, "alpha": rank},
                "optimizer": {"name": "adamw", "lr": 1e-4},
                "scheduler": {"name": "constant"},
                "precision": {"mixed": "bf16"},
                "bucket": {"resolution": 512},
                "dropout": {},
                "data": {"train_dir": str(data_dir), "cache_latents": cache, "cache_text_embeddings": text_cache},
                "eval": {"prompts": ["a red circle"]},
                "tracking": {"enabled": False},
                "train": {
                    "max_steps": warmup + steps,
                    "batch_size": batch,
                    "log_every_n_steps": warmup,
                    "compile": compile_kind,
                    "compile_mode": compile_mode,
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
    from torch.utils.flop_counter import FlopCounterMode

    configure_compile(trainer.base.unet, "none", "default")  # count the eager operators
    trainer.graphed_unet = None  # a replayed graph runs no operators the counter could see
    trainer.position.epoch = 1
    batch = next(iter(trainer.loader))
    with FlopCounterMode(display=False) as counter:
        loss = trainer._loss(batch)
        loss.backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(batch["caption"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/out")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per configuration")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="only the first three configurations")
    parser.add_argument("--tiny", action="store_true", help="the tiny model instead (a smoke run, CPU or GPU)")
    parser.add_argument("--split-only", action="store_true", help="only the per-stage time split")
    parser.add_argument("--no-split", action="store_true", help="skip the per-stage time split")
    parser.add_argument("--rows", default="", help="comma-separated grid row numbers to run (default: all)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        raise SystemExit("the SD1.5-scale benchmark needs a CUDA GPU (use --tiny for a CPU smoke run)")
    peak = matmul_peak_tflops() if cuda else float("nan")
    device = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"{device}: bf16 matmul peak {peak:.0f} TFLOP/s; torch {torch.__version__}", flush=True)
    base = tiny_base_model() if args.tiny else sd15_base_model()
    resolution = base.native_resolution
    tmp = Path(tempfile.mkdtemp())
    data_dir = synthetic_dataset(tmp / "data", args.images, resolution)
    records = scan_dataset(data_dir).records

    # each optimisation next to the row without it, in this one invocation. Keys: b batch, r rank,
    # w data workers, c compile ("none" | "blocks" | "blocks/reduce-overhead"), cl channels-last,
    # g train.cuda_graphs, cast: peft's fp32 cast of LoRA inputs left on (the loop before this pass),
    # latents: data.cache_latents, text: data.cache_text_embeddings (on unless said).
    grid = [
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
    if args.quick:
        grid = grid[:3]
    if args.rows:
        grid = [grid[int(i)] for i in args.rows.split(",")]
    if args.split_only:
        grid = []
    result = {
        "device": device + (" (tiny model)" if args.tiny else ""),
        "torch": torch.__version__,
        "matmul_peak_tflops": peak,
        "date": time.strftime("%Y-%m-%d"),
        "timed_steps": args.steps,
        "rows": [],
        "time_split_ms": {},
    }
    rows = []
    for spec in grid:
        batch, rank, workers, cache = spec["b"], spec.get("r", 4), spec["w"], spec.get("latents", "memory")
        compile_kind, _, compile_mode = spec["c"].partition("/")
        warmup = math.ceil(args.images / batch) + 3  # the first epoch (and compilation / graph capture)
        cfg = config(
            data_dir,
            tmp / "out",
            batch=batch,
            rank=rank,
            cache=cache,
            steps=args.steps,
            warmup=warmup,
            text_cache=spec.get("text", True),
            compile_kind=compile_kind,
            compile_mode=compile_mode or "default",
            channels_last=spec["cl"],
            cuda_graphs=spec["g"],
        )
        torch._dynamo.reset()  # each configuration compiles from scratch, as a fresh run would
        clear_text_caches()
        cfg.bucket.resolution = resolution
        cfg.data.num_workers = workers
        cfg.data.persistent_workers = workers > 0
        cfg.precision.mixed = "bf16" if cuda else "fp32"
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        clock = StepClock()
        training.loop.disable_input_dtype_casting = (
            keep_input_casting if spec.get("cast") else disable_input_dtype_casting
        )
        trainer = None
        setting = {
            "batch": batch,
            "rank": rank,
            "cache_latents": cache,
            "text_cache": spec.get("text", True),
            "workers": workers,
            "compile": spec["c"],
            "channels_last": spec["cl"],
            "cuda_graphs": spec["g"],
            "peft_input_cast": bool(spec.get("cast")),
        }
        try:
            trainer = Trainer(cfg, base, records, clock)
            started = time.perf_counter()
            trainer.fit(show_progress=False)
            total = time.perf_counter() - started
            end = cfg.train.max_steps
            seconds = clock.times[end] - clock.times[warmup]
            rate = args.steps * batch / seconds
            memory = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
            flops = count_flops(trainer)  # after training: a filled latent cache is not counted
            row = {
                **setting,
                "images_per_s": rate,
                "steps_per_s": args.steps / seconds,
                "peak_gib": memory,
                "tflop_per_image": flops / 1e12,
                "mfu": flops * rate / (peak * 1e12),
                "warmup_steps": warmup,
                "warmup_seconds": clock.times[warmup] - started,  # includes compilation
                "run_seconds": total,
            }
        except Exception as error:  # an OOM or a compile failure ends this row, not the benchmark
            row = {**setting, "error": f"{type(error).__name__}: {str(error)[:300]}"}
        finally:
            if trainer is not None:
                remove_lora(trainer.network)
            configure_compile(base.unet, "none", "default")
            del trainer
            training.loop.disable_input_dtype_casting = disable_input_dtype_casting
        rows.append(row)
        result["rows"] = rows
        (out / "results.json").write_text(json.dumps(result, indent=2))  # after each row: a timeout keeps them
        print(json.dumps(row), flush=True)

    splits = result["time_split_ms"]
    for batch, cache in () if args.no_split else ((1, "memory"), (4, "memory"), (4, "none")):
        cfg = config(data_dir, tmp / "out", batch=batch, rank=4, cache=cache, steps=8, warmup=1, text_cache=True)
        cfg.bucket.resolution = resolution
        cfg.precision.mixed = "bf16" if cuda else "fp32"
        split = time_split(cfg, base, records)
        splits[f"batch{batch}-{cache}"] = split
        print("time split (host ms per step)", batch, cache, json.dumps({k: round(v, 2) for k, v in split.items()}))
    (out / "results.json").write_text(json.dumps(result, indent=2))
    header = "| batch | rank | latents | workers | compile | channels-last | CUDA graphs | peft cast | img/s | it/s |"
    print("\n" + header + " peak GiB | MFU | warm-up s |")
    print("|---" * 13 + "|")
    for r in rows:
        head = (
            f"| {r['batch']} | {r['rank']} | {r['cache_latents']} | {r['workers']} | {r['compile']} | "
            f"{'on' if r['channels_last'] else 'off'} | {'on' if r['cuda_graphs'] else 'off'} | "
            f"{'on' if r['peft_input_cast'] else 'off'} |"
        )
        if "error" in r:
            print(f"{head} {r['error'][:60]} | | | | |")
        else:
            print(
                f"{head} {r['images_per_s']:.1f} | {r['steps_per_s']:.1f} | {r['peak_gib']:.1f} | "
                f"{r['mfu']:.1%} | {r['warmup_seconds']:.0f} |"
            )


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
