"""SDXL base at full size with random weights, built in code (no download), for the speed benchmarks.

The architecture is stabilityai/stable-diffusion-xl-base-1.0's, from its published ``config.json``
files (unet/, vae/, text_encoder/, text_encoder_2/, scheduler/): a 2.57B-parameter UNet, SDXL's VAE
(scaling factor 0.13025, ``force_upcast``), CLIP ViT-L (768) and OpenCLIP ViT-bigG with projection
(1280). Speed does not depend on the weights, so they are random. The tokenizers are the project's
word tokenizer (``training.text.tokenizer``, no download); the text encoders keep CLIP's 49408-token
tables, so the embedding sizes are SDXL's.

Built on the GPU (``torch.device("cuda")`` as the default device while the modules are made): each
layer's random init then runs as a GPU kernel instead of minutes of CPU work. ``device="meta"``
builds the same model without memory, which is enough to count its FLOPs anywhere
(``unet_lora_tflop``).

    python benchmarks/sdxl_model.py            # FLOPs of the UNet LoRA step, counted on the meta device (CPU)
"""

from __future__ import annotations

import time
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from training.families.loading import BaseModel
from training.families.sdxl import SDXL
from training.families.tiny_sdxl import SDXL_SCHEDULER
from training.text.tokenizer import build_word_tokenizer

# --- stabilityai/stable-diffusion-xl-base-1.0 configs (only what differs from the classes' defaults matters)
UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 1280 pooled + 6 time ids x 256
    norm_num_groups=32,
)
VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    sample_size=1024,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    scaling_factor=0.13025,
    force_upcast=True,
)
# bos/eos/pad follow the word tokenizer (BOS 0, EOS 1 = pad); CLIP's pooled output reads the EOS position
TOKENS = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
CLIP_L = dict(  # text_encoder: CLIP ViT-L/14
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    hidden_act="quick_gelu",
    projection_dim=768,
    **TOKENS,
)
CLIP_BIG_G = dict(  # text_encoder_2: OpenCLIP ViT-bigG/14 with its text projection
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    hidden_act="gelu",
    projection_dim=1280,
    **TOKENS,
)
SCHEDULER = SDXL_SCHEDULER
ISSUE_TFLOP_PER_IMAGE = 14.5  # issue 16: SDXL UNet LoRA forward + backward per 1024 px image


def sdxl_parts(device: str | torch.device = "cuda") -> tuple[Any, Any, Any, Any]:
    """(unet, vae, text_encoder, text_encoder_2) in fp32 with random weights, made on ``device``."""
    with torch.device(device):
        unet = UNet2DConditionModel(**UNET)
        vae = AutoencoderKL(**VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIG_G))
    return unet, vae, text_encoder, text_encoder_2


def sdxl_base_model(device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16) -> BaseModel:
    """The SDXL-base-architecture model, weights random (seed 0) and already in ``dtype`` on ``device``.

    Casting here (not in the loop) keeps the fp32 copies out of the first benchmark row's peak memory.
    """
    torch.manual_seed(0)
    started = time.perf_counter()
    parts = sdxl_parts(device)
    for part in parts:
        part.to(dtype).requires_grad_(False).eval()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    unet, vae, text_encoder, text_encoder_2 = parts
    print(
        f"SDXL-architecture model built on {device} in {time.perf_counter() - started:.1f} s "
        f"(UNet {parameters(unet) / 1e9:.2f}B parameters, text encoders {parameters(text_encoder) / 1e6:.0f}M + "
        f"{parameters(text_encoder_2) / 1e6:.0f}M, VAE {parameters(vae) / 1e6:.0f}M)",
        flush=True,
    )
    tokenizers = [build_word_tokenizer(), build_word_tokenizer()]  # no download; CLIP's 49408-token tables kept
    scheduler = DDPMScheduler.from_config(EulerDiscreteScheduler(**SCHEDULER).config)  # as load_base_model does
    identity = {"source": "benchmark-sdxl-random", "location": "in-memory", "weights_sha256": "random-seed-0"}
    identity["kind"] = SDXL.kind
    return BaseModel(
        unet, vae, [text_encoder, text_encoder_2], tokenizers, scheduler, "in-memory", identity, family=SDXL
    )


def tiny_sdxl_base_model() -> BaseModel:
    """The project's tiny SDXL (``training.families.tiny_sdxl``): the same code paths, small enough for a CPU."""
    from training.families.tiny_sdxl import build_tiny_sdxl_pipeline

    pipe = build_tiny_sdxl_pipeline()
    parts = (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)
    for part in parts:
        part.requires_grad_(False).eval()
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    identity = {"source": "tiny", "location": "in-memory", "weights_sha256": "tiny-sdxl-seed-0", "kind": SDXL.kind}
    return BaseModel(
        pipe.unet,
        pipe.vae,
        [pipe.text_encoder, pipe.text_encoder_2],
        [pipe.tokenizer, pipe.tokenizer_2],
        scheduler,
        "in-memory",
        identity,
        family=SDXL,
    )


def write_folder(base: BaseModel, folder, dtype: torch.dtype = torch.bfloat16) -> float:
    """``base`` as a diffusers folder (safetensors in ``dtype``, SDXL's Euler scheduler); returns seconds."""
    started = time.perf_counter()
    for part in (base.denoiser, base.vae, *base.text_encoders):
        part.to(dtype)
    SDXL.pipeline(base, EulerDiscreteScheduler(**SCHEDULER)).save_pretrained(folder, safe_serialization=True)
    return time.perf_counter() - started


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def unet_lora_tflop(rank: int = 4, side: int = 1024, batch: int = 1) -> dict[str, float]:
    """TFLOP per image of the SDXL UNet's LoRA training step (forward + backward), counted on the meta
    device by ``torch.utils.flop_counter`` with the project's own LoRA (``network.unet_targets``)."""
    from omegaconf import OmegaConf
    from torch.utils.flop_counter import FlopCounterMode

    from sweeper.config.schema import NetworkConfig
    from training.network.lora import add_lora

    unet, vae, text_encoder, text_encoder_2 = sdxl_parts("meta")
    for part in (unet, vae, text_encoder, text_encoder_2):
        part.requires_grad_(False)
    base = BaseModel(unet, vae, [text_encoder, text_encoder_2], [None, None], None, "meta", family=SDXL)
    network_cfg = OmegaConf.structured(NetworkConfig(dim=rank, alpha=rank))
    network = add_lora(base, network_cfg, 1e-4)
    latent = side // 8
    with torch.device("meta"):
        noisy = torch.randn(batch, 4, latent, latent)
        timesteps = torch.randint(0, 1000, (batch,))
        cond = {
            "hidden": torch.randn(batch, 77, UNET["cross_attention_dim"]),
            "text_embeds": torch.randn(batch, CLIP_BIG_G["projection_dim"]),
            "time_ids": torch.randn(batch, 6),
        }
    with FlopCounterMode(display=False) as counter:
        prediction = SDXL.predict(unet, noisy, timesteps, cond)
        forward = counter.get_total_flops()
        prediction.float().pow(2).mean().backward()
    lora = sum(p.numel() for p in network.parameters())
    return {
        "rank": rank,
        "side": side,
        "forward_tflop_per_image": forward / batch / 1e12,
        "train_tflop_per_image": counter.get_total_flops() / batch / 1e12,
        "lora_parameters_m": lora / 1e6,
    }


if __name__ == "__main__":
    for rank in (4, 32):
        count = unet_lora_tflop(rank)
        print(
            f"SDXL UNet LoRA rank {rank} ({count['lora_parameters_m']:.1f}M LoRA parameters) at 1024 px: forward "
            f"{count['forward_tflop_per_image']:.2f} TFLOP, forward + backward {count['train_tflop_per_image']:.2f} "
            f"TFLOP per image (issue 16: {ISSUE_TFLOP_PER_IMAGE})",
            flush=True,
        )
