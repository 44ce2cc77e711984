"""A setting trained on K seeds (``train.replicates=K``): the replicates, their aggregate, the file to take.

One training run says what one seed gave; a user compares settings. Each replicate is an ordinary
run (``sweeper.run.task.run_once``) nested under the setting's MLflow run, on a seed derived from
``train.seed`` (the same K seeds for every setting: common random numbers, so settings pair by
seed), with the worker's loaded model, scorers and caches reused. The setting's run holds the
aggregate with intervals over seeds x prompts x images (``evaluation.replicates``).
"""

from __future__ import annotations

import copy
import hashlib
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict

from evaluation.evaluate import DIGITS
from evaluation.metric_names import DIRECTIONS, metric_name, shown_name
from evaluation.replicates import cells, setting_estimate
from evaluation.stats import mean_interval
from sweeper.config.eval_concept import choose_concept
from sweeper.config.validate import validate
from sweeper.run.task import RunResult, log_config, run_name, run_once, selection_objective
from sweeper.tracking.tracker import start_run
from training.atomic_file import write_atomically, write_text_atomically
from training.speed.memory import release_accelerator_memory


def replicate_seeds(seed: int, count: int, label: str | None = None) -> list[int]:
    """Replicate 0 trains on ``train.seed`` itself (so K = 1 is the plain run); replicate r on a seed
    derived from (seed, r). Every setting of a sweep gets the same list, unless ``sweep.label`` is
    set: each label then trains the same setting on seeds of its own (an A/A sweep)."""
    if label is not None:
        salt = int.from_bytes(hashlib.sha256(str(label).encode()).digest()[:4], "little")
        return [int(np.random.SeedSequence([seed, salt, r]).generate_state(1)[0] % 2**31) for r in range(count)]
    derived = [int(np.random.SeedSequence([seed, r]).generate_state(1)[0] % 2**31) for r in range(1, count)]
    return [seed, *derived]


def run_replicates(
    cfg: DictConfig, *, overrides: list[str] | None = None, report: Any = None, show_progress: bool = True
) -> RunResult:
    """Train the setting once per seed (skipping seeds an earlier attempt of this trial finished) and
    log the aggregate on the setting's run; the returned result is the setting's."""
    started = time.perf_counter()
    validated = validate(cfg)  # every problem at once, before the first replicate trains
    cfg.eval.prompts = validated.eval_prompts.prompts
    count, output_dir = int(cfg.train.replicates), Path(cfg.output.dir)
    seeds = replicate_seeds(cfg.train.seed, count, cfg.sweep.label)
    in_sweep = cfg.sweep.trial_number is not None and bool(cfg.sweep.storage)
    carried = _carried(cfg, seeds) if in_sweep else {}
    objective, maximize = selection_objective(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    tags = {"replicates": str(count), "replicate.seeds": ",".join(map(str, seeds))}
    if cfg.sweep.trial_number is not None:
        tags.update({"sweep.trial_number": str(cfg.sweep.trial_number), "sweep.study_name": cfg.sweep.study_name})
    with start_run(
        cfg.tracking,
        Path.cwd() / "outputs",
        run_name=f"{run_name(cfg, overrides)} ({count} seeds)",
        description=cfg.output.comment,
        parent_run_id=cfg.sweep.parent_run_id,
        tags=tags,
        local_dir=output_dir,
    ) as tracker:
        log_config(tracker, cfg, resolved, overrides, None)
        records: dict[int, dict[str, Any]] = {}
        for index, seed in enumerate(seeds):
            label = f"replicate {index + 1}/{count} (train.seed={seed})"
            if index in carried:
                records[index] = carried[index]
                print(f"{label}: finished by an earlier attempt (run {carried[index].get('run_id')}), not retrained")
                _record(cfg, index, carried[index])
                continue
            print(f"{label}")
            result = run_once(
                _replicate_config(cfg, index, seed, output_dir, tracker.run_id),
                overrides=overrides,
                report=report or _reporter(cfg, index),
                show_progress=show_progress,
                extra_tags={"replicate": str(index), "replicate.of": str(count), "replicate.seed": str(seed)},
                name=f"{run_name(cfg, overrides)} · seed {seed} ({index + 1}/{count})",
            )
            records[index] = replicate_record(index, seed, result)
            release_accelerator_memory()  # the replicate's trainer is unreachable only now
            _record(cfg, index, records[index])
            if result.stopped_early:
                print(f"{label}: pruned at step {result.metrics.get('train/steps_done', 0):.0f}; no further seeds")
                break
        done = [records[i] for i in sorted(records)]
        pruned = next((r for r in done if r["stopped_early"]), None)
        metrics = aggregate_metrics(done)
        lines = summary_lines(done, choose_concept(cfg).target)
        metrics["wall_time_s"] = time.perf_counter() - started
        representative = nearest_to_mean(done, metric_name(objective))
        lora_path = Path(representative["lora_file"])
        kept = output_dir / f"{cfg.output.name}{lora_path.suffix}"
        write_atomically(kept, lambda tmp: shutil.copyfile(lora_path, tmp))
        tracker.log_metrics(metrics)
        setting_tags = {
            "lora.representative_seed": str(representative["seed"]),
            "lora.representative_run_id": str(representative.get("run_id") or ""),
            "eval.objective": objective,
            "intervals": f"this setting ({len(done)} seeds): seeds x prompts x images",
        }
        if pruned is not None:
            setting_tags.update({"pruned": "true", "pruned_at_replicate": str(pruned["index"])})
            setting_tags["pruned_at_step"] = str(int(pruned["metrics"].get("train/steps_done", 0)))
        tracker.set_tags(setting_tags)
        tracker.log_artifact(kept, "lora")
        tracker.log_text(_replicates_table(done, metric_name(objective)), "eval/replicates.tsv")
        tracker.log_text("\n".join(lines) + "\n", "eval/summary.txt")
        write_text_atomically(output_dir / "replicates.tsv", _replicates_table(done, metric_name(objective)))
        return RunResult(
            metrics,
            kept,
            tracker.run_id,
            tracker.tracking_uri,
            stopped_early=pruned is not None,
            per_image=representative["per_image"],
            summary=lines,
            selected_step=int(representative["selected_step"]),
            prompts=representative["prompts"],
            baseline_per_image=representative["baseline_per_image"],
            replicates=done,
            experiment_id=tracker.experiment_id,
            objective=objective,
            higher_is_better=maximize,
        )


def replicate_record(index: int, seed: int, result: RunResult) -> dict[str, Any]:
    """What the aggregate and a resumed trial need of one replicate (JSON: kept on the Optuna trial)."""
    return {
        "index": index,
        "seed": seed,
        "run_id": result.run_id,
        "metrics": {k: v for k, v in result.metrics.items() if math.isfinite(v)},
        "per_image": result.per_image,
        "baseline_per_image": result.baseline_per_image,
        "prompts": result.prompts,
        "lora_file": str(result.lora_path),
        "lora_sha256": result.lora_sha256,
        "stopped_early": result.stopped_early,
        "selected_step": result.selected_step,
    }


def _clusters(record: dict[str, Any], values: list[float]) -> list[str] | None:
    return record["prompts"] if len(values) == len(record["prompts"]) else None


def metric_table(records: list[dict[str, Any]], name: str, *, gain: bool = False) -> np.ndarray:
    """``[seed, cell]`` of one metric (or its gain over the base model), cells = prompts' means."""
    rows = []
    for record in records:
        values = np.asarray(record["per_image"][name], float)
        if gain:
            values = values - np.asarray(record["baseline_per_image"][name], float)
        rows.append(cells(list(values), _clusters(record, list(values))))
    return np.stack(rows)


def aggregate_metrics(records: list[dict[str, Any]]) -> dict[str, float]:
    """Means over the replicates of every metric they all logged, then each evaluated metric's
    setting interval (``name/low``, ``name/high``), gain and seed SD (``name/seed_sd``)."""
    shared = set.intersection(*(set(r["metrics"]) for r in records))
    metrics = {key: float(np.mean([r["metrics"][key] for r in records])) for key in sorted(shared)}
    metrics["replicates"] = float(len(records))
    if len(records) < 2:
        return metrics
    for name in records[0]["per_image"]:
        if not all(name in r["baseline_per_image"] and name in r["per_image"] for r in records):
            continue
        for key, table in (
            (name, metric_table(records, name)),
            (f"{name}_gain", metric_table(records, name, gain=True)),
        ):
            if np.isnan(table).all():
                continue
            estimate = setting_estimate(table)
            metrics.update({key: estimate.mean, f"{key}/low": estimate.low, f"{key}/high": estimate.high})
        means = [float(np.nanmean(r["per_image"][name])) for r in records]
        metrics[f"{name}/seed_sd"] = float(np.std(means, ddof=1))
    for alias, name in (("clip_score", "clip_t"), ("clip_score_gain", "clip_t_gain")):
        if name in metrics:
            metrics[alias] = metrics[name]
    return metrics


def summary_lines(records: list[dict[str, Any]], concept: str | None = None) -> list[str]:
    """``clip_t 38.7 (36.9-40.4) [this setting (3 seeds)], base 36.9 [the base model], gain ...``;
    ``concept`` names what concept_acc counts (``concept_acc[star]``)."""
    if len(records) < 2:
        return []
    count, images = len(records), len(records[0]["prompts"])
    lines = []
    for metric in DIRECTIONS:
        if not all(metric in r["per_image"] and metric in r["baseline_per_image"] for r in records):
            continue
        digits = DIGITS.get(metric, 3)
        value = setting_estimate(metric_table(records, metric))
        gain = setting_estimate(metric_table(records, metric, gain=True))
        base_values = records[0]["baseline_per_image"][metric]
        base = mean_interval(base_values, clusters=_clusters(records[0], base_values))
        note = "" if gain.excludes(0.0) else f" (not distinguishable from 0 with {count} seeds x {images} images)"
        lines.append(
            f"{shown_name(metric, concept)} {value.text(digits=digits)} [{value.conditions}], "
            f"base {base.mean:.{digits}f}, "
            f"gain {gain.text(signed=True, digits=digits)} [{gain.conditions}]{note}"
        )
    return lines


def nearest_to_mean(records: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The replicate whose objective is closest to the setting's mean: the file that shows what the
    setting typically gives. The best seed's file would carry that seed's luck (the winner's curse)."""
    mean = float(np.mean([r["metrics"][key] for r in records]))
    on_disk = [r for r in records if Path(r["lora_file"]).exists()] or records  # a resume on another machine
    return min(on_disk, key=lambda r: (abs(r["metrics"][key] - mean), r["index"]))


def _replicates_table(records: list[dict[str, Any]], key: str) -> str:
    rows = ["replicate\tseed\t" + key + "\tmlflow_run_id\tlora_file"]
    for r in records:
        rows.append(
            f"{r['index']}\t{r['seed']}\t{r['metrics'].get(key, float('nan')):.4f}\t{r['run_id']}\t{r['lora_file']}"
        )
    return "\n".join(rows) + "\n"


def _replicate_config(
    cfg: DictConfig, index: int, seed: int, output_dir: Path, setting_run_id: str | None
) -> DictConfig:
    """The setting's config as one run: its seed, its own folder, nested under the setting's run."""
    replicate = copy.deepcopy(cfg)
    with open_dict(replicate):
        replicate.train.seed = seed
        replicate.train.replicates = 1
        replicate.output.dir = str(output_dir / f"seed-{seed}")
        if setting_run_id:
            replicate.sweep.parent_run_id = setting_run_id
    return replicate


def _reporter(cfg: DictConfig, index: int) -> Any:
    """The trial's pruner, seeing replicate ``index`` at its own offset (None outside a pruned sweep)."""
    if cfg.sweep.trial_number is None or not cfg.sweep.report_objective:
        return None
    from sweeper.search.trial import trial_reporter

    return trial_reporter(cfg.sweep, index)


def _carried(cfg: DictConfig, seeds: list[int]) -> dict[int, dict[str, Any]]:
    from sweeper.search.trial import carried_replicates

    found = carried_replicates(cfg.sweep)
    return {i: r for i, r in found.items() if i < len(seeds) and r.get("seed") == seeds[i] and not r["stopped_early"]}


def _record(cfg: DictConfig, index: int, record: dict[str, Any]) -> None:
    if cfg.sweep.trial_number is None or not cfg.sweep.storage:
        return
    from sweeper.search.trial import record_replicate

    record_replicate(cfg.sweep, index, record)
