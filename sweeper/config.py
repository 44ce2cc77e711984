"""Typed schemas of every config group, registered in Hydra's ConfigStore.

Each group's YAML options in ``conf/<group>/`` extend the schema ``base_<group>`` through their
defaults list, and the root schema types the whole tree, so a typo'd key or a value of the wrong
type fails when Hydra composes the config, naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class ModelConfig:
    """Base model: ``tiny`` (built in code, cached) or a ``diffusers`` folder / hub id."""

    source: str = "tiny"  # tiny | diffusers
    path: str | None = None  # diffusers folder, or a hub id when online
    revision: str | None = None  # hub revision (branch, tag or commit)
    cache_dir: str | None = None  # where the tiny model is built; default $LORA_SWEEPER_CACHE


@dataclass
class NetworkConfig:
    """LoRA: rank, strength, dropout and which parts train at which learning rate."""

    dim: int = 8
    alpha: float | None = None  # update scaled by alpha/dim (kohya); give alpha OR scale
    scale: float | None = None  # alpha/dim directly (DrawThings' "network scale")
    dropout: float = 0.0  # on the low-rank activations, training only
    train_unet: bool = True
    train_text_encoder: bool = False
    unet_lr: float | None = None  # falls back to optimizer.lr; 0 freezes the UNet LoRA
    text_encoder_lr: float | None = None  # falls back to optimizer.lr; 0 freezes it
    unet_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    text_encoder_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-2
    eps: float = 1e-8


@dataclass
class SchedulerConfig:
    name: str = "constant"  # constant | constant_with_warmup | cosine
    warmup_steps: int = 0


@dataclass
class PrecisionConfig:
    mixed: str = "auto"  # fp32 | fp16 | bf16 | auto (bf16 on a capable GPU, fp32 otherwise)


@dataclass
class BucketConfig:
    """Training resolution. Aspect-ratio bucketing itself arrives with the parity issue."""

    resolution: int | None = None  # None = the model's native resolution (64 tiny, 512 SD1.5)


@dataclass
class DropoutConfig:
    caption_rate: float = 0.0  # probability a whole caption becomes empty
    caption_every_n_epochs: int = 0  # every n-th epoch (from 1) all captions are empty; 0 = never
    tag_rate: float = 0.0  # each comma-separated tag dropped with this probability


@dataclass
class DataConfig:
    train_dir: str | None = None
    caption_extension: str = ".txt"
    on_bad_image: str = "error"  # error | skip
    random_crop: bool = False  # random instead of center crop to the resolution
    num_workers: int = 0


@dataclass
class EvalConfig:
    prompts: list[str] = field(default_factory=list)
    test_seed: int = 1234
    images_per_prompt: int = 2
    num_inference_steps: int = 20
    guidance_scale: float = 7.5
    sampler: str = "ddim"  # ddim | euler | dpm++ | ddpm
    clip_model: str = "tiny"  # tiny, a local CLIP folder, or a hub id
    every_n_steps: int = 0  # periodic evaluation during training; 0 = only at the end


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str | None = None  # None = sqlite:///<outputs>/mlflow.db
    experiment: str = "lora-sweeper"
    artifact_root: str | None = None  # None = <outputs>/mlartifacts


@dataclass
class TrainConfig:
    max_steps: int = 200  # optimizer steps
    batch_size: int = 4
    grad_accum_steps: int = 1
    seed: int = 42
    max_grad_norm: float = 1.0  # 0 disables clipping
    log_every_n_steps: int = 1


@dataclass
class OutputConfig:
    dir: str = "${hydra:runtime.output_dir}"
    name: str = "lora"
    comment: str = ""


@dataclass
class SweepConfig:
    """Filled in by the Optuna sweeper for each trial (empty in a single run).

    It makes the trial reachable from inside the task (to report evaluations to the pruner) and
    nests the trial's MLflow run under the sweep's parent run.
    """

    study_name: str | None = None
    storage: str | None = None
    trial_number: int | None = None
    parent_run_id: str | None = None
    report_objective: bool = False  # report periodic CLIP scores to the pruner
    pruner: str = "none"  # the sweep's pruner settings: Optuna keeps no pruner in its storage
    pruner_startup_trials: int = 1
    pruner_warmup_steps: int = 0


@dataclass
class Config:
    """The root: every group plus the train/output sections."""

    defaults: list[Any] = field(default_factory=list)
    model: ModelConfig = MISSING
    network: NetworkConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    scheduler: SchedulerConfig = MISSING
    precision: PrecisionConfig = MISSING
    bucket: BucketConfig = MISSING
    dropout: DropoutConfig = MISSING
    data: DataConfig = MISSING
    eval: EvalConfig = MISSING
    tracking: TrackingConfig = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)


GROUP_SCHEMAS: dict[str, type] = {
    "model": ModelConfig,
    "network": NetworkConfig,
    "optimizer": OptimizerConfig,
    "scheduler": SchedulerConfig,
    "precision": PrecisionConfig,
    "bucket": BucketConfig,
    "dropout": DropoutConfig,
    "data": DataConfig,
    "eval": EvalConfig,
    "tracking": TrackingConfig,
}


def register_configs() -> None:
    """Put the root schema and one ``base_<group>`` schema per group into the ConfigStore."""
    store = ConfigStore.instance()
    store.store(name="base_config", node=Config)
    for group, schema in GROUP_SCHEMAS.items():
        store.store(group=group, name=f"base_{group}", node=schema)


def register_resolvers() -> None:
    """``${project_path:data/sample}``: a path inside this checkout, whatever the working directory."""
    if not OmegaConf.has_resolver("project_path"):
        OmegaConf.register_new_resolver("project_path", lambda relative: str(PROJECT_ROOT / relative))


register_resolvers()
register_configs()
