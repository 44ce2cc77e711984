"""The sweep's verdict on real training (the toy world, CPU): an A/A sweep of one setting finds nothing,
a learning rate 10x too high is found worse. Shortened runs (60 steps, 18 images) keep it affordable."""

from __future__ import annotations

import re

import pytest

from tests.conftest import run_main
from tests.test_sweep_faults import study_of

TOY_SHORT = [
    "train.max_steps=60",
    "eval.every_n_steps=0",
    "eval.select=last",
    "eval.images_per_prompt=3",
    "eval.num_inference_steps=8",
    "hydra.sweeper.replicates=3",
]


@pytest.mark.slow
def test_an_aa_sweep_on_the_toy_world_finds_no_difference(tmp_path):
    # one setting, four labels: each copy trains on 3 seeds of its own (README: How sure is the verdict?)
    done = run_main("-m", *TOY_SHORT, "sweep.label=a,b,c,d", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Holm over all 6 pairs of settings" in done.stdout, done.stdout[-3000:]
    assert "worse than the best" not in done.stdout and "significantly different" not in done.stdout
    assert done.stdout.count("not distinguishable from the best with 3 seeds x 18 images") == 3


@pytest.mark.slow
def test_a_learning_rate_ten_times_too_high_is_found_worse_over_seeds(tmp_path):
    done = run_main("-m", *TOY_SHORT, "optimizer.lr=1e-3,1e-2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    best = next(t for t in study_of(tmp_path).get_trials() if t.params["optimizer.lr"] == 1e-3)
    assert f"best: trial {best.number} optimizer.lr=0.001" in done.stdout, done.stdout[-3000:]
    assert "optimizer.lr=0.01: worse than the best" in done.stdout


@pytest.mark.slow
def test_a_network_type_sweep_runs_every_type_and_gives_each_a_verdict(tmp_path):
    types = ("lora", "locon", "loha", "lokr", "dora")
    options = [*TOY_SHORT[1:-1], "train.max_steps=30", "hydra.sweeper.replicates=2"]
    done = run_main("-m", *options, f"network.type={','.join(types)}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    trials = study_of(tmp_path).get_trials()
    assert sorted({t.params["network.type"] for t in trials}) == sorted(types)
    assert "Holm over all 10 pairs of settings" in done.stdout, done.stdout[-3000:]
    for network_type in types:  # the best, and every other type: worse than it or not distinguishable
        assert re.search(rf"(best: )?trial \d+ network.type={network_type}: ", done.stdout), done.stdout[-3000:]
