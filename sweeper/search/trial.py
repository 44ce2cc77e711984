"""The task's side of a trial: report periodic evaluations to the trial's Optuna pruner.

The trial is found from the job's own config (study name, storage, trial number), so this works
whatever launcher runs the job: in the sweeper's process, another process, or another machine.
"""

from __future__ import annotations

from typing import Any

import optuna

from sweeper.search.study import build_pruner, open_storage
from sweeper.task import EvalReporter


def load_trial(sweep_cfg: Any) -> optuna.trial.Trial:
    """The live (RUNNING) trial ``sweep_cfg.trial_number`` of the sweep's study."""
    study = optuna.load_study(
        study_name=sweep_cfg.study_name, storage=open_storage(sweep_cfg.storage), pruner=build_pruner(sweep_cfg)
    )
    trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, sweep_cfg.trial_number)
    return optuna.trial.Trial(study, trial_id)


def trial_reporter(sweep_cfg: Any) -> EvalReporter:
    """(step, value) -> True when the pruner says this trial should stop."""
    trial = load_trial(sweep_cfg)

    def report(step: int, value: float) -> bool:
        trial.report(value, step)
        return trial.should_prune()

    return report
