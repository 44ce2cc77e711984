"""The sweep report's page from a real (in-memory) Optuna study, without training: what it says about
failed and pruned trials, that it escapes what it shows, carries plotly.js once and is written whole.
The end-to-end report (grids from MLflow, the parent run's artifact) is checked in tests/test_sweep.py."""

from __future__ import annotations

import shlex
import sys

import optuna
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

from sweeper.search.report import SweepSummary
from sweeper.search.report_html import Commands, _same_columns, resume_command, write_report
from sweeper.search.space import SearchSpace


def test_the_page_lists_failed_and_pruned_trials_escapes_values_and_embeds_plotly_once(tmp_path):
    study = optuna.create_study(direction="maximize", study_name="<b>study</b>", pruner=optuna.pruners.MedianPruner())
    dims = CategoricalDistribution(["4", "8", "<script>x</script>"])
    for number, dim, value in ((0, "4", 30.0), (1, "8", 31.5)):
        attrs = {"mlflow_run_id": f"run{number}"}
        study.add_trial(create_trial(params={"dim": dim}, distributions={"dim": dims}, value=value, user_attrs=attrs))
    study.add_trial(
        create_trial(
            params={"dim": "<script>x</script>"},
            distributions={"dim": dims},
            state=TrialState.FAIL,
            user_attrs={"error": "NonFiniteLossError: loss <nan>", "failure": "error"},
        )
    )
    study.add_trial(
        create_trial(
            params={"dim": "4"},
            distributions={"dim": dims},
            state=TrialState.PRUNED,
            intermediate_values={2: 12.0},
            user_attrs={"mlflow_run_id": "run3", "pruned_at_step": 2},
        )
    )
    summary = SweepSummary(study, SearchSpace({"dim": dims}, {}, []), ["clip_score"], ["maximize"], "grid", "sqlite://")
    commands = Commands(tmp_path, "cd /x && python -m sweeper -m dim=4,8", "")

    path = write_report(summary, tmp_path, commands, tracking_uri=None, parent_run_id=None)

    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # written under a temporary name, then renamed
    page = path.read_text()
    board = page.split("<h2>Leaderboard</h2>")[1].split("<h2>")[0]
    assert board.index("<td>run1</td>") < board.index("<td>run0</td>") < board.index("<td>run3</td>")  # best first
    assert "<tr class=best><td>1</td>" in board and "<td>FAIL</td>" not in board  # failures listed apart
    failed = page.split("<h2 id=failed>")[1].split("<h2>")[0]
    assert "<td>2</td><td>FAIL</td><td>dim=&lt;script&gt;x&lt;/script&gt;</td>" in failed
    assert "loss &lt;nan&gt; (failure=error)" in failed and "not re-run" in failed
    assert "<td>3</td><td>PRUNED</td>" in failed and "pruned at step 2 by MedianPruner" in failed
    assert "<script>x" not in page and "&lt;b&gt;study&lt;/b&gt;" in page
    assert "tracking is off" in page  # no MLflow: no grids, said so
    assert page.count("id=plotly-js-gzip>") == 1 and page.count("Plotly.newPlot") == 1
    assert 1.5e6 < len(page) < 2.3e6  # one gzip+base64 copy of plotly.js (4.8 MB raw) and little else
    for run_id in ("run0", "run1", "run3"):
        assert f"-m sweeper.reproduce {run_id}" in page
    assert "cd /x &amp;&amp; python -m sweeper -m dim=4,8" in page


def test_the_resume_command_is_the_sweeps_own_line_quoted_for_a_shell(tmp_path):
    config = OmegaConf.create(
        {
            "hydra": {
                "overrides": {
                    "hydra": ["hydra.mode=MULTIRUN", "hydra.sweeper.n_trials=20"],
                    "task": ["optimizer.lr=tag(log, interval(1e-5,1e-3))", "network.dim=8,16"],
                }
            }
        }
    )
    line = resume_command(config, tmp_path)
    assert shlex.split(line) == [
        "cd",
        str(tmp_path),
        "&&",
        sys.executable,
        "-m",
        "sweeper",
        "-m",
        "optimizer.lr=tag(log, interval(1e-5,1e-3))",
        "network.dim=8,16",
        "hydra.sweeper.n_trials=20",
    ]


def test_the_page_says_when_the_columns_differ_in_prompts_or_seeds():
    lines = _same_columns({0: {"eval.test_seed": "1234"}, 1: {"eval.test_seed": "1234"}, 2: {"eval.test_seed": "7"}})
    assert "eval.test_seed DIFFERS between columns (1234: trials 0, 1; 7: trials 2)" in lines
    assert "eval.test_seed = 1234 in every column" in _same_columns({0: {"eval.test_seed": "1234"}})
