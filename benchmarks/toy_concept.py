"""How well the toy world's default run teaches its concept, under candidate defaults, with intervals.

Runs ``sweeper.run.setting.run`` in one process (as a sweep worker does: the base model, CLIP and the
baseline are reused) for each variant of overrides on top of the defaults, and records concept_acc,
the paired concept and clip_t gains with their 95% intervals, and where the time went. Also
measures the cost of per-checkpoint evaluation (``eval.every_n_steps=100`` of 300 steps) against
none, on the second run of each so the first run's one-off setup is not counted.

    python benchmarks/toy_concept.py --out results/ [--precision fp32] [--variants default,more_images]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# kohya's LoCon-style targets: the attention/feed-forward layers plus the ResNet blocks' convolutions
CONV_TARGETS = "to_q,to_k,to_v,to_out.0,proj_in,proj_out,ff.net.0.proj,ff.net.2,conv1,conv2"
VARIANTS: dict[str, list[str]] = {
    "default": [],
    "seed7": ["train.seed=7"],
    "images4": ["eval.images_per_prompt=4"],
    "seeds3": ["eval.seeds=[1234,2345,3456]"],
    "steps600": ["train.max_steps=600"],
    "lr2e-3": ["optimizer.lr=2e-3"],
    "dim16": ["network.dim=16"],
    "steps600_lr2e-3": ["train.max_steps=600", "optimizer.lr=2e-3"],
    "steps600_images4": ["train.max_steps=600", "eval.images_per_prompt=4"],
    "steps600_images4_seed7": ["train.max_steps=600", "eval.images_per_prompt=4", "train.seed=7"],
    "lr2e-3_images4": ["optimizer.lr=2e-3", "eval.images_per_prompt=4"],
    "lr2e-3_images4_seed7": ["optimizer.lr=2e-3", "eval.images_per_prompt=4", "train.seed=7"],
    "guidance5_images4": ["eval.guidance_scale=5.0", "eval.images_per_prompt=4"],
    "guidance10_images4": ["eval.guidance_scale=10.0", "eval.images_per_prompt=4"],
    "dim16_seed7": ["network.dim=16", "train.seed=7"],
    "dim16_images4": ["network.dim=16", "eval.images_per_prompt=4"],
    "dim16_images4_seed7": ["network.dim=16", "eval.images_per_prompt=4", "train.seed=7"],
    "dim16_lr2e-3_images4": ["network.dim=16", "optimizer.lr=2e-3", "eval.images_per_prompt=4"],
    "conv_images4": [f"network.unet_targets=[{CONV_TARGETS}]", "eval.images_per_prompt=4"],
    "conv_images4_seed7": [f"network.unet_targets=[{CONV_TARGETS}]", "eval.images_per_prompt=4", "train.seed=7"],
    "dim16_te_images4": ["network.dim=16", "network.train_text_encoder=true", "eval.images_per_prompt=4"],
    "dim16_minsnr_images4": ["network.dim=16", "train.min_snr_gamma=5", "eval.images_per_prompt=4"],
    "dim32_images4": ["network.dim=32", "eval.images_per_prompt=4"],
    "moon": ["data=toy_moon"],
    "arrow": ["data=toy_arrow"],
}
# Shorter training with the best of two evaluated checkpoints and 8 images per prompt (48 in all).
for seed in (42, 7):
    short = ["train.max_steps=200", "eval.every_n_steps=100", "eval.images_per_prompt=8", f"train.seed={seed}"]
    VARIANTS[f"s200_e100_i8_seed{seed}"] = short
    VARIANTS[f"s200_e100_i8_inf10_seed{seed}"] = [*short, "eval.num_inference_steps=10"]
    VARIANTS[f"s200_e100_i8_dim16_seed{seed}"] = [*short, "network.dim=16"]
    VARIANTS[f"s200_e50_i8_seed{seed}"] = [*short, "eval.every_n_steps=50"]
    VARIANTS[f"s300_e100_i8_seed{seed}"] = [*short, "train.max_steps=300"]
EVAL_COST = {"eval_none": ["eval.every_n_steps=0"], "eval_every_100": ["eval.every_n_steps=100"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/out")
    parser.add_argument("--precision", default=None, help="precision.mixed for every run (fp32 mimics the CPU)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of VARIANTS")
    parser.add_argument("--eval-cost", action="store_true", help="also time per-checkpoint evaluation")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from hydra import compose, initialize_config_dir

    from sweeper.config.schema import register_configs, register_resolvers
    from sweeper.run.setting import run

    register_resolvers()
    register_configs()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp())
    conf = Path(__file__).resolve().parent.parent / "conf"
    common = ["tracking.enabled=false", f"output.dir={work / 'out'}"]
    if args.precision:
        common.append(f"precision.mixed={args.precision}")

    def one(name: str, overrides: list[str]) -> dict:
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            cfg = compose(config_name="config", overrides=common + overrides)
        started = time.perf_counter()
        result = run(cfg, show_progress=False)
        m = result.metrics
        row = {
            "variant": name,
            "overrides": overrides,
            "wall_s": round(time.perf_counter() - started, 2),
            "train_s": round(m["train/seconds"], 2),
            "eval_s": round(m["time/eval_s"], 2),
            "fit_s": round(m["time/fit_s"], 2),
            "selected_step": result.selected_step,
            "n_images": len(result.per_image["clip_t"]),
        }
        for metric in ("concept_acc", "clip_t", "clip_i"):
            for suffix in ("", "/low", "/high"):
                row[f"{metric}{suffix}"] = round(m[f"{metric}{suffix}"], 4)
                row[f"{metric}_gain{suffix}"] = round(m[f"{metric}_gain{suffix}"], 4)
            row[f"{metric}_baseline"] = round(m[f"{metric}_baseline"], 4)
        print(json.dumps(row), flush=True)
        return row

    rows = []
    if args.eval_cost:
        for name, overrides in EVAL_COST.items():
            for attempt in range(2):  # the second reuses the worker's model, CLIP and baseline, as later trials do
                row = one(f"{name}#{attempt}", overrides)
                row["overhead_share"] = round(1 - row["train_s"] / row["wall_s"], 4)
                rows.append(row)
    rows += [one(name, VARIANTS[name]) for name in args.variants.split(",") if name]
    (out / "toy_concept.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
