"""The sweep: ask Optuna for a trial, run it as an ordinary job through Hydra's launcher, tell.

Every trial is the normal task (``sweeper.run.setting.run``) plus bookkeeping: its overrides carry the
sampled values and ``sweep.*`` (study, storage, trial number, parent run) so the task can report to
its pruner and nest its MLflow run under the sweep's parent run.

Any number of workers (processes, machines) may run the same sweep against one storage. Each takes
the study lock (``sweeper.search.lock``) to decide what runs next (``sweeper.search.planner``), so no
point runs twice; a worker that dies leaves a trial that is failed (at once on the same host, after
the heartbeat grace elsewhere) and queued again with the same params.
"""

from __future__ import annotations

import logging
import math
import sys
import time
import uuid
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import get_heartbeat_thread, is_heartbeat_enabled
from optuna.trial import FrozenTrial, TrialState

from evaluation.metric_names import evaluated_metric
from evaluation.stats import THIS_FILE, this_setting
from sweeper.run.process_identity import HOST, PID, is_gone, this_process
from sweeper.run.signals import interruption_reason
from sweeper.search.lock import JournalBusyError, JournalWorkerLock, study_lock
from sweeper.search.planner import (
    RETRYABLE_FAILURES,
    attempts,
    finished_twin,
    plan_grid,
    trials_to_sample,
)
from sweeper.search.reconcile import close_trial_runs
from sweeper.search.report import SweepSummary, log_parent_results, print_summary
from sweeper.search.report_html import REPORT_ARTIFACT, Commands, resume_command, write_and_log_report
from sweeper.search.settings import OptunaSweeperConf
from sweeper.search.settings_verdict import (
    CELLS_ATTR,
    EXTENDS_ATTR,
    IMAGES_ATTR,
    INTERVAL_ATTR,
    SEEDS_ATTR,
    TARGET_ATTR,
    RaceStep,
    race_step,
)
from sweeper.search.space import (
    SearchSpace,
    SearchSpaceError,
    add_conditional,
    describe_params,
    format_value,
    parse_search_space,
    points_to_check,
    short_key,
    suggest,
)
from sweeper.search.storage_url import is_journal, missing_driver
from sweeper.search.study import (
    SweepConfigError,
    build_pruner,
    build_sampler,
    default_storage_url,
    derive_study_name,
    objectives_and_directions,
    open_storage,
    proposal_seed,
    proposals_made,
    resolve_sampler_name,
)
from sweeper.search.workers import resolve_n_workers, run_workers
from sweeper.tracking.credentials import redact_password
from sweeper.tracking.tracker import default_tracking_uri, start_run, ui_command


class SweepFailedError(RuntimeError):
    """Too many trials failed; the message carries the first error."""


class SweepIncompleteError(RuntimeError):
    """Grid points that failed for good (deterministic failures, or out of retries)."""


@dataclass
class TrialOutcome:
    state: TrialState
    values: list[float] | None = None
    run_id: str | None = None
    error: str | None = None
    failure: str | None = None  # why it failed: "error" (deterministic), or one of RETRYABLE_FAILURES
    pruned_at: int | None = None  # the step a pruned trial stopped at
    cells: dict[str, list[float]] = field(default_factory=dict)  # replicate -> the objective's per-prompt means
    images: int = 0  # scored images per seed
    seeds: list[int] = field(default_factory=list)  # the training seed of each replicate
    interval: list[Any] = field(default_factory=list)  # the objective's [low, high, what it conditions on]
    pruned_at_replicate: int | None = None


@dataclass
class SweepProgress:
    """This invocation's tally, for the failure-rate rule."""

    finished: int = 0
    failed: int = 0
    first_error: str | None = None
    outcomes: dict[int, TrialOutcome] = field(default_factory=dict)


class Wait:
    """Nothing to start now, but trials run in other workers: one may die and need a re-run."""


class Finished:
    """Nothing runs and nothing is left to run."""


MAX_DUPLICATE_DRAWS = 10  # a sampler proposing only finished parameter sets has exhausted the space
WORKERS_JOINED = "lora_sweeper.workers_joined"  # study system attr: how many workers have joined
STUDY_UID = "lora_sweeper.study_uid"  # study system attr: which MLflow parent run is this study's


class OptunaSweep:
    def __init__(self, options: OptunaSweeperConf) -> None:
        self.options = options

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        # the terminal shows one line per trial and the final table, not each job's internal overrides
        logging.getLogger("hydra._internal.core_plugins.basic_launcher").setLevel(logging.WARNING)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    # --- the sweep
    def sweep(self, arguments: list[str]) -> list[JobReturn]:
        options, cfg = self.options, self.config
        preset = [f"{key}={value}" for key, value in (options.params or {}).items()]
        try:
            space = parse_search_space(preset + list(arguments))
            add_conditional(space, plain(options.conditional))
        except SearchSpaceError as error:
            raise SweepConfigError(str(error)) from error
        if not space.distributions:
            raise SweepConfigError(
                "nothing to sweep: give a swept key (network.dim=8,16,32, optimizer.lr='interval(1e-5,1e-3)') "
                "or a preset (+search=lora_basic)"
            )
        self.objectives, directions = objectives_and_directions(options)
        self.space, self.sampler_name = space, resolve_sampler_name(options, space)
        _check_replicates(options, self.sampler_name)
        self.outputs = Path.cwd() / "outputs"
        self.storage_url = options.storage or default_storage_url(self.outputs)
        problem = missing_driver(self.storage_url)
        if problem:
            raise SweepConfigError(f"hydra.sweeper.storage: {problem}")
        study_name = options.study_name or derive_study_name(
            cfg.tracking.experiment, space, self.objectives, directions
        )
        workers = resolve_n_workers(options.n_workers)
        self._check_every_point(space)  # before any worker trains anything
        if workers > 1:
            status = run_workers(workers, Path(cfg.hydra.sweep.dir))
            if status != 0:
                sys.exit(status)
            return []
        journal = JournalWorkerLock(self.storage_url) if is_journal(self.storage_url) else None
        if journal is not None:
            journal.acquire()  # journal storage: one worker at a time, so its RUNNING trials are dead ones
        self.sole_worker = journal is not None
        try:
            return self._work(study_name, directions)
        finally:
            if journal is not None:
                journal.release()

    def _work(self, study_name: str, directions: list[str]) -> list[JobReturn]:
        options, cfg, space = self.options, self.config, self.space
        with self._lock(study_name):  # the first worker creates the schema and the study; the others load it
            storage = open_storage(self.storage_url, options.heartbeat_seconds, options.grace_seconds)
            study = optuna.create_study(
                study_name=study_name,
                storage=storage,
                pruner=build_pruner(options),
                directions=directions,
                load_if_exists=True,
            )
            attrs = study._storage.get_study_system_attrs(study._study_id)
            worker_index = int(attrs.get(WORKERS_JOINED, 0))
            study._storage.set_study_system_attr(study._study_id, WORKERS_JOINED, worker_index + 1)
            study_uid = attrs.get(STUDY_UID) or uuid.uuid4().hex  # this study in this storage, and no other
            study._storage.set_study_system_attr(study._study_id, STUDY_UID, study_uid)
            self._fail_dead_trials(study)  # a killed worker's trial is queued again before the count below
            to_run = self._to_run(study)
        study.sampler = build_sampler(self.sampler_name, options.seed, space)
        Path(cfg.hydra.sweep.dir).mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, Path(cfg.hydra.sweep.dir) / "multirun.yaml")

        summary = SweepSummary(
            study,
            space,
            self.objectives,
            directions,
            self.sampler_name,
            self.storage_url,
            racing_seeds=options.replicates if options.racing else 0,
            grid_size=space.grid_size if self.sampler_name == "grid" else 0,
        )
        print(
            f"Sweep '{study_name}': {self.sampler_name} sampler (worker {worker_index}, seed {options.seed}), pruner "
            f"{options.pruner}, storage {redact_password(self.storage_url)}, {to_run} trial(s) to run"
        )
        returns: list[JobReturn] = []
        with ExitStack() as stack:
            with self._lock(study_name):  # one parent run however many workers start at once
                parent = stack.enter_context(
                    start_run(
                        cfg.tracking,
                        self.outputs,
                        run_name=f"{cfg.tracking.experiment} sweep {', '.join(map(short_key, space.distributions))} "
                        f"{time.strftime('%m-%d %H:%M')}",
                        # a parent belongs to one study: a new storage with the same study name gets its own
                        resume_tags={
                            "sweep.study_name": study_name,
                            "sweep.study_uid": study_uid,
                            "sweep.role": "parent",
                        },
                    )
                )
            parent.log_params(summary.parent_params())
            parent.set_tags(summary.parent_tags(options))
            progress = SweepProgress()
            try:
                self._loop(study, parent.run_id, progress, returns)
            finally:
                with self._lock(study_name):
                    final = self._finished(study)
                    others = self._live_other_workers(study)
                log_parent_results(parent, summary)
                report = write_and_log_report(parent, summary, Path(cfg.hydra.sweep.dir), self._commands(parent))
                print_summary(summary)
                if not final and others:  # the last worker out finishes the parent run
                    parent.leave_running = True
                    print(
                        f"{others} other worker(s) still run trials of this study; the last one to finish completes "
                        "the parent run."
                    )
                if parent.run_id:
                    print(f"MLflow parent run: {parent.run_id}")
                    best_first = (self.objectives[0], directions[0] == "maximize")
                    print(f"MLflow UI: {ui_command(parent.tracking_uri, parent.experiment_id, *best_first)}")
                where = f" (and {REPORT_ARTIFACT} on the parent run)" if parent.run_id else ""
                print(f"Sweep report (leaderboard, sample grids side by side, plots): {report}{where}")
            self._raise_if_incomplete(study)
        return returns

    def _commands(self, parent: Any) -> Commands:
        """The report's commands: this sweep again (resumes it), and a trial's reproduction from its record."""
        cwd = self.outputs.parent
        uri = parent.tracking_uri
        suffix = f" --tracking-uri {redact_password(uri)}" if uri and uri != default_tracking_uri(self.outputs) else ""
        return Commands(cwd, resume_command(self.config, cwd), suffix)

    def _live_other_workers(self, study: optuna.Study) -> int:
        """Workers other than this one that hold a RUNNING trial and are not known to be dead (on this
        host: their process is alive; elsewhere: not yet past the heartbeat grace)."""
        stale = _stale_trial_ids(study)
        me = this_process()
        workers = {
            (t.user_attrs.get(HOST), t.user_attrs.get(PID))
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if not is_gone(t.user_attrs) and t._trial_id not in stale
        }
        workers.discard((me[HOST], me[PID]))
        return len(workers)

    def _lock(self, study_name: str) -> Any:
        return study_lock(self.storage_url, study_name)

    def _loop(self, study: optuna.Study, parent_run_id: str | None, progress: SweepProgress, returns: list) -> None:
        told_waiting = False
        while True:
            with self._lock(study.study_name):
                step = self._next_trial(study)
            if step is Finished:
                return
            if step is Wait:
                if not told_waiting:
                    running = sum(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False))
                    print(
                        f"Waiting for {running} trial(s) running in other workers; a dead worker's trial is re-run "
                        f"once its heartbeat is {self.options.grace_seconds} s old (hydra.sweeper.grace_seconds)"
                    )
                    told_waiting = True
                time.sleep(max(1, min(self.options.heartbeat_seconds, 10)))
                continue
            told_waiting = False
            returns.append(self._run_trial(study, step, parent_run_id, progress))
            self._check_failure_rate(progress)

    # --- what runs next (always under the study lock)
    def _next_trial(self, study: optuna.Study) -> optuna.Trial | type[Wait] | type[Finished]:
        self._fail_dead_trials(study)
        trials = study.get_trials(deepcopy=False)
        waiting = any(t.state == TrialState.WAITING for t in trials)
        running = any(t.state == TrialState.RUNNING for t in trials)
        if self.sampler_name == "grid":
            plan = plan_grid(trials, self.space, self.options.max_retries)
            if not waiting:
                if not plan.to_enqueue:
                    if plan.pending:
                        return Wait
                    step = self._race_step(study)
                    if step is None:
                        return Finished
                    study.enqueue_trial(
                        step.trial.params, user_attrs={EXTENDS_ATTR: step.trial.number, TARGET_ATTR: step.target}
                    )
                    return self._ask(study)
                point = plan.to_enqueue[0]
                if point in plan.retry_of:
                    self._retry(study, plan.retry_of[point])
                else:
                    study.enqueue_trial(dict(zip(self.space.grid_values, point, strict=True)))
            return self._ask(study)
        for _ in range(MAX_DUPLICATE_DRAWS):
            if not waiting and trials_to_sample(trials, self.options.n_trials) == 0:
                return Wait if running else Finished
            trial = self._ask(study)
            twin = finished_twin(study._storage.get_trial(trial._trial_id), trials)
            if twin is None:
                return trial
            self._reuse(study, trial, twin)
            trials = study.get_trials(deepcopy=False)
            waiting = any(t.state == TrialState.WAITING for t in trials)
        return self._ask(study)

    def _race_step(self, study: optuna.Study) -> RaceStep | None:
        """Racing: the next setting to get one more seed, or None (also without racing)."""
        if not self.options.racing:
            return None
        maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
        return race_step(study.get_trials(deepcopy=False), maximize, self.options.replicates)

    def _replicates_of(self, trial: optuna.Trial) -> int:
        """Seeds this trial trains: racing starts every setting on 2 and extends contenders."""
        target = study_trial_attr(trial, TARGET_ATTR)
        if target is not None:
            return int(target)
        return min(2, self.options.replicates) if self.options.racing else self.options.replicates

    def _to_run(self, study: optuna.Study) -> int:
        """Trials this sweep still has to start (for the opening line)."""
        trials = study.get_trials(deepcopy=False)
        waiting = sum(t.state == TrialState.WAITING for t in trials)
        if self.sampler_name == "grid":
            plan = plan_grid(trials, self.space, self.options.max_retries)
            return len(plan.to_enqueue) + waiting
        return trials_to_sample(trials, self.options.n_trials) + waiting

    def _finished(self, study: optuna.Study) -> bool:
        trials = study.get_trials(deepcopy=False)
        if any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials):
            return False
        if self.sampler_name == "grid":
            return plan_grid(trials, self.space, self.options.max_retries).finished and self._race_step(study) is None
        return trials_to_sample(trials, self.options.n_trials) == 0

    def _ask(self, study: optuna.Study) -> optuna.Trial:
        """The next trial (under the study lock). A queued trial is popped as it is; otherwise the sampler
        is seeded for this proposal, so the same study state always gets the same proposal."""
        trials = study.get_trials(deepcopy=False)
        if not any(t.state == TrialState.WAITING for t in trials):
            seed = proposal_seed(self.options.seed, proposals_made(trials))
            study.sampler = build_sampler(self.sampler_name, seed, self.space)
        with warnings.catch_warnings():  # ask/tell with heartbeats is what we want; Optuna assumes optimize()
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            trial = study.ask(self.space.distributions)
            for key, distribution in self.space.conditional_distributions(trial.params).items():
                suggest(trial, key, distribution)
        for key, value in this_process().items():  # who runs it: a dead local worker is seen at once
            study._storage.set_trial_user_attr(trial._trial_id, key, value)
        return trial

    def _reuse(self, study: optuna.Study, trial: optuna.Trial, twin: FrozenTrial) -> None:
        """A proposal equal to a finished trial is not trained again: it takes that trial's result."""
        study._storage.set_trial_user_attr(trial._trial_id, "duplicate_of", twin.number)
        if twin.user_attrs.get("mlflow_run_id"):
            study._storage.set_trial_user_attr(trial._trial_id, "mlflow_run_id", twin.user_attrs["mlflow_run_id"])
        print(f"[trial {trial.number}] same params as trial {twin.number}: its result is reused, nothing trained")
        if twin.state == TrialState.COMPLETE:
            study.tell(trial, twin.values)
        else:
            study.tell(trial, state=twin.state)

    def _fail_dead_trials(self, study: optuna.Study) -> None:
        """RUNNING trials whose worker is dead become FAIL with the reason, their MLflow runs KILLED, and
        are queued again: at once when the worker process on this host is gone (kill -9, OOM killer;
        with journal storage, one worker at a time, every RUNNING trial), else once the heartbeat is
        older than grace_seconds (the test Optuna's ``fail_stale_trials`` makes, here with the reason
        recorded before the trial is finished, after which Optuna refuses new attributes)."""
        storage = study._storage
        stale = _stale_trial_ids(study)
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            gone = is_gone(trial.user_attrs)
            if gone or (self.sole_worker and gone is None):
                pid = trial.user_attrs.get("worker.pid", "?")
                reason = f"killed: its worker (pid {pid}) ended without finishing it"
            elif trial._trial_id in stale:
                reason = (
                    f"killed: its worker stopped its heartbeat for {self.options.grace_seconds} s "
                    "(killed, frozen, out of host memory, or the machine went away)"
                )
            else:
                continue
            try:
                self._fail(study, trial._trial_id, reason, "killed")
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # its worker finished it after all
            close_trial_runs(self.config.tracking, self.outputs, study.study_name, trial.number, reason)
            print(f"[trial {trial.number}] {reason}")
            self._retry(study, storage.get_trial(trial._trial_id))

    def _retry(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Queue the same params again (Optuna's retry callback keeps the chain in ``retry_history``)."""
        if attempts(trial) > self.options.max_retries:
            print(f"[trial {trial.number}] not re-run: hydra.sweeper.max_retries={self.options.max_retries} reached")
            return
        with warnings.catch_warnings():  # "experimental" in Optuna, and the documented way to retry
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            RetryHeartbeatStaleTrialCallback(max_retry=self.options.max_retries)(study, trial)

    def _fail(self, study: optuna.Study, trial_id: int, reason: str, failure: str) -> None:
        """FAIL with the reason recorded first: a finished trial's attributes can no longer be set."""
        study._storage.set_trial_user_attr(trial_id, "error", reason[:2000])
        study._storage.set_trial_user_attr(trial_id, "failure", failure)
        study._storage.set_trial_state_values(trial_id, TrialState.FAIL)

    # --- one trial
    def _run_trial(
        self, study: optuna.Study, trial: optuna.Trial, parent_run_id: str | None, progress: SweepProgress
    ) -> JobReturn:
        options, objectives = self.options, self.objectives
        overrides = [
            *self.space.trial_overrides(trial.params),
            f"sweep.study_name={study.study_name}",
            f"sweep.storage={format_value(self.storage_url)}",
            f"sweep.trial_number={trial.number}",
            f"sweep.report_objective={format_value(self.reports_to_pruner(objectives))}",
            f"sweep.objective={objectives[0]}",
            f"sweep.direction={study.directions[0].name.lower()}",
            f"sweep.pruner={options.pruner}",
            f"sweep.pruner_startup_trials={options.pruner_startup_trials}",
            f"sweep.pruner_warmup_steps={options.pruner_warmup_steps}",
            f"sweep.run_name='{describe_params(trial.params, short=True)}'",
        ]
        replicates = self._replicates_of(trial)
        if replicates > 1 or self.options.replicates > 1:
            overrides.append(f"train.replicates={replicates}")
        if parent_run_id:
            overrides.append(f"sweep.parent_run_id={parent_run_id}")
        frozen = study._storage.get_trial(trial._trial_id)
        retried = frozen.system_attrs.get("failed_trial")
        if frozen.user_attrs.get("error"):  # inherited from the failed attempt (Optuna's retry copies user attrs)
            study._storage.set_trial_user_attr(trial._trial_id, "previous_error", frozen.user_attrs["error"])
            study._storage.set_trial_user_attr(trial._trial_id, "error", "")
        again = f" (re-run of trial {retried})" if retried is not None else ""
        extends = study_trial_attr(trial, EXTENDS_ATTR)
        if extends is not None:
            again += f" (racing: trial {extends} extended to {replicates} seeds)"
        elif replicates > 1:
            again += f" ({replicates} seeds)"
        print(f"[trial {trial.number}] {describe_params(trial.params)}{again}")
        try:
            with get_heartbeat_thread(trial._trial_id, study._storage):  # lets other workers see we live
                job = self.launcher.launch([overrides], initial_job_idx=trial.number)[0]
        except KeyboardInterrupt as interrupted:  # Ctrl-C or SIGTERM: FAIL with the reason, queued to re-run
            reason = interruption_reason(interrupted)
            with self._lock(study.study_name):
                self._fail(study, trial._trial_id, reason, "interrupted")
                self._retry(study, study._storage.get_trial(trial._trial_id))
            print(f"[trial {trial.number}] FAIL {reason}; it runs again when the sweep is resumed")
            raise
        except BaseException as error:  # a broken launcher: never leave the trial RUNNING
            with self._lock(study.study_name):
                self._fail(study, trial._trial_id, f"{type(error).__name__}: {error}", "error")
            raise
        outcome = _classify(job, objectives)
        if outcome.run_id:
            trial.set_user_attr("mlflow_run_id", outcome.run_id)
        if outcome.cells:
            trial.set_user_attr(CELLS_ATTR, outcome.cells)  # what the verdict compares settings on
            trial.set_user_attr(IMAGES_ATTR, outcome.images)
            trial.set_user_attr(SEEDS_ATTR, outcome.seeds)
        if outcome.interval:
            trial.set_user_attr(INTERVAL_ATTR, outcome.interval)
        if outcome.pruned_at_replicate is not None:
            trial.set_user_attr("pruned_at_replicate", outcome.pruned_at_replicate)
        with self._lock(study.study_name):
            if outcome.state == TrialState.FAIL:
                self._fail(study, trial._trial_id, outcome.error or "failed", outcome.failure or "error")
                if outcome.failure in RETRYABLE_FAILURES:
                    self._retry(study, study._storage.get_trial(trial._trial_id))
            else:
                study.tell(trial, outcome.values if outcome.state == TrialState.COMPLETE else None, state=outcome.state)
        progress.outcomes[trial.number] = outcome
        progress.finished += 1
        if outcome.state == TrialState.FAIL:
            progress.failed += 1
            progress.first_error = progress.first_error or f"trial {trial.number}: {outcome.error}"
        from training.speed.memory import release_accelerator_memory

        release_accelerator_memory()  # whatever the outcome: the next trial starts from the same memory
        print(f"[trial {trial.number}] {_outcome_line(outcome, objectives)}")
        return job

    def _raise_if_incomplete(self, study: optuna.Study) -> None:
        """A grid sweep succeeds only when every point has a finished trial."""
        if self.sampler_name != "grid":
            return
        plan = plan_grid(study.get_trials(deepcopy=False), self.space, self.options.max_retries)
        if plan.given_up and not plan.pending and not plan.to_enqueue:
            lines = [
                f"  {describe_params(dict(zip(self.space.grid_values, point, strict=True)))}: "
                f"trial {trial.number} {trial.user_attrs.get('error', 'failed')}"
                for point, trial in plan.given_up.items()
            ]
            raise SweepIncompleteError(
                f"{len(plan.given_up)} of {self.space.grid_size} grid point(s) have no finished trial and are not "
                "retried (a deterministic failure, or hydra.sweeper.max_retries reached):\n" + "\n".join(lines)
            )

    def _check_every_point(self, space: SearchSpace) -> None:
        """Every grid point (or every value and interval bound) passes the startup checks before any trial."""
        from sweeper.config.validate import ConfigError, validate

        points = points_to_check(space)
        found_at: dict[str, list[str]] = {}  # problem -> the points that have it
        for params in points:
            label = describe_params(params)
            trial_cfg = self.hydra_context.config_loader.load_sweep_config(self.config, space.trial_overrides(params))
            with open_dict(trial_cfg):
                if "hydra:" in str(OmegaConf.to_container(trial_cfg.output)["dir"]):  # the job's own folder,
                    trial_cfg.output.dir = str(Path(self.config.hydra.sweep.dir))  # which lies in the sweep's
                del trial_cfg["hydra"]
            try:
                validate(trial_cfg)
            except ConfigError as error:
                for problem in error.problems:
                    found_at.setdefault(problem, []).append(label)
        if found_at:
            raise ConfigError(
                [
                    problem if len(labels) == len(points) else f"[{' | '.join(labels)}] {problem}"
                    for problem, labels in found_at.items()
                ]
            )

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


def plain(value: Any) -> Any:
    """A Hydra option's value as plain Python (a DictConfig when it came from a preset)."""
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def run_reporting_errors(sweep: OptunaSweep, arguments: list[str]) -> list[JobReturn]:
    """The sweep, with its expected failures printed as their message alone (no traceback) and an
    exit status: 2 for bad settings found before anything ran, 1 for a sweep that ran and failed."""
    from sweeper.config.validate import ConfigError
    from sweeper.tracking.store import TrackingUnavailableError

    try:
        return sweep.sweep(arguments)
    except (ConfigError, SweepConfigError, JournalBusyError, TrackingUnavailableError) as error:
        print(redact_password(str(error)), file=sys.stderr)
        sys.exit(2)
    except (SweepFailedError, SweepIncompleteError) as error:
        print(redact_password(str(error)), file=sys.stderr)
        sys.exit(1)


def _outcome_line(outcome: TrialOutcome, objectives: list[str]) -> str:
    """``COMPLETE clip_score=31.2345``, ``PRUNED at step 200 (clip_score=30.1 then)`` or ``FAIL <reason>``."""
    if outcome.state == TrialState.FAIL:
        return f"FAIL {outcome.error}"
    if outcome.state == TrialState.PRUNED:
        return f"PRUNED at step {outcome.pruned_at}" if outcome.pruned_at is not None else "PRUNED"
    return "COMPLETE " + " ".join(f"{n}={v:.4f}" for n, v in zip(objectives, outcome.values or [], strict=False))


def _classify(job: JobReturn, objectives: list[str]) -> TrialOutcome:
    """The trial's Optuna state from the job: COMPLETE with values, PRUNED, or FAIL with a reason."""
    if job.status != JobStatus.COMPLETED:
        error = job._return_value
        if _is_out_of_memory(error):
            return TrialOutcome(TrialState.FAIL, error=f"out of memory: {error}", failure="out_of_memory")
        return TrialOutcome(TrialState.FAIL, error=f"{type(error).__name__}: {error}", failure="error")
    result: dict[str, Any] = job.return_value
    metrics, run_id = result["metrics"], result.get("run_id")
    if result.get("pruned"):
        steps = metrics.get("train/steps_done")
        replicates = result.get("replicates") or []
        at = next((i for i, r in enumerate(replicates) if r.get("stopped_early")), None)
        pruned_at = int(steps) if steps is not None else None
        return TrialOutcome(
            TrialState.PRUNED,
            run_id=run_id,
            pruned_at=pruned_at,
            pruned_at_replicate=at if len(replicates) > 1 else None,
        )
    missing = [name for name in objectives if name not in metrics]
    if missing:
        known = ", ".join(sorted(k for k in metrics if "/" not in k))
        return TrialOutcome(
            TrialState.FAIL,
            run_id=run_id,
            error=f"objective {missing} is not a metric of the task; known: {known}",
            failure="error",
        )
    values = [float(metrics[name]) for name in objectives]
    if not all(math.isfinite(v) for v in values):
        return TrialOutcome(
            TrialState.FAIL, run_id=run_id, error=f"objective value is not finite: {values}", failure="error"
        )
    cells, images = _objective_cells(result, objectives[0])
    seeds = [int(r["seed"]) for r in result.get("replicates") or []]
    outcome = TrialOutcome(TrialState.COMPLETE, values=values, run_id=run_id, cells=cells, images=images, seeds=seeds)
    names = (objectives[0], objectives[0].replace("clip_score", "clip_t"))  # clip_score is clip_t's old name
    key = next((name for name in names if f"{name}/low" in metrics and f"{name}/high" in metrics), None)
    if key is not None:
        label = this_setting(len(seeds)) if len(seeds) > 1 else THIS_FILE
        outcome.interval = [float(metrics[f"{key}/low"]), float(metrics[f"{key}/high"]), label]
    return outcome


def _objective_cells(result: dict[str, Any], objective: str) -> tuple[dict[str, list[float]], int]:
    """Replicate index -> the objective's per-prompt means (per held-out image for val_loss), and the
    number of images each seed was scored on. Settings pair by replicate index: the same seed in
    every setting (common random numbers), or with sweep.label each copy's own seeds (an A/A sweep)."""
    from evaluation.replicates import cells

    metric = evaluated_metric(objective)
    found, images = {}, 0
    for index, replicate in enumerate(result.get("replicates") or []):
        values = (replicate.get("per_image") or {}).get(metric)
        if metric is None or not values:
            return {}, 0
        prompts = replicate.get("prompts") or []
        clusters = prompts if len(prompts) == len(values) else None
        found[str(index)] = [float(v) for v in cells(values, clusters)]
        images = len(values)
    return found, images


def _stale_trial_ids(study: optuna.Study) -> set[int]:
    """Trials whose heartbeat is older than the grace (none without heartbeats)."""
    storage = study._storage
    return set(storage._get_stale_trial_ids(study._study_id)) if is_heartbeat_enabled(storage) else set()


def study_trial_attr(trial: optuna.Trial, key: str) -> Any:
    """A user attr of a live trial (set when it was enqueued)."""
    return trial.study._storage.get_trial(trial._trial_id).user_attrs.get(key)


def _check_replicates(options: OptunaSweeperConf, sampler: str) -> None:
    problems = []
    if options.replicates < 1:
        problems.append(f"hydra.sweeper.replicates must be >= 1 (got {options.replicates})")
    if options.racing and sampler != "grid":
        problems.append(
            f"hydra.sweeper.racing=true races the points of a grid; this sweep samples with {sampler}. Give every "
            "swept key as a list (network.dim=4,8,16), or set hydra.sweeper.racing=false"
        )
    if options.racing and options.replicates < 3:
        problems.append(
            "hydra.sweeper.racing=true starts every setting on 2 seeds and adds seeds up to hydra.sweeper.replicates; "
            f"set hydra.sweeper.replicates=3 or more (got {options.replicates})"
        )
    if problems:
        raise SweepConfigError("\n".join(problems))


def _is_out_of_memory(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.cuda.OutOfMemoryError | MemoryError) or "out of memory" in str(error).lower()
