"""The sweep: ask Optuna for a trial, run it as an ordinary job through Hydra's launcher, tell.

Every trial is the normal task (``sweeper.task.run``) plus bookkeeping: its overrides carry the
sampled values and ``sweep.*`` (study, storage, trial number, parent run) so the task can report to
its pruner and nest its MLflow run under the sweep's parent run.
"""

from __future__ import annotations

import gc
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf
from optuna.storages._heartbeat import get_heartbeat_thread
from optuna.trial import TrialState

from evaluation.metric_names import evaluated_metric
from sweeper.search.report import SweepSummary, log_parent_results, print_summary
from sweeper.search.settings import OptunaSweeperConf
from sweeper.search.space import SearchSpace, SearchSpaceError, format_value, parse_search_space
from sweeper.search.study import (
    SweepConfigError,
    build_pruner,
    build_sampler,
    default_storage_url,
    derive_study_name,
    objectives_and_directions,
    open_storage,
    resolve_sampler_name,
)
from sweeper.tracking import redact_password, start_run, ui_command


class SweepFailedError(RuntimeError):
    """Too many trials failed; the message carries the first error."""


@dataclass
class TrialOutcome:
    state: TrialState
    values: list[float] | None = None
    run_id: str | None = None
    error: str | None = None
    per_image: dict[str, list[float]] = field(default_factory=dict)  # objective -> per-image values


@dataclass
class SweepProgress:
    """This invocation's tally, for the failure-rate rule."""

    finished: int = 0
    failed: int = 0
    first_error: str | None = None
    outcomes: dict[int, TrialOutcome] = field(default_factory=dict)


class OptunaSweep:
    def __init__(self, options: OptunaSweeperConf) -> None:
        self.options = options

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    # --- the sweep
    def sweep(self, arguments: list[str]) -> list[JobReturn]:
        options, cfg = self.options, self.config
        preset = [f"{key}={value}" for key, value in (options.params or {}).items()]
        try:
            space = parse_search_space(preset + list(arguments))
        except SearchSpaceError as error:
            raise SweepConfigError(str(error)) from error
        if not space.distributions:
            raise SweepConfigError(
                "nothing to sweep: give a swept key (network.dim=8,16,32, optimizer.lr='interval(1e-5,1e-3)') "
                "or a preset (+search=lora_basic)"
            )
        objectives, directions = objectives_and_directions(options)
        sampler_name = resolve_sampler_name(options, space)
        outputs = Path.cwd() / "outputs"
        storage_url = options.storage or default_storage_url(outputs)
        study_name = options.study_name or derive_study_name(cfg.tracking.experiment, space, objectives, directions)
        study = optuna.create_study(
            study_name=study_name,
            storage=open_storage(storage_url),
            sampler=build_sampler(sampler_name, options.seed, space),
            pruner=build_pruner(options),
            directions=directions,
            load_if_exists=True,
        )
        optuna.storages.fail_stale_trials(study)  # trials of dead workers (no heartbeat) become FAIL
        Path(cfg.hydra.sweep.dir).mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, Path(cfg.hydra.sweep.dir) / "multirun.yaml")

        summary = SweepSummary(study, space, objectives, directions, sampler_name, storage_url)
        print(
            f"Sweep '{study_name}': {sampler_name} sampler, pruner {options.pruner}, "
            f"storage {redact_password(storage_url)}, {self._remaining(study, space, sampler_name)} trial(s) to run"
        )
        returns: list[JobReturn] = []
        with start_run(
            cfg.tracking,
            outputs,
            run_name=f"sweep {study_name}",
            resume_tags={"sweep.study_name": study_name, "sweep.role": "parent"},
        ) as parent:
            parent.log_params(summary.parent_params())
            parent.set_tags(summary.parent_tags(options))
            progress = SweepProgress()
            try:
                while self._remaining(study, space, sampler_name) > 0:
                    returns.append(self._run_trial(study, space, objectives, storage_url, parent.run_id, progress))
                    self._check_failure_rate(progress)
            finally:
                log_parent_results(parent, summary)
                print_summary(summary)
                if parent.run_id:
                    print(f"MLflow parent run: {parent.run_id}\nMLflow UI: {ui_command(parent.tracking_uri)}")
        return returns

    def _remaining(self, study: optuna.Study, space: SearchSpace, sampler_name: str) -> int:
        """Trials still to run: unvisited grid points, or n_trials minus the finished ones."""
        trials = study.get_trials(deepcopy=False)
        if sampler_name == "grid":
            taken = [t for t in trials if t.state.is_finished() or t.state == TrialState.RUNNING]
            seen = {_grid_point(t.params, space) for t in taken}
            return space.grid_size - len(seen & _all_grid_points(space))
        return max(0, self.options.n_trials - sum(t.state.is_finished() for t in trials))

    # --- one trial
    def _run_trial(
        self,
        study: optuna.Study,
        space: SearchSpace,
        objectives: list[str],
        storage_url: str,
        parent_run_id: str | None,
        progress: SweepProgress,
    ) -> JobReturn:
        with warnings.catch_warnings():  # ask/tell with heartbeats is what we want; Optuna assumes optimize()
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            trial = study.ask(space.distributions)
        overrides = [
            *space.trial_overrides(trial.params),
            f"sweep.study_name={study.study_name}",
            f"sweep.storage={format_value(storage_url)}",
            f"sweep.trial_number={trial.number}",
            f"sweep.report_objective={format_value(self.reports_to_pruner(objectives))}",
            f"sweep.objective={objectives[0]}",
            f"sweep.direction={study.directions[0].name.lower()}",
            f"sweep.pruner={self.options.pruner}",
            f"sweep.pruner_startup_trials={self.options.pruner_startup_trials}",
            f"sweep.pruner_warmup_steps={self.options.pruner_warmup_steps}",
        ]
        if parent_run_id:
            overrides.append(f"sweep.parent_run_id={parent_run_id}")
        print(f"[trial {trial.number}] {' '.join(f'{k}={format_value(v)}' for k, v in trial.params.items())}")
        try:
            with get_heartbeat_thread(trial._trial_id, study._storage):  # lets other workers see we live
                job = self.launcher.launch([overrides], initial_job_idx=trial.number)[0]
        except BaseException as error:  # interrupted or broken launcher: never leave the trial RUNNING
            study.tell(trial, state=TrialState.FAIL)
            trial_error = f"{type(error).__name__}: {error}"
            study._storage.set_trial_user_attr(trial._trial_id, "error", trial_error[:2000])
            raise
        outcome = _classify(job, objectives)
        if outcome.run_id:
            trial.set_user_attr("mlflow_run_id", outcome.run_id)
        if outcome.per_image:
            trial.set_user_attr("per_image", outcome.per_image)  # what the summary's significance tests pair
        if outcome.error:
            trial.set_user_attr("error", outcome.error[:2000])
        study.tell(trial, outcome.values if outcome.state == TrialState.COMPLETE else None, state=outcome.state)
        progress.outcomes[trial.number] = outcome
        progress.finished += 1
        if outcome.state == TrialState.FAIL:
            progress.failed += 1
            progress.first_error = progress.first_error or f"trial {trial.number}: {outcome.error}"
            _free_accelerator_memory()
        shown = outcome.error if outcome.error else (outcome.values if outcome.values else "")
        print(f"[trial {trial.number}] {outcome.state.name} {shown}")
        return job

    def reports_to_pruner(self, objectives: list[str]) -> bool:
        """Periodic evaluations measure every metric, so a single objective can be pruned on.

        Optuna's ``Trial.report`` does not support multi-objective studies (it raises), so a
        multi-objective sweep runs without pruning, and so does one whose objective no evaluation
        measures (``lora_file_mb``, ``train/final_loss``).
        """
        return self.options.pruner != "none" and len(objectives) == 1 and evaluated_metric(objectives[0]) is not None

    def _check_failure_rate(self, progress: SweepProgress) -> None:
        if progress.finished >= 2 and progress.failed / progress.finished > self.options.max_failure_rate:
            raise SweepFailedError(
                f"{progress.failed} of {progress.finished} trials failed (more than hydra.sweeper.max_failure_rate="
                f"{self.options.max_failure_rate}); stopping the sweep. First error: {progress.first_error}"
            )


def _classify(job: JobReturn, objectives: list[str]) -> TrialOutcome:
    """The trial's Optuna state from the job: COMPLETE with values, PRUNED, or FAIL with a reason."""
    if job.status != JobStatus.COMPLETED:
        error = job._return_value
        reason = f"{type(error).__name__}: {error}"
        if _is_out_of_memory(error):
            reason = f"out of memory: {error}"
        return TrialOutcome(TrialState.FAIL, error=reason)
    result: dict[str, Any] = job.return_value
    metrics, run_id = result["metrics"], result.get("run_id")
    if result.get("pruned"):
        return TrialOutcome(TrialState.PRUNED, run_id=run_id)
    missing = [name for name in objectives if name not in metrics]
    if missing:
        known = ", ".join(sorted(k for k in metrics if "/" not in k))
        return TrialOutcome(
            TrialState.FAIL, run_id=run_id, error=f"objective {missing} is not a metric of the task; known: {known}"
        )
    values = [float(metrics[name]) for name in objectives]
    if not all(math.isfinite(v) for v in values):
        return TrialOutcome(TrialState.FAIL, run_id=run_id, error=f"objective value is not finite: {values}")
    per_image = result.get("per_image") or {}
    measured = {name: evaluated_metric(name) for name in objectives}
    paired = {name: per_image[metric] for name, metric in measured.items() if metric in per_image}
    return TrialOutcome(TrialState.COMPLETE, values=values, run_id=run_id, per_image=paired)


def _is_out_of_memory(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.cuda.OutOfMemoryError | MemoryError) or "out of memory" in str(error).lower()


def _free_accelerator_memory() -> None:
    """A failed trial (e.g. out of memory) must not leave its tensors to the next one."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _grid_point(params: dict[str, Any], space: SearchSpace) -> tuple:
    return tuple(params.get(key) for key in space.grid_values)


def _all_grid_points(space: SearchSpace) -> set[tuple]:
    import itertools

    return set(itertools.product(*space.grid_values.values()))
