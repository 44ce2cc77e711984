"""The shared loop on the tiny model: the loss falls, only LoRA weights move, runs repeat exactly."""

from __future__ import annotations

import pytest
import torch

from sweeper.tracking.tracker import NullTracker
from training.data.scan import scan_dataset
from training.families.loading import load_base_model
from training.loop import Trainer
from training.network.lora import remove_lora

# The tiny model of each family (model=tiny from the tests' +debug=fast): a test of the shared loop
# runs once per family, so SDXL's two text encoders and time ids take the same path as SD1.
FAMILIES = {
    "sd1": [],
    "sdxl": ["model.kind=sdxl"],
    "sd3": ["model.kind=sd3"],
    "flux": ["model.kind=flux"],
}


def train(cfg):
    base = load_base_model(cfg.model)
    before = {k: v.clone() for k, v in base.denoiser.state_dict().items()}
    trainer = Trainer(cfg, base, scan_dataset(cfg.data.train_dir).records, NullTracker())
    lora_before = {id(p): p.detach().clone() for p in trainer.network.parameters()}
    result = trainer.fit(show_progress=False)
    return base, before, trainer, lora_before, result


@pytest.mark.slow
def test_loss_falls_and_only_lora_weights_change(make_cfg):
    cfg = make_cfg("train.max_steps=80", "train.batch_size=4", "optimizer.lr=2e-3")
    base, before, trainer, lora_before, result = train(cfg)

    assert result.steps == 80 and len(result.losses) == 80
    first, last = result.losses[:20], result.losses[-20:]
    assert sum(last) / len(last) < 0.95 * sum(first) / len(first)

    changed = [not torch.equal(p.detach(), lora_before[id(p)]) for p in trainer.network.parameters()]
    assert all(changed), "every LoRA tensor should have been updated"
    after = {k.replace(".base_layer", ""): v for k, v in base.denoiser.state_dict().items() if "lora_" not in k}
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("family", FAMILIES)
def test_same_config_and_seed_give_bit_identical_lora(make_cfg, family):
    options = ["train.max_steps=8", "network.dropout=0.1", "data.random_crop=true", "data.flip_aug=true"]
    cfg = make_cfg(*FAMILIES[family], *options)
    weights = []
    for _ in range(2):
        _, _, trainer, _, _ = train(cfg)
        weights.append(trainer.network.kohya_state_dict())
        remove_lora(trainer.network)
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_a_different_seed_gives_different_lora(make_cfg):
    runs = []
    for seed in (1, 2):
        _, _, trainer, _, _ = train(make_cfg("train.max_steps=5", f"train.seed={seed}"))
        runs.append(trainer.network.kohya_state_dict())
    key = next(k for k in runs[0] if k.endswith("lora_up.weight"))
    assert not torch.equal(runs[0][key], runs[1][key])


def test_gradient_accumulation_counts_optimizer_steps(make_cfg):
    cfg = make_cfg("train.max_steps=4", "train.grad_accum_steps=3", "scheduler=cosine")
    _, _, trainer, _, result = train(cfg)
    assert result.steps == 4
    assert trainer.lr_schedule.last_lr() < cfg.optimizer.lr  # cosine moved 4 steps, not 12


def test_text_encoder_lora_trains_only_when_enabled(make_cfg):
    _, _, off, _, _ = train(make_cfg("train.max_steps=3"))
    assert not any(k.startswith("lora_te_") for k in off.network.kohya_state_dict())
    remove_lora(off.network)
    cfg = make_cfg("train.max_steps=3", "network.train_text_encoder=true", "network.text_encoder_lr=1e-3")
    _, _, on, lora_before, _ = train(cfg)
    te_groups = [g for g in on.network.param_groups if g["name"] == "text_encoder"]
    assert te_groups and te_groups[0]["lr"] == 1e-3
    assert any(not torch.equal(p.detach(), lora_before[id(p)]) for p in te_groups[0]["params"])
    assert any(k.startswith("lora_te_") for k in on.network.kohya_state_dict())


def test_a_trainer_given_no_images_fails_instead_of_looping(make_cfg):
    """The programmatic API (benchmarks, workers) passes records in: none must not mean endless empty epochs."""
    cfg = make_cfg("train.max_steps=1")
    with pytest.raises(ValueError, match=r"no training images.*data\.train_dir"):
        Trainer(cfg, load_base_model(cfg.model), [], NullTracker())
