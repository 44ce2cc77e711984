"""What SD3/SD3.5 and FLUX.1 share: an MMDiT transformer as the denoiser, rectified-flow training,
a T5 encoder beside CLIP, and kohya's original-layout LoRA names with fused qkv modules.

Each family file (``sd3.py``, ``flux.py``) says how its denoiser is called, how captions become its
conditioning and which pipeline samples it; this base holds the rest of the seam for both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from training.families.base import ModelFamily
from training.families.mmdit_names import KohyaNames
from training.objective.base import Objective
from training.objective.flow import RectifiedFlow

# network.unet_targets' default (kohya's UNet default); for a transformer family it means kohya's
# default there too: every linear layer of the transformer blocks that has a kohya name
# eval.sampler values a flow family accepts: ddim and euler (the DDPM default and its kin) mean the
# deterministic Euler steps of the flow ODE, its one sampler
FLOW_SAMPLERS = ("flow_euler", "ddim", "euler")
UNET_DEFAULT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


class MMDiTFamily(ModelFamily):
    """A flow-matching transformer family; subclasses give names, conditioning and the pipeline."""

    denoiser_folder = "transformer"
    scheduler_type = FlowMatchEulerDiscreteScheduler
    network_module = ""  # kohya's ss_network_module
    default_t5_max_length = 256
    config_dir_files = (
        "model_index.json",
        "transformer/config.json",
        "vae/config.json",
        "text_encoder/config.json",
        "tokenizer",
        "scheduler/scheduler_config.json",
    )

    @property
    def denoiser_class(self) -> str:
        """transformer/config.json's ``_class_name`` (detection reads it before any weight loads)."""
        return self.denoiser_type.__name__

    # --- how its files look
    def folder_evidence(self, folder: Path, index: dict[str, Any]) -> str | None:
        """The pipeline class in model_index.json, or (a config folder without it) the transformer's class."""
        if evidence := super().folder_evidence(folder, index):
            return evidence
        try:
            denoiser = json.loads((folder / "transformer" / "config.json").read_text()).get("_class_name")
        except (OSError, ValueError, AttributeError):
            return None
        return (
            f"{self.article} {self.label} model (transformer: {denoiser})" if denoiser == self.denoiser_class else None
        )

    def problems(
        self, model_cfg: Any, network_cfg: Any, train_cfg: Any | None = None, eval_cfg: Any | None = None
    ) -> list[str]:
        problems = []
        if eval_cfg is not None and eval_cfg.sampler not in FLOW_SAMPLERS:
            problems.append(
                f"eval.sampler={eval_cfg.sampler} is a DDPM sampler; {self.label} samples with flow_euler "
                "(ddim and euler are taken to mean it): set eval.sampler=flow_euler"
            )
        if network_cfg.embedding.enabled:
            problems.append(
                f"network.embedding.enabled=true: textual-inversion co-training is built for SD1/SD2's one text "
                f"encoder, not {self.label}'s CLIP + T5; set network.embedding.enabled=false"
            )
        if network_cfg.type == "locon" or network_cfg.conv_dim is not None:
            problems.append(
                f"network.type={network_cfg.type} / network.conv_dim: LoCon adapts a UNet's ResNet convolutions, "
                f"and {self.label}'s transformer has none; use network.type=lora and leave network.conv_dim=null"
            )
        elif network_cfg.type == "lokr":
            problems.append(
                f"network.type=lokr: {self.label}'s files fuse q, k and v into one layer, and three Kronecker "
                "products are not one; use network.type=lora, loha or dora (written block-diagonally)"
            )
        if model_cfg.attention != "sdpa":
            problems.append(
                f"model.attention={model_cfg.attention}: {self.label}'s joint attention runs in diffusers' own "
                "processors on torch's scaled_dot_product_attention; set model.attention=sdpa"
            )
        if model_cfg.prediction_type is not None:
            problems.append(
                f"model.prediction_type={model_cfg.prediction_type}: {self.label} trains by flow matching (it predicts "
                "a velocity); set model.prediction_type=null"
            )
        if train_cfg is not None:
            for key in ("min_snr_gamma", "denoise_range", "timestep_range"):
                if getattr(train_cfg, key) is not None:
                    problems.append(
                        f"train.{key} is a DDPM option; {self.label} trains by flow matching: set train.{key}=null "
                        "and choose the noise levels with train.flow.weighting_scheme / train.flow.shift"
                    )
        return problems

    # --- the objective and the denoiser
    def configure_attention(self, denoiser: Any, kind: str, device: torch.device | str) -> None:
        """The transformer keeps diffusers' joint-attention processors (SDPA inside); see ``problems``."""
        if kind != "sdpa":
            raise RuntimeError(f"model.attention={kind}: {self.label} runs on sdpa only; set model.attention=sdpa")

    def training_scheduler(self, scheduler: Any, prediction_type: str | None) -> Any:
        return FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)

    def objective(self, scheduler: Any, vae_config: Any, train_cfg: Any, device: torch.device | str) -> Objective:
        return RectifiedFlow(scheduler, vae_config, train_cfg, device)

    def sampler(self, name: str) -> str:
        return "flow_euler"

    # --- LoRA targets and names
    def kohya_names(self, denoiser: torch.nn.Module) -> KohyaNames:
        raise NotImplementedError

    def lora_targets(self, denoiser: torch.nn.Module, requested: list[str]) -> list[str]:
        """Full module names: kohya's default (every named linear of the blocks) for the default list,
        else the named modules whose path ends in one of ``requested``."""
        named = self.kohya_names(denoiser).modules()
        if list(requested) == UNET_DEFAULT_TARGETS:
            return named
        chosen = [module for module in named if any(module == t or module.endswith(f".{t}") for t in requested)]
        if not chosen:
            raise ValueError(
                f"network.unet_targets={list(requested)} names no linear layer of {self.label}'s transformer blocks; "
                "name diffusers modules such as attn.to_q, attn.add_q_proj, ff.net.2, proj_mlp, or keep the default"
            )
        return chosen

    def conv_targets(self, denoiser: torch.nn.Module) -> tuple[list[str], list[str]]:
        """None: the transformer has no ResNet convolutions (startup refuses network.conv_dim)."""
        return [], []

    def kohya_unet_names(self, unet: torch.nn.Module) -> dict[str, str]:
        return self.kohya_names(unet).flat().single

    def kohya_fused_names(self, denoiser: torch.nn.Module) -> dict[str, list[str]]:
        return self.kohya_names(denoiser).flat().fused

    def modelspec_prediction_type(self, v_prediction: bool) -> str | None:
        return None  # kohya writes none for flow models


def t5_states(
    tokenizer: Any, encoder: torch.nn.Module, captions: list[str], device: torch.device | str, max_length: int
) -> torch.Tensor:
    """T5's last hidden states over captions padded to ``max_length`` tokens, as the SD3 and FLUX
    pipelines compute them (no attention mask: padding tokens are attended, as in training there)."""
    ids = tokenizer(
        captions, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return encoder(ids.to(device))[0]


def clip_outputs(tokenizer: Any, encoder: torch.nn.Module, captions: list[str], device: torch.device | str) -> Any:
    """A CLIP encoder's outputs with every hidden state, over captions padded to its 77 tokens."""
    ids = tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return encoder(ids.to(device), output_hidden_states=True)
