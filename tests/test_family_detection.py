"""Each family recognises its own files, most specific first: SD3 and FLUX folders and single files
(two or three text encoders, a transformer denoiser) are named as what they are, not read as SDXL,
load as their family, and a contradicting model.kind names both."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from sweeper.config.validate import ConfigError, validate
from training.families.detect import checkpoint_kind, folder_kind
from training.families.loading import load_base_model
from training.families.tiny_mmdit import build_tiny_flux_pipeline, build_tiny_sd3_pipeline


@pytest.fixture(scope="module")
def tiny_flow_folders(tmp_path_factory):
    """The tiny SD3 and FLUX.1 pipelines, saved with save_pretrained (the real layout); SD3 also without T5."""
    root = tmp_path_factory.mktemp("flow-models")
    sd3 = build_tiny_sd3_pipeline()
    sd3.save_pretrained(root / "sd3")
    sd3.text_encoder_3 = sd3.tokenizer_3 = None
    sd3.register_modules(text_encoder_3=None, tokenizer_3=None)
    sd3.save_pretrained(root / "sd3-no-t5")
    build_tiny_flux_pipeline().save_pretrained(root / "flux")
    return root


def test_sd3_and_flux_folders_are_named_not_taken_for_sdxl(tiny_flow_folders):
    assert (tiny_flow_folders / "flux" / "text_encoder_2").is_dir()  # what made them "SDXL" before
    assert folder_kind(tiny_flow_folders / "sd3") == (
        "sd3",
        "an SD3 model (model_index.json: StableDiffusion3Pipeline)",
    )
    assert folder_kind(tiny_flow_folders / "flux") == ("flux", "a FLUX.1 model (model_index.json: FluxPipeline)")
    # a config folder without model_index.json: the transformer's own config says it
    (tiny_flow_folders / "sd3" / "model_index.json").rename(tiny_flow_folders / "sd3" / "index.bak")
    try:
        assert folder_kind(tiny_flow_folders / "sd3")[0] == "sd3"
    finally:
        (tiny_flow_folders / "sd3" / "index.bak").rename(tiny_flow_folders / "sd3" / "model_index.json")


def test_original_layout_files_are_named_by_their_denoiser_blocks(tmp_path):
    sd3_file, flux_file = tmp_path / "sd3.safetensors", tmp_path / "flux.safetensors"
    save_file(
        {
            "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(1),
            "text_encoders.clip_g.transformer.text_model.final_layer_norm.weight": torch.zeros(1),
        },
        sd3_file,
    )
    save_file(
        {"double_blocks.0.img_attn.qkv.weight": torch.zeros(1), "single_blocks.0.linear1.weight": torch.zeros(1)},
        flux_file,
    )
    assert checkpoint_kind(sd3_file)[0] == "sd3" and "joint_blocks" in checkpoint_kind(sd3_file)[1]
    assert checkpoint_kind(flux_file)[0] == "flux" and "double_blocks" in checkpoint_kind(flux_file)[1]


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_a_flow_folder_loads_as_its_family_and_a_wrong_kind_names_both(make_cfg, tiny_flow_folders, name):
    cfg = make_cfg("model=diffusers", f"model.path={tiny_flow_folders / name}")  # model.kind left unset
    validate(cfg)
    base = load_base_model(cfg.model)
    assert base.kind == name and base.t5 is not None
    assert type(base.noise_scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    label = {"sd3": "SD3", "flux": "FLUX.1"}[name]
    with pytest.raises(ConfigError, match=rf"model.kind=sdxl but .* is an? {label} model .*set model.kind={name}"):
        validate(make_cfg("model=diffusers", f"model.path={tiny_flow_folders / name}", "model.kind=sdxl"))


def test_sd3_runs_without_t5_where_flux_cannot(make_cfg, tiny_flow_folders):
    without = load_base_model(make_cfg("model=diffusers", f"model.path={tiny_flow_folders / 'sd3-no-t5'}").model)
    assert without.kind == "sd3" and without.t5 is None
    off = load_base_model(
        make_cfg("model=diffusers", f"model.path={tiny_flow_folders / 'sd3'}", "model.t5=false").model
    )
    assert off.t5 is None and off.identity.get("t5") is None
    with pytest.raises(ConfigError, match=r"model.t5=false: FLUX.1 conditions on T5"):
        validate(make_cfg("model=diffusers", f"model.path={tiny_flow_folders / 'flux'}", "model.t5=false"))
