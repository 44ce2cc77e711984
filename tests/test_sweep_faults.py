"""Sweeps that lose nothing: workers killed, interrupted or terminated mid-trial, then resumed.

Every test runs ``python -m sweeper -m`` as real processes, sends real signals, and reads the
results back from Optuna's storage and MLflow's store.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from sweeper.search.study import open_storage
from tests.conftest import REPO, ended_at_teardown
from training.fault_hold import HOLD_ENV, HOLD_LINE

# a tiny model, trials of a few seconds: long enough to be killed in the middle of one
QUICK = [
    "model=tiny",
    "eval.clip_model=tiny",
    "train.batch_size=2",
    "eval.num_inference_steps=2",
    "eval.images_per_prompt=1",
    "eval.prompts=[a red circle]",
]
SHORT_TRIAL = [*QUICK, "train.max_steps=4"]


def hold_run(n: int) -> dict[str, str]:
    """The environment that holds this process's n-th training run mid-training (training/fault_hold.py)."""
    return {HOLD_ENV: str(n)}


GRID = "network.dim=4,8,16"


class Sweep:
    """A ``python -m sweeper -m`` process whose output is collected line by line as it comes."""

    def __init__(self, cwd: Path, *args: str, env: dict[str, str] | None = None) -> None:
        environment = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(REPO),
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",  # several torch processes on 2 cores
            **(env or {}),
        }
        self.process = ended_at_teardown(
            subprocess.Popen(
                [sys.executable, "-m", "sweeper", "-m", *args],
                cwd=cwd,
                env=environment,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            if self.process.poll() is not None and text not in self.output:
                self._reader.join(5)
                if text in self.output:
                    return
                raise AssertionError(f"exited {self.process.returncode} before {text!r}:\n{self.output[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} within {timeout} s:\n{self.output[-4000:]}")
            time.sleep(0.1)

    def finish(self, timeout: float = 600) -> int:
        code = self.process.wait(timeout)
        self._reader.join(10)
        return code


def study_of(cwd: Path, url: str | None = None) -> optuna.Study:
    storage = open_storage(url or f"sqlite:///{cwd / 'outputs' / 'optuna.db'}")
    (summary,) = optuna.get_all_study_summaries(storage)
    return optuna.load_study(study_name=summary.study_name, storage=storage)


def mlflow_runs(cwd: Path, uri: str | None = None) -> list:
    client = MlflowClient(uri or f"sqlite:///{cwd / 'outputs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("lora-sweeper")
    return client.search_runs([experiment.experiment_id], max_results=1000)


def assert_every_point_complete_once(study: optuna.Study, key: str, values: list) -> None:
    complete = [t.params[key] for t in study.get_trials() if t.state == TrialState.COMPLETE]
    assert sorted(complete) == sorted(values), [(t.number, t.state.name, t.params) for t in study.get_trials()]
    assert not [t for t in study.get_trials() if t.state in (TrialState.RUNNING, TrialState.WAITING)]


def assert_nothing_left_running(runs: list) -> None:
    running = [(r.info.run_name, r.data.tags.get("sweep.role")) for r in runs if r.info.status == "RUNNING"]
    assert not running, running
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert "error" not in parents[0].data.tags  # a stale error from the interrupted attempt is gone


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sent", "status", "reason"),
    [
        (signal.SIGKILL, -signal.SIGKILL, "killed"),
        (signal.SIGINT, 130, "interrupted by SIGINT"),
        (signal.SIGTERM, 143, "terminated by SIGTERM"),
    ],
)
def test_a_trial_stopped_by_a_signal_runs_again_when_the_sweep_resumes(tmp_path, sent, status, reason):
    first = Sweep(tmp_path, *SHORT_TRIAL, GRID, env=hold_run(2))
    first.wait_for("[trial 1] network.dim=8")
    first.wait_for(HOLD_LINE)  # inside trial 1's training
    first.process.send_signal(sent)
    assert first.finish() == status, first.output[-3000:]
    if sent != signal.SIGKILL:  # the worker's own clean-up: FAIL with the reason, MLflow run KILLED
        killed = study_of(tmp_path).get_trials()[1]
        assert killed.state == TrialState.FAIL and reason in killed.user_attrs["error"]
        trial_runs = [r for r in mlflow_runs(tmp_path) if r.data.tags.get("sweep.trial_number") == "1"]
        assert [r.info.status for r in trial_runs] == ["KILLED"]
        assert reason in trial_runs[0].data.tags["error"]

    again = Sweep(tmp_path, *SHORT_TRIAL, GRID)
    assert again.finish() == 0, again.output[-3000:]
    assert "2 trial(s) to run" in again.output  # the stopped trial's re-run and the last point
    study = study_of(tmp_path)
    assert_every_point_complete_once(study, "network.dim", [4, 8, 16])
    killed = study.get_trials()[1]
    assert killed.state == TrialState.FAIL and reason in killed.user_attrs["error"]
    rerun = next(t for t in study.get_trials() if t.system_attrs.get("failed_trial") == 1)
    assert rerun.state == TrialState.COMPLETE and rerun.params == {"network.dim": 8}
    assert rerun.user_attrs["error"] == "" and reason in rerun.user_attrs["previous_error"]
    runs = mlflow_runs(tmp_path)
    assert_nothing_left_running(runs)
    killed_run = next(r for r in runs if r.data.tags.get("sweep.trial_number") == "1")
    assert killed_run.info.status == "KILLED" and reason in killed_run.data.tags["error"]


@pytest.mark.slow
def test_a_deterministic_failure_is_reported_not_retried_and_the_sweep_exits_non_zero(tmp_path):
    """lr=1e30 makes the loss NaN at once: the same params would fail the same way again."""
    done = Sweep(tmp_path, *QUICK, "train.max_steps=4", "optimizer.lr=1e-3,1e30")
    assert done.finish() != 0
    assert "1 of 2 grid point(s) have no finished trial" in done.output
    trials = study_of(tmp_path).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL]
    assert trials[1].user_attrs["failure"] == "error"

    again = Sweep(tmp_path, *QUICK, "train.max_steps=4", "optimizer.lr=1e-3,1e30")
    assert again.finish() != 0
    assert "0 trial(s) to run" in again.output
    assert len(study_of(tmp_path).get_trials()) == 2  # not retried


@pytest.mark.slow
def test_a_journal_file_serves_one_worker_and_its_dead_trials_are_rerun(tmp_path):
    journal = f"hydra.sweeper.storage={tmp_path / 'study.log'}"
    first = Sweep(tmp_path, *SHORT_TRIAL, GRID, journal, env=hold_run(2))
    first.wait_for("[trial 0] network.dim=4")
    second = Sweep(tmp_path, *SHORT_TRIAL, GRID, journal)
    assert second.finish() != 0
    assert "journal storage has no heartbeat, so it serves one worker at a time" in second.output
    first.wait_for("[trial 1] network.dim=8")
    first.wait_for(HOLD_LINE)
    first.process.kill()
    first.finish()

    again = Sweep(tmp_path, *SHORT_TRIAL, GRID, journal)
    assert again.finish() == 0, again.output[-3000:]
    study = study_of(tmp_path, f"{tmp_path / 'study.log'}")
    assert_every_point_complete_once(study, "network.dim", [4, 8, 16])
    assert "killed" in study.get_trials()[1].user_attrs["error"]


def test_every_grid_point_is_checked_before_the_first_trial(tmp_path):
    done = Sweep(tmp_path, *QUICK, "network.dim=4,-3", "optimizer.lr=1e-3,nan")
    assert done.finish() != 0
    both = "[network.dim=-3 optimizer.lr=0.001 | network.dim=-3 optimizer.lr=nan]"
    assert f"{both} network.dim must be >= 1" in done.output
    assert "optimizer.lr" in done.output and "Traceback" not in done.output
    assert "nothing was trained" in done.output
    assert not (tmp_path / "outputs" / "optuna.db").exists() or not optuna.get_all_study_summaries(
        f"sqlite:///{tmp_path / 'outputs' / 'optuna.db'}"
    )


def test_a_database_url_without_its_driver_names_the_extra(tmp_path):
    done = Sweep(tmp_path, *QUICK, "network.dim=4,8", "hydra.sweeper.storage=postgresql+psycopg2://u@127.0.0.1/db")
    assert done.finish() != 0
    assert "pip install -e '.[postgres]'" in done.output


# --- a sweep stays itself: the same proposals after a resume, one parent per study


def tpe_lrs(study: optuna.Study) -> list[float]:
    return sorted(t.params["optimizer.lr"] for t in study.get_trials() if t.state == TrialState.COMPLETE)


@pytest.mark.slow
def test_an_interrupted_tpe_sweep_resumes_with_the_proposals_of_an_uninterrupted_one(tmp_path):
    args = [*SHORT_TRIAL, "optimizer.lr=tag(log, interval(1e-4,1e-2))", "hydra.sweeper.n_trials=4"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    straight.mkdir(), broken.mkdir()
    assert Sweep(straight, *args).finish() == 0

    first = Sweep(broken, *args, env=hold_run(2))
    first.wait_for("[trial 1] optimizer.lr=")
    first.wait_for(HOLD_LINE)
    first.process.send_signal(signal.SIGINT)
    assert first.finish() == 130, first.output[-3000:]
    assert "other worker(s) still run trials" not in first.output  # it was the only worker
    (parent,) = [r for r in mlflow_runs(broken) if r.data.tags.get("sweep.role") == "parent"]
    assert parent.info.status == "KILLED" and parent.info.end_time
    assert "interrupted by SIGINT" in parent.data.tags["error"]

    again = Sweep(broken, *args)
    assert again.finish() == 0, again.output[-3000:]
    assert tpe_lrs(study_of(broken)) == tpe_lrs(study_of(straight))  # the same 4 parameter sets
    (parent,) = [r for r in mlflow_runs(broken) if r.data.tags.get("sweep.role") == "parent"]
    assert parent.info.status == "FINISHED" and "error" not in parent.data.tags


@pytest.mark.slow
def test_the_same_search_in_a_new_storage_gets_its_own_parent_run(tmp_path):
    args = [*QUICK, "train.max_steps=2", "network.dim=4,8"]
    first = Sweep(tmp_path, *args, f"hydra.sweeper.storage=sqlite:///{tmp_path / 'one.db'}")
    assert first.finish() == 0, first.output[-3000:]
    second = Sweep(tmp_path, *args, f"hydra.sweeper.storage=sqlite:///{tmp_path / 'two.db'}")
    assert second.finish() == 0, second.output[-3000:]
    runs = mlflow_runs(tmp_path)
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    assert len(parents) == 2 and len({p.data.tags["sweep.study_uid"] for p in parents}) == 2
    for parent in parents:
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert sorted(int(c.data.params["network.dim"]) for c in children) == [4, 8]
        assert parent.data.metrics["trials/complete"] == 2.0
