"""Each family recognises its own files, most specific first: SD3 and FLUX folders and single files
(two or three text encoders, a transformer denoiser) are named as what they are, not read as SDXL,
and refused at startup until their training exists."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from safetensors.torch import save_file
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
)

from sweeper.validate import ConfigError, validate
from training.families.detect import checkpoint_kind, folder_kind
from training.families.tiny_sd import build_tiny_pipeline, build_tiny_vae

CLIP = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "vocab_size": 1000,
    "projection_dim": 32,
}


def _t5() -> T5EncoderModel:
    return T5EncoderModel(T5Config(d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=1, vocab_size=1000))


@pytest.fixture(scope="module")
def tiny_flow_folders(tmp_path_factory):
    """A tiny SD3 and a tiny FLUX.1 pipeline, saved with save_pretrained (the real layout)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("flow-models")
    tokenizer: CLIPTokenizer = build_tiny_pipeline(0).tokenizer
    sd3 = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            num_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=32,
            caption_projection_dim=16,
            pooled_projection_dim=64,
            out_channels=4,
        ),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=build_tiny_vae(),
        text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP)),
        tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP)),
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    sd3.save_pretrained(root / "sd3")
    flux = FluxPipeline(
        transformer=FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            axes_dims_rope=(2, 2, 4),
        ),
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        vae=build_tiny_vae(),
        text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP)),
        tokenizer=tokenizer,
        text_encoder_2=_t5(),
        tokenizer_2=tokenizer,
    )
    flux.save_pretrained(root / "flux")
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
def test_a_flow_model_is_refused_at_startup_by_name(make_cfg, tiny_flow_folders, name):
    cfg = make_cfg("model=diffusers", f"model.path={tiny_flow_folders / name}")
    with pytest.raises(
        ConfigError, match=r"model.path: .* is an? (SD3|FLUX.1) model .*trains sd1, sd2, sdxl models only"
    ):
        validate(cfg)
