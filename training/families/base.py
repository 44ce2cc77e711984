"""The model-family seam: what differs between base-model families, behind one interface.

The shared loop, evaluation, the caches, tracking and sweeps call a ``ModelFamily`` and never
branch on the kind (DESIGN.md, "Model families"). A family owns loading the parts, prompt encoding
(one or two text encoders, pooled embeddings, clip skip), per-image extra conditioning (SDXL's
size/crop time ids), the objective (``training/objective``), the denoiser call, the sampling pipeline, which parts carry
a LoRA under which kohya prefix and module names, and the kohya/modelspec file metadata.

SD1/SD2 (``training.families.sd``) and SDXL (``training.families.sdxl``) are DDPM families with a
``UNet2DConditionModel``; SD3/SD3.5 (``sd3``) and FLUX.1 (``flux``) are flow-matching families with
an MMDiT transformer (``training.families.mmdit``), which own the objective, the denoiser call and
the packed or padded conditioning as well.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from training.families.checked_loading import load_checked
from training.families.labels import article_for
from training.objective.base import Objective
from training.objective.ddpm import NoisePrediction

# A named bundle of conditioning tensors, batch first: "hidden" (the denoiser's cross-attention
# context) plus whatever else the family's denoiser takes ("text_embeds", "time_ids" for SDXL).
Conditioning = dict[str, torch.Tensor]
# (captions) -> Conditioning: a family's text encoding with the run's settings bound
TextEncoder = Callable[[list[str]], Conditioning]


@dataclass(frozen=True)
class TextPart:
    """One text encoder of a family: its diffusers component names and its LoRA file prefix."""

    encoder: str  # component name in a diffusers folder / pipeline ("text_encoder", "text_encoder_2")
    tokenizer: str  # its tokenizer's component name
    kohya_prefix: str  # lora_te_ (SD1/SD2), lora_te1_ / lora_te2_ (SDXL)
    lr_key: str  # the network option that sets its learning rate
    encoder_type: type = CLIPTextModel  # CLIPTextModelWithProjection where the pooled projection is read


@dataclass(frozen=True)
class ImageGeometry:
    """Where a training crop came from: what SDXL's micro-conditioning is computed from."""

    original_size: tuple[int, int]  # (height, width) of the image file
    crop_top_left: tuple[int, int]  # (top, left) of the crop in the resized (and flipped) image
    target_size: tuple[int, int]  # (height, width) of the crop (the bucket)


def batch_geometry(batch: dict[str, Any]) -> list[ImageGeometry]:
    """The geometry of every item of a collated batch (``bucket`` is ``(width, height)``)."""
    return [
        ImageGeometry(tuple(original), tuple(crop), (bucket[1], bucket[0]))
        for original, crop, bucket in zip(batch["original_size"], batch["crop_top_left"], batch["bucket"], strict=True)
    ]


class ModelFamily:
    """Defaults shared by the DDPM UNet families; a subclass states what its family does differently."""

    kind: str = ""
    label: str = ""  # how messages name it ("SD1.x", "SDXL")
    text_parts: tuple[TextPart, ...] = ()
    denoiser_type: type = UNet2DConditionModel  # the denoiser's class and its folder in a diffusers model
    denoiser_folder = "unet"
    scheduler_type: type = DDPMScheduler  # the scheduler class its folder's config is read into
    t5_folders: tuple[str, str] | None = None  # (encoder, tokenizer) folders of a T5 encoder, where it has one
    t5_required = False  # False: loaded when the folder has it and model.t5 is on (SD3)
    unet_prefix = "lora_unet_"  # the denoiser's kohya prefix (kohya keeps it for SD3's and FLUX's transformer)
    network_module = "networks.lora"  # kohya's ss_network_module
    vae_overflows_in_fp16 = False  # the VAE needs fp32 when training in fp16 (model.vae_precision=auto)
    # --- how its files look (training/families/detect.py asks the lower ranks first: the more specific)
    detection_rank = 100
    pipeline_classes: tuple[str, ...] = ()  # model_index.json's _class_name values of this family
    checkpoint_markers: tuple[tuple[str, str], ...] = ()  # (tensor-name prefix, evidence) of an original-layout file
    # what model.config_dir must hold for a single-file checkpoint (configs; SD3/FLUX read weights there too)
    config_dir_files: tuple[str, ...] = (
        "model_index.json",
        "unet/config.json",
        "vae/config.json",
        "text_encoder/config.json",
        "tokenizer",
        "scheduler/scheduler_config.json",
    )

    def folder_evidence(self, folder: Path, index: dict[str, Any]) -> str | None:
        """Why ``folder`` (its ``model_index.json`` read into ``index``) is of this family; None if it is not."""
        name = index.get("_class_name")
        return (
            f"{self.article} {self.label} model (model_index.json: {name})" if name in self.pipeline_classes else None
        )

    @property
    def article(self) -> str:
        return article_for(self.label)

    # --- before anything loads
    def problems(
        self, model_cfg: Any, network_cfg: Any, train_cfg: Any | None = None, eval_cfg: Any | None = None
    ) -> list[str]:
        """Options this family cannot honour, each naming the key and the fix."""
        if eval_cfg is not None and eval_cfg.sampler == "flow_euler":
            return [f"eval.sampler=flow_euler samples flow-matching models (SD3, FLUX.1), not {self.label}; use ddim"]
        return []

    # --- text conditioning
    def encode_text(
        self,
        base: Any,
        captions: list[str],
        device: torch.device | str,
        *,
        clip_skip: int,
        max_token_length: int,
        t5_max_length: int | None = None,
    ) -> Conditioning:
        """The denoiser's conditioning for ``captions`` from ``base``'s tokenizers and text encoders."""
        raise NotImplementedError

    def batch_extras(
        self, geometry: Sequence[ImageGeometry], device: torch.device | str, train_cfg: Any | None = None
    ) -> Conditioning:
        """Per-image conditioning beyond the text (none for SD1/SD2)."""
        return {}

    # --- the objective and the denoiser
    def configure_attention(self, denoiser: Any, kind: str, device: torch.device | str) -> None:
        """Every attention layer of the denoiser on the ``model.attention`` kernel (UNet processors)."""
        from training.speed.attention import configure_attention

        configure_attention(denoiser, kind, device)

    def training_scheduler(self, scheduler: Any, prediction_type: str | None) -> Any:
        """The scheduler training draws noise with: DDPM's forward process from the model's own config
        (its betas), whatever sampler that config names; ``model.prediction_type`` replaces the target
        (v-prediction, Salimans & Ho 2022, arXiv:2202.00512, for SD2-768-v style models)."""
        from diffusers import DDPMScheduler

        extra = {"prediction_type": prediction_type} if prediction_type else {}
        return DDPMScheduler.from_config(scheduler.config, **extra)

    def objective(self, scheduler: Any, vae_config: Any, train_cfg: Any, device: torch.device | str) -> Objective:
        """How this family trains: the DDPM noise-prediction objective (``training/objective``)."""
        return NoisePrediction(scheduler, vae_config, train_cfg, device)

    def predict(self, unet: Any, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The denoiser's prediction for ``noisy`` under ``cond`` (text and batch extras)."""
        return unet(noisy, timesteps, cond["hidden"]).sample

    def graph_inputs(self, cond: Conditioning) -> tuple[torch.Tensor, ...]:
        """``cond`` as the positional tensors a captured CUDA graph takes (see ``from_graph_inputs``)."""
        return (cond["hidden"],)

    def from_graph_inputs(self, tensors: Sequence[torch.Tensor]) -> Conditioning:
        return {"hidden": tensors[0]}

    # --- evaluation
    def native_resolution(self, base: Any) -> int:
        """The image side the denoiser was built for (64 for tiny, 512 for SD1.5, 1024 for SDXL/SD3)."""
        sample_size = base.denoiser.config.sample_size
        side = sample_size if isinstance(sample_size, int) else sample_size[0]
        return side * base.vae_scale_factor

    def sampling_guidance(self, eval_cfg: Any, train_cfg: Any) -> float:
        """The pipeline's ``guidance_scale``: classifier-free guidance (``eval.guidance_scale``)."""
        return float(eval_cfg.guidance_scale)

    # the starting noise in the layout the pipeline takes as ``latents``, where it is not the plain
    # (count, channels, h, w) draw (FLUX packs it): evaluation.sampling.LatentDraw
    initial_latents: Callable[..., torch.Tensor] | None = None

    def sampler(self, name: str) -> str:
        """The ``evaluation.sampling.SAMPLERS`` entry that samples this family for ``eval.sampler``."""
        return name

    def pipeline(self, base: Any, scheduler: Any) -> Any:
        """The diffusers sampling pipeline over ``base``'s live parts (shared, not copied)."""
        raise NotImplementedError

    def pipeline_inputs(self, cond: Conditioning) -> dict[str, torch.Tensor]:
        """The pipeline's embedding arguments for a (prompt, negative prompt) pair encoded together."""
        hidden = cond["hidden"]
        return {"prompt_embeds": hidden[:1], "negative_prompt_embeds": hidden[1:]}

    # --- the LoRA
    def lora_targets(self, denoiser: torch.nn.Module, requested: list[str]) -> list[str]:
        """peft ``target_modules`` for ``network.unet_targets`` (module-name suffixes)."""
        return list(requested)

    def conv_targets(self, denoiser: torch.nn.Module) -> tuple[list[str], list[str]]:
        """What ``network.conv_dim`` adds (LoCon): the linear and 1x1 layers (adapted at ``network.dim``)
        and the 3x3 convolutions (at ``conv_dim``) of the UNet's ResNet blocks and down/upsamplers, the
        modules kohya's ``conv_dim`` (LoRA-C3Lier, ``UNET_TARGET_REPLACE_MODULE_CONV2D_3X3``) and
        LyCORIS' LoCon add to the transformer blocks' layers."""
        at_dim, at_conv_dim = [], []
        for name, block in denoiser.named_modules():
            if type(block).__name__ not in ("ResnetBlock2D", "Downsample2D", "Upsample2D"):
                continue
            for child, layer in block.named_modules():
                if isinstance(layer, torch.nn.Conv2d) and layer.kernel_size != (1, 1):
                    at_conv_dim.append(f"{name}.{child}")
                elif isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                    at_dim.append(f"{name}.{child}")
        return at_dim, at_conv_dim

    def kohya_unet_names(self, unet: torch.nn.Module) -> dict[str, str]:
        """Module path -> kohya's flattened name (without ``lora_unet_``) for every denoiser module."""
        return {name: name.replace(".", "_") for name, _ in unet.named_modules() if name}

    def kohya_fused_names(self, denoiser: torch.nn.Module) -> dict[str, list[str]]:
        """kohya name -> the denoiser modules one original layer holds (SD3/FLUX's qkv); none here."""
        return {}

    def modelspec_prediction_type(self, v_prediction: bool) -> str | None:
        return "v" if v_prediction else "epsilon"

    def base_model_version(self, base: Any) -> str:
        """kohya's ``ss_base_model_version``."""
        raise NotImplementedError

    def architecture(self, v_prediction: bool, base: Any = None) -> str:
        """modelspec's ``architecture`` of the base model (the LoRA appends ``/lora``)."""
        raise NotImplementedError

    def file_metadata(self, base: Any) -> dict[str, Any]:
        """Family-specific kohya keys of a LoRA file (``ss_v2``, ...)."""
        return {}

    # --- loading
    def load_folder(self, location: str, revision: str | None, vae: Any | None, with_t5: bool = True) -> dict:
        """The parts of a diffusers folder or hub id: denoiser, vae, text_encoders (those a LoRA may
        adapt), tokenizers, scheduler, and t5 / t5_tokenizer where the family has them (else None)."""
        kwargs = {"revision": revision} if revision else {}
        parts = {
            "denoiser": load_checked(self.denoiser_type, location, self.denoiser_folder, **kwargs),
            "vae": vae or load_checked(AutoencoderKL, location, "vae", **kwargs),
            "text_encoders": [
                load_checked(part.encoder_type, location, part.encoder, **kwargs) for part in self.text_parts
            ],
            "tokenizers": [
                CLIPTokenizer.from_pretrained(location, subfolder=part.tokenizer, **kwargs) for part in self.text_parts
            ],
            "scheduler": self.scheduler_type.from_pretrained(location, subfolder="scheduler", **kwargs),
            "t5": None,
            "t5_tokenizer": None,
        }
        if self.t5_folders and with_t5 and (self.t5_required or has_part(location, self.t5_folders[0])):
            encoder, tokenizer = self.t5_folders
            parts["t5"] = load_checked(T5EncoderModel, location, encoder, **kwargs)
            parts["t5_tokenizer"] = T5TokenizerFast.from_pretrained(location, subfolder=tokenizer, **kwargs)
        return parts

    def pipeline_parts(self, pipeline: Any) -> dict:
        """The parts ``load_folder`` returns, taken from a loaded diffusers pipeline by this family's
        component names (what a single file loads through)."""
        t5, t5_tokenizer = (getattr(pipeline, name, None) for name in self.t5_folders or ("", ""))
        return {
            "denoiser": getattr(pipeline, self.denoiser_folder),
            "vae": pipeline.vae,
            "text_encoders": [getattr(pipeline, part.encoder) for part in self.text_parts],
            "tokenizers": [getattr(pipeline, part.tokenizer) for part in self.text_parts],
            "scheduler": pipeline.scheduler,
            "t5": t5,
            "t5_tokenizer": t5_tokenizer,
        }

    def load_single_file(
        self, file: str, config_source: str | None, vae: Any | None, local_only: bool, with_t5: bool = True
    ) -> dict:
        """The parts of an original-layout single-file checkpoint, by component name."""
        raise NotImplementedError

    def build_tiny(self, cache_root: Any) -> str:
        """The folder of this family's tiny random model (``model.source=tiny``), built on first use."""
        raise NotImplementedError


def has_part(location: str, subfolder: str) -> bool:
    """Whether a folder (or hub snapshot) holds ``subfolder`` (SD3's T5 may be left out)."""
    folder = Path(location)
    if folder.is_dir():
        return (folder / subfolder).is_dir()
    return True  # a hub id: let from_pretrained fetch it
