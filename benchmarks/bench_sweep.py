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

``--replicates K`` (issue 22) passes ``hydra.sweeper.replicates=K``: each setting trains on K seeds
in the same worker, each seed an ordinary run nested under the setting's MLflow run with its own
``<trial>/seed-<seed>/run.json``. The script then reads every replicate's record and reports its
wall time, training seconds and the rest, and what one more seed costs: replicates 2..K of a
setting against its first, and against the first replicate of the first setting (which also pays
the model load, the caches and the baseline score). Time per replicate on one GPU, SD1.5 scale
(benchmarks/RESULTS.md, "Time per replicate"; about 6 minutes on an H100):

    python3 benchmarks/bench_sweep.py --out $OUT --grid network.dim=4,8,16 --replicates 3 train.cuda_graphs=true
    python3 benchmarks/bench_sweep.py --tiny --steps 4 --images 8 --replicates 2 --out /tmp/smoke  # CPU smoke run

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
    for part in (base.denoiser, base.vae, *base.text_encoders):
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

    from sweeper.config.schema import ModelConfig
    from training.families.loading import load_base_model

    started = time.perf_counter()
    base = load_base_model(OmegaConf.structured(ModelConfig(source="diffusers", path=str(folder))))
    seconds = time.perf_counter() - started
    parts = {
        "unet": base.denoiser,
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
    parser.add_argument(
        "--replicates", type=int, default=None, help="hydra.sweeper.replicates: train each setting on this many seeds"
    )
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
    if args.replicates is not None:
        result.update(replicates=args.replicates, steps=args.steps, images=args.images, batch=args.batch)
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
    results_file = out / ("sweep-sdxl.json" if sdxl else "sweep-replicates.json" if args.replicates else "sweep.json")
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
    if "replicates" in run:
        print_replicates(run)
        return
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
        *([f"hydra.sweeper.replicates={args.replicates}"] if args.replicates is not None else []),
        *args.overrides,
    ]
    print(" ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=folder, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    total = time.perf_counter() - started
    if args.replicates is not None:
        replicated = read_replicates(sweep_dir, tracking, [g.split("=", 1)[0] for g in args.grid.split()])
        return {
            "workers": workers,
            "command": " ".join(command),
            "sweep_wall_s": total,
            "trials_per_hour": 3600 * len(replicated["trials"]) / total,
            "replicates_per_hour": 3600 * len(replicated["replicates"]) / total,
            **replicated,
            **grid_checks(folder, tracking),
        }

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


def _replicate_order(trial_dir: Path) -> list[tuple[int, int]]:
    """(index, seed) of a setting's replicates: its ``replicates.tsv``, else its seed folders by finishing time."""
    table = trial_dir / "replicates.tsv"
    if table.exists():
        rows = [line.split("\t") for line in table.read_text().splitlines()[1:] if line.strip()]
        return [(int(row[0]), int(row[1])) for row in rows]
    records = sorted(trial_dir.glob("seed-*/run.json"), key=lambda p: p.stat().st_mtime)
    return [(i, int(p.parent.name.removeprefix("seed-"))) for i, p in enumerate(records)]


def _median(values: list[float]) -> float | None:
    values = sorted(values)
    if not values:
        return None
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


def read_replicates(sweep_dir: Path, tracking: str, swept: list[str]) -> dict:
    """Every replicate's ``run.json`` (``<trial>/seed-<seed>/``), each setting's own run from MLflow, and
    what a replicate after the first costs."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name("lora-sweeper")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    settings = {r.data.tags["sweep.trial_number"]: r for r in runs if "replicates" in r.data.tags}
    replicates, trials = [], []
    trial_dirs = [d for d in sweep_dir.iterdir() if d.is_dir() and d.name.isdigit()]
    for trial_dir in sorted(trial_dirs, key=lambda d: int(d.name)):
        trial = int(trial_dir.name)
        rows = []
        for index, seed in _replicate_order(trial_dir):
            record = trial_dir / f"seed-{seed}" / "run.json"
            if not record.exists():
                continue
            data = json.loads(record.read_text())
            metrics = data["metrics"]
            wall, train = metrics["wall_time_s"], metrics["train/seconds"]
            phases = {k.removeprefix("time/"): round(v, 2) for k, v in metrics.items() if k.startswith("time/")}
            rows.append(
                {
                    "trial": trial,
                    "replicate": index + 1,
                    "seed": seed,
                    "wall_s": wall,
                    "train_s": train,
                    "overhead_s": wall - train,
                    "overhead": 1 - train / wall,
                    **phases,
                    "steps": metrics.get("train/steps_done"),
                    "peak_memory_mb": metrics.get("peak_memory_mb"),
                    "mlflow_run_id": data.get("mlflow_run_id"),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        replicates.extend(rows)
        setting = settings.get(str(trial))
        replicate_wall = sum(r["wall_s"] for r in rows)
        wall = setting.data.metrics.get("wall_time_s") if setting is not None else None
        later = [r["wall_s"] for r in rows[1:]]
        first = rows[0]["wall_s"] if rows else None
        trials.append(
            {
                "trial": trial,
                "params": {k: setting.data.params.get(k) for k in swept} if setting is not None else {},
                "replicates": len(rows),
                "seeds": [r["seed"] for r in rows],
                "setting_run_id": setting.info.run_id if setting is not None else None,
                "nested_runs": sum(
                    1
                    for r in runs
                    if setting is not None and r.data.tags.get("mlflow.parentRunId") == setting.info.run_id
                ),
                # wall_s / train_s / overhead as a plain trial's, so the sweep table reads the same
                "wall_s": wall if wall is not None else replicate_wall,
                "train_s": sum(r["train_s"] for r in rows),
                "overhead": 1 - sum(r["train_s"] for r in rows) / (wall or replicate_wall or float("nan")),
                "replicates_wall_s": replicate_wall,
                "outside_replicates_s": None if wall is None else wall - replicate_wall,
                "first_wall_s": first,
                "later_median_wall_s": _median(later),
                "later_vs_first": None if not later else _median(later) / first,
            }
        )
    later = replicates[1:]
    later_in_setting = [r for r in replicates if r["replicate"] > 1]
    summary = {
        "first_replicate_first_trial_wall_s": replicates[0]["wall_s"] if replicates else None,
        "first_replicate_first_trial_train_s": replicates[0]["train_s"] if replicates else None,
        "first_replicate_first_trial_overhead_s": replicates[0]["overhead_s"] if replicates else None,
        # every replicate but the very first: what one more seed (or one more setting's first seed) costs
        "later_replicates": len(later),
        "later_median_wall_s": _median([r["wall_s"] for r in later]),
        "later_median_train_s": _median([r["train_s"] for r in later]),
        "later_median_overhead_s": _median([r["overhead_s"] for r in later]),
        # replicates 2..K of each setting only: the price of K
        "replicates_2_to_k": len(later_in_setting),
        "replicates_2_to_k_median_wall_s": _median([r["wall_s"] for r in later_in_setting]),
        "replicates_2_to_k_median_train_s": _median([r["train_s"] for r in later_in_setting]),
        "replicates_2_to_k_median_overhead_s": _median([r["overhead_s"] for r in later_in_setting]),
        "first_of_later_settings_wall_s": [t["first_wall_s"] for t in trials[1:]],
        "same_seeds_every_setting": len({tuple(t["seeds"]) for t in trials}) == 1,
    }
    if replicates and summary["replicates_2_to_k_median_wall_s"]:
        summary["first_over_replicates_2_to_k"] = replicates[0]["wall_s"] / summary["replicates_2_to_k_median_wall_s"]
    return {"replicates": replicates, "trials": trials, "replicate_summary": summary}


def print_replicates(run: dict) -> None:
    """Each replicate's time and where it went; then what a replicate after the first costs."""
    print(f"\nworkers {run['workers']}: per replicate (seconds)")
    print("| trial | replicate | seed | wall | train | overhead | start | setup (+ model load) | fit | eval | save |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in run["replicates"]:
        phases = " | ".join(f"{r.get(name, 0):.1f}" for name in ("start_s", "setup_s", "fit_s", "eval_s", "save_s"))
        print(
            f"| {r['trial']} | {r['replicate']} | {r['seed']} | {r['wall_s']:.1f} | {r['train_s']:.1f} | "
            f"{r['overhead_s']:.1f} | {phases} |"
        )
    print("\n| trial | params | seeds | setting wall | sum of replicates | outside replicates | first | later (med) |")
    print("|---|---|---|---|---|---|---|---|")
    for t in run["trials"]:
        outside = t["outside_replicates_s"]
        later = t["later_median_wall_s"]
        print(
            f"| {t['trial']} | {' '.join(f'{k}={v}' for k, v in t['params'].items())} | {t['replicates']} | "
            f"{t['wall_s']:.1f} | {t['replicates_wall_s']:.1f} | {'-' if outside is None else f'{outside:.1f}'} | "
            f"{t['first_wall_s'] or 0:.1f} | {'-' if later is None else f'{later:.1f}'} |"
        )
    s = run["replicate_summary"]
    if s["replicates_2_to_k_median_wall_s"] is not None:
        first, later = s["first_replicate_first_trial_wall_s"], s["replicates_2_to_k_median_wall_s"]
        print(
            f"first replicate of the first setting {first:.1f} s "
            f"(train {s['first_replicate_first_trial_train_s']:.1f}); replicates 2..K (median of "
            f"{s['replicates_2_to_k']}): {later:.1f} s (train {s['replicates_2_to_k_median_train_s']:.1f}, "
            f"other {s['replicates_2_to_k_median_overhead_s']:.1f}); every replicate after the very first "
            f"(median of {s['later_replicates']}): {s['later_median_wall_s']:.1f} s"
        )


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
