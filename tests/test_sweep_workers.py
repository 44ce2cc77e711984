"""Many workers on one study: started at the same instant on fresh stores, one frozen mid-trial,
and ``hydra.sweeper.n_workers`` starting them from one command. Real PostgreSQL, MariaDB and a real
``mlflow server`` (tests/servers.py says how to run these where those servers are missing)."""

from __future__ import annotations

import signal
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from tests.servers import create_postgres_database, drop_postgres_database
from tests.test_sweep_faults import QUICK, SHORT_TRIAL, Sweep, assert_every_point_complete_once, hold_run, study_of
from training.fault_hold import HOLD_LINE

GRID4 = "network.dim=2,4,8,16"
STEADY_TRIAL = [*QUICK, "train.max_steps=40"]  # a few seconds each: both workers get a share


def only_study(storage: str) -> optuna.Study:
    (summary,) = optuna.get_all_study_summaries(storage)
    return optuna.load_study(study_name=summary.study_name, storage=storage)


def workers_of(study: optuna.Study) -> set[str]:
    return {t.user_attrs["worker.pid"] for t in study.get_trials() if t.state == TrialState.COMPLETE}


@pytest.fixture
def optuna_postgres_url():
    """A second fresh PostgreSQL database, for Optuna (the MLflow server has its own)."""
    database = create_postgres_database()
    try:
        yield database.url
    finally:
        drop_postgres_database(database)


@pytest.mark.slow
def test_two_workers_started_at_once_on_fresh_stores_split_a_grid(tmp_path, optuna_postgres_url, mlflow_server):
    args = [*STEADY_TRIAL, GRID4, f"hydra.sweeper.storage={optuna_postgres_url}", f"tracking.uri={mlflow_server.url}"]
    workers = [Sweep(tmp_path, *args), Sweep(tmp_path, *args)]
    for worker in workers:
        assert worker.finish() == 0, worker.output[-3000:]

    study = only_study(optuna_postgres_url)
    assert_every_point_complete_once(study, "network.dim", [2, 4, 8, 16])
    assert len(study.get_trials()) == 4  # no point ran twice
    assert len(workers_of(study)) == 2  # both took trials

    client = MlflowClient(mlflow_server.url)
    (experiment,) = [e for e in client.search_experiments() if e.name == "lora-sweeper"]
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 4 and {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert parents[0].data.tags["best.trial_number"] in {"0", "1", "2", "3"}


@pytest.mark.slow
def test_two_tpe_workers_end_with_exactly_n_trials_all_distinct(tmp_path, mariadb_url):
    """On MariaDB (its named lock), with a local MLflow store both create at once."""
    args = [
        *STEADY_TRIAL,
        "optimizer.lr=tag(log, interval(1e-4,1e-2))",
        "hydra.sweeper.n_trials=4",
        f"hydra.sweeper.storage={mariadb_url}",
    ]
    workers = [Sweep(tmp_path, *args), Sweep(tmp_path, *args)]
    for worker in workers:
        assert worker.finish() == 0, worker.output[-3000:]
    study = only_study(mariadb_url)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert len({t.params["optimizer.lr"] for t in trials}) == 4
    outputs = "".join(worker.output for worker in workers)
    assert "(worker 0, seed 0)" in outputs and "(worker 1, seed 0)" in outputs  # seeded per proposal, not per worker


@pytest.mark.slow
def test_a_frozen_workers_trial_is_rerun_by_the_survivor_after_the_heartbeat_grace(tmp_path):
    """SIGSTOP: the process lives but its heartbeat stops, as for a hung or partitioned machine."""
    args = [*SHORT_TRIAL, "network.dim=4,8", "hydra.sweeper.heartbeat_seconds=1", "hydra.sweeper.grace_seconds=5"]
    frozen = Sweep(tmp_path, *args, env=hold_run(1))
    frozen.wait_for("[trial 0] network.dim=4")
    frozen.wait_for(HOLD_LINE)  # alive, mid-training, heartbeat running
    frozen.process.send_signal(signal.SIGSTOP)
    try:
        survivor = Sweep(tmp_path, *args)
        assert survivor.finish() == 0, survivor.output[-3000:]
    finally:
        frozen.process.kill()
        frozen.finish()
    assert "stopped its heartbeat for 5 s" in survivor.output
    study = study_of(tmp_path)
    assert_every_point_complete_once(study, "network.dim", [4, 8])
    stale = study.get_trials()[0]
    assert stale.state == TrialState.FAIL and "stopped its heartbeat" in stale.user_attrs["error"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("lora-sweeper").experiment_id])
    stale_run = next(r for r in runs if r.data.tags.get("sweep.trial_number") == "0")
    assert stale_run.info.status == "KILLED" and "heartbeat" in stale_run.data.tags["error"]


@pytest.mark.slow
def test_n_workers_starts_that_many_processes_on_one_study(tmp_path):
    done = Sweep(tmp_path, *STEADY_TRIAL, GRID4, "hydra.sweeper.n_workers=2")
    assert done.finish() == 0, done.output[-3000:]
    assert "Starting 2 sweep workers on the CPU" in done.output
    assert "[worker 0] " in done.output and "[worker 1] " in done.output
    study = study_of(tmp_path)
    assert_every_point_complete_once(study, "network.dim", [2, 4, 8, 16])
    assert len(study.get_trials()) == 4 and len(workers_of(study)) == 2
    assert len(list(Path(tmp_path / "outputs" / "multirun").glob("*/*/multirun.yaml"))) == 1  # one sweep folder


@pytest.mark.slow
def test_the_submitit_launcher_runs_each_trial_as_its_own_job(tmp_path):
    """Hydra's submitit launcher (submitit_local here; submitit_slurm on a cluster) with our sweeper."""
    done = Sweep(tmp_path, *QUICK, "train.max_steps=4", "network.dim=4,8", "hydra/launcher=submitit_local")
    assert done.finish() == 0, done.output[-3000:]
    study = study_of(tmp_path)
    assert_every_point_complete_once(study, "network.dim", [4, 8])
    job_logs = list(Path(tmp_path / "outputs" / "multirun").glob("*/*/.submitit/*/*_result.pkl"))
    assert len(job_logs) == 2  # each trial ran as a submitit job, in its own process
