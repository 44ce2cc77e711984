"""concept_acc counts the concept the LoRA was taught, names it, and is off (with the reason) elsewhere."""

from __future__ import annotations

from PIL import Image

from evaluation.evaluate import EvalResult, summary_lines
from evaluation.metric_names import concept_word, shown_name
from sweeper.config.eval_concept import choose_concept
from sweeper.config.validate import _concept_problems
from sweeper.run.replicates import summary_lines as setting_summary_lines


def own_data(tmp_path):
    folder = tmp_path / "moons" / "10_moon"
    folder.mkdir(parents=True)
    return tmp_path / "moons"


def test_the_bundled_sample_on_the_toy_model_counts_stars(make_cfg):
    choice = choose_concept(make_cfg("model=toy", fast=False))
    assert choice.enabled and choice.target == "a star" and "a circle" in choice.labels
    assert choice.tag.startswith("a star (")


def test_own_data_on_the_toy_model_switches_it_off_and_says_how_to_count_yours(make_cfg, tmp_path):
    choice = choose_concept(make_cfg("model=toy", f"data.train_dir={own_data(tmp_path)}", fast=False))
    assert not choice.enabled
    assert "your own data" in choice.why and "eval.concept.target" in choice.why
    assert choice.tag.startswith("off: ")


def test_a_random_model_has_no_concept_and_user_labels_turn_it_on(make_cfg):
    assert not choose_concept(make_cfg()).enabled  # model=tiny
    choice = choose_concept(make_cfg("eval.concept.labels=[a moon,a star]", "eval.concept.target=a moon"))
    assert choice.enabled and choice.target == "a moon" and choice.why == "eval.concept"
    assert not choose_concept(make_cfg("model=toy", "eval.concept.labels=[]", fast=False)).enabled


def test_an_objective_of_concept_acc_without_a_concept_is_refused_before_training(make_cfg, tmp_path):
    cfg = make_cfg("model=toy", f"data.train_dir={own_data(tmp_path)}", "eval.objective=concept_acc", fast=False)
    (problem,) = _concept_problems(cfg)
    assert problem.startswith("eval.objective: concept_acc is off") and "eval.concept.labels" in problem
    assert _concept_problems(make_cfg("model=toy", "eval.objective=concept_acc", fast=False)) == []
    assert _concept_problems(make_cfg("model=toy", "sweep.objective=concept_acc_gain", fast=False)) == []


def test_the_printed_name_says_which_concept():
    assert concept_word("a star") == "star" and concept_word("An apple") == "apple" and concept_word("moon") == "moon"
    assert shown_name("concept_acc", "a star") == "concept_acc[star]"
    assert shown_name("concept_acc") == "concept_acc" and shown_name("clip_t", "a star") == "clip_t"
    grid = Image.new("RGB", (1, 1))
    values = {"concept_acc": [1.0, 0.0, 1.0, 1.0], "clip_t": [30.0, 31.0, 32.0, 33.0]}
    lora = EvalResult(values, ["p", "p", "q", "q"], [], grid, concept="a star")
    base = EvalResult({k: [0.0] * 4 for k in values}, lora.prompts, [], grid, concept="a star")
    lines = summary_lines(lora, base)
    assert any(line.startswith("concept_acc[star] ") for line in lines), lines
    assert any(line.startswith("clip_t ") for line in lines), lines
    records = [
        {"per_image": values, "baseline_per_image": base.values, "prompts": lora.prompts, "seed": seed}
        for seed in (1, 2)
    ]
    assert any(line.startswith("concept_acc[star] ") for line in setting_summary_lines(records, "a star"))
