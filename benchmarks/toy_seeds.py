"""The default run on several training seeds, per bundled concept: what issue 24's targets are measured with.

``run`` trains and evaluates one setting (the defaults plus ``--override``s, on ``data=<preset>``)
for each seed, in this process, and appends one JSON line per run to ``--out``: the run's
``concept_acc`` and ``clip_t`` with their 95% intervals and gains over the base model (the
intervals resample prompts: ``evaluation.stats``), the wall time, and each eval prompt's
``concept_acc`` and gain. Start one process per seed to measure seeds in parallel (with
``OMP_NUM_THREADS=1`` and ``CUDA_VISIBLE_DEVICES=`` for CPU runs). ``summary`` reads such files and
prints, per setting, the mean ``concept_acc`` over seeds, how many seeds' gain interval excludes 0,
and each prompt's mean gain over seeds.

    python benchmarks/toy_seeds.py run --data toy_star --seeds 42,43,44,45,46 --out runs.jsonl
    python benchmarks/toy_seeds.py summary runs.jsonl [more.jsonl ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

METRICS = ("concept_acc", "clip_t")


def per_prompt(prompts: list[str], values: list[float], baseline: list[float]) -> dict[str, dict[str, float]]:
    """Each prompt's mean value and mean paired gain over its samples, in first-seen order."""
    rows: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for prompt, value, base in zip(prompts, values, baseline, strict=True):
        rows[prompt].append((value, base))
    return {
        prompt: {
            "value": round(statistics.fmean(v for v, _ in pairs), 4),
            "gain": round(statistics.fmean(v - b for v, b in pairs), 4),
        }
        for prompt, pairs in rows.items()
    }


def run_seeds(data: str, seeds: list[int], overrides: list[str], out: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from hydra import compose, initialize_config_dir

    from sweeper.config.schema import register_configs, register_resolvers
    from sweeper.run.setting import run

    register_resolvers()
    register_configs()
    conf = Path(__file__).resolve().parent.parent / "conf"
    work = Path(tempfile.mkdtemp())
    for seed in seeds:
        settings = [f"data={data}", *overrides]
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            cfg = compose(
                config_name="config",
                overrides=[*settings, f"train.seed={seed}", "tracking=none", f"output.dir={work / str(seed)}"],
            )
        started = time.perf_counter()
        result = run(cfg, show_progress=False)
        metrics = result.metrics
        wall = round(time.perf_counter() - started, 1)
        row: dict = {"data": data, "overrides": overrides, "seed": seed, "wall_s": wall}
        row["selected_step"] = result.selected_step
        for name in METRICS:
            for suffix in ("", "/low", "/high"):
                row[f"{name}{suffix}"] = round(metrics[f"{name}{suffix}"], 4)
                row[f"{name}_gain{suffix}"] = round(metrics[f"{name}_gain{suffix}"], 4)
            row[f"{name}_baseline"] = round(metrics[f"{name}_baseline"], 4)
        row["per_prompt_concept_acc"] = per_prompt(
            result.prompts, result.per_image["concept_acc"], result.baseline_per_image["concept_acc"]
        )
        with out.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k != "per_prompt_concept_acc"}), flush=True)


def summarise(rows: list[dict]) -> list[dict]:
    """Per setting (data + overrides): seeds, mean/SD/min concept_acc, significant gains, per-prompt gains."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["data"], tuple(row["overrides"]))].append(row)
    table = []
    for (data, overrides), runs in sorted(groups.items()):
        accs = [r["concept_acc"] for r in runs]
        prompts = list(runs[0]["per_prompt_concept_acc"])
        prompt_gain = {
            p: round(statistics.fmean(r["per_prompt_concept_acc"][p]["gain"] for r in runs), 4) for p in prompts
        }
        table.append(
            {
                "data": data,
                "overrides": list(overrides),
                "seeds": sorted(r["seed"] for r in runs),
                "concept_acc_mean": round(statistics.fmean(accs), 4),
                "concept_acc_sd": round(statistics.stdev(accs), 4) if len(accs) > 1 else None,
                "concept_acc_min": min(accs),
                "baseline_mean": round(statistics.fmean(r["concept_acc_baseline"] for r in runs), 4),
                "gain_excludes_0": f"{sum(r['concept_acc_gain/low'] > 0 for r in runs)}/{len(runs)}",
                "gain_intervals": {r["seed"]: [r["concept_acc_gain/low"], r["concept_acc_gain/high"]] for r in runs},
                "clip_t_gain_mean": round(statistics.fmean(r["clip_t_gain"] for r in runs), 3),
                "prompt_gain_mean": prompt_gain,
                "every_prompt_gains": all(g > 0 for g in prompt_gain.values()),
                "wall_s_mean": round(statistics.fmean(r["wall_s"] for r in runs), 1),
            }
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("run", help="train and evaluate one setting on each seed")
    one.add_argument("--data", default="toy_star", help="data preset: toy_star, toy_moon, toy_arrow")
    one.add_argument("--seeds", default="42,43,44,45,46")
    one.add_argument("--override", action="append", default=[], help="a config override (repeatable)")
    one.add_argument("--out", type=Path, required=True, help="JSON lines file to append to")
    summary = commands.add_parser("summary", help="aggregate JSON lines files")
    summary.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args()
    if args.command == "run":
        run_seeds(args.data, [int(s) for s in args.seeds.split(",")], args.override, args.out)
    else:
        rows = [json.loads(line) for f in args.files for line in f.read_text().splitlines() if line.strip()]
        for entry in summarise(rows):
            print(json.dumps(entry))


if __name__ == "__main__":
    main()
