"""Settings trained on K seeds: nested replicate runs, the aggregate and its labels, the file to take,
reproducing one replicate, sweeps that compare settings over seeds, resume and racing."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from sweeper import reproduce
from sweeper.run.fingerprint import file_sha256
from sweeper.run.replicates import replicate_seeds
from sweeper.search.settings_verdict import CELLS_ATTR
from tests.conftest import run_main
from tests.test_sweep_faults import QUICK, Sweep, hold_run, mlflow_runs, study_of
from training.fault_hold import HOLD_LINE
from training.network.file import lora_identity


def test_seeds_are_derived_from_train_seed_and_the_first_is_train_seed_itself():
    seeds = replicate_seeds(42, 4)
    assert seeds[0] == 42 and len(set(seeds)) == 4
    assert replicate_seeds(42, 4) == seeds  # every setting of a sweep gets the same seeds
    assert replicate_seeds(42, 2) == seeds[:2]  # racing's extensions keep the earlier seeds
    assert replicate_seeds(7, 2)[1] != seeds[1]
    labelled = replicate_seeds(42, 3, "a")
    assert labelled == replicate_seeds(42, 3, "a") and not set(labelled) & set(replicate_seeds(42, 3, "b"))


@pytest.fixture(scope="module")
def replicated(tmp_path_factory):
    """One setting trained on 2 seeds, in-process (shared by the tests below)."""
    from sweeper.run import task
    from sweeper.run.setting import run
    from tests.conftest import FAST, compose_config

    tmp = tmp_path_factory.mktemp("replicated")
    overrides = [
        f"output.dir={tmp / 'out'}",
        f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
        f"tracking.artifact_root={tmp / 'artifacts'}",
        *FAST,
        "train.max_steps=6",
        "eval.images_per_prompt=2",
        "train.replicates=2",
    ]
    loads = task._worker.model_loads
    result = run(compose_config(overrides), show_progress=False)
    return tmp, result, task._worker.model_loads - loads


def test_each_replicate_is_its_own_run_nested_under_the_settings_run(replicated):
    tmp, result, model_loads = replicated
    client = MlflowClient(result.tracking_uri)
    setting = client.get_run(result.run_id)
    children = client.search_runs(
        [setting.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{result.run_id}'"
    )
    assert sorted(int(r.data.params["train.seed"]) for r in children) == sorted(replicate_seeds(42, 2))
    assert {r.data.params["train.replicates"] for r in children} == {"1"}
    assert all(r.info.status == "FINISHED" for r in children) and setting.info.status == "FINISHED"
    assert setting.data.tags["replicates"] == "2" and setting.data.metrics["replicates"] == 2.0
    assert model_loads <= 1  # the second seed reuses the loaded base model
    # the setting's interval is over seeds x prompts x images, and says so
    metrics = setting.data.metrics
    assert metrics["clip_t/low"] <= metrics["clip_t"] <= metrics["clip_t/high"]
    assert "clip_t/seed_sd" in metrics and "clip_t_gain/low" in metrics
    assert all("[this setting (2 seeds)]" in line for line in result.summary)
    # the file to take: the replicate nearest the setting's mean, copied under the run's name
    representative = setting.data.tags["lora.representative_run_id"]
    assert representative in {r.info.run_id for r in children}
    chosen = next(r for r in children if r.info.run_id == representative)
    assert file_sha256(result.lora_path) == chosen.data.tags["lora.sha256"]
    assert sorted(p.name for p in (tmp / "out").glob("seed-*")) == sorted(f"seed-{s}" for s in replicate_seeds(42, 2))
    assert (tmp / "out" / "replicates.tsv").read_text().count("\n") == 3


def test_one_replicate_reproduces_bit_identically(replicated, tmp_path, capsys, monkeypatch):
    _, result, _ = replicated
    monkeypatch.chdir(tmp_path)
    second = next(r for r in result.replicates if r["index"] == 1)
    code = reproduce.main(
        [second["run_id"], "--tracking-uri", result.tracking_uri, "--output-dir", str(tmp_path / "r")]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert lora_identity(tmp_path / "r" / "lora.safetensors") == lora_identity(Path(second["lora_file"]))


def test_a_run_on_one_seed_labels_its_intervals_as_this_file(make_cfg):
    from sweeper.run.setting import run

    result = run(make_cfg("train.max_steps=2"), show_progress=False)
    assert result.summary and all("[this file]" in line for line in result.summary)
    assert not result.replicates


def test_replicates_below_one_and_replicates_with_resume_are_refused_before_training(make_cfg):
    from sweeper.config.validate import ConfigError, validate

    with pytest.raises(ConfigError) as error:
        validate(make_cfg("train.replicates=0"))
    assert "train.replicates must be >= 1" in str(error.value)
    with pytest.raises(ConfigError) as error:
        validate(make_cfg("train.replicates=2", "train.resume=/nowhere"))
    assert "train.resume continues one run" in str(error.value)


def test_checkpoints_are_chosen_on_one_half_of_the_images_and_scored_on_the_other(make_cfg):
    from sweeper.run.setting import run
    from sweeper.run.task import SCORED_ON_HALF

    result = run(make_cfg("train.max_steps=4", "eval.every_n_steps=2", "eval.images_per_prompt=2"), show_progress=False)
    client = MlflowClient(result.tracking_uri)
    tags = client.get_run(result.run_id).data.tags
    assert tags["eval.scored_on"] == SCORED_ON_HALF and tags["intervals"].startswith("this file")
    assert len(result.per_image["clip_t"]) == 2  # 2 prompts x 2 images, half of them reported
    assert len(result.baseline_per_image["clip_t"]) == 2


# --- sweeps over settings with replicates (real processes)

QUICK_SWEEP = [*QUICK, "train.max_steps=4", "eval.images_per_prompt=2", "eval.prompts=[a red circle,a blue square]"]


@pytest.mark.slow
def test_an_aa_sweep_with_replicates_compares_settings_over_seeds(tmp_path):
    done = run_main("-m", *QUICK_SWEEP, "sweep.label=a,b,c", "hydra.sweeper.replicates=2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    study = study_of(tmp_path)
    trials = study.get_trials()
    assert len(trials) == 3 and all(len(t.user_attrs[CELLS_ATTR]) == 2 for t in trials)
    # each label is the same setting on seeds of its own: an A/A sweep
    by_label = {t.params["sweep.label"]: t.user_attrs["replicate_seeds"] for t in trials}
    assert by_label == {label: replicate_seeds(42, 2, label) for label in "abc"}
    assert len({seed for seeds in by_label.values() for seed in seeds}) == 6
    assert "Verdict on clip_score over training seeds" in done.stdout
    # (whether an A/A verdict stays quiet is a matter of rates: tests/test_verdicts.py, and the toy
    # world's A/A sweep in tests/test_toy_verdicts.py; here the wording and the bookkeeping)
    assert "with 2 seeds x 2 images" in done.stdout or "worse than the best" in done.stdout
    assert "seed SD of one run's clip_score" in done.stdout
    runs = mlflow_runs(tmp_path)
    parent = next(r for r in runs if r.data.tags.get("sweep.role") == "parent")
    settings = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(settings) == 3 and all(r.data.tags["replicates"] == "2" for r in settings)
    replicates = [r for r in runs if r.data.tags.get("mlflow.parentRunId") in {s.info.run_id for s in settings}]
    assert len(replicates) == 6 and all(r.data.tags.get("sweep.trial_number") for r in replicates)
    table = MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}").download_artifacts(
        parent.info.run_id, "sweep/trials.csv"
    )
    lines = Path(table).read_text().splitlines()
    assert {"interval", "seeds", "vs_best"} <= set(lines[0].split(","))
    assert all("[this setting (2 seeds)]" in line for line in lines[1:])


@pytest.mark.slow
def test_a_one_seed_sweep_makes_no_claim_between_settings(tmp_path):
    done = run_main("-m", *QUICK_SWEEP, "train.seed=1,2,3", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "No verdict between settings: each was trained on one seed" in done.stdout
    assert "seed SD of one run's clip_score, from trials that differ only in train.seed" in done.stdout
    assert "worse" not in done.stdout.split("No verdict")[1]


@pytest.mark.slow
def test_an_interrupted_setting_resumes_without_retraining_its_finished_seeds(tmp_path):
    args = [
        *QUICK,
        "train.max_steps=4",
        "eval.prompts=[a red circle]",
        "network.dim=4,8",
        "hydra.sweeper.replicates=2",
    ]
    first = Sweep(tmp_path, *args, env=hold_run(2))  # held in the first setting's second seed
    first.wait_for("replicate 2/2")
    first.wait_for(HOLD_LINE)
    first.process.send_signal(signal.SIGINT)
    assert first.finish() == 130, first.output[-3000:]
    interrupted = study_of(tmp_path).get_trials()[0]
    assert interrupted.state == TrialState.FAIL and set(interrupted.user_attrs) >= {"replicate.0"}
    kept = interrupted.user_attrs["replicate.0"]["run_id"]

    again = Sweep(tmp_path, *args)
    assert again.finish() == 0, again.output[-3000:]
    assert f"finished by an earlier attempt (run {kept}), not retrained" in again.output
    rerun = next(t for t in study_of(tmp_path).get_trials() if t.system_attrs.get("failed_trial") == 0)
    assert rerun.state == TrialState.COMPLETE and len(rerun.user_attrs[CELLS_ATTR]) == 2
    runs = mlflow_runs(tmp_path)
    first_seed = [r for r in runs if r.data.tags.get("replicate") == "0" and r.data.params["network.dim"] == "4"]
    assert [r.info.run_id for r in first_seed] == [kept]  # trained once


@pytest.mark.slow
def test_a_racing_sweep_gives_the_leader_every_seed_and_reports_the_saving(tmp_path):
    done = run_main(
        "-m",
        *QUICK_SWEEP,
        "network.dim=2,4,8",
        "hydra.sweeper.replicates=3",
        "hydra.sweeper.racing=true",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    study = study_of(tmp_path)
    complete = [t for t in study.get_trials() if t.state == TrialState.COMPLETE]
    seeds = {t.params["network.dim"]: len(t.user_attrs[CELLS_ATTR]) for t in complete}  # the latest of each
    assert set(seeds) == {2, 4, 8} and min(seeds.values()) >= 2
    extensions = [t for t in complete if "extends" in t.user_attrs]
    assert extensions and all(t.user_attrs["replicates_target"] == 3 for t in extensions)
    assert "Racing trained" in done.stdout and "seed-runs" in done.stdout
    # an extension carries the seeds it extends: each setting's seeds were trained once
    first_seed_runs = [r for r in mlflow_runs(tmp_path) if r.data.tags.get("replicate") == "0"]
    assert len(first_seed_runs) == 3


def _trial(number: int, dim: int, cells: dict[int, list[float]], extends: int | None = None):
    attrs = {CELLS_ATTR: {str(k): v for k, v in cells.items()}}
    if extends is not None:
        attrs["extends"] = extends
    return optuna.trial.create_trial(
        params={"network.dim": dim},
        distributions={"network.dim": optuna.distributions.CategoricalDistribution([2, 4, 8])},
        value=sum(sum(v) / len(v) for v in cells.values()) / len(cells),
        user_attrs=attrs,
    )


def _numbered(trials):
    study = optuna.create_study(direction="maximize")
    for trial in trials:
        study.add_trial(trial)
    return study.get_trials()


def test_race_step_drops_a_setting_significantly_worse_and_extends_the_others():
    from sweeper.search.settings_verdict import current_settings, race_step

    rng = np.random.default_rng(0)
    base = rng.normal(30, 2, size=(3, 6))  # 3 seeds x 6 prompts, shared by the settings (same seeds and images)
    noisy = [base + rng.normal(0, 0.3, size=base.shape) for _ in range(3)]
    noisy[2] -= 5.0  # a clearly worse setting

    def cells(setting: int, seeds: int) -> dict[int, list[float]]:
        return {k: noisy[setting][k].tolist() for k in range(seeds)}

    trials = _numbered([_trial(0, 2, cells(0, 2)), _trial(1, 4, cells(1, 2)), _trial(2, 8, cells(2, 2))])
    step = race_step(trials, maximize=True, max_seeds=3)
    assert step is not None and step.trial.number in (0, 1) and step.target == 3
    # the worse setting is never extended; once both contenders have 3 seeds the race is over
    more = [*trials[:3], _trial(3, 2, cells(0, 3), extends=0), _trial(4, 4, cells(1, 3), extends=1)]
    trials = _numbered(more)
    assert sorted(current_settings(trials)) == [2, 3, 4]  # trials 0 and 1 were extended
    assert race_step(trials, maximize=True, max_seeds=3) is None


def test_racing_needs_a_grid_and_at_least_three_replicates(tmp_path):
    done = run_main("-m", *QUICK_SWEEP, "network.dim=4,8", "hydra.sweeper.racing=true", cwd=tmp_path)
    assert done.returncode == 2 and "set hydra.sweeper.replicates=3 or more" in done.stderr
    done = run_main(
        "-m",
        *QUICK_SWEEP,
        "optimizer.lr=interval(1e-4,1e-3)",
        "hydra.sweeper.racing=true",
        "hydra.sweeper.replicates=3",
        cwd=tmp_path,
    )
    assert done.returncode == 2 and "races the points of a grid" in done.stderr
