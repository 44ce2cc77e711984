"""Loading a base model's parts (UNet, VAE, text encoder, tokenizer, noise scheduler).

The tiny default and real models take the same path: a diffusers folder read by ``from_pretrained``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from training.tiny_model import ensure_tiny_model

MODEL_SOURCES = ("tiny", "diffusers")


@dataclass
class BaseModel:
    """The parts of an SD-family model that LoRA training needs."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler
    location: str  # the folder or hub id it was loaded from
    identity: dict[str, str] = field(default_factory=dict)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_resolution(self) -> int:
        """The image side the UNet was built for (64 for tiny, 512 for SD1.5)."""
        sample_size = self.unet.config.sample_size
        side = sample_size if isinstance(sample_size, int) else sample_size[0]
        return side * self.vae_scale_factor

    @property
    def base_model_version(self) -> str:
        """kohya's ``ss_base_model_version`` naming."""
        if self.identity.get("source") == "tiny":
            return "tiny_sd_v1"
        v_prediction = self.noise_scheduler.config.prediction_type == "v_prediction"
        return "sd_v2" + ("_v" if v_prediction else "") if self.text_encoder.config.hidden_size == 1024 else "sd_v1"


def resolve_model_location(model_cfg: Any) -> str:
    """Where the weights come from: the tiny model's cache folder, a local folder or a hub id."""
    if model_cfg.source == "tiny":
        return str(ensure_tiny_model(model_cfg.cache_dir))
    return str(Path(model_cfg.path).expanduser()) if Path(model_cfg.path).expanduser().exists() else model_cfg.path


def model_location_problem(model_cfg: Any) -> str | None:
    """Why ``model`` cannot be loaded, checked before anything heavy happens (None if fine)."""
    if model_cfg.source not in MODEL_SOURCES:
        return f"model.source: unknown source '{model_cfg.source}'; use one of {', '.join(MODEL_SOURCES)}"
    if model_cfg.source == "tiny":
        return None
    path = model_cfg.path
    if not path:
        return "model.path: not set; give a diffusers folder or a hub id, e.g. model.path=/models/sd15"
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "model_index.json").is_file() and not (local / "unet").is_dir():
            return (
                f"model.path: '{path}' is not a diffusers folder (no model_index.json or unet/); "
                "point it at a folder saved with save_pretrained"
            )
        return None
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        return f"model.path: folder '{path}' does not exist; check the path"
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return f"model.path: '{path}' is a hub id but HF_HUB_OFFLINE is set; download it first or give a local folder"
    return None


def load_base_model(model_cfg: Any) -> BaseModel:
    """Load every part in fp32 on the CPU; the loop moves and casts them for training."""
    location = resolve_model_location(model_cfg)
    revision = {"revision": model_cfg.revision} if model_cfg.revision else {}
    unet = UNet2DConditionModel.from_pretrained(location, subfolder="unet", **revision)
    vae = AutoencoderKL.from_pretrained(location, subfolder="vae", **revision)
    text_encoder = CLIPTextModel.from_pretrained(location, subfolder="text_encoder", **revision)
    tokenizer = CLIPTokenizer.from_pretrained(location, subfolder="tokenizer", **revision)
    noise_scheduler = DDPMScheduler.from_pretrained(location, subfolder="scheduler", **revision)
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
        module.eval()
    identity = {
        "source": model_cfg.source,
        "location": location,
        "revision": model_cfg.revision or "",
        "weights_sha256": weights_fingerprint(location),
    }
    return BaseModel(unet, vae, text_encoder, tokenizer, noise_scheduler, location, identity)


def weights_fingerprint(location: str) -> str:
    """sha256 over the names and sizes of a local folder's weight files (cheap; '' for hub ids).

    Hashing multi-GB weights on every run would cost minutes; names + sizes catch swapped models.
    """
    folder = Path(location)
    if not folder.is_dir():
        return ""
    digest = hashlib.sha256()
    for file in sorted(folder.rglob("*")):
        if file.suffix in (".safetensors", ".bin", ".json", ".txt"):
            digest.update(f"{file.relative_to(folder)}:{file.stat().st_size}".encode())
    return digest.hexdigest()
