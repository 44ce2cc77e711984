"""Per-trial overhead of a real sweep: the share of each trial's time that is not training steps.

Writes the SD1.5-architecture model of ``bench_training.py`` (random weights) as a diffusers folder
and a synthetic 512 px dataset, then runs ``python -m sweeper -m network.dim=4,8,16`` on it exactly
as a user would (one worker process, so the base model, latent/text caches, CLIP scorer and
baseline score are reused after the first trial). Each trial's ``run.json`` holds its task wall
time and its training seconds; the rest (model load, caching, eval sampling, CLIP, saving, MLflow)
is the overhead.

    python benchmarks/bench_sweep.py --out results/ [--steps 300] [-- extra overrides...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_training import sd15_base_model, synthetic_dataset

from training.pipeline import sd_pipeline


def write_model(folder: Path) -> Path:
    base = sd15_base_model()
    pipeline = sd_pipeline(
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        unet=base.unet,
        scheduler=base.noise_scheduler,
    )
    pipeline.save_pretrained(folder, safe_serialization=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/out")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every trial")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp())
    started = time.perf_counter()
    model = write_model(work / "sd15-random")
    data = synthetic_dataset(work / "data", args.images, 512)
    print(f"model + data written in {time.perf_counter() - started:.0f} s", flush=True)

    sweep_dir = work / "multirun"
    command = [
        sys.executable,
        "-m",
        "sweeper",
        "-m",
        "network.dim=4,8,16",
        "model=diffusers",
        f"model.path={model}",
        f"data.train_dir={data}",
        "data.cache_latents=memory",
        f"train.max_steps={args.steps}",
        "train.batch_size=4",
        "eval.clip_model=tiny",
        f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
        f"hydra.sweep.dir={sweep_dir}",
        *args.overrides,
    ]
    print(" ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=work, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    total = time.perf_counter() - started

    trials = []
    for record in sorted(sweep_dir.glob("*/run.json"), key=lambda p: int(p.parent.name)):
        metrics = json.loads(record.read_text())["metrics"]
        wall, train = metrics["wall_time_s"], metrics["train/seconds"]
        trial = int(record.parent.name)
        phases = {k.removeprefix("time/"): round(v, 2) for k, v in metrics.items() if k.startswith("time/")}
        trials.append({"trial": trial, "wall_s": wall, "train_s": train, "overhead": 1 - train / wall, **phases})
        print(json.dumps(trials[-1]), flush=True)
    result = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(command),
        "sweep_wall_s": total,
        "trials": trials,
    }
    (out / "sweep.json").write_text(json.dumps(result, indent=2))
    print("\n| trial | task wall s | training s | not training |\n|---|---|---|---|")
    for t in trials:
        print(f"| {t['trial']} | {t['wall_s']:.1f} | {t['train_s']:.1f} | {t['overhead']:.1%} |")
    print(f"sweep wall time (process start to end): {total:.0f} s")


if __name__ == "__main__":
    main()
