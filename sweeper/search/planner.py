"""What a worker should do next, read off the study's trials (pure: trials in, a decision out).

A trial counts as done when it COMPLETEd or was PRUNED. A FAILed trial is re-run with the same
params (Optuna's ``RetryHeartbeatStaleTrialCallback`` enqueues the copy) when it did not finish its
work (killed, interrupted, out of memory) and retries are left; a deterministic failure (a config
error, a NaN loss) would fail the same way again, so it is reported and given up.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from sweeper.search.space import SearchSpace

DONE = (TrialState.COMPLETE, TrialState.PRUNED)
PENDING = (TrialState.RUNNING, TrialState.WAITING)

# user attr "failure": why a trial failed; only these are worth running again with the same params
RETRYABLE_FAILURES = ("killed", "interrupted", "out_of_memory")


def is_retryable(trial: FrozenTrial) -> bool:
    """A failure that says nothing about the params. A trial Optuna failed for a stale heartbeat
    carries no reason of ours: its worker died, so it is retryable too."""
    return trial.state == TrialState.FAIL and trial.user_attrs.get("failure", "killed") in RETRYABLE_FAILURES


def attempts(trial: FrozenTrial) -> int:
    """How many times this trial's params have been tried, this trial included."""
    return len(trial.system_attrs.get("retry_history", [])) + 1


def is_duplicate(trial: FrozenTrial) -> bool:
    return "duplicate_of" in trial.user_attrs


@dataclass
class GridPlan:
    """Every grid point's standing, and the points no trial covers (they get enqueued)."""

    done: list[tuple] = field(default_factory=list)
    pending: list[tuple] = field(default_factory=list)  # running somewhere, or waiting to be popped
    to_enqueue: list[tuple] = field(default_factory=list)  # never tried, or failed with retries left
    retry_of: dict[tuple, FrozenTrial] = field(default_factory=dict)  # point -> its last retryable failure
    given_up: dict[tuple, FrozenTrial] = field(default_factory=dict)  # point -> its last (final) failure

    @property
    def finished(self) -> bool:
        """Every point is done or given up: nothing runs, nothing is left to run."""
        return not self.pending and not self.to_enqueue


def grid_points(space: SearchSpace) -> list[tuple]:
    """The grid in the order the user wrote it (``network.dim=4,8,16`` runs 4 first)."""
    return list(itertools.product(*space.grid_values.values()))


def grid_point(params: dict[str, Any], space: SearchSpace) -> tuple:
    return tuple(params.get(key) for key in space.grid_values)


def plan_grid(trials: Iterable[FrozenTrial], space: SearchSpace, max_retries: int) -> GridPlan:
    by_point: dict[tuple, list[FrozenTrial]] = {}
    for trial in trials:
        params = trial.params or trial.system_attrs.get("fixed_params", {})
        by_point.setdefault(grid_point(params, space), []).append(trial)
    plan = GridPlan()
    for point in grid_points(space):
        tried = sorted(by_point.get(point, []), key=lambda t: t.number)
        if any(t.state in DONE for t in tried):
            plan.done.append(point)
        elif any(t.state in PENDING for t in tried):
            plan.pending.append(point)
        elif not tried:
            plan.to_enqueue.append(point)
        else:
            last = tried[-1]
            if is_retryable(last) and attempts(last) <= max_retries:
                plan.to_enqueue.append(point)
                plan.retry_of[point] = last
            else:
                plan.given_up[point] = last
    return plan


def trials_to_sample(trials: Iterable[FrozenTrial], n_trials: int) -> int:
    """New trials a sampler should still propose: n_trials minus those done, running or queued.

    Failed trials do not count (a retry is queued for those worth re-running), nor do duplicates
    of a finished parameter set, which were never trained.
    """
    counted = [t for t in trials if (t.state in DONE or t.state in PENDING) and not is_duplicate(t)]
    return max(0, n_trials - len(counted))


def finished_twin(trial: FrozenTrial, trials: Iterable[FrozenTrial]) -> FrozenTrial | None:
    """An earlier finished trial with exactly these params, whose result this one can reuse."""
    for other in trials:
        if (
            other.number != trial.number
            and other.state in DONE
            and not is_duplicate(other)
            and other.params == trial.params
        ):
            return other
    return None
