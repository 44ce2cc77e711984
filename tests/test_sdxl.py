"""SDXL through the one loop, on a tiny SDXL-architecture model built in code (training.families.tiny_sdxl).

Family detection, training (loss, frozen base, both text encoders), exact repeats and resume, the
size/crop time ids of every image, the kohya-named LoRA file in diffusers, single-file loading, a
sweep and a reproduction.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from mlflow.tracking import MlflowClient
from PIL import Image
from safetensors import safe_open

import training.loop
from sweeper import reproduce
from sweeper.config.validate import ConfigError, validate
from sweeper.run.setting import run
from sweeper.tracking.tracker import NullTracker
from tests.conftest import run_main
from tests.helpers_checkpoint import copy_configs, write_sdxl_checkpoint
from training.data.scan import scan_dataset
from training.families.loading import load_base_model
from training.families.sdxl import SDXL
from training.families.tiny_sd import build_tiny_pipeline
from training.families.tiny_sdxl import build_tiny_sdxl_pipeline
from training.loop import Trainer
from training.network.file import lora_identity
from training.network.lora import remove_lora

SDXL_TINY = ["model.kind=sdxl"]  # model=tiny comes from the tests' FAST defaults


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl") / "tiny-sdxl"
    build_tiny_sdxl_pipeline().save_pretrained(folder, safe_serialization=True)
    return folder


def train(cfg, records=None):
    base = load_base_model(cfg.model)
    frozen = {
        name: {k: v.clone() for k, v in module.state_dict().items()}
        for name, module in (("unet", base.denoiser), ("te1", base.text_encoders[0]), ("te2", base.text_encoders[1]))
    }
    trainer = Trainer(cfg, base, records or scan_dataset(cfg.data.train_dir).records, NullTracker())
    lora_before = {id(p): p.detach().clone() for p in trainer.network.parameters()}
    result = trainer.fit(show_progress=False)
    return base, frozen, trainer, lora_before, result


# --- the family


def test_the_family_is_detected_from_the_files_and_a_mismatch_names_both(make_cfg, sdxl_folder, tmp_path):
    cfg = make_cfg("model=diffusers", f"model.path={sdxl_folder}")  # model.kind left unset
    validate(cfg)
    assert load_base_model(cfg.model).kind == "sdxl"
    with pytest.raises(ConfigError, match=r"model.kind=sd1 but .* is an SDXL model .*set model.kind=sdxl"):
        validate(make_cfg("model=diffusers", f"model.path={sdxl_folder}", "model.kind=sd1"))
    sd1 = tmp_path / "sd1"
    build_tiny_pipeline().save_pretrained(sd1, safe_serialization=True)
    with pytest.raises(ConfigError, match=r"model.kind=sdxl but .* is an SD1 model .*set model.kind=sd1"):
        validate(make_cfg("model=diffusers", f"model.path={sd1}", "model.kind=sdxl"))
    with pytest.raises(ValueError, match=r"model.kind=sdxl but .* is an SD1 model"):
        load_base_model(make_cfg("model=diffusers", f"model.path={sd1}", "model.kind=sdxl").model)  # after loading
    with pytest.raises(ConfigError, match=r"network.embedding.enabled=true: .*SDXL"):
        validate(make_cfg(*SDXL_TINY, "network.embedding.enabled=true", "data.trigger_word=zqx"))


def test_a_single_file_sdxl_checkpoint_loads_offline_with_its_own_weights(make_cfg, sdxl_folder, tmp_path):
    pipeline = StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    file = write_sdxl_checkpoint(pipeline, tmp_path / "tiny-sdxl.safetensors")
    config_dir = copy_configs(sdxl_folder, tmp_path / "configs")
    cfg = make_cfg("model=diffusers", f"model.path={file}", f"model.config_dir={config_dir}")  # kind from the header
    validate(cfg)
    base = load_base_model(cfg.model)
    assert base.kind == "sdxl" and base.identity["config_dir"] == str(config_dir)
    for mine, theirs in (
        (base.denoiser, pipeline.unet),
        (base.vae, pipeline.vae),
        (base.text_encoders[0], pipeline.text_encoder),
        (base.text_encoders[1], pipeline.text_encoder_2),
    ):
        expected = theirs.state_dict()
        got = mine.state_dict()
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected)
    with pytest.raises(ConfigError, match=r"model.kind=sd2 but .* is an SDXL checkpoint"):
        validate(make_cfg("model=diffusers", f"model.path={file}", f"model.config_dir={config_dir}", "model.kind=sd2"))


# --- training


@pytest.mark.slow
def test_sdxl_loss_falls_only_lora_changes_and_both_text_encoders_train(make_cfg):
    cfg = make_cfg(
        *SDXL_TINY,
        "train.max_steps=60",
        "train.batch_size=4",
        "optimizer.lr=2e-3",
        "network.train_text_encoder=true",
        "network.text_encoder_lr=1e-3",
        "network.text_encoder_2_lr=5e-4",
    )
    base, frozen, trainer, lora_before, result = train(cfg)
    first, last = result.losses[:15], result.losses[-15:]
    assert sum(last) / len(last) < 0.95 * sum(first) / len(first)
    rates = {group["name"]: group["lr"] for group in trainer.network.param_groups}
    assert rates == {"unet": 2e-3, "text_encoder": 1e-3, "text_encoder_2": 5e-4}
    # SDXL conditions on the penultimate layer of the first text encoder (and on the pooled output of the
    # second's last layer), so a LoRA on the first encoder's last layer gets no gradient, as in kohya
    last = f"encoder.layers.{base.text_encoders[0].config.num_hidden_layers - 1}."
    for part in trainer.network.parts:
        for name, param in part.model.named_parameters():
            if "lora_" in name:
                unused = part.label == "text_encoder" and name.startswith(last)
                assert torch.equal(param.detach(), lora_before[id(param)]) == unused, (part.label, name)
    for name, module in (("unet", base.denoiser), ("te1", base.text_encoders[0]), ("te2", base.text_encoders[1])):
        after = {k.replace(".base_layer", ""): v for k, v in module.state_dict().items() if "lora_" not in k}
        assert after.keys() == frozen[name].keys() and all(torch.equal(frozen[name][k], after[k]) for k in after)
    prefixes = {key.split("_", 2)[1] for key in trainer.network.kohya_state_dict()}
    assert prefixes == {"unet", "te1", "te2"}
    remove_lora(trainer.network)


# (the same seed's bit-identical LoRA and resume for SDXL: tests/test_training.py and tests/test_parity.py,
# parametrised over the families)


# --- time ids


def _coordinate_image(path, width: int, height: int) -> None:
    """Red = x, green = y of each pixel: a crop's first pixel tells where it was taken."""
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    Image.fromarray(np.stack([x, y, np.zeros_like(x)], axis=-1).astype(np.uint8)).save(path)


def _record_time_ids(monkeypatch) -> list[tuple[dict, torch.Tensor]]:
    """Every batch the loop conditions on, with the time ids SDXL's family made for it."""
    seen: list[tuple[dict, torch.Tensor]] = []
    geometry_of = training.loop.batch_geometry
    extras = SDXL.batch_extras

    def recording_geometry(batch):
        seen.append((batch, None))
        return geometry_of(batch)

    def recording_extras(geometry, device, train_cfg=None):
        cond = extras(geometry, device, train_cfg)
        seen[-1] = (seen[-1][0], cond["time_ids"].cpu())
        return cond

    monkeypatch.setattr(training.loop, "batch_geometry", recording_geometry)
    monkeypatch.setattr(SDXL, "batch_extras", recording_extras)
    return seen


def test_time_ids_follow_each_images_size_random_crop_and_flip(make_cfg, tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    sizes = {"wide": (200, 64), "tall": (64, 150), "square": (64, 64)}  # (width, height); resolution 64: scale 1
    for name, (width, height) in sizes.items():
        _coordinate_image(data / f"{name}.png", width, height)
        (data / f"{name}.txt").write_text(f"a {name} picture")
    seen = _record_time_ids(monkeypatch)
    cfg = make_cfg(
        *SDXL_TINY, f"data.train_dir={data}", "data.random_crop=true", "data.flip_aug=true", "train.max_steps=12"
    )
    train(cfg)
    checked, flipped_seen = 0, 0
    for batch, time_ids in seen:
        for k, caption in enumerate(batch["caption"]):
            width, height = sizes[caption.split()[1]]
            pixels = batch["pixel_values"][k]  # (3, 64, 64) in [-1, 1]
            first_x = round((float(pixels[0, 0, 0]) + 1) * 127.5)
            first_y = round((float(pixels[1, 0, 0]) + 1) * 127.5)
            flipped = batch["flipped"][k]
            # in the flipped image the crop's first column is original column (width - 1 - left)
            left = width - 1 - first_x if flipped else first_x
            assert time_ids[k].tolist() == [height, width, first_y, left, 64, 64], (caption, flipped)
            checked += 1
            flipped_seen += flipped
    assert checked == 24 and 0 < flipped_seen < 24


def test_time_ids_follow_buckets_and_are_the_same_with_cached_latents(make_cfg, tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    for name, (width, height) in {"wide": (240, 96), "tall": (96, 200), "square": (100, 100)}.items():
        _coordinate_image(data / f"{name}.png", width, height)
        (data / f"{name}.txt").write_text(f"a {name} picture")
    rows = {}
    for cache in ("none", "memory"):
        seen = _record_time_ids(monkeypatch)
        cfg = make_cfg(
            *SDXL_TINY,
            f"data.train_dir={data}",
            "bucket.enabled=true",
            "data.flip_aug=true",
            f"data.cache_latents={cache}",
            "train.max_steps=9",
            "train.batch_size=1",
        )
        _, _, trainer, _, _ = train(cfg)
        dataset = trainer.dataset
        buckets = {r.caption.split()[1]: b for r, b in zip(dataset.records, dataset.record_buckets, strict=True)}
        rows[cache] = []
        for batch, time_ids in seen:
            name = batch["caption"][0].split()[1]
            width, height = buckets[name]
            assert time_ids[0, 4:].tolist() == [height, width], "target size = the image's bucket (h, w)"
            rows[cache].append((name, batch["flipped"][0], time_ids[0].tolist()))
        remove_lora(trainer.network)
    assert {name for name, _, _ in rows["none"]} == {"wide", "tall", "square"}
    assert rows["none"] == rows["memory"], "cached latents are conditioned on the crop they were encoded from"
    wide = next(ids for name, flipped, ids in rows["none"] if name == "wide")
    assert wide[:2] == [96, 240] and buckets["wide"][0] > buckets["wide"][1]


# --- the LoRA file


def test_the_sdxl_lora_file_loads_into_diffusers_with_matching_images(make_cfg, sdxl_folder, tmp_path):
    cfg = make_cfg(
        "model=diffusers",
        f"model.path={sdxl_folder}",
        "train.max_steps=12",
        "optimizer.lr=5e-3",
        "network.dim=4",
        "network.train_text_encoder=true",
    )
    result = run(cfg, show_progress=False)
    with safe_open(str(result.lora_path), "pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert metadata["ss_v2"] == "False"
    modules = {key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0] for key in keys}
    assert {m.split("_", 2)[1] for m in modules} == {"unet", "te1", "te2"}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in modules
    assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj" in modules

    # diffusers' own loader maps every module of the file onto the models
    plain = StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    adapted = StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    adapted.load_lora_weights(str(result.lora_path), adapter_name="ours")
    loaded = sum(
        1
        for model in (adapted.unet, adapted.text_encoder, adapted.text_encoder_2)
        for _, module in model.named_modules()
        if "ours" in getattr(module, "lora_A", {})
    )
    assert loaded == len(modules)

    # ... and samples as our own pipeline does with the trained LoRA applied through network.init_weights
    base = load_base_model(cfg.model)
    init = make_cfg(*cfg_overrides(cfg), f"network.init_weights={result.lora_path}")
    trainer = Trainer(init, base, scan_dataset(init.data.train_dir).records, NullTracker())
    assert not trainer.init_report.unmatched and not trainer.init_report.missing
    ours = trainer.sampling_pipeline(adapted.scheduler)

    def sample(pipeline):
        generator = torch.Generator().manual_seed(7)
        return pipeline(
            "a red circle", num_inference_steps=3, generator=generator, output_type="np", height=64, width=64
        ).images

    mine, theirs, without = sample(ours), sample(adapted), sample(plain)
    assert np.abs(mine - theirs).max() < 1e-4
    assert np.abs(theirs - without).max() > 1e-3, "the LoRA changes the images"
    remove_lora(trainer.network)


def cfg_overrides(cfg) -> list[str]:
    return [
        "model=diffusers",
        f"model.path={cfg.model.path}",
        f"network.dim={cfg.network.dim}",
        "network.train_text_encoder=true",
    ]


# --- sweeps and reproduce


@pytest.mark.slow
def test_a_two_trial_sdxl_sweep(tmp_path):
    done = run_main(
        "-m",
        "model=tiny",
        "model.kind=sdxl",
        "eval.clip_model=tiny",
        "train.max_steps=4",
        "train.batch_size=2",
        "eval.num_inference_steps=2",
        "eval.images_per_prompt=1",
        "network.dim=4,8",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("lora-sweeper")
    children = [r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    assert sorted(int(c.data.params["network.dim"]) for c in children) == [4, 8]
    assert all(c.info.status == "FINISHED" for c in children)
    assert {c.data.params["model.kind"] for c in children} == {"sdxl"}


def test_an_sdxl_run_reproduces_bit_identically(make_cfg, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = make_cfg(*SDXL_TINY, "train.max_steps=5", "data.flip_aug=true", "network.dim=4")
    result = run(cfg, show_progress=False)
    assert "note: model=tiny is a test model" in capsys.readouterr().out  # its scores mean nothing
    with safe_open(str(result.lora_path), "pt") as handle:
        assert handle.metadata()["ss_base_model_version"] == "tiny_sdxl_base_v1-0"  # not a real SDXL LoRA
    tags = MlflowClient(result.tracking_uri).get_run(result.run_id).data.tags
    assert "random weights" in tags["model.note"]
    code = reproduce.main(
        [result.run_id, "--tracking-uri", result.tracking_uri, "--output-dir", str(tmp_path / "again")]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    again = tmp_path / "again" / f"{cfg.output.name}.safetensors"
    assert lora_identity(again) == lora_identity(result.lora_path)
    assert "bit-identical LoRA tensors" in out
