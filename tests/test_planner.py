"""The sweep's next-trial decisions (pure), the process-liveness check and the study lock."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import time

import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

from sweeper.run.process_identity import is_gone, this_process
from sweeper.search.lock import study_lock
from sweeper.search.planner import finished_twin, plan_grid, trials_to_sample
from sweeper.search.space import SearchSpace, parse_search_space, points_to_check
from tests.conftest import ended_at_teardown

SPACE = SearchSpace(
    distributions={"network.dim": CategoricalDistribution([4, 8, 16])}, grid_values={"network.dim": [4, 8, 16]}
)
DIM = {"network.dim": CategoricalDistribution([4, 8, 16])}


def trial(number: int, dim: int, state: TrialState, **user_attrs) -> object:
    made = create_trial(
        params={"network.dim": dim},
        distributions=DIM,
        value=1.0 if state == TrialState.COMPLETE else None,
        state=state,
        user_attrs=user_attrs,
    )
    made.number = number
    return made


def retry_of(number: int, dim: int, state: TrialState, history: list[int]) -> object:
    made = trial(number, dim, state)
    made._system_attrs = {"failed_trial": history[0], "retry_history": history}
    return made


@pytest.mark.parametrize(
    ("trials", "to_enqueue", "pending", "given_up"),
    [
        ([], [(4,), (8,), (16,)], [], []),  # nothing ran: every point, in the order written
        ([trial(0, 4, TrialState.COMPLETE), trial(1, 8, TrialState.PRUNED)], [(16,)], [], []),
        ([trial(0, 4, TrialState.RUNNING), trial(1, 8, TrialState.WAITING)], [(16,)], [(4,), (8,)], []),
        # killed (no reason recorded: its worker died) -> re-run
        ([trial(0, 4, TrialState.FAIL)], [(4,), (8,), (16,)], [], []),
        ([trial(0, 4, TrialState.FAIL, failure="interrupted")], [(4,), (8,), (16,)], [], []),
        # a deterministic failure is not re-run
        ([trial(0, 4, TrialState.FAIL, failure="error")], [(8,), (16,)], [], [(4,)]),
        # out of retries: the first attempt and two re-runs (max_retries=2) all killed
        (
            [
                trial(0, 4, TrialState.FAIL, failure="killed"),
                retry_of(1, 4, TrialState.FAIL, [0]),
                retry_of(2, 4, TrialState.FAIL, [0, 1]),
            ],
            [(8,), (16,)],
            [],
            [(4,)],
        ),
        # a point done once is done, whatever failed there before
        ([trial(0, 4, TrialState.FAIL, failure="error"), trial(1, 4, TrialState.COMPLETE)], [(8,), (16,)], [], []),
    ],
)
def test_the_grid_plan(trials, to_enqueue, pending, given_up):
    plan = plan_grid(trials, SPACE, max_retries=2)
    assert plan.to_enqueue == to_enqueue
    assert plan.pending == pending
    assert list(plan.given_up) == given_up


def test_only_complete_pruned_running_and_queued_trials_count_toward_n_trials():
    trials = [
        trial(0, 4, TrialState.COMPLETE),
        trial(1, 8, TrialState.FAIL),
        trial(2, 8, TrialState.PRUNED),
        trial(3, 16, TrialState.RUNNING),
        trial(4, 4, TrialState.COMPLETE, duplicate_of=0),
    ]
    assert trials_to_sample(trials, 4) == 1
    assert trials_to_sample(trials, 2) == 0


def test_a_proposal_equal_to_a_finished_trial_finds_it():
    finished = [trial(0, 4, TrialState.COMPLETE), trial(1, 8, TrialState.FAIL)]
    assert finished_twin(trial(2, 4, TrialState.RUNNING), finished).number == 0
    assert finished_twin(trial(2, 8, TrialState.RUNNING), finished) is None  # a failure is no result


def test_points_to_check_cover_every_value_and_bound():
    space = parse_search_space(["network.dim=4,8", "optimizer.lr=interval(1e-5,1e-3)"])
    points = points_to_check(space)
    assert {p["network.dim"] for p in points} == {4, 8}
    assert {p["optimizer.lr"] for p in points} == {1e-5, 1e-3}
    assert len(points_to_check(parse_search_space(["network.dim=4,8", "optimizer.lr=1e-4,1e-3"]))) == 4


def test_a_process_is_gone_once_it_ended_and_not_while_it_runs():
    child = ended_at_teardown(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]))
    identity = {**this_process(), "worker.pid": str(child.pid), "worker.started": ""}
    from sweeper.run.process_identity import _start_ticks

    identity["worker.started"] = _start_ticks(child.pid) or ""
    assert is_gone(identity) is False
    child.kill()
    time.sleep(0.2)  # not reaped yet: a zombie counts as gone
    assert is_gone(identity) is True
    child.wait()
    assert is_gone(identity) is True
    assert is_gone({**identity, "worker.host": "another-host"}) is None
    assert is_gone(this_process()) is False


def _hold(url: str, name: str, entered, release) -> None:
    with study_lock(url, name):
        entered.set()
        release.wait(60)


def _take(url: str, name: str, trying, got) -> None:
    trying.set()
    with study_lock(url, name):
        got.set()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_the_study_lock_excludes_another_process(tmp_path, backend, request):
    url = f"sqlite:///{tmp_path / 'optuna.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    context = multiprocessing.get_context("spawn")
    entered, release = context.Event(), context.Event()
    holder = ended_at_teardown(context.Process(target=_hold, args=(url, "study", entered, release)))
    holder.start()
    assert entered.wait(60)
    trying, got = context.Event(), context.Event()
    other = ended_at_teardown(context.Process(target=_take, args=(url, "study", trying, got)))
    other.start()
    assert trying.wait(120)
    assert not got.wait(3)  # blocked while the first holds the lock
    with study_lock(url, "another study"):
        pass  # other studies are not blocked
    release.set()
    assert got.wait(60)  # and gets it once released
    for process in (holder, other):
        process.join(60)
        assert process.exitcode == 0
