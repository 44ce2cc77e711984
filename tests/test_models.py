"""Loading base models: the tiny default, a diffusers folder, a single-file checkpoint; VAE, kind, attention."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

import training.speed.attention_options
from sweeper.config.validate import ConfigError, validate
from tests.helpers_checkpoint import copy_configs, write_ldm_checkpoint, write_ldm_vae
from training.families.checked_loading import IncompleteWeightsError
from training.families.loading import load_base_model, model_problems
from training.families.tiny_sd import build_tiny_pipeline
from training.network.adapters import attach_lora
from training.speed.attention import (
    configure_attention,
    configure_gradient_checkpointing,
    gradient_checkpointing_enabled,
)
from training.speed.attention_options import attention_problem


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory):
    """A small model written to disk in the real diffusers format (save_pretrained, safetensors)."""
    folder = tmp_path_factory.mktemp("models") / "my-sd"
    pipeline = build_tiny_pipeline(seed=7)
    pipeline.save_pretrained(folder, safe_serialization=True)
    return folder, pipeline


def test_a_diffusers_folder_loads_with_its_own_weights(make_cfg, diffusers_folder):
    folder, pipeline = diffusers_folder
    cfg = make_cfg("model=diffusers", f"model.path={folder}")
    validate(cfg)
    base = load_base_model(cfg.model)
    assert base.location == str(folder)
    expected = pipeline.unet.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in base.denoiser.state_dict().items())
    assert base.native_resolution == 64
    assert base.identity["weights_sha256"]
    assert not any(p.requires_grad for p in base.denoiser.parameters())


def test_a_diffusers_folder_trains_end_to_end(make_cfg, diffusers_folder):
    from sweeper.run.setting import run

    folder, _ = diffusers_folder
    result = run(make_cfg("model=diffusers", f"model.path={folder}", "train.max_steps=2"), show_progress=False)
    assert result.lora_path.is_file()


def test_the_tiny_model_is_built_from_a_fixed_seed():
    first, second = build_tiny_pipeline(), build_tiny_pipeline()
    assert all(torch.equal(v, second.unet.state_dict()[k]) for k, v in first.unet.state_dict().items())


def test_model_path_problems_are_reported(make_cfg, tmp_path, diffusers_folder):
    with pytest.raises(ConfigError, match=r"model.path: folder .* does not exist"):
        validate(make_cfg("model=diffusers", f"model.path={tmp_path / 'missing'}"))
    not_a_model = tmp_path / "just-images"
    not_a_model.mkdir()
    with pytest.raises(ConfigError, match="not a diffusers folder"):
        validate(make_cfg("model=diffusers", f"model.path={not_a_model}"))
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE"):
        validate(make_cfg("model=diffusers", "model.path=someone/some-model"))


def test_a_broken_folder_fails_loudly(make_cfg, tmp_path, diffusers_folder):
    folder, _ = diffusers_folder
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(OSError):
        load_base_model(make_cfg("model=diffusers", f"model.path={broken}").model)


def _edit_weights(file: Path, edit) -> None:
    tensors = load_file(file)
    save_file(edit(tensors), file)


@pytest.mark.parametrize(
    ("part", "change", "reported"),
    [
        # a renamed tensor: transformers would leave the layer norm at its fresh init with only a warning
        (
            "text_encoder",
            lambda t: {k.replace("final_layer_norm.weight", "final_layer_norm.gamma"): v for k, v in t.items()},
            ["missing keys: final_layer_norm.weight", "unexpected keys: final_layer_norm.gamma"],
        ),
        ("unet", lambda t: {k: v for k, v in t.items() if k != "conv_in.weight"}, ["missing keys: conv_in.weight"]),
        ("vae", lambda t: {**t, "decoder.extra.weight": torch.zeros(1)}, ["unexpected keys: decoder.extra.weight"]),
    ],
)
def test_missing_or_renamed_weights_fail_naming_file_and_keys(
    make_cfg, tmp_path, diffusers_folder, part, change, reported
):
    """A folder whose weights do not fit the model must never load as silently random parameters."""
    folder, _ = diffusers_folder
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    weights = next((broken / part).glob("*.safetensors"))
    _edit_weights(weights, change)
    with pytest.raises(IncompleteWeightsError) as error:
        load_base_model(make_cfg("model=diffusers", f"model.path={broken}").model)
    message = str(error.value)
    assert str(weights) in message
    assert all(phrase in message for phrase in reported), message


def test_a_clip_model_with_a_renamed_weight_names_eval_clip_model(tmp_path):
    from evaluation.clip_score import ClipScorer
    from toy_world.shipped import shipped_folder

    clip = tmp_path / "clip"
    shutil.copytree(shipped_folder("clip"), clip)
    weights = clip / "model.safetensors"
    _edit_weights(weights, lambda t: {k.replace("logit_scale", "logit_scale_old"): v for k, v in t.items()})
    with pytest.raises(
        ValueError, match=r"eval.clip_model=.*missing keys: logit_scale.*unexpected keys: logit_scale_old"
    ):
        ClipScorer(str(clip))


# --- single-file checkpoints, replacement VAE, prediction type, kind


def _same_weights(left: torch.nn.Module, right: torch.nn.Module) -> bool:
    a, b = left.state_dict(), right.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def single_file(tmp_path_factory, diffusers_folder):
    """The same model as an original-layout (A1111) .safetensors file, plus a weightless config folder."""
    folder, pipeline = diffusers_folder
    root = tmp_path_factory.mktemp("single-file")
    checkpoint = write_ldm_checkpoint(pipeline, root / "my-sd.safetensors")
    config_dir = copy_configs(folder, root / "configs")
    assert not list(config_dir.rglob("*.safetensors"))
    return checkpoint, config_dir, pipeline


def test_a_single_file_checkpoint_loads_offline_with_its_own_weights(make_cfg, single_file):
    checkpoint, config_dir, pipeline = single_file
    cfg = make_cfg("model=diffusers", f"model.path={checkpoint}", f"model.config_dir={config_dir}")
    validate(cfg)
    base = load_base_model(cfg.model)
    assert base.location == str(checkpoint)
    for ours, theirs in (("denoiser", "unet"), ("vae", "vae"), ("text_encoder", "text_encoder")):
        assert _same_weights(getattr(base, ours), getattr(pipeline, theirs)), ours
    assert base.tokenizer("a red circle").input_ids == pipeline.tokenizer("a red circle").input_ids
    assert isinstance(base.noise_scheduler, DDPMScheduler)
    assert base.identity["config_dir"] == str(config_dir)
    assert base.identity["weights_sha256"]
    assert base.base_model_version == "sd_v1"
    assert not any(p.requires_grad for p in base.text_encoder.parameters())


def test_a_single_file_checkpoint_trains_end_to_end(make_cfg, single_file):
    from sweeper.run.setting import run

    checkpoint, config_dir, _ = single_file
    cfg = make_cfg("model=diffusers", f"model.path={checkpoint}", f"model.config_dir={config_dir}", "train.max_steps=2")
    assert run(cfg, show_progress=False).lora_path.is_file()


def test_a_single_file_without_config_dir_offline_names_config_dir(make_cfg, single_file):
    checkpoint, _, _ = single_file
    with pytest.raises(ConfigError, match=r"model.config_dir") as caught:
        validate(make_cfg("model=diffusers", f"model.path={checkpoint}"))
    assert "single-file checkpoint" in str(caught.value)


def test_single_file_and_config_dir_problems_are_reported(make_cfg, tmp_path, single_file):
    checkpoint, _, _ = single_file
    with pytest.raises(ConfigError, match=r"model.path: checkpoint file .* does not exist"):
        validate(make_cfg("model=diffusers", f"model.path={tmp_path / 'gone.safetensors'}"))
    with pytest.raises(ConfigError, match=r"model.config_dir: folder .* does not exist"):
        validate(make_cfg("model=diffusers", f"model.path={checkpoint}", f"model.config_dir={tmp_path / 'nope'}"))
    empty = tmp_path / "empty-configs"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"model.config_dir: .*missing model_index.json"):
        validate(make_cfg("model=diffusers", f"model.path={checkpoint}", f"model.config_dir={empty}"))
    not_a_checkpoint = tmp_path / "notes.txt"
    not_a_checkpoint.write_text("hi")
    with pytest.raises(ConfigError, match=r"model.path: .* not a single-file checkpoint"):
        validate(make_cfg("model=diffusers", f"model.path={not_a_checkpoint}"))


@pytest.fixture(scope="module")
def other_vae(tmp_path_factory):
    """A VAE with other weights (another seed), written in each format model.vae accepts."""
    root = tmp_path_factory.mktemp("vae")
    pipeline = build_tiny_pipeline(seed=11)
    pipeline.vae.save_pretrained(root / "vae-folder", safe_serialization=True)
    pipeline.save_pretrained(root / "model-folder", safe_serialization=True)
    write_ldm_vae(pipeline.vae, root / "vae-ldm.safetensors")
    save_file(pipeline.vae.state_dict(), str(root / "vae-diffusers.safetensors"))
    return root, pipeline.vae


@pytest.mark.parametrize("form", ["vae-folder", "model-folder", "vae-ldm.safetensors", "vae-diffusers.safetensors"])
def test_a_replacement_vae_is_loaded_instead_of_the_models(make_cfg, diffusers_folder, other_vae, form):
    folder, pipeline = diffusers_folder
    root, vae = other_vae
    cfg = make_cfg("model=diffusers", f"model.path={folder}", f"model.vae={root / form}")
    validate(cfg)
    base = load_base_model(cfg.model)
    assert _same_weights(base.vae, vae)
    assert not _same_weights(base.vae, pipeline.vae)
    assert _same_weights(base.denoiser, pipeline.unet)  # only the VAE changes
    assert base.identity["vae"] == str(root / form)


def test_a_replacement_vae_works_with_a_single_file_checkpoint(make_cfg, single_file, other_vae):
    checkpoint, config_dir, _ = single_file
    root, vae = other_vae
    cfg = make_cfg(
        "model=diffusers",
        f"model.path={checkpoint}",
        f"model.config_dir={config_dir}",
        f"model.vae={root / 'vae-ldm.safetensors'}",
    )
    assert _same_weights(load_base_model(cfg.model).vae, vae)


def test_vae_problems_name_model_vae(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"model.vae: .* does not exist"):
        validate(make_cfg(f"model.vae={tmp_path / 'missing-vae.safetensors'}"))
    with pytest.raises(ConfigError, match=r"model.vae: .* is not a diffusers VAE folder"):
        validate(make_cfg(f"model.vae={tmp_path}"))
    with pytest.raises(ConfigError, match=r"model.vae: .* hub id .* HF_HUB_OFFLINE"):
        validate(make_cfg("model.vae=stabilityai/sd-vae-ft-mse"))


@pytest.mark.parametrize(("override", "expected"), [(None, "epsilon"), ("v_prediction", "v_prediction")])
def test_prediction_type_overrides_the_scheduler_config(make_cfg, diffusers_folder, override, expected):
    folder, pipeline = diffusers_folder
    extra = [f"model.prediction_type={override}"] if override else []
    base = load_base_model(make_cfg("model=diffusers", f"model.path={folder}", *extra).model)
    assert base.noise_scheduler.config.prediction_type == expected
    assert base.identity["prediction_type"] == expected
    # the rest of the schedule is the model's own
    assert base.noise_scheduler.config.beta_end == pipeline.scheduler.config.beta_end
    assert base.base_model_version == "sd_v1"  # v-prediction alone does not make a model SD2


def test_a_kind_that_does_not_match_the_model_is_an_error(make_cfg, diffusers_folder):
    folder, _ = diffusers_folder
    cfg = make_cfg("model=diffusers", f"model.path={folder}", "model.kind=sd2")
    with pytest.raises(ConfigError, match=r"model.kind=sd2 but .* hidden size 32\b.*; set model.kind=sd1"):
        validate(cfg)
    with pytest.raises(ValueError, match=r"model.kind=sd2 but"):
        load_base_model(cfg.model)  # checked again against what was loaded
    with pytest.raises(ConfigError, match=r"model.kind=sd2 but model.source=tiny"):
        validate(make_cfg("model.kind=sd2"))


def _sd2_shaped_pipeline(seed: int = 3):
    """Tiny, but with SD2's text encoder width (1024): what model.kind=sd2 expects."""
    pipeline = build_tiny_pipeline(seed)
    torch.manual_seed(seed)
    text_config = pipeline.text_encoder.config.to_dict()
    text_config.update(hidden_size=1024, intermediate_size=64, projection_dim=32)
    unet_config = dict(pipeline.unet.config)
    unet_config["cross_attention_dim"] = 1024
    pipeline.register_modules(
        text_encoder=CLIPTextModel(CLIPTextConfig(**text_config)),
        unet=UNet2DConditionModel.from_config(unet_config),
    )
    return pipeline


@pytest.mark.parametrize(("prediction", "version"), [("epsilon", "sd_v2"), ("v_prediction", "sd_v2_v")])
def test_an_sd2_model_loads_as_kind_sd2(make_cfg, tmp_path, prediction, version):
    folder = tmp_path / "sd2"
    _sd2_shaped_pipeline().save_pretrained(folder, safe_serialization=True)
    with pytest.raises(ConfigError, match=r"model.kind=sd1 but .* hidden size 1024\b.*; set model.kind=sd2"):
        validate(make_cfg("model=diffusers", f"model.path={folder}", "model.kind=sd1"))
    for kind in ("model.kind=sd2", "model.kind=null"):  # given, or detected from the text encoder's width
        cfg = make_cfg("model=diffusers", f"model.path={folder}", kind, f"model.prediction_type={prediction}")
        validate(cfg)
        base = load_base_model(cfg.model)
        assert base.kind == "sd2"
        assert base.base_model_version == version


def test_bad_model_values_are_reported_together_naming_each_key(make_cfg):
    cfg = make_cfg("model.kind=sd4", "model.prediction_type=velocity", "model.attention=flash", "model.clip_skip=0")
    with pytest.raises(ConfigError) as caught:
        validate(cfg)
    message = str(caught.value)
    for key in ("model.kind", "model.prediction_type", "model.attention", "model.clip_skip"):
        assert key in message, key
    assert model_problems(make_cfg().model) == []


# --- attention kernels and gradient checkpointing


@pytest.mark.parametrize(("kind", "processor"), [("eager", AttnProcessor), ("sdpa", AttnProcessor2_0)])
def test_attention_kind_sets_every_unet_processor(kind, processor):
    unet = build_tiny_pipeline().unet
    other = AttnProcessor2_0 if processor is AttnProcessor else AttnProcessor
    unet.set_attn_processor(other())  # configure_attention must replace whatever was there
    configure_attention(unet, kind, torch.device("cpu"))
    processors = unet.attn_processors
    assert processors
    assert all(type(p) is processor for p in processors.values())


def test_xformers_fails_clearly_without_cuda(make_cfg):
    unet = build_tiny_pipeline().unet
    with pytest.raises(RuntimeError, match=r"model.attention=xformers needs a CUDA GPU"):
        configure_attention(unet, "xformers", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"model.attention=xformers"):
            validate(make_cfg("model.attention=xformers"))


def test_attention_problems(monkeypatch):
    assert attention_problem("sdpa", cuda_available=False) is None
    assert attention_problem("eager", cuda_available=False) is None
    assert "model.attention: unknown kind 'flash'" in attention_problem("flash", cuda_available=True)
    assert "CUDA" in attention_problem("xformers", cuda_available=False)
    monkeypatch.setattr(training.speed.attention_options, "xformers_installed", lambda: False)
    assert "not installed" in attention_problem("xformers", cuda_available=True)
    monkeypatch.setattr(training.speed.attention_options, "xformers_installed", lambda: True)
    assert attention_problem("xformers", cuda_available=True) is None


def test_gradient_checkpointing_is_set_and_unset():
    pipeline = build_tiny_pipeline()
    unet, text_encoder = pipeline.unet, pipeline.text_encoder
    configure_gradient_checkpointing(unet, [text_encoder], enabled=True, train_text_encoder=False)
    assert unet.is_gradient_checkpointing
    assert not gradient_checkpointing_enabled(text_encoder)  # frozen: runs under no_grad, nothing to save
    configure_gradient_checkpointing(unet, [text_encoder], enabled=True, train_text_encoder=True)
    assert gradient_checkpointing_enabled(unet) and gradient_checkpointing_enabled(text_encoder)
    # the next trial on the same (reused) base model turns it off again
    configure_gradient_checkpointing(unet, [text_encoder], enabled=False, train_text_encoder=True)
    assert not unet.is_gradient_checkpointing
    assert not gradient_checkpointing_enabled(text_encoder)


def test_gradient_checkpointing_keeps_lora_gradients_flowing():
    """Frozen base + LoRA: checkpointed layers must still pass gradients to the adapters."""
    pipeline = build_tiny_pipeline()
    unet, text_encoder = pipeline.unet, pipeline.text_encoder
    for model in (unet, text_encoder):
        model.requires_grad_(False)
    attach_lora(
        text_encoder, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    configure_gradient_checkpointing(unet, [text_encoder], enabled=True, train_text_encoder=True)
    unet.train()
    text_encoder.train()
    ids = pipeline.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    hidden = text_encoder(ids)[0]
    noise = unet(torch.randn(1, 4, 16, 16), torch.tensor([10]), hidden).sample
    noise.square().mean().backward()
    grads = [p.grad for n, p in text_encoder.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
