"""Where a training step's time goes on the GPU: host syncs, GPU busy time, the top kernels.

Runs ``training.loop.Trainer`` on the SD1.5-scale benchmark model (``bench_training``) and, per
configuration, (1) lists every host synchronisation inside the steady-state step (torch's
``cuda.set_sync_debug_mode``, with the project frame that caused it), (2) profiles a few steps with
CUDA activity: wall ms per step, GPU kernel ms per step (the rest is the GPU waiting for the
host), the top kernels and the top host calls. With ``--grad-check`` it also compares LoRA
gradients of whole-UNet ``torch.compile`` backends with eager ones (fp32).

    python benchmarks/diagnose_step.py --out $OUT [--configs 1,4,32] [--grad-check]
    python3 -m benchmarks.diagnose_step --family sdxl --out $OUT --configs 1,4 --images 16  # SDXL at 1024 px
    python3 -m benchmarks.diagnose_step --family sdxl --tiny --configs 1 --images 4 --out /tmp/smoke  # CPU smoke
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

from benchmarks.bench_training import StepClock, config, sd15_base_model, synthetic_dataset, tiny_base_model
from benchmarks.sdxl_model import sdxl_base_model, tiny_sdxl_base_model
from benchmarks.step_profile import profile_steps, run_more
from training.data.scan import scan_dataset
from training.loop import Trainer
from training.network.lora import remove_lora


def sync_sites(trainer: Trainer, steps: int = 3) -> dict[str, int]:
    """Each host synchronisation in ``steps`` steps, by the innermost project frame that caused it."""
    sites: collections.Counter[str] = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        frames = [
            f"{Path(f.filename).name}:{f.lineno} {f.name}"
            for f in traceback.extract_stack()
            if "/training/" in f.filename or "/sweeper/" in f.filename or "/evaluation/" in f.filename
        ]
        sites[f"{str(message)[:80]} @ {' < '.join(reversed(frames[-3:]))}"] += 1

    old = warnings.showwarning
    warnings.showwarning = record
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            run_more(trainer, steps)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = old
    return dict(sites)


def grad_check(base, records, data_dir: Path, out_dir: Path) -> dict[str, float]:
    """Max relative LoRA-gradient difference of whole-UNet compile backends against eager (fp32)."""
    cfg = config(data_dir, out_dir, batch=1, rank=4, cache="memory", steps=1, warmup=1, text_cache=True)
    cfg.precision.mixed = "fp32"
    for part in (base.denoiser, base.vae, *base.text_encoders):
        part.to(torch.float32)  # earlier bf16 runs converted the shared model
    trainer = Trainer(cfg, base, records, StepClock())
    batch = next(iter(trainer.loader))

    def grads() -> dict[str, torch.Tensor]:
        trainer.noise_rng.manual_seed(0)
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer._loss(batch).backward()
        return {n: p.grad.detach().clone() for n, p in base.denoiser.named_parameters() if p.grad is not None}

    trainer.position.epoch = 1
    eager = grads()
    report = {"lora_tensors_with_grad": len(eager)}
    for backend in ("inductor", "aot_eager", "cudagraphs"):
        torch._dynamo.reset()
        base.denoiser.compile(backend=backend)
        try:
            compiled = grads()
            worst = max(((compiled[n] - g).norm() / (g.norm() + 1e-12)).item() for n, g in eager.items())
            report[backend] = worst
            report[f"{backend}_missing"] = len(set(eager) - set(compiled))
        except Exception as error:  # a backend that fails is a finding, not the end of the run
            report[backend] = f"{type(error).__name__}: {str(error)[:200]}"
        finally:
            base.denoiser._compiled_call_impl = None
    remove_lora(trainer.network)
    base.denoiser.to(torch.float32)
    return report


VARIANTS = {
    "eager": {},
    "channels_last": {"channels_last": True},
    "unet/cudagraphs": {"backend": "cudagraphs"},
    "unet/inductor": {"backend": "inductor"},
    "unet/inductor-reduce-overhead": {"backend": "inductor", "mode": "reduce-overhead"},
}


def variant_speed(base, records, data_dir: Path, out_dir: Path, batch: int, name: str, steps: int = 20) -> dict:
    """Steady-state images/s of the loop with the whole UNet compiled one way (bf16, cached latents)."""
    options = VARIANTS[name]
    cfg = config(data_dir, out_dir, batch=batch, rank=4, cache="memory", steps=1, warmup=1, text_cache=True)
    cfg.bucket.resolution = base.native_resolution
    workers = 0 if batch == 1 else 4
    cfg.data.num_workers, cfg.data.persistent_workers = workers, workers > 0
    torch._dynamo.reset()
    trainer = Trainer(cfg, base, records, StepClock())
    if options.get("channels_last"):
        base.denoiser.to(memory_format=torch.channels_last)
    if "backend" in options:
        base.denoiser.compile(backend=options["backend"], mode=options.get("mode"))
    try:
        started = time.perf_counter()
        trainer.total_steps = -(-len(records) // batch) + 3
        trainer.fit(show_progress=False)
        torch.cuda.synchronize()
        warm = time.perf_counter() - started
        started = time.perf_counter()
        run_more(trainer, steps)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        return {"images_per_s": steps * batch / seconds, "steps_per_s": steps / seconds, "warmup_s": warm}
    except Exception as error:
        return {"error": f"{type(error).__name__}: {str(error)[:300]}"}
    finally:
        base.denoiser._compiled_call_impl = None
        base.denoiser.to(memory_format=torch.contiguous_format)
        remove_lora(trainer.network)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/out")
    parser.add_argument("--configs", default="1,4,32", help="batch sizes to diagnose (eager, text cache on)")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--grad-check", action="store_true")
    parser.add_argument("--variants", default="", help="batch:variant,... speed of whole-UNet variants")
    parser.add_argument("--tiny", action="store_true", help="the tiny model on the CPU: a smoke run of this script")
    parser.add_argument("--family", default="sd15", choices=("sd15", "sdxl"), help="the model's architecture")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    if args.family == "sdxl":
        base = tiny_sdxl_base_model() if args.tiny else sdxl_base_model("cuda")
    else:
        base = tiny_base_model() if args.tiny else sd15_base_model()
    tmp = Path(tempfile.mkdtemp())
    data_dir = synthetic_dataset(tmp / "data", args.images, base.native_resolution)
    records = scan_dataset(data_dir).records
    report: dict = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if cuda else "cpu"}
    for batch in [int(b) for b in args.configs.split(",") if b]:
        workers = 0 if batch == 1 else 4
        cfg = config(data_dir, tmp / "out", batch=batch, rank=4, cache="memory", steps=1, warmup=1, text_cache=True)
        cfg.bucket.resolution = base.native_resolution
        cfg.data.num_workers, cfg.data.persistent_workers = workers, workers > 0
        cfg.precision.mixed = "bf16" if cuda else "fp32"
        trainer = Trainer(cfg, base, records, StepClock())
        trainer.total_steps = -(-args.images // batch) + 3  # one epoch fills the latent cache
        trainer.fit(show_progress=False)
        entry = {"syncs": sync_sites(trainer), **profile_steps(trainer)} if cuda else {}
        report[f"batch{batch}"] = entry
        print(f"batch {batch}", json.dumps(entry, indent=1), flush=True)
        remove_lora(trainer.network)
        del trainer
        (out / "diagnose.json").write_text(json.dumps(report, indent=1))

    for item in [v for v in args.variants.split(",") if v]:
        batch, name = item.split(":")
        result = variant_speed(base, records, data_dir, tmp / "out", int(batch), name)
        report[f"variant {item}"] = result
        print("variant", item, json.dumps(result), flush=True)
        (out / "diagnose.json").write_text(json.dumps(report, indent=1))
    if args.grad_check:
        report["grad_check"] = grad_check(base, records, data_dir, tmp / "out")
        print("grad check", json.dumps(report["grad_check"]), flush=True)
    (out / "diagnose.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
