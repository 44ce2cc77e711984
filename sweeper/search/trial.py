"""The task's side of a trial: report periodic evaluations to the trial's Optuna pruner.

The trial is found from the job's own config (study name, storage, trial number), so this works
whatever launcher runs the job: in the sweeper's process, another process, or another machine.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import optuna

from sweeper.search.study import build_pruner, open_storage

# (step, objective mean, its per-image values) -> True to stop training early: a pruner's hook into the run
EvalReporter = Callable[[int, float, list[float]], bool]


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


# With replicates each training seed has its own block of instances / steps, the same in every trial.
IMAGES_PER_REPLICATE = 1_000
STEPS_PER_REPLICATE = 10_000_000


def trial_reporter(sweep_cfg: Any, replicate: int = 0) -> EvalReporter:
    """(step, mean, per-image values) -> True when the pruner says this trial should stop.

    Most pruners see the objective's mean at each evaluation step (replicate r's steps offset by
    r * STEPS_PER_REPLICATE, so the same seed's evaluations line up across settings). ``wilcoxon``
    sees every (seed, image) pair of every evaluation as its own instance, so Optuna's
    WilcoxonPruner runs its paired signed-rank test against the best trial on the same seeds and images.
    """
    trial = load_trial(sweep_cfg)

    def report(step: int, value: float, per_image: list[float]) -> bool:
        if sweep_cfg.pruner == "wilcoxon":
            for index, image_value in enumerate(per_image):
                if math.isfinite(image_value):
                    instance = step * INSTANCES_PER_STEP + replicate * IMAGES_PER_REPLICATE + index
                    trial.report(image_value, instance)
        else:
            trial.report(value, replicate * STEPS_PER_REPLICATE + step)
        return trial.should_prune()

    return report


REPLICATE_ATTR = "replicate."  # trial user attr per finished replicate: what a resumed trial need not retrain


def record_replicate(sweep_cfg: Any, index: int, record: dict[str, Any]) -> None:
    """Keep a finished replicate on its trial, so a re-run of the trial (kill, resume, racing) skips it."""
    trial = load_trial(sweep_cfg)
    trial.storage.set_trial_user_attr(trial._trial_id, f"{REPLICATE_ATTR}{index}", record)


def carried_replicates(sweep_cfg: Any) -> dict[int, dict[str, Any]]:
    """Finished replicates of earlier attempts at this setting: the trial this one re-runs (Optuna's
    ``failed_trial``) or extends (racing's ``extends``), and theirs in turn."""
    trial = load_trial(sweep_cfg)
    storage, study_id = trial.storage, trial.study._study_id
    found: dict[int, dict[str, Any]] = {}
    frozen = storage.get_trial(trial._trial_id)  # a retry inherits its failed attempt's user attrs
    seen = {frozen.number}
    while True:
        for key, record in frozen.user_attrs.items():
            if key.startswith(REPLICATE_ATTR):
                found.setdefault(int(key[len(REPLICATE_ATTR) :]), record)
        earlier = frozen.system_attrs.get("failed_trial", frozen.user_attrs.get("extends"))
        if earlier is None or earlier in seen:
            return found
        seen.add(earlier)
        frozen = storage.get_trial(storage.get_trial_id_from_study_id_trial_number(study_id, int(earlier)))
