"""The kohya / DrawThings options inside the one shared loop, on the tiny model."""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from safetensors.torch import load_file

from sweeper.config.validate import ConfigError, validate
from sweeper.run.setting import run
from sweeper.tracking.tracker import NullTracker
from tests.test_network_types import TYPES
from tests.test_training import FAMILIES
from training.checkpoint import load_training_state
from training.data.scan import scan_dataset
from training.families.loading import load_base_model
from training.loop import Trainer
from training.network.file import read_bundled_embeddings
from training.network.lora import remove_lora


def trainer_for(cfg, reg=None):
    base = load_base_model(cfg.model)
    reg_records = scan_dataset(reg).records if reg else None
    return Trainer(cfg, base, scan_dataset(cfg.data.train_dir).records, NullTracker(), reg_records=reg_records)


def lora_tensors(trainer):
    return {k: v.clone() for k, v in trainer.network.kohya_state_dict().items()}


@pytest.mark.parametrize("optimizer", ["adamw", "lion", "sgd", "adafactor", "prodigy"])
def test_each_optimizer_trains(make_cfg, optimizer):
    trainer = trainer_for(make_cfg(f"optimizer={optimizer}", "train.max_steps=3"))
    before = lora_tensors(trainer)
    result = trainer.fit(show_progress=False)
    after = lora_tensors(trainer)
    assert result.steps == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    "scheduler",
    ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial", "plateau"],
)
def test_each_scheduler_trains(make_cfg, scheduler):
    cfg = make_cfg(f"scheduler={scheduler}", "train.max_steps=4", "scheduler.warmup_steps=0.5", "eval.every_n_steps=2")
    trainer = trainer_for(cfg)
    seen = []
    result = trainer.fit(on_eval=lambda step: (seen.append(step) or 1.0, False), show_progress=False)
    assert result.steps == 4 and seen == [2]


def test_v_prediction_trains_on_the_velocity_target(make_cfg):
    calls = []
    for prediction in ("epsilon", "v_prediction"):
        trainer = trainer_for(make_cfg(f"model.prediction_type={prediction}", "train.max_steps=1"))
        scheduler = trainer.base.noise_scheduler
        velocity = scheduler.get_velocity
        scheduler.get_velocity = lambda *a, _p=prediction, _v=velocity, **k: calls.append(_p) or _v(*a, **k)
        trainer.fit(show_progress=False)
    assert calls == ["v_prediction"]


def test_loss_options_run_together(make_cfg):
    cfg = make_cfg(
        "train.max_steps=3",
        "train.noise_offset=0.1",
        "train.min_snr_gamma=5",
        "train.denoise_range=[0.5,1.0]",
        "network.max_norm=0.01",
        "data.flip_aug=true",
        "data.color_aug=true",
        "data.shuffle_tags=true",
        "data.trigger_word=sks",
        "dropout.caption_rate=0.3",
    )
    trainer = trainer_for(cfg)
    result = trainer.fit(show_progress=False)
    assert result.steps == 3
    scale = trainer.network.alpha / trainer.network.dim
    norms = [
        float(torch.linalg.matrix_norm(up.detach().flatten(1) @ down.detach().flatten(1))) * scale
        for down, up in trainer.network.lora_pairs()
    ]
    assert max(norms) <= 0.01 + 1e-6


def test_regularisation_images_are_weighted(make_cfg, tmp_path):
    reg = tmp_path / "reg" / "1_class"
    reg.mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (64, 64), (40 * i, 90, 200)).save(reg / f"r{i}.png")
        (reg / f"r{i}.txt").write_text("a square", encoding="utf-8")
    losses = {}
    for weight in (0.0, 1.0):
        cfg = make_cfg(f"data.reg_dir={tmp_path / 'reg'}", f"data.prior_loss_weight={weight}", "train.max_steps=1")
        trainer = trainer_for(cfg, reg=tmp_path / "reg")
        assert any(r.is_reg for r in trainer.dataset.records)
        batch = next(b for b in trainer.loader if all(b["is_reg"]))
        trainer.position.epoch = 1  # as inside fit()
        with torch.no_grad():
            losses[weight] = float(trainer._loss(batch))
        remove_lora(trainer.network)
    assert losses[0.0] == 0.0 and losses[1.0] > 0.0


@pytest.mark.parametrize(
    ("family", "network"),
    [*((family, "lora") for family in FAMILIES), *(("sd1", t) for t in ("locon", "loha", "lokr", "dora"))],
)
def test_resume_from_a_saved_state_equals_an_uninterrupted_run(make_cfg, tmp_path, family, network):
    options = [
        *FAMILIES[family],
        *(TYPES[network] if network != "lora" else []),
        "train.max_steps=8",
        "train.batch_size=2",
        "train.grad_accum_steps=2",
        "train.save_every_n_steps=3",
        "train.save_state=true",
        "data.flip_aug=true",
        "data.random_crop=true",
        "dropout.caption_rate=0.5",
        "network.train_text_encoder=true",
        "scheduler=cosine",
    ]
    whole = run(make_cfg(*options, f"output.dir={tmp_path / 'whole'}"), show_progress=False)
    state = tmp_path / "whole" / "state-step000003"
    assert load_training_state(state).progress["step"] == 3
    resumed = run(
        make_cfg(*options, f"output.dir={tmp_path / 'resumed'}", f"train.resume={state}"), show_progress=False
    )
    a, b = load_file(whole.lora_path), load_file(resumed.lora_path)
    last_text_prefix = {"sdxl": "lora_te2_", "sd3": "lora_te2_", "flux": "lora_te1_"}.get(family, "lora_te_")
    assert any(k.startswith(last_text_prefix) for k in a)  # text encoders resume too
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "whole" / "lora-step000006.safetensors").is_file()
    history = MlflowClient(resumed.tracking_uri).get_metric_history(resumed.run_id, "train/loss")
    assert sorted(m.step for m in history) == [4, 5, 6, 7, 8], "the resumed run trains only the remaining steps"
    whole_history = MlflowClient(whole.tracking_uri).get_metric_history(whole.run_id, "train/loss")
    assert {m.step: m.value for m in history} == {m.step: m.value for m in whole_history if m.step > 3}


def test_the_embedding_is_learned_and_saved(make_cfg):
    cfg = make_cfg(
        "network.embedding.enabled=true",
        "data.trigger_word=zqx",
        "network.embedding.num_vectors=2",
        "network.embedding.lr=0.05",
        "train.max_steps=4",
    )
    trainer_cfg_result = run(cfg, show_progress=False)
    bundled = read_bundled_embeddings(trainer_cfg_result.lora_path)
    assert set(bundled) == {"zqx"} and bundled["zqx"].shape[0] == 2
    base = load_base_model(cfg.model)
    star = base.tokenizer("*", add_special_tokens=False).input_ids[0]
    start = base.text_encoder.get_input_embeddings().weight[star]
    assert not torch.allclose(bundled["zqx"][0], start), "the vectors moved away from their initial word"


def test_cached_latents_give_the_same_losses(make_cfg):
    losses = {}
    for cache in ("none", "memory"):
        trainer = trainer_for(make_cfg(f"data.cache_latents={cache}", "train.max_steps=4", "data.flip_aug=true"))
        losses[cache] = trainer.fit(show_progress=False).losses
        remove_lora(trainer.network)
    assert losses["memory"] == pytest.approx(losses["none"], rel=1e-5)


def test_with_cached_latents_batches_decode_no_images(make_cfg, monkeypatch):
    trainer = trainer_for(make_cfg("data.cache_latents=memory", "train.max_steps=3", "data.flip_aug=true"))
    try:
        records = {index for index, record in enumerate(trainer.dataset.records) if record.repeats > 0}
        assert set(trainer.latent_keys()) == {(i, flipped) for i in records for flipped in (False, True)}
        decoded = []
        monkeypatch.setattr("training.data.dataset.load_rgb", lambda path: decoded.append(path))
        batch = next(iter(trainer.loader))
        assert "pixel_values" not in batch and decoded == []
        assert trainer.fit(show_progress=False).steps == 3 and decoded == []
    finally:
        remove_lora(trainer.network)


def test_aspect_buckets_train_one_bucket_per_batch(make_cfg, tmp_path):
    folder = tmp_path / "data" / "2_mixed"
    folder.mkdir(parents=True)
    for i, size in enumerate([(96, 48), (100, 50), (48, 96), (50, 100), (64, 64), (70, 70)]):
        Image.new("RGB", size, (30 * i, 100, 50)).save(folder / f"{i}.png")
    cfg = make_cfg(f"data.train_dir={tmp_path / 'data'}", "bucket.enabled=true", "bucket.step=16", "train.max_steps=4")
    trainer = trainer_for(cfg)
    assert len(set(trainer.dataset.record_buckets)) == 3
    for batch in trainer.loader:
        assert len(set(batch["bucket"])) == 1 and batch["pixel_values"].shape[-2:] == batch["bucket"][0][::-1]
    assert trainer.fit(show_progress=False).steps == 4


@pytest.mark.parametrize(
    ("overrides", "keys"),
    [
        (["network.alpha=4", "network.scale=1"], ["network.alpha", "network.scale"]),
        (
            ["train.denoise_range=[0,0.5]", "train.timestep_range=[0,500]"],
            ["train.denoise_range", "train.timestep_range"],
        ),
        (["data.cache_latents=memory", "data.color_aug=true"], ["data.cache_latents", "data.color_aug"]),
        (["data.cache_latents=disk", "data.random_crop=true"], ["data.cache_latents", "data.random_crop"]),
        (["train.max_steps=null", "train.epochs=null"], ["train.max_steps", "train.epochs"]),
        (
            ["network.train_unet=false", "network.train_text_encoder=false"],
            ["network.train_unet", "network.train_text_encoder"],
        ),
        (["output.format=ckpt"], ["output.format", "output.allow_pickle"]),
        (["scheduler=plateau", "eval.every_n_steps=0"], ["plateau", "eval.every_n_steps"]),
        (["network.embedding.enabled=true", "data.trigger_word=null"], ["network.embedding", "data.trigger_word"]),
    ],
)
def test_invalid_combinations_name_both_keys(make_cfg, overrides, keys):
    with pytest.raises(ConfigError) as caught:
        validate(make_cfg(*overrides))
    assert all(key in str(caught.value) for key in keys), str(caught.value)
