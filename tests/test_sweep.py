"""``python -m sweeper -m ...``: real Optuna sweeps over the tiny model, checked in Optuna and MLflow.

The sweeps run inside the test process (``run_main``: the same entry point and output); what only a
new process shows (signals, several workers, the command line) is in test_sweep_faults and test_cli.
"""

from __future__ import annotations

import base64
import csv
import gzip
import io
import re
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from plotly.offline import get_plotlyjs

from tests.conftest import run_main

FAST_TRIAL = ["train.max_steps=4", "train.batch_size=2", "eval.num_inference_steps=2", "eval.images_per_prompt=1"]


def storage(cwd: Path) -> str:
    return f"sqlite:///{cwd / 'outputs' / 'optuna.db'}"


def mlflow(cwd: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{cwd / 'outputs' / 'mlflow.db'}")


def sweep(cwd: Path, *args: str):
    done = run_main("-m", *FAST_TRIAL, *args, cwd=cwd)
    return done


def only_study(cwd: Path) -> optuna.Study:
    summaries = optuna.get_all_study_summaries(storage(cwd))
    assert len(summaries) == 1
    return optuna.load_study(study_name=summaries[0].study_name, storage=storage(cwd))


def runs_of(cwd: Path):
    client = mlflow(cwd)
    experiment = client.get_experiment_by_name("lora-sweeper")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def report_of(stdout: str, client: MlflowClient, parent_id: str) -> str:
    """The sweep report named on the terminal, checked to be the one on the parent run, self-contained
    and small: one copy of plotly.js (gzip, base64) for every plot, nothing loaded from elsewhere."""
    path = Path(re.search(r"\nSweep report \([^)]*\): (\S+report\.html) \(and sweep/report\.html", stdout)[1])
    report = path.read_text()
    assert Path(client.download_artifacts(parent_id, "sweep/report.html")).read_text() == report
    assert report.count("id=plotly-js-gzip>") == 1 and "<script src=" not in report and "src='http" not in report
    packed = report.split("id=plotly-js-gzip>")[1].split("<")[0]
    assert gzip.decompress(base64.b64decode(packed)).decode() == get_plotlyjs()
    assert report.count("class=figure") >= 2  # optimization history, parallel coordinates (+ importances)
    assert len(report.encode()) < 2.5e6  # measured 2.0 MB; plotly.js alone is 4.8 MB uncompressed
    return report


def leaderboard(report: str) -> str:
    return report.split("<h2>Leaderboard</h2>")[1].split("<h2>")[0]


def grids(report: str) -> str:
    return report.split("<h2>Sample grids</h2>")[1].split("<h2>")[0]


@pytest.mark.slow
def test_a_grid_over_dim_runs_exactly_those_trials_under_one_parent(tmp_path):
    done = sweep(tmp_path, "network.dim=4,8,16")
    assert done.returncode == 0, done.stderr[-3000:]

    study = only_study(tmp_path)
    trials = study.get_trials()
    assert len(trials) == 3 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert sorted(t.params["network.dim"] for t in trials) == [4, 8, 16]

    client, parents, children = runs_of(tmp_path)
    assert len(parents) == 1 and len(children) == 3
    parent = parents[0]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert sorted(int(c.data.params["network.dim"]) for c in children) == [4, 8, 16]
    assert {c.data.tags["sweep.trial_number"] for c in children} == {"0", "1", "2"}
    assert parent.data.tags["sweep.sampler"] == "grid"
    assert parent.data.params["sweep.space.network.dim"] == "choice(4, 8, 16)"

    best = study.best_trial
    assert parent.data.tags["best.trial_number"] == str(best.number)
    assert parent.data.tags["best.mlflow_run_id"] == best.user_attrs["mlflow_run_id"]
    assert re.search(
        rf"Best: trial {best.number} \(clip_score=[\d.]+\) network.dim={best.params['network.dim']}", done.stdout
    )
    table = list(
        csv.DictReader(io.StringIO(Path(client.download_artifacts(parent.info.run_id, "sweep/trials.csv")).read_text()))
    )
    assert [row["state"] for row in table] == ["COMPLETE"] * 3
    # the report: every trial's row, grid and reproduce command, the plots on one copy of plotly.js
    report = report_of(done.stdout, client, parent.info.run_id)
    for trial in trials:
        run_id = trial.user_attrs["mlflow_run_id"]
        assert f"<td>{run_id}</td>" in leaderboard(report)
        assert f"trial {trial.number}: network.dim={trial.params['network.dim']};" in grids(report)
        assert re.search(rf"-m sweeper\.reproduce {run_id}(\n|</pre>)", report)
    assert grids(report).count("<img src='data:image/") == 4  # the base model and each trial
    assert f"cd {tmp_path} &amp;&amp; " in report and "-m sweeper -m train.max_steps=4 " in report
    assert "network.dim=4,8,16</pre>" in report  # the resume command is the sweep's own
    assert "eval.test_seed = 1234 in every column" in report
    assert not client.list_artifacts(parent.info.run_id, "sweep/plots")  # no more 4.8 MB copy per plot

    experiment = client.get_experiment_by_name("lora-sweeper")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # a training experiment
    # what a runs table reads: trials by their swept values, the parent by experiment, keys and time
    assert sorted(c.info.run_name for c in children) == ["trial 0: dim=4", "trial 1: dim=8", "trial 2: dim=16"]
    assert re.fullmatch(r"lora-sweeper sweep dim \d\d-\d\d \d\d:\d\d", parent.info.run_name)
    # the terminal: one line per trial start and end, then the table; no job internals
    assert "sweep.study_name=" not in done.stdout and "Launching 1 jobs" not in done.stdout + done.stderr
    assert done.stdout.count("MLflow UI:") == 1 and "ExperimentalWarning" not in done.stderr
    assert re.search(r"\[trial 1\] COMPLETE clip_score=[\d.]+\n", done.stdout)

    # the same command again: every grid point is done, nothing re-runs
    again = sweep(tmp_path, "network.dim=4,8,16")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 trial(s) to run" in again.stdout
    assert len(only_study(tmp_path).get_trials()) == 3
    _, parents_after, children_after = runs_of(tmp_path)
    assert len(parents_after) == 1 and len(children_after) == 3


@pytest.mark.slow
def test_tpe_over_an_interval_is_bounded_and_reproducible(tmp_path):
    params = []
    for name in ("first", "second"):
        cwd = tmp_path / name
        cwd.mkdir()
        done = sweep(
            cwd,
            "optimizer.lr=tag(log, interval(1e-4,1e-2))",
            "hydra.sweeper.n_trials=4",
            "hydra.sweeper.seed=7",
        )
        assert done.returncode == 0, done.stderr[-3000:]
        trials = only_study(cwd).get_trials()
        assert len(trials) == 4
        lrs = [t.params["optimizer.lr"] for t in sorted(trials, key=lambda t: t.number)]
        printed = re.findall(r"\[trial \d\] optimizer.lr=(\S+)", done.stdout)
        assert printed == [f"{lr:.4g}" for lr in lrs]  # 4 significant digits on the terminal
        assert all(1e-4 <= lr <= 1e-2 for lr in lrs)
        assert len(set(lrs)) == 4
        params.append(lrs)
        _, _, children = runs_of(cwd)
        assert sorted(float(c.data.params["optimizer.lr"]) for c in children) == pytest.approx(sorted(lrs))
    assert params[0] == params[1]


@pytest.mark.slow
def test_running_the_same_sweep_again_resumes_it(tmp_path):
    args = ["network.dim=int(interval(2,16))"]
    first = sweep(tmp_path, *args, "hydra.sweeper.n_trials=1")
    assert first.returncode == 0, first.stderr[-3000:]
    trial_zero = only_study(tmp_path).get_trials()[0]

    second = sweep(tmp_path, *args, "hydra.sweeper.n_trials=3")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "2 trial(s) to run" in second.stdout
    trials = only_study(tmp_path).get_trials()
    assert [t.number for t in trials] == [0, 1, 2]
    assert trials[0].user_attrs["mlflow_run_id"] == trial_zero.user_attrs["mlflow_run_id"]
    assert trials[0].datetime_complete == trial_zero.datetime_complete  # not run again
    _, parents, children = runs_of(tmp_path)
    assert len(parents) == 1 and len(children) == 3


def test_the_pruner_stops_a_bad_trial_early(tmp_path):
    """A study whose finished trial scored 100 at every step: any real trial is worse, and is pruned."""
    name = "pruning"
    (tmp_path / "outputs").mkdir()
    study = optuna.create_study(study_name=name, storage=storage(tmp_path), direction="maximize")
    lr = optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)
    study.add_trial(
        optuna.trial.create_trial(
            params={"optimizer.lr": 1e-3},
            distributions={"optimizer.lr": lr},
            value=100.0,
            intermediate_values={step: 100.0 for step in range(2, 12, 2)},
        )
    )
    done = run_main(
        "-m",
        "train.batch_size=2",
        "eval.num_inference_steps=2",
        "eval.images_per_prompt=1",
        "train.max_steps=10",
        "eval.every_n_steps=2",
        "optimizer.lr=tag(log, interval(1e-4,1e-2))",
        f"hydra.sweeper.study_name={name}",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.pruner=median",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    trial = optuna.load_study(study_name=name, storage=storage(tmp_path)).get_trials()[1]
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert trial.last_step == 2
    run = mlflow(tmp_path).get_run(trial.user_attrs["mlflow_run_id"])
    assert run.data.tags["pruned"] == "true"
    assert run.data.metrics["train/steps_done"] == 2  # of 10 configured
    assert run.data.metrics["clip_score"] == pytest.approx(trial.intermediate_values[2])
    assert "[trial 1] PRUNED at step 2" in done.stdout
    assert re.search(r"\n1\s+PRUNED@2\s+\S+\s+[\d.]+ \(pruned at step 2\)", done.stdout)


def test_a_failing_trial_is_fail_and_the_sweep_goes_on(tmp_path):
    """lr=1e30 passes the startup checks but makes the loss NaN: that trial fails, the other runs,
    and the sweep ends non-zero because a grid point has no result."""
    done = sweep(tmp_path, "optimizer.lr=1e30,1e-3")
    assert done.returncode == 1, done.stderr[-3000:]
    assert "1 of 2 grid point(s) have no finished trial" in done.stderr
    trials = {t.params["optimizer.lr"]: t for t in only_study(tmp_path).get_trials()}
    failed, ok = trials[1e30], trials[1e-3]
    assert failed.state == optuna.trial.TrialState.FAIL and "loss became" in failed.user_attrs["error"]
    assert ok.state == optuna.trial.TrialState.COMPLETE
    # the table holds the finished trials; failures are listed apart with their reasons
    listed = rf"Failed:\n  trial {failed.number} optimizer.lr=1e\+30: NonFiniteLossError: loss became"
    assert re.search(listed, done.stdout)

    client, parents, children = runs_of(tmp_path)
    statuses = sorted(c.info.status for c in children)
    assert statuses == ["FAILED", "FINISHED"]
    failed_run = next(c for c in children if c.info.status == "FAILED")
    assert "loss became" in failed_run.data.tags["error"]
    table = Path(client.download_artifacts(parents[0].info.run_id, "sweep/trials.csv")).read_text()
    assert "FAIL" in table and "COMPLETE" in table
    # the report lists the failure with its reason and shows the finished trial's grid only
    report = report_of(done.stdout, client, parents[0].info.run_id)
    failed_section = report.split("<h2 id=failed>")[1].split("<h2>")[0]
    assert re.search(
        rf"<td>{failed.number}</td><td>FAIL</td><td>optimizer.lr=1e\+30</td><td>[^<]*loss became", failed_section
    )
    assert f"trial {ok.number}: optimizer.lr=0.001;" in grids(report) and f"trial {failed.number}:" not in grids(report)
    assert f"-m sweeper.reproduce {ok.user_attrs['mlflow_run_id']}" in report


def test_too_many_failures_stop_the_sweep_with_the_first_error(tmp_path):
    done = sweep(tmp_path, "optimizer.lr=1e30,2e30,3e30,4e30", "hydra.sweeper.max_failure_rate=0.5")
    assert done.returncode != 0
    assert "max_failure_rate" in done.stderr and "First error: trial 0" in done.stderr
    assert len(only_study(tmp_path).get_trials()) == 2  # stopped after 2 of 4


def test_two_objectives_give_a_pareto_front(tmp_path):
    done = sweep(
        tmp_path,
        "network.dim=2,16",
        "hydra.sweeper.objective=[clip_score,lora_file_mb]",
        "hydra.sweeper.direction=[maximize,minimize]",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    study = only_study(tmp_path)
    assert len(study.directions) == 2 and len(study.get_trials()) == 2
    sizes = {t.params["network.dim"]: t.values[1] for t in study.get_trials()}
    assert sizes[2] < sizes[16]  # the file-size objective really is the LoRA file's size
    assert "Pareto front: trial" in done.stdout
    client, parents, _ = runs_of(tmp_path)
    front = parents[0].data.tags["pareto.trial_numbers"].split(",")
    assert front
    grids = {a.path for a in client.list_artifacts(parents[0].info.run_id, "sweep/pareto")}
    assert grids == {f"sweep/pareto/trial_{n}.png" for n in front}  # each front member's sample grid


@pytest.mark.slow
def test_a_search_preset_defines_the_space(tmp_path):
    done = sweep(tmp_path, "+search=lr_grid")
    assert done.returncode == 0, done.stderr[-3000:]
    lrs = sorted(t.params["optimizer.lr"] for t in only_study(tmp_path).get_trials())
    assert lrs == [1e-4, 3e-4, 1e-3, 3e-3]


def test_the_fidelity_vs_alignment_preset_is_a_two_objective_study(tmp_path):
    """The preset composes (without training): objectives clip_i and clip_t, both maximised."""
    done = run_main("+search=fidelity_vs_alignment", "--cfg", "hydra", "--package", "hydra.sweeper", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"objective:\s*\n\s*- clip_i\s*\n\s*- clip_t", done.stdout), done.stdout
    assert "network.dim: 4,8,16" in done.stdout


def test_the_network_type_preset_searches_each_types_learning_rate_in_its_own_range(tmp_path):
    from omegaconf import OmegaConf

    from tests.test_sweep_faults import study_of

    preset = OmegaConf.load(Path(__file__).resolve().parent.parent / "conf" / "search" / "network_type.yaml")
    ranges = preset.conditional["network.type"]["optimizer.lr"]
    done = run_main(
        "-m", "+search=network_type", "+debug=fast", "hydra.sweeper.n_trials=4", "train.max_steps=2", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    trials = study_of(tmp_path).get_trials()
    assert len(trials) == 4
    for trial in trials:
        low, high = (float(x) for x in re.findall(r"[\d.e-]+", ranges[trial.params["network.type"]])[-2:])
        assert low <= trial.params["optimizer.lr"] <= high, trial.params
    header = next(line for line in done.stdout.splitlines() if line.startswith("number"))
    assert header.split()[2:5] == ["network.type", "network.dim", "optimizer.lr"]
