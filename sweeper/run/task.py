"""The task: one complete LoRA run (validate, setup, fit, evaluate, save, record) -> its metrics.

A single run and every sweep trial reach ``run_once`` through ``sweeper.run.setting.run`` (which trains
one seed, or several with ``train.replicates``); a trial only adds its bookkeeping around it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import resource
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig, OmegaConf

from evaluation.clip_score import ClipScorer
from evaluation.dino import DinoEmbedder
from evaluation.evaluate import EvalResult, References, Scorers, evaluate, summary_lines
from evaluation.grid import image_grid
from evaluation.metric_names import DIRECTIONS, evaluated_metric, metric_name
from evaluation.sampling import sampling_scheduler
from sweeper.config.eval_concept import choose_concept
from sweeper.config.validate import validate
from sweeper.run.fingerprint import code_version, dataset_fingerprint, file_sha256, fingerprint_digest, training_config
from sweeper.run.startup_report import report_data, report_sizes, scores_note
from sweeper.tracking.tracker import flatten, start_run, ui_command
from training.atomic_file import write_atomically, write_text_atomically
from training.checkpoint import save_training_state
from training.data.buckets import bucket_table
from training.data.dataset import load_rgb, oriented_size, small_images
from training.data.validation import VAL_SEED, HeldOut, split_held_out
from training.families.loading import RUNTIME_MODEL_KEYS, BaseModel, load_base_model
from training.loop import Trainer
from training.network.file import LoraNotSavedError, bundle_embeddings, lora_identity, read_metadata, save_lora
from training.network.lora import remove_leftover_adapters, remove_lora
from training.network.metadata import DatasetSummary, kohya_metadata, summarize_dataset, training_metadata
from training.network.types import NETWORK_MODULES
from training.text.tag_stats import tag_frequencies, tag_frequencies_by_folder, tag_table

if TYPE_CHECKING:  # the sweep's pruner hook; sweeper.search imports Optuna, which a single run does not need
    from sweeper.search.trial import EvalReporter


@dataclass
class RunResult:
    metrics: dict[str, float]
    lora_path: Path
    run_id: str | None
    tracking_uri: str | None
    per_prompt: dict[str, float] = field(default_factory=dict)
    stopped_early: bool = False
    lora_sha256: str = ""
    per_image: dict[str, list[float]] = field(default_factory=dict)  # the selected evaluation's values
    summary: list[str] = field(default_factory=list)  # one line per metric: value (interval), base, gain
    selected_step: int = 0
    prompts: list[str] = field(default_factory=list)  # each per-image value's prompt (the clusters)
    baseline_per_image: dict[str, list[float]] = field(default_factory=dict)  # the base model's, same images
    replicates: list[Any] = field(default_factory=list)  # with train.replicates > 1: each seed's record
    note: str | None = None  # said under the scores: model=tiny's are of a random model and mean nothing

    experiment_id: str | None = None
    objective: str = "clip_score"  # what the printed runs page sorts by, best first
    higher_is_better: bool = True

    @property
    def ui_command(self) -> str | None:
        if not self.tracking_uri:
            return None
        return ui_command(self.tracking_uri, self.experiment_id, self.objective, self.higher_is_better)


def run_once(
    cfg: DictConfig,
    *,
    overrides: list[str] | None = None,
    report: EvalReporter | None = None,
    show_progress: bool = True,
    extra_tags: dict[str, str] | None = None,
    name: str | None = None,
) -> RunResult:
    """Train, evaluate and save one LoRA as ``cfg`` says, tracked as one MLflow run.

    In a sweep trial ``cfg.sweep`` names the trial: the run nests under the sweep's parent run and
    its periodic CLIP scores go to the trial's pruner (unless ``report`` is given explicitly).
    """
    run = _Run(cfg, overrides, report, show_progress)
    run.validate()
    with run.tracked(name, extra_tags):
        try:
            run.setup()
            run.fit()
            run.evaluate()
            run.save()
        finally:
            run.release()
        return run.record()


class _Run:
    """One run's stages: validate -> setup -> fit -> evaluate -> save, then what is recorded of it.
    Each stage leaves on ``self`` what the later ones read."""

    def __init__(
        self, cfg: DictConfig, overrides: list[str] | None, report: EvalReporter | None, show_progress: bool
    ) -> None:
        self.cfg, self.overrides, self.report, self.show_progress = cfg, overrides, report, show_progress
        self.started, self.started_at = time.perf_counter(), time.time()
        self.checkpoints: list[Checkpoint] = []
        self.phases: dict[str, float] = {}

    # --- validate
    def validate(self) -> None:
        """Every problem at once, before any model is loaded; the resolved config the run records."""
        cfg = self.cfg
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()  # peak_memory_mb is this run's, not the worker's so far
        self.validated = validate(cfg)
        # eval.prompts=null made concrete, so params, the baseline cache and a reproduction all see the same prompts
        cfg.eval.prompts = self.validated.eval_prompts.prompts
        self.resolved = OmegaConf.to_container(cfg, resolve=True)
        self.output_dir = Path(cfg.output.dir)
        trial = cfg.sweep.trial_number
        if self.report is None and trial is not None and cfg.sweep.report_objective:
            from sweeper.search.trial import trial_reporter

            self.report = trial_reporter(cfg.sweep)

    @contextlib.contextmanager
    def tracked(self, name: str | None, extra_tags: dict[str, str] | None) -> Iterator[Any]:
        """The run's MLflow run, with its config and what the data check found logged first."""
        cfg, validated, trial = self.cfg, self.validated, self.cfg.sweep.trial_number
        trial_tags = (
            None if trial is None else {"sweep.trial_number": str(trial), "sweep.study_name": cfg.sweep.study_name}
        )
        with start_run(
            cfg.tracking,
            Path.cwd() / "outputs",
            run_name=name or run_name(cfg, self.overrides),
            description=cfg.output.comment,
            parent_run_id=cfg.sweep.parent_run_id,
            tags=trial_tags,
            local_dir=self.output_dir,  # what does not reach the tracking store is listed and kept here
        ) as tracker:
            self.tracker = tracker
            log_config(tracker, cfg, self.resolved, self.overrides, extra_tags)
            fingerprint = dataset_fingerprint(validated.dataset.records, cfg.data.caption_extension)
            tracker.set_tags({"data.fingerprint": fingerprint_digest(fingerprint)})
            tracker.log_text(json.dumps(fingerprint, indent=1), "data/fingerprint.json")
            for skipped, reason in validated.dataset.skipped:
                print(f"skipped unreadable image {skipped}: {reason}")
            if validated.dataset.skipped:
                skipped_rows = "\n".join(f"{p}\t{r}" for p, r in validated.dataset.skipped) + "\n"
                tracker.log_text(skipped_rows, "data/skipped.tsv")
            report_data(tracker, cfg, validated)  # images without captions, eval prompts taken from captions
            yield tracker

    # --- setup (the base model and the CLIP scorer are reused by later runs in this process)
    def setup(self) -> None:
        """The base model, the trainer (LoRA, data, optimizer), the scorers, the sampling pipeline."""
        cfg, validated, tracker = self.cfg, self.validated, self.tracker
        self.phases["start_s"] = time.perf_counter() - self.started  # validation + run start
        self.mark = time.perf_counter()
        self.base = base = _worker.base_model(cfg.model)
        tracker.set_tags({f"model.{k}": v for k, v in base.identity.items()})
        regularisation = validated.regularisation.records if validated.regularisation else None
        if cfg.network.embedding.enabled:
            _worker.discard(cfg.model)  # new tokens change the tokenizer: later runs load a clean model
        held_out = _held_out(cfg, validated)
        if held_out.note:
            print(held_out.note)
            tracker.set_tags({"val_loss": held_out.note})
        self.trainer = trainer = Trainer(cfg, base, held_out.train, tracker, reg_records=regularisation)
        _log_data_tables(tracker, cfg, trainer)
        report_sizes(tracker, cfg, trainer, base.native_resolution)  # buckets in use, resolution far too large
        small = small_images(trainer.dataset.records, trainer.resolution)
        for path, (width, height) in small:
            print(f"warning: image {path} is {width}x{height}, under 1/4 of resolution {trainer.resolution}: upscaled")
        if small:
            tracker.log_text("".join(f"{p}\t{w}x{h}\n" for p, (w, h) in small), "data/small_images.tsv")
        self.scorers = _worker.scorers(cfg, trainer.device, [r for r in held_out.train if not r.is_reg])
        sampler = base.family.sampler(cfg.eval.sampler)
        self.pipeline = trainer.sampling_pipeline(sampling_scheduler(base.noise_scheduler.config, sampler))
        self.validation = trainer.validation_loss(held_out.held_out) if held_out.held_out else None
        self.objective, self.maximize = selection_objective(cfg)
        self.summary = _dataset_summary(trainer, validated)

    # --- fit
    def fit(self) -> None:
        """Training, with the periodic evaluations (and their pruning) and intermediate saves."""
        self.phases["setup_s"], self.mark = time.perf_counter() - self.mark, time.perf_counter()
        self.fitted = self.trainer.fit(
            on_eval=self._periodic_eval, on_save=self._save_file, show_progress=self.show_progress
        )
        self.trainer.drop_graphs()  # the final evaluation samples without them
        self.phases["fit_s"], self.mark = time.perf_counter() - self.mark, time.perf_counter()

    def _periodic_eval(self, step: int) -> tuple[float, bool]:
        """Metrics of the LoRA at this step; with eval.select=best its file too, to pick the best later."""
        cfg, tracker, objective = self.cfg, self.tracker, self.objective
        result = self._evaluate_now(f"step {step}")
        if objective not in result.values:
            raise ValueError(_missing_objective(objective, result))
        path = self._save_file(step, self.trainer.position.epoch) if cfg.eval.select == "best" else None
        self.checkpoints.append(Checkpoint(step, result, path))
        tracker.log_metrics(_eval_metrics(result), step)
        tracker.log_image(result.grid, f"samples/step_{step:06d}.png")
        value = result.mean(objective)
        stop = bool(self.report and self.report(step, value, result.values[objective]))
        return (value if self.maximize else -value), stop  # the plateau schedule wants higher = better

    # --- evaluate: the LoRA at its last step (a pruned run has just been), then the base model
    def evaluate(self) -> None:
        cfg, trainer, fit = self.cfg, self.trainer, self.fitted
        if not fit.stopped_early:
            self.checkpoints.append(Checkpoint(fit.steps, self._evaluate_now(f"step {fit.steps} (last)"), None))
        # choose on one half of each prompt's images, report on the other: no double use (README)
        self.split = cfg.eval.select == "best" and all(c.result.splittable for c in self.checkpoints)
        self.selected = _select(self.checkpoints, self.objective, self.maximize, cfg.eval.select, self.split)
        baseline_key = _baseline_key(cfg, trainer.resolution)
        self.baseline = _worker.baselines.get(baseline_key)
        if self.baseline is None:
            trainer.network.set_enabled(False)
            self.baseline = _worker.baselines[baseline_key] = self._evaluate_now("the base model")
            trainer.network.set_enabled(True)
        self.phases["eval_s"], self.mark = time.perf_counter() - self.mark, time.perf_counter()

    def _evaluate_now(self, what: str) -> EvalResult:
        """The current network's (or, disabled, the base model's) samples and scores; ``what`` names the bar."""
        cfg, trainer, base = self.cfg, self.trainer, self.base
        with trainer.accelerator.autocast(), trainer.lora_without_input_casts(base.denoiser, *base.text_encoders):
            result = evaluate(
                self.pipeline,
                self.scorers,
                list(cfg.eval.prompts),
                test_seed=cfg.eval.test_seed,
                seeds=list(cfg.eval.seeds),
                images_per_prompt=cfg.eval.images_per_prompt,
                batch_size=cfg.eval.batch_size,
                num_inference_steps=cfg.eval.num_inference_steps,
                guidance_scale=base.family.sampling_guidance(cfg.eval, cfg.train),
                height=trainer.resolution,
                width=trainer.resolution,
                encode_prompt=trainer.encode_prompt,
                generation_prompts=[trainer.prompt(p) for p in cfg.eval.prompts],
                progress=f"evaluating {what}" if self.show_progress else None,
                initial_latents=base.family.initial_latents,  # None: the plain draw
            )
        if self.validation is not None:
            result = result.with_values({"val_loss": trainer.held_out_loss(self.validation)})
        return result

    # --- save: the last step's file, then the selected checkpoint's under the run's name
    def save(self) -> None:
        fit, selected = self.fitted, self.selected
        self.lora_path = lora_path = self._save_file(fit.steps, fit.epochs, final=True)
        self.last_path = None
        if selected.path is not None and selected.step != fit.steps:
            self.last_path = lora_path.with_name(f"{self.cfg.output.name}-last{lora_path.suffix}")
            os.replace(lora_path, self.last_path)
            write_atomically(lora_path, lambda tmp: shutil.copyfile(selected.path, tmp))
        self.phases["save_s"] = time.perf_counter() - self.mark

    def _save_file(self, step: int, epoch: int, final: bool = False) -> Path:
        """The LoRA file (and, with train.save_state, the resumable training state) at this point."""
        cfg, trainer = self.cfg, self.trainer
        stem = None if final else f"{cfg.output.name}-step{step:06d}"
        try:
            path = _save_lora(cfg, trainer, self.base, self.resolved, step, stem, self._provenance(epoch))
        except LoraNotSavedError as error:  # output.dir failed after startup; the file may be kept
            self.tracker.set_tags({"lora.rescued_to": str(error.rescued)})
            raise
        if cfg.train.save_state:
            save_training_state(self.output_dir / f"state-step{step:06d}", trainer.training_state())
        if not final:
            self.tracker.log_artifact(path, "lora/intermediate")
        return path

    def _provenance(self, epoch: int) -> dict[str, str]:
        """The run-level metadata of a LoRA file saved now (when, from what data, by which run)."""
        return training_metadata(
            self.cfg,
            self.trainer,
            self.base,
            summary=self.summary,
            epoch=epoch,
            started_at=self.started_at,
            run_id=self.tracker.run_id,
        )

    def release(self) -> None:
        """The base model is shared with later runs: its LoRA layers go, and what the trainer held."""
        if hasattr(self, "trainer"):
            remove_lora(self.trainer.network)
            self.trainer.release()  # CUDA graphs, optimizer state, compiled code: not carried into the next trial

    # --- what is recorded of it
    def record(self) -> RunResult:
        """Metrics, tags, sample grids, tables and the file to MLflow and the run folder; the result."""
        cfg, tracker, fit, selected, split = self.cfg, self.tracker, self.fitted, self.selected, self.split
        baseline, checkpoints, objective, maximize = self.baseline, self.checkpoints, self.objective, self.maximize
        trainer, lora_path, last_path, output_dir = self.trainer, self.lora_path, self.last_path, self.output_dir
        phases, started = self.phases, self.started
        final = selected.result.half(1) if split else selected.result
        if split:
            baseline = baseline.half(1)
        metrics = {
            **final_metrics(final, baseline),
            "selected_step": float(selected.step),
            "train/steps_done": float(fit.steps),
            "train/seconds": fit.train_seconds,
            "wall_time_s": time.perf_counter() - started,
            **{f"time/{name}": seconds for name, seconds in phases.items()},
            "peak_memory_mb": _peak_memory_mb(trainer.device),
            "lora_file_mb": lora_path.stat().st_size / 2**20,
        }
        if fit.losses:
            metrics["train/final_loss"] = fit.losses[-1]
        per_prompt = {}
        for prompt, score in final.per_prompt.items():
            per_prompt[prompt] = score
            metrics[f"clip_score/{_metric_safe(prompt)}"] = score
            metrics[f"clip_score_baseline/{_metric_safe(prompt)}"] = baseline.per_prompt[prompt]
        tracker.log_metrics(metrics, fit.steps)
        tags = {
            "selected_step": str(selected.step),
            "eval.select": cfg.eval.select,
            "eval.objective": objective,
            "eval.scored_on": SCORED_ON_HALF if split else SCORED_ON_ALL,
            "intervals": "this file: prompts resampled as clusters, then images within them",
        }
        if fit.stopped_early:
            tags.update({"pruned": "true", "pruned_at_step": str(fit.steps)})
        tracker.set_tags(tags)
        tracker.log_artifact(lora_path, "lora")
        if last_path is not None:
            tracker.log_artifact(last_path, "lora")
        # fixed names, so MLflow's compare view can set any runs' grids side by side
        tracker.log_image(checkpoints[-1].result.grid, "samples/final.png")  # the last step's
        tracker.log_image(final.grid, "samples/selected.png")  # the run's result (eval.select)
        tracker.log_image(baseline.grid, "samples/baseline.png")
        label = f"left: this LoRA (step {selected.step}), right: the base model"
        side_by_side = image_grid([[final.grid, baseline.grid]], [label])
        tracker.log_image(side_by_side, "samples/lora_vs_base.png")
        tracker.log_text(_score_table(final, baseline), "eval/clip_scores.tsv")
        tracker.log_text(_per_image_table(final, baseline), "eval/per_image.tsv")
        lines = summary_lines(final, baseline)
        note = scores_note(cfg)
        tracker.log_text("\n".join(lines + ([f"note: {note}"] if note else [])) + "\n", "eval/summary.txt")
        lora_sha256 = file_sha256(lora_path)
        identity = lora_identity(lora_path)
        tracker.set_tags({"lora.sha256": lora_sha256, **{f"lora.{k}": v for k, v in identity.items()}})
        if cfg.output.format == "safetensors":
            tracker.log_text(json.dumps(read_metadata(lora_path), indent=1, sort_keys=True), "lora/metadata.json")
        _write_run_record(output_dir, tracker.run_id, metrics, lora_path, lora_sha256, identity)
        return RunResult(
            metrics,
            lora_path,
            tracker.run_id,
            tracker.tracking_uri,
            per_prompt,
            stopped_early=fit.stopped_early,
            lora_sha256=lora_sha256,
            per_image=final.values,
            summary=lines,
            note=note,
            selected_step=selected.step,
            prompts=list(final.prompts),
            baseline_per_image=baseline.values,
            experiment_id=tracker.experiment_id,
            objective=objective,
            higher_is_better=maximize,
        )


def log_config(
    tracker: Any, cfg: Any, resolved: dict, overrides: list[str] | None, extra_tags: dict[str, str] | None
) -> None:
    """The options as params, bookkeeping as tags, the resolved config and the command-line overrides."""
    params = flatten(resolved)
    # what differs between trials only as bookkeeping is a tag, so the compare view's params are the options
    bookkeeping = {k: v for k, v in params.items() if k == "output.dir" or k.startswith("sweep.")}
    tracker.log_params({k: v for k, v in params.items() if k not in bookkeeping})
    tracker.set_tags({k: v for k, v in bookkeeping.items() if v is not None})
    tracker.set_tags({**_run_tags(cfg), **(extra_tags or {})})
    tracker.log_text(OmegaConf.to_yaml(resolved), "config/resolved.yaml")
    tracker.log_text("\n".join(overrides or []) + "\n", "config/overrides.txt")


@dataclass
class Checkpoint:
    """One evaluation of the LoRA during or after training; ``path`` is its file when it was kept."""

    step: int
    result: EvalResult
    path: Path | None


def selection_objective(cfg: Any) -> tuple[str, bool]:
    """The metric checkpoints are chosen (and pruned) by, and whether higher is better: the sweep's
    first objective when evaluations measure it, else ``eval.objective``."""
    swept = evaluated_metric(cfg.sweep.objective) if cfg.sweep.objective else None
    if swept is not None:
        return swept, cfg.sweep.direction == "maximize"
    objective = metric_name(cfg.eval.objective)
    return objective, DIRECTIONS[objective] == "maximize"


SCORED_ON_HALF = "the odd-numbered samples of each prompt; the checkpoint was chosen on the even-numbered"
SCORED_ON_ALL = "every sample"


def _select(checkpoints: list[Checkpoint], objective: str, maximize: bool, select: str, split: bool) -> Checkpoint:
    """``eval.select``: the checkpoint best on the objective (the earliest of ties), or the last one.

    With ``split`` the choice reads only the selection half of the samples, so the scores reported
    from the other half are not inflated by the choice (the winner's curse of picking a checkpoint).
    """
    if select == "last":
        return checkpoints[-1]
    sign = 1.0 if maximize else -1.0
    return max(checkpoints, key=lambda c: (sign * (c.result.half(0) if split else c.result).mean(objective), -c.step))


def _missing_objective(objective: str, result: EvalResult) -> str:
    hints = {
        "clip_i": "it needs training images",
        "copy_risk": "it needs training images",
        "dino_i": "set eval.dino_model",
        "concept_acc": "set eval.concept.labels and eval.concept.target",
        "val_loss": "set data.val_split or data.val_dir",
        "diversity": "it needs several images per prompt (eval.images_per_prompt or eval.seeds)",
    }
    return (
        f"objective {objective!r} was not measured ({hints.get(objective, 'unknown metric')}); "
        f"measured: {', '.join(sorted(result.values))}"
    )


def _eval_metrics(result: EvalResult) -> dict[str, float]:
    """What a periodic evaluation logs: each metric's mean under ``eval/`` (``eval/clip_score`` kept)."""
    metrics = {f"eval/{name}": result.mean(name) for name in result.values}
    metrics["eval/clip_score"] = result.clip_score
    return {k: v for k, v in metrics.items() if math.isfinite(v)}


def final_metrics(final: EvalResult, baseline: EvalResult) -> dict[str, float]:
    """Every metric with its interval, the base model's, and the paired gain: ``clip_t``, ``clip_t/low``,
    ``clip_t/high``, ``clip_t_baseline`` (+ bounds), ``clip_t_gain`` (+ bounds); ``clip_score*`` as before."""
    metrics: dict[str, float] = {}
    for name in final.values:
        if name not in baseline.values or math.isnan(final.mean(name)):
            continue
        for key, estimate in (
            (name, final.estimate(name)),
            (f"{name}_baseline", baseline.estimate(name)),
            (f"{name}_gain", final.gain(name, baseline)),
        ):
            metrics.update({key: estimate.mean, f"{key}/low": estimate.low, f"{key}/high": estimate.high})
    metrics["clip_score"] = metrics["clip_t"]
    metrics["clip_score_baseline"] = metrics["clip_t_baseline"]
    metrics["clip_score_gain"] = metrics["clip_t_gain"]
    return metrics


def _per_image_table(final: EvalResult, baseline: EvalResult) -> str:
    """TSV of every sample's metrics beside the base model's (same prompt, same seed)."""
    names = [n for n in final.values if n in baseline.values and n != "val_loss"]
    rows = ["prompt\t" + "\t".join(f"{n}\t{n}_baseline" for n in names)]
    for i, prompt in enumerate(final.prompts):
        cells = "\t".join(f"{final.values[n][i]:.4f}\t{baseline.values[n][i]:.4f}" for n in names)
        rows.append(f"{prompt}\t{cells}")
    return "\n".join(rows) + "\n"


def _held_out(cfg: Any, validated: Any) -> HeldOut:
    """The images val_loss is measured on: a seeded split of the training set, or data.val_dir."""
    records = list(validated.dataset.records)
    if validated.held_out is not None:  # data.val_dir, scanned (and checked) by validation
        return HeldOut(records, validated.held_out.records)
    return split_held_out(records, cfg.data.val_split, VAL_SEED)


def _save_lora(
    cfg: Any, trainer: Trainer, base: BaseModel, resolved: dict, step: int, stem: str | None, extra: dict[str, str]
) -> Path:
    """The kohya-compatible LoRA file (with the embedding bundled in, if one was learned)."""
    tensors = trainer.network.kohya_state_dict()
    if trainer.embedding is not None:
        tensors = bundle_embeddings(tensors, {trainer.embedding.name: trainer.embedding.vectors})
    metadata = kohya_metadata(
        trainer.network,
        output_name=cfg.output.name,
        base_model_version=base.base_model_version,
        comment=cfg.output.comment,
        seed=cfg.train.seed,
        steps=step,
        resolved_config=training_config(resolved),
        v2=bool(base.family.file_metadata(base).get("ss_v2")),
        network_module=NETWORK_MODULES.get(trainer.network.type) or base.family.network_module,
        network_args=trainer.network.args,
        extra=extra,
    )
    return save_lora(cfg.output, tensors, metadata, stem=stem)


def _dataset_summary(trainer: Trainer, validated: Any) -> DatasetSummary:
    """Folders, counts, buckets and tags of the data this run trains on, for the LoRA file's metadata."""
    records = trainer.dataset.records
    originals = list(validated.dataset.records) + (
        list(validated.regularisation.records) if validated.regularisation else []
    )
    return summarize_dataset(
        records,
        trainer.dataset.record_buckets,
        [oriented_size(r.path) for r in records],
        tag_frequencies_by_folder(originals),
    )


def _log_data_tables(tracker: Any, cfg: Any, trainer: Trainer) -> None:
    """The bucket assignment and (with data.tag_stats) the tag-frequency table, as artifacts."""
    dataset = trainer.dataset
    tracker.log_text(bucket_table(dataset.record_buckets, [r.repeats for r in dataset.records]), "data/buckets.tsv")
    if cfg.data.tag_stats:
        captions = [r.caption for r in dataset.records if not r.is_reg]
        tracker.log_text(tag_table(tag_frequencies(captions), cfg.data.tag_stats), "data/tag_frequency.tsv")


class _WorkerCache:
    """What the runs of one process share (DESIGN.md, "Reuse across trials").

    The loaded base model (LoRA removed after every run), the CLIP scorer, and the base model's
    scores, which depend only on the model and the eval settings, never on a trial's LoRA values.
    """

    def __init__(self) -> None:
        self._models: dict[str, BaseModel] = {}
        self._scorers: dict[tuple[str, str], ClipScorer] = {}
        self._dinos: dict[tuple[str, str, str], DinoEmbedder] = {}
        self._references: dict[tuple, References] = {}
        self.baselines: dict[str, EvalResult] = {}
        self.model_loads = 0

    def base_model(self, model_cfg: Any) -> BaseModel:
        key = _model_key(model_cfg)
        if key not in self._models:
            self._models.clear()  # one base model in memory at a time
            self.baselines.clear()
            self._models[key] = load_base_model(model_cfg)
            self.model_loads += 1
        base = self._models[key]
        remove_leftover_adapters(base.denoiser, *base.text_encoders)
        return base

    def discard(self, model_cfg: Any) -> None:
        """Forget a base model this run is about to change in place (e.g. new embedding tokens)."""
        if self._models.pop(_model_key(model_cfg), None) is not None:
            self.baselines.clear()

    def scorer(self, clip_model: str, device: torch.device) -> ClipScorer:
        key = (clip_model, str(device))
        if key not in self._scorers:
            self._scorers[key] = ClipScorer(clip_model, device=device)
        return self._scorers[key]

    def scorers(self, cfg: Any, device: torch.device, training: list[Any]) -> Scorers:
        """CLIP, DINO (with eval.dino_model), the training images' embeddings and the concept labels.

        The embeddings of the training images are computed once per dataset and model, like the baseline.
        """
        clip = self.scorer(cfg.eval.clip_model, device)
        dino = None
        if cfg.eval.dino_model:
            key = ("dino", cfg.eval.dino_model, str(device))
            if key not in self._dinos:
                self._dinos[key] = DinoEmbedder(cfg.eval.dino_model, device=device)
            dino = self._dinos[key]
        scorers = Scorers(clip, dino)
        files = tuple(str(r.path) for r in training)
        ref_key = (cfg.eval.clip_model, cfg.eval.dino_model, str(device), files)
        if ref_key not in self._references:
            self._references.clear()
            self._references[ref_key] = scorers.reference_embeddings([load_rgb(r.path) for r in training])
        scorers.references = self._references[ref_key]
        concept = choose_concept(cfg)
        if concept.enabled:
            scorers.concept = scorers.concept_for(concept.labels, concept.target)
        return scorers


_worker = _WorkerCache()


def _model_key(model_cfg: Any) -> str:
    """What the loaded weights depend on (not clip skip, attention kernel or checkpointing)."""
    settings = OmegaConf.to_container(model_cfg, resolve=True)
    return json.dumps({k: v for k, v in settings.items() if k not in RUNTIME_MODEL_KEYS}, sort_keys=True)


def _baseline_key(cfg: Any, resolution: int) -> str:
    """Everything the base model's sample images depend on."""
    parts = {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "eval": {
            k: v
            for k, v in OmegaConf.to_container(cfg.eval, resolve=True).items()
            if k not in ("every_n_steps", "objective", "select")
        },
        "precision": cfg.precision.mixed,
        "resolution": resolution,
        "max_token_length": cfg.data.max_token_length,
        # the references (clip_i, copy_risk), the held-out images (val_loss) and the prompts' trigger word
        "data": {k: cfg.data[k] for k in ("train_dir", "val_split", "val_dir", "trigger_word", "caption_extension")},
    }
    return json.dumps(parts, sort_keys=True)


RUN_RECORD = "run.json"


def _write_run_record(
    output_dir: Path,
    run_id: str | None,
    metrics: dict[str, float],
    lora_path: Path,
    lora_sha256: str,
    identity: dict[str, str],
) -> None:
    """The run's id, final metrics and LoRA hashes beside its files, so a run folder can be reproduced."""
    record = {
        "mlflow_run_id": run_id,
        "metrics": metrics,
        "lora_file": str(lora_path),
        "lora_sha256": lora_sha256,
        **{f"lora_{k}": v for k, v in identity.items()},
    }
    write_text_atomically(output_dir / RUN_RECORD, json.dumps(record, indent=2, sort_keys=True))


def run_name(cfg: Any, overrides: list[str] | None) -> str:
    """What a runs table should read: a trial by its swept values (``trial 3: dim=16 lr=0.0003``), a
    single run by its output name, start time and the options the user gave (``lora 12-02 14:05 dim=16``)."""
    if cfg.sweep.trial_number is not None:
        return f"trial {cfg.sweep.trial_number}: {cfg.sweep.run_name or ''}".rstrip(": ")
    given = []
    for override in overrides or []:
        key, equals, value = override.lstrip("+~").partition("=")
        if equals and not key.startswith(("hydra.", "tracking.", "output.")):
            given.append(f"{key.rsplit('.', 1)[-1]}={Path(value).name if '/' in value else value}")
    shown = " ".join(given[:4])
    return f"{cfg.output.name} {time.strftime('%m-%d %H:%M')} {shown}".strip()


def _run_tags(cfg: Any) -> dict[str, str]:
    return {"seed": str(cfg.train.seed), "test_seed": str(cfg.eval.test_seed), **code_version()}


def _peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory on CUDA; the process's peak resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _metric_safe(text: str) -> str:
    """MLflow metric names allow letters, digits, ``_-. /``; prompts keep their words."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", text)[:200]


def _score_table(final: EvalResult, baseline: EvalResult) -> str:
    rows = ["prompt\tclip_score\tclip_score_baseline"]
    rows += [f"{p}\t{s:.4f}\t{baseline.per_prompt[p]:.4f}" for p, s in final.per_prompt.items()]
    rows.append(f"(mean)\t{final.clip_score:.4f}\t{baseline.clip_score:.4f}")
    return "\n".join(rows) + "\n"
