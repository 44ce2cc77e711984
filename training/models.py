"""Loading a base model's parts (UNet, VAE, text encoder, tokenizer, noise scheduler).

Three ways in, one result: a diffusers folder (the tiny default is one) read by ``from_pretrained``;
a single-file checkpoint in the original LDM / A1111 layout read by diffusers' own single-file
loaders, its configs taken from ``model.config_dir`` so it works offline; a hub id when online.
Then the optional replacement VAE (``model.vae``) and prediction type (``model.prediction_type``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from training.attention import attention_problem
from training.checked_loading import load_checked
from training.text_encoding import clip_skip_problem
from training.tiny_model import ensure_tiny_model
from training.toy.shipped import shipped_folder

MODEL_SOURCES = ("toy", "tiny", "diffusers")
EMBEDDED_SOURCES = ("toy", "tiny")  # SD1-shaped models that ship with (or are built by) the project
MODEL_KINDS = ("sd1", "sd2")
PREDICTION_TYPES = ("epsilon", "v_prediction")
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")  # .ckpt is read with torch.load(weights_only=True)
VAE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt")
SD2_TEXT_HIDDEN_SIZE = 1024  # OpenCLIP ViT-H/14; SD1's CLIP ViT-L/14 is 768
# What a config folder for a single-file checkpoint must hold (configs only; weights are not read).
CONFIG_DIR_FILES = (
    "model_index.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "scheduler/scheduler_config.json",
)
# Options applied to the loaded model at run time; they do not change what is loaded.
RUNTIME_MODEL_KEYS = ("clip_skip", "attention", "gradient_checkpointing")


@dataclass
class BaseModel:
    """The parts of an SD-family model that LoRA training needs."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler
    location: str  # the folder, checkpoint file or hub id it was loaded from
    identity: dict[str, str] = field(default_factory=dict)
    kind: str | None = None  # sd1 | sd2 (model.kind, checked against the text encoder); None = inferred

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
        """kohya's ``ss_base_model_version`` naming: sd_v1, sd_v2, sd_v2_v (v-prediction), tiny_sd_v1."""
        if self.identity.get("source") in EMBEDDED_SOURCES:
            return f"{self.identity['source']}_sd_v1"
        if (self.kind or loaded_kind(self.text_encoder)) == "sd2":
            v_prediction = self.noise_scheduler.config.prediction_type == "v_prediction"
            return "sd_v2_v" if v_prediction else "sd_v2"
        return "sd_v1"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def loaded_kind(text_encoder: Any) -> str:
    """sd2 when the text encoder is SD2's OpenCLIP width, otherwise sd1 (tiny models are SD1-shaped)."""
    return "sd2" if text_encoder.config.hidden_size == SD2_TEXT_HIDDEN_SIZE else "sd1"


def is_checkpoint_file(path: str | Path) -> bool:
    """Whether ``model.path`` names a single-file checkpoint rather than a folder or hub id."""
    return Path(path).suffix.lower() in CHECKPOINT_SUFFIXES


def resolve_model_location(model_cfg: Any) -> str:
    """Where the weights come from: the toy world's shipped folder, the tiny model's cache folder, a
    local folder or file, or a hub id."""
    if model_cfg.source == "toy":
        return str(shipped_folder("base"))
    if model_cfg.source == "tiny":
        return str(ensure_tiny_model(model_cfg.cache_dir))
    local = Path(model_cfg.path).expanduser()
    return str(local) if local.exists() else model_cfg.path


# --- startup validation


def model_problems(model_cfg: Any) -> list[str]:
    """Every reason ``model`` cannot be loaded or run, checked before anything heavy happens."""
    problems: list[str] = []
    if model_cfg.source not in MODEL_SOURCES:
        problems.append(f"model.source: unknown source '{model_cfg.source}'; use one of {', '.join(MODEL_SOURCES)}")
    if model_cfg.kind not in MODEL_KINDS:
        problems.append(
            f"model.kind: unknown kind '{model_cfg.kind}'; use sd1 or sd2 (SD2 = OpenCLIP text encoder; "
            "v-prediction is model.prediction_type)"
        )
    if model_cfg.prediction_type is not None and model_cfg.prediction_type not in PREDICTION_TYPES:
        problems.append(
            f"model.prediction_type: unknown '{model_cfg.prediction_type}'; use epsilon, v_prediction, "
            "or null to keep the model's scheduler config"
        )
    if problem := attention_problem(model_cfg.attention, torch.cuda.is_available()):
        problems.append(problem)
    if problem := clip_skip_problem(model_cfg.clip_skip):
        problems.append(problem)
    if model_cfg.source in EMBEDDED_SOURCES:
        if model_cfg.kind == "sd2":
            problems.append(
                f"model.kind=sd2 but model.source={model_cfg.source} is an SD1-shaped model; use model.kind=sd1"
            )
        if model_cfg.source == "toy":
            try:
                shipped_folder("base")
            except FileNotFoundError as error:
                problems.append(f"model.source=toy: {error}")
    elif model_cfg.source == "diffusers":
        problems += _path_problems(model_cfg)
    if model_cfg.vae:
        problems += _vae_problems(model_cfg.vae)
    return problems


def _path_problems(model_cfg: Any) -> list[str]:
    path = model_cfg.path
    if not path:
        return [
            "model.path: not set; give a diffusers folder, a .safetensors checkpoint (with model.config_dir) "
            "or a hub id, e.g. model.path=/models/sd15"
        ]
    local = Path(path).expanduser()
    if local.is_file():
        return _checkpoint_problems(model_cfg, local)
    if local.is_dir():
        if not (local / "model_index.json").is_file() and not (local / "unet").is_dir():
            return [
                f"model.path: '{path}' is not a diffusers folder (no model_index.json or unet/); "
                "point it at a folder saved with save_pretrained, or at a .safetensors checkpoint"
            ]
        return _kind_problems(model_cfg.kind, local / "text_encoder" / "config.json")
    if is_checkpoint_file(local):
        return [f"model.path: checkpoint file '{path}' does not exist; check the path"]
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        return [f"model.path: folder '{path}' does not exist; check the path"]
    if hub_offline():
        return [f"model.path: '{path}' is a hub id but HF_HUB_OFFLINE is set; download it first or give a local folder"]
    return []


def _checkpoint_problems(model_cfg: Any, file: Path) -> list[str]:
    if not is_checkpoint_file(file):
        return [
            f"model.path: '{model_cfg.path}' is a file but not a single-file checkpoint "
            f"({', '.join(CHECKPOINT_SUFFIXES)}); or give a diffusers folder"
        ]
    config_dir = model_cfg.config_dir
    if not config_dir:
        if hub_offline():
            return [
                f"model.path: '{model_cfg.path}' is a single-file checkpoint and HF_HUB_OFFLINE is set, so its "
                "configs cannot be fetched: set model.config_dir to a local diffusers config folder for this "
                "model family (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/; "
                "e.g. a saved SD1.5 or SD2.1 diffusers folder)"
            ]
        return []
    folder = Path(config_dir).expanduser()
    if not folder.is_dir():
        if hub_offline() or config_dir.startswith((".", "/", "~")) or config_dir.count("/") != 1:
            return [f"model.config_dir: folder '{config_dir}' does not exist; give a local diffusers config folder"]
        return []  # a hub id, fetched online
    missing = [name for name in (*CONFIG_DIR_FILES, "tokenizer") if not (folder / name).exists()]
    if missing:
        return [
            f"model.config_dir: '{config_dir}' is not a diffusers config folder (missing {', '.join(missing)}); "
            "save one with save_pretrained or copy a model's diffusers folder (weights are not needed)"
        ]
    return _kind_problems(model_cfg.kind, folder / "text_encoder" / "config.json")


def _kind_problems(kind: str, text_encoder_config: Path) -> list[str]:
    """model.kind against the text encoder config, read cheaply before loading any weights."""
    try:
        hidden_size = json.loads(text_encoder_config.read_text())["hidden_size"]
    except (OSError, ValueError, KeyError):
        return []  # loading reports a broken folder; the kind is checked again after loading
    found = "sd2" if hidden_size == SD2_TEXT_HIDDEN_SIZE else "sd1"
    return [] if kind not in MODEL_KINDS or kind == found else [_kind_mismatch(kind, found, hidden_size)]


def _kind_mismatch(kind: str, found: str, hidden_size: int) -> str:
    what = "SD2's OpenCLIP ViT-H" if found == "sd2" else "not SD2's OpenCLIP (1024)"
    return (
        f"model.kind={kind} but the model's text encoder has hidden size {hidden_size} ({what}); set model.kind={found}"
    )


def _vae_problems(vae: str) -> list[str]:
    local = Path(vae).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file() and not (local / "vae" / "config.json").is_file():
            return [
                f"model.vae: '{vae}' is not a diffusers VAE folder (no config.json or vae/config.json); "
                f"give a VAE folder or a single file ({', '.join(VAE_FILE_SUFFIXES)})"
            ]
        return []
    if local.is_file():
        if local.suffix.lower() not in VAE_FILE_SUFFIXES:
            return [f"model.vae: '{vae}' is not a VAE weights file ({', '.join(VAE_FILE_SUFFIXES)})"]
        return []
    if vae.startswith((".", "/", "~")) or vae.count("/") != 1 or local.suffix.lower() in VAE_FILE_SUFFIXES:
        return [f"model.vae: '{vae}' does not exist; give a diffusers VAE folder or a .safetensors file"]
    if hub_offline():
        return [f"model.vae: '{vae}' is a hub id but HF_HUB_OFFLINE is set; download it first or give a local path"]
    return []


# --- loading


def load_base_model(model_cfg: Any) -> BaseModel:
    """Load every part in fp32 on the CPU; the loop moves and casts them for training."""
    location = resolve_model_location(model_cfg)
    single_file = Path(location).is_file()
    config_source = _config_source(model_cfg, location, single_file)
    vae = _load_vae(model_cfg.vae, config_source) if model_cfg.vae else None
    if single_file:
        unet, base_vae, text_encoder, tokenizer, noise_scheduler = _load_single_file(location, config_source, vae)
    else:
        unet, base_vae, text_encoder, tokenizer, noise_scheduler = _load_diffusers_folder(
            location, model_cfg.revision, vae
        )
    vae = vae or base_vae
    if model_cfg.prediction_type:
        # v-prediction (Salimans & Ho 2022, arXiv:2202.00512) for SD2-768-v style models; the loop
        # and the samplers read prediction_type from this config.
        noise_scheduler = DDPMScheduler.from_config(noise_scheduler.config, prediction_type=model_cfg.prediction_type)
    found = loaded_kind(text_encoder)
    if model_cfg.kind != found:
        raise ValueError(_kind_mismatch(model_cfg.kind, found, text_encoder.config.hidden_size) + f" ({location})")
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        _require_loaded(module, name, location)
        module.requires_grad_(False)
        module.eval()
    identity = {
        "source": model_cfg.source,
        "location": location,
        "revision": model_cfg.revision or "",
        "weights_sha256": weights_fingerprint(location),
        "kind": model_cfg.kind,
        "prediction_type": noise_scheduler.config.prediction_type,
    }
    if single_file:
        identity["config_dir"] = config_source or ""
    if model_cfg.vae:
        identity["vae"] = _local_or_id(model_cfg.vae)
        identity["vae_sha256"] = weights_fingerprint(identity["vae"])
    return BaseModel(unet, vae, text_encoder, tokenizer, noise_scheduler, location, identity, kind=model_cfg.kind)


def _config_source(model_cfg: Any, location: str, single_file: bool) -> str | None:
    """Where component configs come from: the model folder / hub id, or model.config_dir for a file."""
    if not single_file:
        return location
    return _local_or_id(model_cfg.config_dir) if model_cfg.config_dir else None  # None: diffusers infers it online


def _local_or_id(path: str) -> str:
    local = Path(path).expanduser()
    return str(local) if local.exists() else path


def _load_diffusers_folder(location: str, revision: str | None, vae: AutoencoderKL | None) -> tuple:
    kwargs = {"revision": revision} if revision else {}
    unet = load_checked(UNet2DConditionModel, location, "unet", **kwargs)
    base_vae = vae or load_checked(AutoencoderKL, location, "vae", **kwargs)
    text_encoder = load_checked(CLIPTextModel, location, "text_encoder", **kwargs)
    tokenizer = CLIPTokenizer.from_pretrained(location, subfolder="tokenizer", **kwargs)
    noise_scheduler = DDPMScheduler.from_pretrained(location, subfolder="scheduler", **kwargs)
    return unet, base_vae, text_encoder, tokenizer, noise_scheduler


def _load_single_file(file: str, config_source: str | None, vae: AutoencoderKL | None) -> tuple:
    """An original-layout checkpoint through diffusers' own converters (``from_single_file``).

    With a local ``config_source`` nothing touches the network; the checkpoint's layout (SD1 CLIP or
    SD2 OpenCLIP text encoder) is converted by diffusers. The safety checker is never loaded.
    """
    local_configs = config_source is not None and Path(config_source).is_dir()
    pipeline = StableDiffusionPipeline.from_single_file(
        file,
        config=config_source,
        local_files_only=local_configs or hub_offline(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        **({"vae": vae} if vae is not None else {}),
    )
    # Training draws noise with the DDPM forward process whatever sampler the checkpoint's config names.
    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    return pipeline.unet, pipeline.vae, pipeline.text_encoder, pipeline.tokenizer, noise_scheduler


def _load_vae(vae: str, config_source: str | None) -> AutoencoderKL:
    """A replacement VAE: a diffusers folder (or a model folder's vae/), a single file, or a hub id.

    A single file takes its architecture from the base model's VAE config (a replacement VAE such as
    sd-vae-ft-mse shares it); diffusers converts an original-layout file and loads a diffusers one as is.
    """
    local = Path(vae).expanduser()
    if local.is_file():
        local_configs = config_source is not None and Path(config_source).is_dir()
        return AutoencoderKL.from_single_file(
            str(local),
            config=config_source,
            subfolder="vae",
            local_files_only=local_configs or hub_offline(),
        )
    if local.is_dir() and not (local / "config.json").is_file():
        return load_checked(AutoencoderKL, local, "vae")
    return load_checked(AutoencoderKL, str(local) if local.is_dir() else vae)


def _require_loaded(module: torch.nn.Module, name: str, location: str) -> None:
    """diffusers' single-file loader builds models on the meta device; weights the file lacks stay there."""
    missing = [n for n, p in module.named_parameters() if p.device.type == "meta"]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"model.path: '{location}' has no weights for {name} ({shown}); is it a complete checkpoint?")


def weights_fingerprint(location: str) -> str:
    """sha256 over the names and sizes of a local folder's (or one file's) weights; '' for hub ids.

    Hashing multi-GB weights on every run would cost minutes; names + sizes catch swapped models.
    """
    path = Path(location)
    if path.is_file():
        return hashlib.sha256(f"{path.name}:{path.stat().st_size}".encode()).hexdigest()
    if not path.is_dir():
        return ""
    digest = hashlib.sha256()
    for file in sorted(path.rglob("*")):
        if file.suffix in (".safetensors", ".bin", ".json", ".txt"):
            digest.update(f"{file.relative_to(path)}:{file.stat().st_size}".encode())
    return digest.hexdigest()
