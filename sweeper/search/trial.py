"""The task's side of a trial: report periodic evaluations to the trial's Optuna pruner.

The trial is found from the job's own config (study name, storage, trial number), so this works
whatever launcher runs the job: in the sweeper's process, another process, or another machine.
"""

from __future__ import annotations

import math
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


# The Wilcoxon pruner compares per-instance values: each evaluated image is an instance, numbered
# step * INSTANCES_PER_STEP + image index, so the same image at the same step pairs across trials.
INSTANCES_PER_STEP = 100_000


def trial_reporter(sweep_cfg: Any) -> EvalReporter:
    """(step, mean, per-image values) -> True when the pruner says this trial should stop.

    Most pruners see the objective's mean at each evaluation step. ``wilcoxon`` sees every image of
    every evaluation as its own instance, so Optuna's WilcoxonPruner can run its paired signed-rank
    test against the best trial's values on the same images.
    """
    trial = load_trial(sweep_cfg)

    def report(step: int, value: float, per_image: list[float]) -> bool:
        if sweep_cfg.pruner == "wilcoxon":
            for index, image_value in enumerate(per_image):
                if math.isfinite(image_value):
                    trial.report(image_value, step * INSTANCES_PER_STEP + index)
        else:
            trial.report(value, step)
        return trial.should_prune()

    return report
