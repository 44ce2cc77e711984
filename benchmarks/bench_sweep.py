"""Per-trial overhead of a real sweep: the share of each trial's time that is not training steps.

SDXL (issue 16) on one H200: the model folder written in about a minute, then 3 trials of 300
steps at batch 4 and 1024 px, about 6-7 minutes in all with CUDA graphs (target: at most 15% of a
300-step trial outside training):

    python3 benchmarks/bench_sweep.py --family sdxl --out $OUT train.cuda_graphs=true
    python3 benchmarks/bench_sweep.py --family sdxl --out $OUT --steps 150 --images 16 train.cuda_graphs=true
    python3 benchmarks/bench_sweep.py --family sdxl --tiny --steps 4 --images 8 --out /tmp/smoke  # CPU smoke run

SD1.5 (the default family):

    python benchmarks/bench_sweep.py --out results/ [--steps 300] [--grid ...] [--workers 1,2] [-- overrides...]

Writes the family's architecture with random weights as a diffusers folder (SD1.5: the model of
``bench_training.py``, fp32; SDXL: ``benchmarks/sdxl_model.py``, built on the GPU and saved in bf16,
about 7 GB) and a synthetic dataset at the model's native size (512 / 1024 px), then runs
``python -m sweeper -m network.dim=4,8,16`` on it exactly as a user would (one worker process, so
the base model, latent/text caches, CLIP scorer and baseline score are reused after the first
trial; ``model.kind`` is detected from the folder). Each trial's ``run.json`` holds its task wall
time and its training seconds; the rest (model load, caching, eval sampling, CLIP, saving, MLflow)
is the overhead, split by the trial's ``time/*`` phases: the first trial's ``setup_s`` includes
loading the model (``load_base_model`` reads the folder and upcasts it to fp32 on the CPU), its
``eval_s`` the base model's baseline score. ``--check-load`` (on with ``--tiny``) also times
``load_base_model`` on the folder in this process first.

``--workers 1,2`` runs the same sweep once per worker count (``hydra.sweeper.n_workers``; each
worker a process pinned to a GPU, round robin, so 2 on a one-GPU machine share it) in fresh stores,
and reports wall time, trials per hour, the speed-up over the first count, and checks that every
grid point ran exactly once under one MLflow parent run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_training import sd15_base_model, synthetic_dataset, tiny_base_model
from sdxl_model import sdxl_base_model, tiny_sdxl_base_model, write_folder


def write_model(folder: Path, family: str = "sd15", tiny: bool = False) -> int:
    """The benchmark model as a diffusers folder (SD1.5 in fp32 as before; SDXL built on the GPU, saved in
    bf16); returns its native resolution."""
    if family == "sd15":
        base = tiny_base_model() if tiny else sd15_base_model()
        base.family.pipeline(base, base.noise_scheduler).save_pretrained(folder, safe_serialization=True)
        return base.native_resolution
    if tiny:  # in bf16 as the full-size one, so the smoke run loads what a device run loads
        base = tiny_sdxl_base_model()
        write_folder(base, folder, torch.bfloat16)
        return base.native_resolution
    base = sdxl_base_model("cuda")
    resolution = base.native_resolution
    for part in (base.unet, base.vae, *base.text_encoders):
        part.to("cpu")  # safetensors writes from host memory
    write_folder(base, folder, torch.bfloat16)
    del base
    gc.collect()
    torch.cuda.empty_cache()  # the sweep's own process needs the GPU
    return resolution


def folder_gib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**30


def check_load(folder: Path) -> dict:
    """``load_base_model`` on the written folder, as a trial does (``model.source=diffusers``): seconds and dtypes."""
    from omegaconf import OmegaConf

    from sweeper.config import ModelConfig
    from training.families.loading import load_base_model

    started = time.perf_counter()
    base = load_base_model(OmegaConf.structured(ModelConfig(source="diffusers", path=str(folder))))
    seconds = time.perf_counter() - started
    parts = {
        "unet": base.unet,
        "vae": base.vae,
        **{f"text_encoder_{i + 1}": m for i, m in enumerate(base.text_encoders)},
    }
    dtypes = {name: str(next(part.parameters()).dtype).removeprefix("torch.") for name, part in parts.items()}
    report = {"load_s": seconds, "kind": base.kind, "native_resolution": base.native_resolution, "dtypes": dtypes}
    del base
    gc.collect()
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/out")
    parser.add_argument("--family", default="sd15", choices=("sd15", "sdxl"), help="the model's architecture")
    parser.add_argument("--tiny", action="store_true", help="the family's tiny model (a smoke run, CPU or GPU)")
    parser.add_argument("--steps", type=int, default=300, help="train.max_steps of every trial")
    parser.add_argument("--images", type=int, default=32, help="synthetic training images")
    parser.add_argument("--batch", type=int, default=4, help="train.batch_size")
    parser.add_argument("--check-load", action="store_true", help="time load_base_model on the folder first")
    parser.add_argument("--grid", default="network.dim=4,8,16", help="the swept overrides, space separated")
    parser.add_argument("--workers", default="1", help="comma-separated worker counts to run in turn (or auto)")
    parser.add_argument("--tracking", default="sqlite", choices=["sqlite", "file"], help="the local MLflow store")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every trial")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    sdxl = args.family == "sdxl"
    if sdxl and not cuda and not args.tiny:
        raise SystemExit("the SDXL model is built on a CUDA GPU (use --tiny for a CPU smoke run)")
    work = Path(tempfile.mkdtemp())
    started = time.perf_counter()
    model = work / f"{'tiny-' if args.tiny else ''}{args.family}-random"
    resolution = write_model(model, args.family, args.tiny)
    written = time.perf_counter() - started
    print(f"model written in {written:.0f} s ({folder_gib(model):.2f} GiB)", flush=True)
    data = synthetic_dataset(work / "data", args.images, resolution)
    print(f"model + data written in {time.perf_counter() - started:.0f} s", flush=True)

    runs: list[dict] = []
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "runs": runs,
    }
    if sdxl or args.tiny:
        result.update(
            family=args.family,
            tiny=args.tiny,
            resolution=resolution,
            steps=args.steps,
            images=args.images,
            batch=args.batch,
            model_write_s=written,
            model_gib=folder_gib(model),
        )
    results_file = out / ("sweep-sdxl.json" if sdxl else "sweep.json")
    if args.check_load or args.tiny:
        result["load"] = check_load(model)
        print("load_base_model:", json.dumps(result["load"]), flush=True)
        results_file.write_text(json.dumps(result, indent=2))
    for workers in args.workers.split(","):
        runs.append(run_sweep(work, model, data, args, workers))
        runs[-1]["speedup_vs_first"] = runs[0]["sweep_wall_s"] / runs[-1]["sweep_wall_s"]
        results_file.write_text(json.dumps(result, indent=2))  # after each, in case time runs out
    print("\n| workers | sweep wall s | trials/hour | speed-up | mean trial s | mean not-training share |")
    print("|---|---|---|---|---|---|")
    for run in runs:
        trials = run["trials"]
        mean_wall = sum(t["wall_s"] for t in trials) / len(trials)
        mean_overhead = sum(t["overhead"] for t in trials) / len(trials)
        print(
            f"| {run['workers']} | {run['sweep_wall_s']:.0f} | {run['trials_per_hour']:.0f} | "
            f"{run.get('speedup_vs_first', 1.0):.2f}x | {mean_wall:.1f} | {mean_overhead:.1%} |"
        )
    for run in runs:
        print_trials(run)


def print_trials(run: dict) -> None:
    """Each trial's time, where it went, and the not-training share of the trials after the first."""
    print(f"\nworkers {run['workers']}: per trial (seconds)")
    print("| trial | wall | training | not training | start | setup (+ model load) | fit | eval | save |")
    print("|---|---|---|---|---|---|---|---|---|")
    for t in run["trials"]:
        phases = " | ".join(f"{t.get(name, 0):.1f}" for name in ("start_s", "setup_s", "fit_s", "eval_s", "save_s"))
        print(f"| {t['trial']} | {t['wall_s']:.1f} | {t['train_s']:.1f} | {t['overhead']:.1%} | {phases} |")
    later = run["trials"][1:]
    if later:
        share = sum(t["overhead"] for t in later) / len(later)
        print(f"trials after the first: {share:.1%} of the wall time outside training (issue 16's target: <= 15%)")


def run_sweep(work: Path, model: Path, data: Path, args: argparse.Namespace, workers: str) -> dict:
    """One sweep with ``workers`` worker processes, in its own folder and stores."""
    folder = work / f"workers-{workers}"
    folder.mkdir()
    sweep_dir = folder / "multirun"
    tracking = f"sqlite:///{folder / 'mlflow.db'}" if args.tracking == "sqlite" else (folder / "mlruns").as_uri()
    command = [
        sys.executable,
        "-m",
        "sweeper",
        "-m",
        *args.grid.split(),
        "model=diffusers",
        f"model.path={model}",
        f"data.train_dir={data}",
        "data.cache_latents=memory",
        f"train.max_steps={args.steps}",
        f"train.batch_size={args.batch}",
        "eval.clip_model=tiny",
        f"tracking.uri={tracking}",
        f"hydra.sweep.dir={sweep_dir}",
        f"hydra.sweeper.n_workers={workers}",
        *args.overrides,
    ]
    print(" ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=folder, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    total = time.perf_counter() - started

    trials = []
    for record in sorted(sweep_dir.glob("*/run.json"), key=lambda p: int(p.parent.name)):
        metrics = json.loads(record.read_text())["metrics"]
        wall, train = metrics["wall_time_s"], metrics["train/seconds"]
        trial = int(record.parent.name)
        phases = {k.removeprefix("time/"): round(v, 2) for k, v in metrics.items() if k.startswith("time/")}
        trials.append({"trial": trial, "wall_s": wall, "train_s": train, "overhead": 1 - train / wall, **phases})
        print(json.dumps(trials[-1]), flush=True)
    return {
        "workers": workers,
        "command": " ".join(command),
        "sweep_wall_s": total,
        "trials_per_hour": 3600 * len(trials) / total,
        "trials": trials,
        **grid_checks(folder, tracking),
    }


def grid_checks(folder: Path, tracking: str) -> dict:
    """Every grid point exactly once (COMPLETE, no duplicates) and one MLflow parent run."""
    import optuna
    from mlflow.tracking import MlflowClient

    storage = f"sqlite:///{folder / 'outputs' / 'optuna.db'}"
    (summary,) = optuna.get_all_study_summaries(storage)
    trials = optuna.load_study(study_name=summary.study_name, storage=storage).get_trials()
    points = [tuple(sorted(t.params.items())) for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name("lora-sweeper")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    return {
        "optuna_trials": len(trials),
        "complete_points": len(points),
        "distinct_points": len(set(points)),
        "worker_pids": len({t.user_attrs.get("worker.pid") for t in trials}),
        "mlflow_parents": len(parents),
        "parent_status": parents[0].info.status if parents else None,
        "mlflow_children": sum("mlflow.parentRunId" in r.data.tags for r in runs),
    }


if __name__ == "__main__":
    main()
