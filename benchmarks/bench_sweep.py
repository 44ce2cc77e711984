"""Per-trial overhead of a real sweep: the share of each trial's time that is not training steps.

Writes the SD1.5-architecture model of ``bench_training.py`` (random weights) as a diffusers folder
and a synthetic 512 px dataset, then runs ``python -m sweeper -m network.dim=4,8,16`` on it exactly
as a user would (one worker process, so the base model, latent/text caches, CLIP scorer and
baseline score are reused after the first trial). Each trial's ``run.json`` holds its task wall
time and its training seconds; the rest (model load, caching, eval sampling, CLIP, saving, MLflow)
is the overhead.

    python benchmarks/bench_sweep.py --out results/ [--steps 300] [--grid ...] [--workers 1,2] [-- overrides...]

``--workers 1,2`` runs the same sweep once per worker count (``hydra.sweeper.n_workers``; each
worker a process pinned to a GPU, round robin, so 2 on a one-GPU machine share it) in fresh stores,
and reports wall time, trials per hour, the speed-up over the first count, and checks that every
grid point ran exactly once under one MLflow parent run.
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


def write_model(folder: Path) -> Path:
    base = sd15_base_model()
    base.family.pipeline(base, base.noise_scheduler).save_pretrained(folder, safe_serialization=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/out")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--grid", default="network.dim=4,8,16", help="the swept overrides, space separated")
    parser.add_argument("--workers", default="1", help="comma-separated worker counts to run in turn (or auto)")
    parser.add_argument("--tracking", default="sqlite", choices=["sqlite", "file"], help="the local MLflow store")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every trial")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp())
    started = time.perf_counter()
    model = write_model(work / "sd15-random")
    data = synthetic_dataset(work / "data", args.images, 512)
    print(f"model + data written in {time.perf_counter() - started:.0f} s", flush=True)

    runs: list[dict] = []
    result = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "runs": runs,
    }
    for workers in args.workers.split(","):
        runs.append(run_sweep(work, model, data, args, workers))
        runs[-1]["speedup_vs_first"] = runs[0]["sweep_wall_s"] / runs[-1]["sweep_wall_s"]
        (out / "sweep.json").write_text(json.dumps(result, indent=2))  # after each, in case time runs out
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
        "train.batch_size=4",
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
