"""Which checkpoint a run keeps (eval.select), the held-out loss, the Wilcoxon pruner and the sweep's
verdict on which trials are really different."""

from __future__ import annotations

from types import SimpleNamespace

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors import safe_open

import sweeper.run.task
from evaluation.evaluate import EvalResult
from sweeper.run.setting import run
from sweeper.search.report import SweepSummary
from sweeper.search.settings_verdict import CELLS_ATTR
from sweeper.search.space import SearchSpace
from sweeper.search.study import build_pruner
from sweeper.search.trial import trial_reporter
from training.network.file import tensors_sha256


def metadata(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as lora:
        return dict(lora.metadata())


def test_select_best_keeps_the_planted_best_step_as_the_runs_lora(make_cfg, monkeypatch):
    """Evaluations at steps 4, 8, 12 and the last (16) score 10, 30, 20, 15: step 8 is the run's result."""
    planted = iter([10.0, 30.0, 20.0, 15.0, 5.0])  # the last value is the base model's
    real_evaluate = sweeper.run.task.evaluate

    def planted_evaluate(*args, **kwargs) -> EvalResult:
        result = real_evaluate(*args, **kwargs)  # real samples; only the score is planted
        value = next(planted)
        return EvalResult({"clip_t": [value, value]}, result.prompts, result.images, result.grid, result.per_prompt)

    monkeypatch.setattr(sweeper.run.task, "evaluate", planted_evaluate)
    monkeypatch.setattr(sweeper.run.task._worker, "baselines", {})  # the base model is evaluated (planted) here
    cfg = make_cfg("train.max_steps=16", "eval.every_n_steps=4", "network.dim=4")
    result = run(cfg, show_progress=False)

    assert result.selected_step == 8 and result.metrics["selected_step"] == 8
    assert result.metrics["clip_t"] == 30.0 and result.metrics["clip_t_gain"] == 25.0
    best, last = result.lora_path, result.lora_path.with_name("lora-last.safetensors")
    assert metadata(best)["ss_steps"] == "8" and metadata(last)["ss_steps"] == "16"
    assert tensors_sha256(best) == tensors_sha256(best.with_name("lora-step000008.safetensors"))
    assert tensors_sha256(best) != tensors_sha256(last)
    artifacts = MlflowClient(result.tracking_uri).list_artifacts(result.run_id, "lora")
    assert {a.path for a in artifacts} >= {"lora/lora.safetensors", "lora/lora-last.safetensors"}


def test_select_last_keeps_the_last_step(make_cfg):
    cfg = make_cfg("train.max_steps=8", "eval.every_n_steps=4", "network.dim=4", "eval.select=last")
    result = run(cfg, show_progress=False)
    assert result.selected_step == 8 and metadata(result.lora_path)["ss_steps"] == "8"
    assert not result.lora_path.with_name("lora-last.safetensors").exists()


# --- held-out loss


def test_val_loss_is_deterministic_and_held_out_images_never_train(make_cfg):
    cfg = make_cfg("train.max_steps=6", "network.dim=4", "data.val_split=0.25")
    first = run(cfg, show_progress=False)
    again = run(cfg, show_progress=False)
    assert len(first.per_image["val_loss"]) == 4  # 25% of the 16 sample images
    assert first.per_image["val_loss"] == again.per_image["val_loss"]  # same LoRA, same inputs: same values
    assert first.metrics["val_loss_baseline"] == again.metrics["val_loss_baseline"]
    assert first.metrics["val_loss"] != first.metrics["val_loss_baseline"]  # the LoRA changes it

    from sweeper.config.validate import validate
    from training.data.validation import VAL_SEED, split_held_out

    records = validate(cfg).dataset.records
    held_out = split_held_out(records, 0.25, VAL_SEED)
    trained = {str(r.path) for r in held_out.train}
    assert not trained & {str(r.path) for r in held_out.held_out}
    assert held_out.held_out == split_held_out(records, 0.25, VAL_SEED).held_out  # the same split every run


def test_the_held_out_images_are_not_in_any_training_batch(make_cfg):
    from sweeper.config.validate import validate
    from sweeper.run.task import _held_out, _worker
    from training.loop import Trainer

    cfg = make_cfg("data.val_split=0.25", "train.max_steps=4")
    validated = validate(cfg)
    held_out = _held_out(cfg, validated)
    trainer = Trainer(cfg, _worker.base_model(cfg.model), held_out.train, SimpleNamespace(log_metrics=lambda *a: None))
    try:
        seen = set()
        for batch in trainer.loader:
            seen.update(str(trainer.dataset.records[i].path) for i in batch["index"])
        assert seen and not seen & {str(r.path) for r in held_out.held_out}
        validation = trainer.validation_loss(held_out.held_out)
        assert trainer.held_out_loss(validation) == trainer.held_out_loss(validation)
    finally:
        sweeper.run.task.remove_lora(trainer.network)


def test_a_dataset_too_small_to_hold_out_says_so():
    from training.data.scan import ImageRecord
    from training.data.validation import split_held_out

    records = [ImageRecord(f"/d/{i}.png", "", 1) for i in range(2)]
    held_out = split_held_out(records, 0.25, 0)
    assert held_out.held_out == [] and len(held_out.train) == 2
    assert "val_loss is off" in held_out.note and "data.val_dir" in held_out.note


# --- the Wilcoxon pruner and the sweep's verdict


def test_the_wilcoxon_pruner_stops_a_planted_bad_trial(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    options = SimpleNamespace(pruner="wilcoxon", pruner_startup_trials=1, pruner_warmup_steps=0)
    study = optuna.create_study(study_name="w", storage=url, direction="maximize", pruner=build_pruner(options))
    good = torch.linspace(30, 40, 24).tolist()
    best = study.ask()
    for index, value in enumerate(good):
        best.report(value, 100_000 * 5 + index)  # step 5, image index
    study.tell(best, sum(good) / len(good))

    def reporter_for(trial):
        cfg = SimpleNamespace(study_name="w", storage=url, trial_number=trial.number, **vars(options))
        return trial_reporter(cfg)

    bad = study.ask()
    assert reporter_for(bad)(5, 0.0, [v - 3.0 for v in good]) is True  # every image worse: pruned
    close = study.ask()
    noise = torch.tensor([(-1) ** i * 0.5 for i in range(24)])
    assert reporter_for(close)(5, 0.0, (torch.tensor(good) + noise).tolist()) is False  # a tie goes on


def _summary(per_trial: dict[int, dict[int, list[float]]], with_values: bool = True) -> SweepSummary:
    """Trials given as ``{number: {seed: per-prompt cells}}`` (what a sweep keeps on each trial)."""
    study = optuna.create_study(direction="maximize")
    dim = optuna.distributions.CategoricalDistribution([4, 8, 16])
    for number, by_seed in per_trial.items():
        means = [sum(v) / len(v) for v in by_seed.values()]
        study.add_trial(
            optuna.trial.create_trial(
                params={"network.dim": [4, 8, 16][number]},
                distributions={"network.dim": dim},
                value=sum(means) / len(means),
                user_attrs={CELLS_ATTR: {str(k): v for k, v in by_seed.items()}} if with_values else {},
            )
        )
    space = SearchSpace(distributions={"network.dim": dim}, grid_values={}, fixed=[])
    return SweepSummary(study, space, ["clip_score"], ["maximize"], "grid", "sqlite://")


def _cells(shift: float, seeds: int = 3, noise: float = 0.3, seed: int = 0) -> dict[int, list[float]]:
    prompts = torch.linspace(30, 40, 6)
    g = torch.Generator().manual_seed(seed)
    return {k: (prompts + shift + noise * torch.randn(6, generator=g)).tolist() for k in range(seeds)}


def test_the_verdict_names_settings_worse_than_the_best_over_seeds():
    summary = _summary({0: _cells(-2, seed=1), 1: _cells(0, seed=2), 2: _cells(-3, seed=3)})
    lines = summary.verdict()
    assert lines[0].startswith("Verdict on clip_score over training seeds") and "Holm over all 3 pairs" in lines[0]
    assert lines[1].startswith("  best: trial 1") and "selection-adjusted interval" in lines[1]
    assert "[this setting (3 seeds)" in lines[1]
    assert sum("worse than the best" in line for line in lines) == 2
    rows = {row["number"]: row for row in summary.rows()}
    assert rows[1]["vs_best"] == "best" and rows[0]["vs_best"] == rows[2]["vs_best"] == "worse"
    assert rows[0]["seeds"] == "3"


def test_the_verdict_says_not_distinguishable_with_k_seeds_never_equal():
    summary = _summary({n: _cells(0.05 * (n == 1), seed=10 + n, noise=1.0) for n in range(3)})
    lines = summary.verdict()
    assert sum("not distinguishable from the best with 3 seeds x 6 images" in line for line in lines) == 2
    assert not any("equal" in line or "tied" in line for line in lines)
    assert any("seeds per setting" in line for line in lines)  # how many seeds would tell them apart
    assert {row["vs_best"] for row in summary.rows()} == {"best", "not distinguishable"}


def test_one_seed_per_setting_makes_no_claim():
    summary = _summary({n: _cells(-3.0 * n, seeds=1, seed=n) for n in range(3)})
    lines = summary.verdict()
    assert lines[0].startswith("No verdict between settings: each was trained on one seed")
    assert "hydra.sweeper.replicates=3" in lines[0]
    assert "worse" not in " ".join(lines)


def test_no_verdict_without_per_seed_values():
    summary = _summary({0: {0: [30.0, 31.0]}, 1: {0: [40.0, 41.0]}}, with_values=False)
    assert summary.verdict() == []


@pytest.mark.parametrize(
    ("objective", "direction", "expected"),
    [
        (None, "maximize", ("clip_t", True)),  # a single run: eval.objective
        ("clip_score", "maximize", ("clip_t", True)),
        ("clip_score_gain", "maximize", ("clip_t", True)),  # a gain ranks as its metric
        ("val_loss", "minimize", ("val_loss", False)),
        ("lora_file_mb", "minimize", ("clip_t", True)),  # not measured by evaluations: eval.objective
        ("train/final_loss", "minimize", ("clip_t", True)),
    ],
)
def test_checkpoints_are_selected_by_the_sweeps_objective_when_evaluations_measure_it(
    make_cfg, objective, direction, expected
):
    from sweeper.run.task import selection_objective

    cfg = make_cfg(*([f"sweep.objective={objective}", f"sweep.direction={direction}"] if objective else []))
    assert selection_objective(cfg) == expected


def test_a_missing_val_dir_is_a_config_error_before_training(make_cfg, tmp_path):
    from sweeper.config.validate import ConfigError, validate

    with pytest.raises(ConfigError, match=r"data\.val_dir"):
        validate(make_cfg(f"data.val_dir={tmp_path / 'nope'}"))
