"""What the verdicts find and cost on the toy world (CPU, real training): A/A sweeps, the seed SD of
each metric, the smallest difference found at K = 1, 3, 5 seeds, and racing's saving on a grid.

    python benchmarks/bench_verdicts.py --out benchmarks/results/toy-verdicts-cpu-2026-12-06.json

Every setting is trained in this process through ``sweeper.run.setting.run`` with ``train.replicates=K``
(the model and caches are loaded once), exactly as a sweep trial trains it; tracking is off. The
A/A sweeps are 4 copies of the default setting (``sweep.label=a..d``: each copy on seeds of its own)
at two values of ``train.seed``. The racing grid is trained on every seed once; racing is then
replayed on those runs (training is bit-identical per seed, so a racing sweep trains exactly these
runs for the seeds it asks for) and its verdict compared with the full-replicate one.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from evaluation.replicates import verdict  # noqa: E402
from sweeper.run.replicates import metric_table  # noqa: E402

METRICS = ("clip_t", "clip_i", "concept_acc")


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from sweeper.config.schema import register_configs, register_resolvers

    register_resolvers()
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def train(overrides: list[str], seeds: int, out: Path) -> tuple[list[dict], float]:
    """One setting on ``seeds`` seeds: its replicate records and the wall time."""
    from sweeper.run.setting import run

    cfg = compose([f"output.dir={out}", "tracking.enabled=false", f"train.replicates={seeds}", *overrides])
    start = time.perf_counter()
    result = run(cfg, show_progress=False)
    return result.replicates, time.perf_counter() - start


def runs_of(settings: dict[str, list[dict]], metric: str, upto: int | None = None) -> dict[str, dict[int, np.ndarray]]:
    return {
        name: {i: row for i, row in enumerate(metric_table(records[:upto] if upto else records, metric))}
        for name, records in settings.items()
    }


def aa(base: list[str], seeds: int, train_seed: int, tmp: Path) -> dict:
    """4 copies of one setting: any 'significantly different' is a false verdict."""
    settings, seconds = {}, []
    for label in "abcd":
        records, wall = train(
            [*base, f"train.seed={train_seed}", f"sweep.label={label}"], seeds, tmp / f"aa{train_seed}{label}"
        )
        settings[label], seconds = records, [*seconds, wall]
    found = {}
    for metric in METRICS:
        judged = verdict(runs_of(settings, metric))
        components = judged.components
        found[metric] = {
            "false_verdict": judged.any_significant,
            "adjusted_p_min": min(c.adjusted_p for c in judged.against_best.values()),
            "seed_sd": components.seed_sd(),
            "run_means": {k: [float(np.mean(r["per_image"][metric])) for r in v] for k, v in settings.items()},
            "detectable": {k: components.detectable(k) for k in (1, 3, 5)},
        }
    return {"train_seed": train_seed, "seconds_per_setting": seconds, "metrics": found}


def race(settings: dict[str, list[dict]], metric: str, max_seeds: int) -> tuple[dict[str, int], object]:
    """Replay racing: every setting on 2 seeds; the contender with fewest seeds gets one more, up to max."""
    have = dict.fromkeys(settings, 2)
    while True:
        runs = {
            name: {i: row for i, row in enumerate(metric_table(settings[name][: have[name]], metric))}
            for name in settings
        }
        judged = verdict(runs)
        out = {n for n, c in judged.against_best.items() if c.significant}
        contenders = [n for n in settings if n not in out and have[n] < max_seeds]
        if not contenders:
            return have, judged
        have[min(contenders, key=lambda n: (have[n], list(settings).index(n)))] += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--images", type=int, default=4, help="eval images per prompt")
    parser.add_argument("--sampling-steps", type=int, default=10)
    parser.add_argument("--aa-seeds", type=int, default=3)
    parser.add_argument("--race-seeds", type=int, default=5)
    parser.add_argument("--skip-race", action="store_true")
    parser.add_argument("--skip-aa", action="store_true", help="keep the A/A part of an earlier --out file")
    args = parser.parse_args()
    base = [
        f"train.max_steps={args.steps}",
        "eval.every_n_steps=0",
        "eval.select=last",
        f"eval.images_per_prompt={args.images}",
        f"eval.num_inference_steps={args.sampling_steps}",
    ]
    result: dict = {"settings": base, "aa": [], "race": None}
    if args.skip_aa and args.out.is_file():
        result["aa"] = json.loads(args.out.read_text())["aa"]
    with tempfile.TemporaryDirectory() as tmp:
        for train_seed in () if args.skip_aa else (42, 7):
            result["aa"].append(aa(base, args.aa_seeds, train_seed, Path(tmp)))
            print(json.dumps(result["aa"][-1]["metrics"], indent=1, default=float), flush=True)
            args.out.write_text(json.dumps(result, indent=1, default=float))
        if not args.skip_race:
            grid = list(itertools.product(("1e-4", "3e-4", "1e-3", "3e-3"), (4, 16)))
            settings, seconds = {}, []
            for lr, dim in grid:
                name = f"lr={lr} dim={dim}"
                folder = Path(tmp) / f"lr{lr}-dim{dim}"  # no '=' in a Hydra override's value
                records, wall = train([*base, f"optimizer.lr={lr}", f"network.dim={dim}"], args.race_seeds, folder)
                settings[name], seconds = records, [*seconds, wall]
                print(f"{name}: {wall:.0f} s", flush=True)
            full = verdict(runs_of(settings, "clip_t"))
            have, raced = race(settings, "clip_t", args.race_seeds)
            worse = lambda v: sorted(n for n, c in v.against_best.items() if c.significant)  # noqa: E731
            result["race"] = {
                "grid": [f"lr={lr} dim={dim}" for lr, dim in grid],
                "seconds_per_setting": seconds,
                "full": {"best": full.best, "worse": worse(full)},
                "racing": {"best": raced.best, "worse": worse(raced), "seeds": have},
                "seed_runs": {"racing": sum(have.values()), "full": len(grid) * args.race_seeds},
                "run_means": {k: [float(np.mean(r["per_image"]["clip_t"])) for r in v] for k, v in settings.items()},
            }
            print(json.dumps(result["race"], indent=1, default=float), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=float))


if __name__ == "__main__":
    main()
