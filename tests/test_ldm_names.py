"""diffusers UNet names -> original (LDM/SGM) names, checked against diffusers' own converters.

The mapping must agree with what the rest of the world reads: an original single-file checkpoint
(diffusers' ``convert_ldm_unet_checkpoint`` must turn our names back into the diffusers ones) and a
kohya SDXL LoRA (diffusers' kohya converter must find the module we adapted). Both are checked on the
published SDXL base UNet (built on the meta device: no memory, no download) and on a tiny SDXL UNet.
"""

from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.lora_conversion_utils import (
    _convert_non_diffusers_lora_to_diffusers,
    _maybe_map_sgm_blocks_to_diffusers,
)
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from diffusers.utils import convert_unet_state_dict_to_peft
from torch import nn

import training.families.tiny_sdxl
from tests.helpers_checkpoint import UNET_PREFIX, copy_configs, write_sdxl_checkpoint
from training.families.ldm_names import kohya_unet_names, ldm_module_name, unet_module_map
from training.families.tiny_sdxl import build_tiny_sdxl_pipeline

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (the values that differ from diffusers' defaults)
SDXL_BASE_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "use_linear_projection": True,
}


def randomised(pipeline: StableDiffusionXLPipeline) -> StableDiffusionXLPipeline:
    """Every weight random (norms too, which start as ones and zeros), so a swapped name cannot hide."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for part in (pipeline.unet, pipeline.vae, pipeline.text_encoder, pipeline.text_encoder_2):
            for parameter in part.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return pipeline


@pytest.fixture(scope="module")
def sdxl_base_unet() -> UNet2DConditionModel:
    with init_empty_weights():
        return UNet2DConditionModel.from_config(SDXL_BASE_UNET)


@pytest.fixture(scope="module")
def tiny_sdxl() -> StableDiffusionXLPipeline:
    return build_tiny_sdxl_pipeline()


@pytest.fixture(params=["sdxl-base", "tiny-sdxl"])
def unet(request: pytest.FixtureRequest) -> UNet2DConditionModel:
    if request.param == "sdxl-base":
        return request.getfixturevalue("sdxl_base_unet")
    return request.getfixturevalue("tiny_sdxl").unet


def weight_modules(unet: nn.Module) -> dict[str, nn.Module]:
    return {path: m for path, m in unet.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)}


# --- single-file checkpoints


def test_every_module_name_survives_diffusers_single_file_converter(unet):
    """Each parameter written under our LDM name of its module comes back under its own diffusers name."""
    mapping = unet_module_map(unet.config)
    state = unet.state_dict()
    checkpoint = {}
    for path, module in unet.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            key = f"{path}.{name}"
            checkpoint[f"{UNET_PREFIX}{ldm_module_name(path, mapping)}.{name}"] = state[key]
    assert len(checkpoint) == len(state)  # no two parameters share an LDM name

    converted = convert_ldm_unet_checkpoint(checkpoint, unet.config)

    assert converted.keys() == state.keys()
    assert [k for k in state if converted[k] is not state[k]] == []  # each tensor back under its own name


def test_kohya_names_cover_every_weight_module_once(unet):
    names = kohya_unet_names(unet)
    mapping = unet_module_map(unet.config)
    weights = weight_modules(unet)
    assert {path: names[path] for path in weights} == {
        path: ldm_module_name(path, mapping).replace(".", "_") for path in weights
    }
    assert len({names[path] for path in weights}) == len(weights)
    assert "" not in names and "down_blocks.1" not in names  # diffusers-only containers have no kohya name


def test_known_kohya_sdxl_names(sdxl_base_unet):
    names = kohya_unet_names(sdxl_base_unet)
    assert names["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"] == (
        "input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    )
    assert names["mid_block.attentions.0.transformer_blocks.9.ff.net.2"] == (
        "middle_block_1_transformer_blocks_9_ff_net_2"
    )
    assert names["up_blocks.0.attentions.2.proj_out"] == "output_blocks_2_1_proj_out"
    # resnet parts, samplers and the SDXL size/crop embedding, as kohya's sdxl_original_unet.py names them
    assert names["down_blocks.0.resnets.1.conv2"] == "input_blocks_2_0_out_layers_3"
    assert names["down_blocks.1.resnets.0.conv_shortcut"] == "input_blocks_4_0_skip_connection"
    assert names["down_blocks.0.downsamplers.0.conv"] == "input_blocks_3_0_op"
    assert names["up_blocks.1.upsamplers.0.conv"] == "output_blocks_5_2_conv"
    assert names["mid_block.resnets.1.time_emb_proj"] == "middle_block_2_emb_layers_1"
    assert names["add_embedding.linear_2"] == "label_emb_0_2"
    assert names["conv_out"] == "out_2"


# --- kohya LoRA files


def kohya_lora(module: nn.Module, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_down, lora_up) shaped as kohya writes them: Linear factors, or a conv followed by a 1x1 conv."""
    if isinstance(module, nn.Linear):
        return torch.randn(rank, module.in_features), torch.randn(module.out_features, rank)
    return torch.randn(rank, module.in_channels, *module.kernel_size), torch.randn(module.out_channels, rank, 1, 1)


def test_diffusers_reads_kohya_lora_names_as_the_modules_we_adapted(tiny_sdxl):
    """Every Linear and Conv2d (attention, feed-forward, resnets, samplers, embeddings), in one LoCon-style file."""
    unet = tiny_sdxl.unet
    names = kohya_unet_names(unet)
    adapted = weight_modules(unet)
    rank = 2
    kohya, downs = {}, {}
    for path, module in adapted.items():
        lora = f"lora_unet_{names[path]}"
        downs[path], kohya[f"{lora}.lora_up.weight"] = kohya_lora(module, rank)
        kohya[f"{lora}.lora_down.weight"] = downs[path]
        kohya[f"{lora}.alpha"] = torch.tensor(float(rank))

    remapped = _maybe_map_sgm_blocks_to_diffusers(kohya, unet.config)
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(remapped)
    peft = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()})

    assert {key.rsplit(".lora_", 1)[0] for key in peft} == adapted.keys()
    assert [p for p in adapted if peft[f"{p}.lora_A.weight"] is not downs[p]] == []
    assert len(alphas) == len(adapted)


# --- a whole SDXL single file


def test_sdxl_checkpoint_loads_back_through_from_single_file(tmp_path):
    # diffusers' single-file loader tells SDXL's two text encoders apart by width alone, which is why
    # the tiny model's widths differ (as real SDXL's 768 and 1280 do)
    assert training.families.tiny_sdxl.TEXT_WIDTHS[0] != training.families.tiny_sdxl.TEXT_WIDTHS[1]
    pipeline = randomised(build_tiny_sdxl_pipeline())
    pipeline.save_pretrained(tmp_path / "diffusers")
    config = copy_configs(tmp_path / "diffusers", tmp_path / "config")
    file = write_sdxl_checkpoint(pipeline, tmp_path / "tiny-sdxl.safetensors")

    loaded = StableDiffusionXLPipeline.from_single_file(str(file), config=str(config), local_files_only=True)

    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        expected, actual = getattr(pipeline, part).state_dict(), getattr(loaded, part).state_dict()
        assert actual.keys() == expected.keys(), part
        assert [k for k, v in expected.items() if not torch.equal(actual[k], v)] == [], part
