"""Each override form maps to the right Optuna distribution (table-driven), and sweep settings are checked."""

from __future__ import annotations

import re
from types import SimpleNamespace

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from sweeper.search.space import (
    SearchSpaceError,
    add_conditional,
    format_value,
    parse_search_space,
    points_to_check,
    suggest,
)
from sweeper.search.study import (
    SweepConfigError,
    derive_study_name,
    objectives_and_directions,
    resolve_sampler_name,
)
from sweeper.tracking.credentials import redact_password

CASES = [
    ("network.dim=8,16,32", CategoricalDistribution([8, 16, 32]), [8, 16, 32]),
    ("optimizer.name=choice(adamw,lion)", CategoricalDistribution(["adamw", "lion"]), ["adamw", "lion"]),
    ("network.train_text_encoder=true,false", CategoricalDistribution([True, False]), [True, False]),
    ("network.dim=range(4,20,4)", IntDistribution(4, 16, step=4), [4, 8, 12, 16]),
    ("network.dim=range(1,4)", IntDistribution(1, 3), [1, 2, 3]),
    ("network.dropout=interval(0.0,0.5)", FloatDistribution(0.0, 0.5), None),
    ("network.dim=int(interval(2,64))", IntDistribution(2, 64), None),
    ("optimizer.lr=tag(log, interval(1e-5,1e-3))", FloatDistribution(1e-5, 1e-3, log=True), None),
    ("network.dim=tag(log, int(interval(2,128)))", IntDistribution(2, 128, log=True), None),
]


@pytest.mark.parametrize(("override", "distribution", "grid"), CASES)
def test_override_maps_to_distribution(override, distribution, grid):
    space = parse_search_space([override])
    key = override.split("=", 1)[0]
    assert space.distributions == {key: distribution}
    assert space.grid_values.get(key) == grid
    assert space.fixed == []


def test_fixed_overrides_apply_to_every_trial_and_finite_spaces_are_grids():
    space = parse_search_space(["network.dim=8,16", "optimizer.lr=1e-4,3e-4", "train.max_steps=5"])
    assert space.fixed == ["train.max_steps=5"]
    assert space.is_finite and space.grid_size == 4
    assert space.trial_overrides({"network.dim": 8, "optimizer.lr": 0.0003}) == [
        "train.max_steps=5",
        "network.dim=8",
        "optimizer.lr=0.0003",
    ]
    assert not parse_search_space(["network.dim=8,16", "optimizer.lr=interval(1e-5,1e-3)"]).is_finite


@pytest.mark.parametrize(
    "override",
    ["optimizer.lr=interval(1e-3,1e-5)", "optimizer.lr=tag(log, interval(0,1))", "network.dim=tag(log, choice(4,8))"],
)
def test_impossible_ranges_name_the_key(override):
    with pytest.raises(SearchSpaceError, match=override.split("=")[0]):
        parse_search_space([override])


def test_values_round_trip_through_override_syntax():
    assert [format_value(v) for v in (None, True, 3, 1e-4, "adamw")] == ["null", "true", "3", "0.0001", "adamw"]


def test_sampler_choice():
    finite = parse_search_space(["network.dim=4,8"])
    infinite = parse_search_space(["optimizer.lr=interval(1e-5,1e-3)"])
    options = SimpleNamespace(sampler="auto")
    assert resolve_sampler_name(options, finite) == "grid"
    assert resolve_sampler_name(options, infinite) == "tpe"
    with pytest.raises(SweepConfigError, match=re.escape("optimizer.lr")):
        resolve_sampler_name(SimpleNamespace(sampler="grid"), infinite)
    with pytest.raises(SweepConfigError, match=re.escape("hydra.sweeper.sampler")):
        resolve_sampler_name(SimpleNamespace(sampler="bayes"), finite)


def test_objectives_and_directions():
    assert objectives_and_directions(SimpleNamespace(objective="clip_score", direction="maximize")) == (
        ["clip_score"],
        ["maximize"],
    )
    multi = SimpleNamespace(objective=["clip_score", "lora_file_mb"], direction=["maximize", "minimize"])
    assert objectives_and_directions(multi)[1] == ["maximize", "minimize"]
    with pytest.raises(SweepConfigError, match=re.escape("hydra.sweeper.direction")):
        objectives_and_directions(SimpleNamespace(objective=["a", "b", "c"], direction=["maximize", "minimize"]))


def test_study_name_depends_on_the_sweep_not_on_its_length():
    space = parse_search_space(["network.dim=4,8", "train.max_steps=5"])
    same = parse_search_space(["train.max_steps=5", "network.dim=4,8"])
    other = parse_search_space(["network.dim=4,16", "train.max_steps=5"])
    name = derive_study_name("exp", space, ["clip_score"], ["maximize"])
    assert name == derive_study_name("exp", same, ["clip_score"], ["maximize"])
    assert name != derive_study_name("exp", other, ["clip_score"], ["maximize"])
    assert name != derive_study_name("exp", space, ["clip_score"], ["minimize"])


def test_passwords_are_removed_from_storage_urls():
    assert redact_password("postgresql://optuna:s3cret@db:5432/studies") == "postgresql://optuna:***@db:5432/studies"
    assert redact_password("sqlite:////tmp/optuna.db") == "sqlite:////tmp/optuna.db"


PER_TYPE_LR = {
    "network.type": {
        "optimizer.lr": {"lora": "tag(log, interval(1e-4, 1e-3))", "lokr": "tag(log, interval(1e-3, 4e-3))"}
    }
}


def test_a_conditional_range_follows_the_value_its_key_got_in_the_same_trial():
    space = parse_search_space(["network.type=lora,lokr", "network.dim=4,8"])
    add_conditional(space, PER_TYPE_LR)
    assert not space.is_finite, "a conditional interval is searched, not gridded"
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=3))
    for _ in range(12):
        trial = study.ask(space.distributions)
        for key, distribution in space.conditional_distributions(trial.params).items():
            suggest(trial, key, distribution)
        low, high = (1e-4, 1e-3) if trial.params["network.type"] == "lora" else (1e-3, 4e-3)
        assert low <= trial.params["optimizer.lr"] <= high
        assert space.trial_overrides(trial.params)[-1].startswith("optimizer.lr=")
        study.tell(trial, trial.params["optimizer.lr"])
    # every branch's bounds are validated before the first trial, with the branch's own value
    checked = {(p["network.type"], p.get("optimizer.lr")) for p in points_to_check(space)}
    assert {("lora", 1e-4), ("lora", 1e-3), ("lokr", 1e-3), ("lokr", 4e-3)} <= checked
    plain = parse_search_space(["network.type=lora,lokr", "network.dim=4,8"])
    assert derive_study_name("e", space, ["clip_score"], ["maximize"]) != derive_study_name(
        "e", plain, ["clip_score"], ["maximize"]
    )


@pytest.mark.parametrize(
    ("overrides", "conditional", "message"),
    [
        (["network.dim=4,8"], PER_TYPE_LR, "network.type must be swept over a list"),
        (["network.type=lora,loha"], PER_TYPE_LR, "no range for network.type=loha"),
        (["network.type=lora,lokr", "optimizer.lr=1e-4,1e-3"], PER_TYPE_LR, "optimizer.lr is already swept"),
        (["network.type=lora,lokr", "optimizer.lr=1e-4"], PER_TYPE_LR, "also given a fixed value"),
    ],
)
def test_conditional_ranges_that_cannot_work_name_the_key(overrides, conditional, message):
    space = parse_search_space(overrides)
    with pytest.raises(SearchSpaceError, match=re.escape(message)):
        add_conditional(space, conditional)
