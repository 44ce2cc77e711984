"""Loading a base model's parts (UNet, VAE, text encoder, tokenizer, noise scheduler).

Three ways in, one result: a diffusers folder (the tiny default is one) read by ``from_pretrained``;
a single-file checkpoint in the original LDM / A1111 layout read by diffusers' own single-file
loaders, its configs taken from ``model.config_dir`` so it works offline; a hub id when online.
Then the optional replacement VAE (``model.vae``) and prediction type (``model.prediction_type``).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL

from toy_world.shipped import shipped_folder
from training.families import MODEL_KINDS, ModelFamily, family_of
from training.families.checked_loading import load_checked
from training.families.detect import checkpoint_kind, folder_kind, kind_mismatch, loaded_kind
from training.families.embedded import EMBEDDED_MODEL_NOTES
from training.families.sd import SD1
from training.text.encoding_options import clip_skip_problem

MODEL_SOURCES = ("toy", "tiny", "diffusers")
EMBEDDED_SOURCES = ("toy", "tiny")  # models that ship with (or are built by) the project
VAE_PRECISIONS = ("auto", "fp32", "half")
PREDICTION_TYPES = ("epsilon", "v_prediction")
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")  # .ckpt is read with torch.load(weights_only=True)
VAE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt")
# Options applied to the loaded model at run time; they do not change what is loaded.
RUNTIME_MODEL_KEYS = ("clip_skip", "attention", "gradient_checkpointing")


@dataclass
class BaseModel:
    """The parts of a base model that LoRA training needs, and the family that knows how to use them."""

    denoiser: torch.nn.Module  # a UNet2DConditionModel (SD1/SD2/SDXL) or an MMDiT transformer (SD3, FLUX)
    vae: AutoencoderKL
    text_encoders: list[torch.nn.Module]  # one per family text part, those a LoRA may adapt (the CLIPs)
    tokenizers: list[Any]  # the text parts' tokenizers
    noise_scheduler: Any  # what training draws noise with: DDPMScheduler, or FlowMatchEulerDiscreteScheduler
    location: str  # the folder, checkpoint file or hub id it was loaded from
    identity: dict[str, str] = field(default_factory=dict)
    family: ModelFamily = SD1
    t5: torch.nn.Module | None = None  # SD3's (optional) and FLUX's T5 encoder: frozen, never adapted
    t5_tokenizer: Any = None

    @property
    def kind(self) -> str:
        return self.family.kind

    @property
    def text_encoder(self) -> torch.nn.Module:
        """The first text encoder (the only one of SD1/SD2)."""
        return self.text_encoders[0]

    @property
    def tokenizer(self) -> Any:
        return self.tokenizers[0]

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_resolution(self) -> int:
        """The image side the denoiser was built for (64 for tiny, 512 for SD1.5, 1024 for SDXL)."""
        return self.family.native_resolution(self)

    @property
    def frozen_modules(self) -> list[torch.nn.Module]:
        """Every part of the model, T5 included where there is one."""
        return [self.denoiser, self.vae, *self.text_encoders, *([self.t5] if self.t5 is not None else [])]

    @property
    def base_model_version(self) -> str:
        """kohya's ``ss_base_model_version`` (sd_v1, sd_v2, sd_v2_v, sdxl_base_v1-0, ...); an embedded model's
        is prefixed with its source (tiny_sd_v1, tiny_sdxl_base_v1-0): no tool takes it for the real one."""
        version = self.family.base_model_version(self)
        source = self.identity.get("source")
        return f"{source}_{version}" if source in EMBEDDED_MODEL_NOTES else version


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def is_checkpoint_file(path: str | Path) -> bool:
    """Whether ``model.path`` names a single-file checkpoint rather than a folder or hub id."""
    return Path(path).suffix.lower() in CHECKPOINT_SUFFIXES


def resolve_model_location(model_cfg: Any) -> str:
    """Where the weights come from: the toy world's shipped folder, the tiny model's cache folder (of
    its family), a local folder or file, or a hub id."""
    if model_cfg.source == "toy":
        return str(shipped_folder("base"))
    if model_cfg.source == "tiny":
        return family_of(model_cfg.kind or "sd1").build_tiny(model_cfg.cache_dir)
    local = Path(model_cfg.path).expanduser()
    return str(local) if local.exists() else model_cfg.path


def detected_kind(model_cfg: Any) -> tuple[str, str] | None:
    """(kind, evidence) from the model's files without loading weights; None when they cannot say
    (a hub id, a .ckpt pickle, a single file without config folder): checked again after loading."""
    if model_cfg.source == "toy":
        return "sd1", "the toy world's SD1-architecture model"
    if model_cfg.source == "tiny":
        return None  # built for whichever family model.kind names
    if not model_cfg.path:
        return None
    local = Path(model_cfg.path).expanduser()
    if local.is_dir():
        return folder_kind(local)
    if local.is_file():
        found = checkpoint_kind(local)
        if found is None and model_cfg.config_dir and Path(model_cfg.config_dir).expanduser().is_dir():
            found = folder_kind(Path(model_cfg.config_dir).expanduser())
        return found
    return None


def resolved_kind(model_cfg: Any) -> str | None:
    """``model.kind`` when given, else what the files say; None until a hub model is loaded."""
    if model_cfg.kind:
        return model_cfg.kind
    found = detected_kind(model_cfg)
    return found[0] if found else ("sd1" if model_cfg.source in EMBEDDED_SOURCES else None)


# --- startup validation


def model_problems(
    model_cfg: Any, network_cfg: Any | None = None, train_cfg: Any | None = None, eval_cfg: Any | None = None
) -> list[str]:
    """Every reason ``model`` cannot be loaded or run, checked before anything heavy happens (``model.attention``
    is checked with the other machine-dependent options: sweeper/config/validate.py)."""
    problems: list[str] = []
    if model_cfg.source not in MODEL_SOURCES:
        problems.append(f"model.source: unknown source '{model_cfg.source}'; use one of {', '.join(MODEL_SOURCES)}")
    if model_cfg.kind is not None and model_cfg.kind not in MODEL_KINDS:
        problems.append(
            f"model.kind: unknown kind '{model_cfg.kind}'; use one of {', '.join(MODEL_KINDS)}, or leave it unset "
            "to detect it from the model files (v-prediction is model.prediction_type)"
        )
    if model_cfg.vae_precision not in VAE_PRECISIONS:
        problems.append(
            f"model.vae_precision: unknown '{model_cfg.vae_precision}'; use auto (fp32 where the family's VAE "
            "overflows in fp16, i.e. SDXL), fp32 (kohya's --no_half_vae) or half"
        )
    if model_cfg.prediction_type is not None and model_cfg.prediction_type not in PREDICTION_TYPES:
        problems.append(
            f"model.prediction_type: unknown '{model_cfg.prediction_type}'; use epsilon, v_prediction, "
            "or null to keep the model's scheduler config"
        )
    if problem := clip_skip_problem(model_cfg.clip_skip):
        problems.append(problem)
    if model_cfg.source == "toy":
        try:
            shipped_folder("base")
        except FileNotFoundError as error:
            problems.append(f"model.source=toy: {error}")
    if model_cfg.source in EMBEDDED_SOURCES and model_cfg.kind == "sd2":
        problems.append(
            f"model.kind=sd2 but model.source={model_cfg.source} has no SD2 form (toy: SD1 only; tiny: sd1, sdxl, "
            "sd3 or flux); use model.kind=sd1"
        )
    elif model_cfg.source == "toy" and model_cfg.kind not in (None, "sd1"):
        problems.append(f"model.kind={model_cfg.kind} but model.source=toy is an SD1-architecture model; use sd1")
    if model_cfg.source == "diffusers":
        path_problems = _path_problems(model_cfg)
        problems += path_problems
        found = detected_kind(model_cfg) if not path_problems else None
        if found and model_cfg.kind in MODEL_KINDS and found[0] != model_cfg.kind:
            problems.append(kind_mismatch(model_cfg.kind, found[0], found[1], model_cfg.path))
        if not path_problems and not found and not model_cfg.kind and Path(model_cfg.path).expanduser().exists():
            problems.append(
                f"model.kind: cannot tell the family of '{model_cfg.path}' from its files (a .ckpt pickle, or a "
                f"folder without text encoder config); set model.kind to one of {', '.join(MODEL_KINDS)}"
            )
    kind = resolved_kind(model_cfg)
    if kind in MODEL_KINDS and network_cfg is not None:
        problems += family_of(kind).problems(model_cfg, network_cfg, train_cfg, eval_cfg)
    if model_cfg.t5_max_length is not None and model_cfg.t5_max_length < 1:
        problems.append(f"model.t5_max_length={model_cfg.t5_max_length}: give a token count (e.g. 256, 512) or null")
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
        if not (local / "model_index.json").is_file() and not any(
            (local / d).is_dir() for d in ("unet", "transformer")
        ):
            return [
                f"model.path: '{path}' is not a diffusers folder (no model_index.json, unet/ or transformer/); "
                "point it at a folder saved with save_pretrained, or at a .safetensors checkpoint"
            ]
        return []
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
                "model family (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/, and for "
                "SDXL text_encoder_2/ and tokenizer_2/; e.g. a saved SD1.5, SD2.1 or SDXL diffusers folder)"
            ]
        return []
    folder = Path(config_dir).expanduser()
    if not folder.is_dir():
        if hub_offline() or config_dir.startswith((".", "/", "~")) or config_dir.count("/") != 1:
            return [f"model.config_dir: folder '{config_dir}' does not exist; give a local diffusers config folder"]
        return []  # a hub id, fetched online
    in_file, in_folder = checkpoint_kind(file), folder_kind(folder)
    wanted = family_of((in_file or in_folder or ("sd1", ""))[0]).config_dir_files
    missing = [name for name in wanted if not (folder / name).exists()]
    if missing:
        return [
            f"model.config_dir: '{config_dir}' is not a diffusers config folder (missing {', '.join(missing)}); "
            "save one with save_pretrained or copy a model's diffusers folder (weights are not needed)"
        ]
    if in_file and in_folder and in_file[0] != in_folder[0]:
        return [
            f"model.config_dir: '{config_dir}' is {in_folder[1]} but model.path '{model_cfg.path}' is {in_file[1]}; "
            f"give a {family_of(in_file[0]).label} config folder"
        ]
    return []


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
    """Load every part in fp32 on the CPU, through its family's loaders; the loop moves and casts them."""
    location = resolve_model_location(model_cfg)
    single_file = Path(location).is_file()
    config_source = _config_source(model_cfg, location, single_file)
    kind = resolved_kind(model_cfg) or _hub_kind(location, model_cfg.revision)
    found = detected_kind(model_cfg)
    if found and found[0] != kind:  # before the wrong family's loader looks for parts that are not there
        raise ValueError(kind_mismatch(kind, found[0], found[1], location))
    family = family_of(kind)
    vae = _load_vae(model_cfg.vae, config_source) if model_cfg.vae else None
    if single_file:
        local_configs = config_source is not None and Path(config_source).is_dir()
        parts = family.load_single_file(location, config_source, vae, local_configs or hub_offline(), model_cfg.t5)
    else:
        parts = family.load_folder(location, model_cfg.revision, vae, model_cfg.t5)
    # the loop and the samplers read the prediction type (or the flow shift) from this scheduler's config
    noise_scheduler = family.training_scheduler(parts["scheduler"], model_cfg.prediction_type)
    found, evidence = loaded_kind(parts["denoiser"], parts["text_encoders"])
    if found != kind:
        raise ValueError(kind_mismatch(kind, found, evidence, location))
    named = {"denoiser": parts["denoiser"], "vae": parts["vae"]}
    encoders = zip(family.text_parts, parts["text_encoders"], strict=True)
    named.update({part.encoder: encoder for part, encoder in encoders})
    if parts.get("t5") is not None:
        named["t5"] = parts["t5"]
    for name, module in named.items():
        _require_loaded(module, name, location)
        module.requires_grad_(False)
        module.eval()
    identity = {
        "source": model_cfg.source,
        "location": location,
        "revision": model_cfg.revision or "",
        "weights_sha256": weights_fingerprint(location),
        "kind": kind,
        "prediction_type": getattr(noise_scheduler.config, "prediction_type", "flow"),
    }
    if parts.get("t5") is not None:
        identity["t5"] = "on"  # the text conditioning differs with and without it (SD3)
    if single_file:
        identity["config_dir"] = config_source or ""
    if model_cfg.vae:
        identity["vae"] = _local_or_id(model_cfg.vae)
        identity["vae_sha256"] = weights_fingerprint(identity["vae"])
    return BaseModel(
        parts["denoiser"],
        parts["vae"],
        parts["text_encoders"],
        parts["tokenizers"],
        noise_scheduler,
        location,
        identity,
        family=family,
        t5=parts.get("t5"),
        t5_tokenizer=parts.get("t5_tokenizer"),
    )


def _hub_kind(repo_id: str, revision: str | None) -> str:
    """The family of a hub model, from its configs alone (json/txt; no weights are fetched)."""
    from huggingface_hub import snapshot_download

    folder = snapshot_download(repo_id, revision=revision, allow_patterns=["*.json", "*.txt"])
    found = folder_kind(Path(folder))
    if found is None:
        raise ValueError(f"model.path: cannot tell the family of hub model '{repo_id}'; set model.kind")
    return found[0]


def _config_source(model_cfg: Any, location: str, single_file: bool) -> str | None:
    """Where component configs come from: the model folder / hub id, or model.config_dir for a file."""
    if not single_file:
        return location
    return _local_or_id(model_cfg.config_dir) if model_cfg.config_dir else None  # None: diffusers infers it online


def _local_or_id(path: str) -> str:
    local = Path(path).expanduser()
    return str(local) if local.exists() else path


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
