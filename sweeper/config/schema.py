"""Typed schemas of every config group, registered in Hydra's ConfigStore.

Each group's YAML options in ``conf/<group>/`` extend the schema ``base_<group>`` through their
defaults list (``- /base_<group>``), and the root schema types the whole tree, so a typo'd key or a
value of the wrong type fails when Hydra composes the config, naming the key. The schemas live at
the root of the ConfigStore, not in their group: Hydra lists every config of a group as one of its
options (``optimizer=adamm``'s error, shell completion), and a schema is not an option.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class ModelConfig:
    """Base model: ``toy`` (the shipped toy-world model), ``tiny`` (random, built in code, cached) or a
    ``diffusers`` folder / file / hub id."""

    source: str = "toy"  # toy | tiny | diffusers
    path: str | None = None  # diffusers folder, single-file .safetensors checkpoint, or hub id (online)
    config_dir: str | None = None  # a local diffusers config folder for a single-file checkpoint (offline)
    revision: str | None = None  # hub revision (branch, tag or commit)
    cache_dir: str | None = None  # where the tiny model is built; default $LORA_SWEEPER_CACHE
    kind: str | None = None  # sd1 | sd2 | sdxl | sd3 | flux: model family; None = detected from the model files
    vae_precision: str = "auto"  # auto | fp32 | half; auto = fp32 where the family's VAE overflows in fp16 (SDXL)
    prediction_type: str | None = None  # epsilon | v_prediction; None = the model's scheduler config
    vae: str | None = None  # replacement VAE (diffusers folder or .safetensors); not saved in the LoRA
    clip_skip: int = 1  # use hidden_states[-n] + final layer norm; 1 = last layer (A1111 convention)
    attention: str = "sdpa"  # sdpa | xformers | eager
    sdpa_backend: str = "auto"  # auto | flash | cudnn | efficient | math: SDPA kernels allowed (with attention=sdpa)
    gradient_checkpointing: bool = False
    channels_last: bool = True  # on a GPU, keep the UNet's conv weights channels-last (cuDNN's fast layout)
    t5: bool = True  # SD3: load and use the T5 encoder (false: SD3 without T5, zeros in its place); FLUX needs it
    t5_max_length: int | None = None  # T5 tokens per caption; None = the family's (SD3 256, FLUX.1-dev 512)


@dataclass
class EmbeddingConfig:
    """Textual-inversion co-training: new token vector(s) for the trigger word, learned beside the LoRA."""

    enabled: bool = False
    token: str | None = None  # the placeholder token; None = data.trigger_word
    init_word: str = "*"  # existing word whose embedding starts the new vectors
    num_vectors: int = 1
    lr: float = 5e-3
    stop_step: int | None = None  # freeze the embedding after this step


@dataclass
class NetworkConfig:
    """LoRA: rank, strength, dropout and which parts train at which learning rate."""

    dim: int = 8
    type: str = "lora"  # lora | locon | loha | lokr | dora (training/network/types.py says what each is)
    alpha: float | None = None  # update scaled by alpha/dim (kohya); give alpha OR scale
    scale: float | None = None  # alpha/dim directly (DrawThings' "network scale")
    dropout: float = 0.0  # on the low-rank activations, training only
    train_unet: bool = True
    train_text_encoder: bool = False
    unet_lr: float | None = None  # falls back to optimizer.lr; 0 freezes the UNet LoRA
    text_encoder_lr: float | None = None  # falls back to optimizer.lr; 0 freezes it
    text_encoder_2_lr: float | None = None  # SDXL's second text encoder; None = text_encoder_lr
    max_norm: float | None = None  # rescale modules whose |up.down.scale| exceeds it, after each step
    # the UNet's ResNet/resampler 3x3 convolutions (LoCon; also LoHa/LoKr/DoRA): their rank, None = off
    # (a locon without it uses dim); conv_alpha None keeps the linear layers' alpha/dim at conv_dim
    conv_dim: int | None = None
    conv_alpha: float | None = None
    lokr_factor: int = -1  # LoKr: the small Kronecker factor's side (-1: as close to sqrt as divides)
    decompose_both: bool = False  # LoKr: the small factor low-rank too (when dim is below half its sides)
    init_weights: str | None = None  # start from an existing LoRA file (ours or kohya's); weights only
    # kohya's default LoRA: every linear (and 1x1 conv) of the transformer blocks: attention, proj_in/out, feed-forward
    unet_targets: list[str] = field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
    )
    text_encoder_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)


@dataclass
class OptimizerConfig:
    """One schema for every optimizer; each option in conf/optimizer/ sets the fields it uses."""

    name: str = "adamw"  # adamw | adamw8bit | lion | sgd | adafactor | prodigy
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-2
    eps: float = 1e-8
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    d_coef: float = 1.0  # prodigy
    scale_lr_with_accumulation: bool = False  # lr x train.grad_accum_steps (DrawThings' advice)


@dataclass
class SchedulerConfig:
    name: str = (
        "constant"  # constant | constant_with_warmup | linear | cosine | cosine_with_restarts | polynomial | plateau
    )
    warmup_steps: float = 0  # steps; a value < 1 is a fraction of the total steps
    num_cycles: int = 1  # cosine_with_restarts: hard restarts (1 = plain cosine)
    power: float = 1.0  # polynomial decay exponent
    plateau_factor: float = 0.5  # plateau: lr multiplier when the eval metric stops improving
    plateau_patience: int = 2  # plateau: evaluations without improvement before reducing


@dataclass
class PrecisionConfig:
    mixed: str = "auto"  # fp32 | fp16 | bf16 | auto (bf16 on a capable GPU, fp32 otherwise)
    # none | large | all: the frozen denoiser's Linear layers multiply in float8 (torchao); a speed option
    fp8_matmul: str = "none"


@dataclass
class BucketConfig:
    """Aspect-ratio buckets (one bucket per batch), or a square resize + crop when disabled."""

    enabled: bool = False
    resolution: int | None = None  # None = the model's native resolution (64 tiny, 512 SD1.5); area cap
    min_side: int | None = None  # None = resolution / 2
    max_side: int | None = None  # None = resolution * 2
    step: int | None = None  # bucket sides are multiples of this; None = 64 from 512 px, resolution / 8 below
    no_upscale: bool = False  # small images keep their size (rounded down to step); min/max ignored


@dataclass
class DropoutConfig:
    caption_rate: float = 0.0  # probability a whole caption becomes empty
    caption_every_n_epochs: int = 0  # every n-th epoch (from 1) all captions are empty; 0 = never
    tag_rate: float = 0.0  # each comma-separated tag dropped with this probability


@dataclass
class SubsetConfig:
    """One more image folder with its own settings (kohya's dataset-config ``[[subsets]]``).

    It is scanned like ``data.train_dir`` (images, caption files, ``<repeats>_<name>/`` subfolders)
    and trained beside it; ``is_reg`` makes it regularisation images like ``data.reg_dir``.
    """

    dir: str | None = None
    repeats: int = 1  # uses of each image per epoch (times a <repeats>_<name>/ subfolder's own)
    caption_extension: str | None = None  # None = data.caption_extension
    keep_tokens: int | None = None  # None = data.keep_tokens
    class_tokens: str | None = None  # the caption of an image without a caption file
    is_reg: bool = False


@dataclass
class DataConfig:
    train_dir: str | None = None
    subsets: list[SubsetConfig] = field(default_factory=list)  # more folders, each with its own settings
    reg_dir: str | None = None  # regularisation (class) images, matched to the training-image count
    prior_loss_weight: float = 1.0  # loss multiplier of regularisation samples
    caption_extension: str = ".txt"
    missing_captions: str = "error"  # error | warn (train uncaptioned) | class_tokens (the folder's <name>, kohya)
    on_bad_image: str = "error"  # error | skip
    trigger_word: str | None = None  # prepended to every caption, kept in place
    shuffle_tags: bool = False
    keep_tokens: int = 0  # leading comma-separated TAGS kept in place by shuffle and tag dropout
    max_token_length: int = 75  # 75 | 150 | 225: longer captions are encoded in 75-token chunks
    flip_aug: bool = False
    color_aug: bool = False
    random_crop: bool = False  # random instead of center crop to the resolution
    cache_latents: str = "none"  # none | memory | disk
    cache_text_embeddings: bool = True  # encode each distinct caption once (skipped while the text encoder trains)
    num_workers: int = 0
    persistent_workers: bool = False
    tag_stats: str | None = None  # count | alpha: tag-frequency table artifact (ss_tag_frequency is always written)
    val_split: float = 0.0  # a seeded fraction of the training images held out (never trained on) for val_loss
    val_dir: str | None = None  # or a separate folder of held-out images (kohya layout) for val_loss


@dataclass
class ConceptConfig:
    """Zero-shot concept check of every sample (concept_acc); null = the toy world's shapes with the toy model on
    the bundled sample, off otherwise (sweeper/config/eval_concept.py)."""

    labels: list[str] | None = None  # candidate labels, e.g. [a circle, a square, a star]; [] = off
    target: str | None = None  # the label the LoRA's samples should get, e.g. a star


@dataclass
class EvalConfig:
    prompts: list[str] | None = None  # None = the bundled sample's prompts, or up to 6 of your own captions
    test_seed: int = 1234
    images_per_prompt: int = 2
    num_inference_steps: int = 20
    guidance_scale: float = 7.5
    sampler: str = "ddim"  # ddim | euler | dpm++ | ddpm
    clip_model: str = "toy"  # toy (shipped, trained), tiny (random, smoke tests), a local CLIP folder, or a hub id
    every_n_steps: int = 0  # periodic evaluation during training; 0 = only at the end
    batch_size: int = 16  # images generated per pipeline call (prompts batched; DDPM: one prompt per call)
    seeds: list[int] = field(default_factory=list)  # several test seeds per prompt; empty = [test_seed]
    dino_model: str | None = None  # DINO ViT folder or hub id for dino_i; null = off
    concept: ConceptConfig = field(default_factory=ConceptConfig)
    objective: str = "clip_t"  # the metric the best checkpoint is chosen by (a sweep uses its first objective)
    select: str = "best"  # best | last: which evaluated checkpoint is the run's result and LoRA file


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str | None = None  # None = sqlite:///<outputs>/mlflow.db
    experiment: str = "lora-sweeper"
    artifact_root: str | None = None  # None = <outputs>/mlartifacts


@dataclass
class FlowConfig:
    """The flow-matching objective of SD3/FLUX (training/objective/flow.py); unused by the DDPM families."""

    weighting_scheme: str = "logit_normal"  # none | logit_normal | mode | sigma_sqrt | cosmap (Esser et al. 2024)
    logit_mean: float = 0.0  # logit-normal density of the noise level: mean and std of its logit
    logit_std: float = 1.0
    mode_scale: float = 1.29  # the mode density's scale (the paper's 1.29)
    shift: float | None = None  # null = the model scheduler's (SD3: 3.0; FLUX: by image size)


@dataclass
class TrainConfig:
    max_steps: int | None = 200  # optimizer steps; with epochs, whichever comes first
    epochs: int | None = None
    batch_size: int = 4
    grad_accum_steps: int = 1
    seed: int = 42
    replicates: int = 1  # train the setting this many times, seeds derived from seed (README: How sure is the verdict?)
    max_grad_norm: float = 1.0  # 0 disables clipping
    log_every_n_steps: int = 1
    noise_offset: float = 0.0  # offset noise (Guttenberg 2023): + offset * N(0,1) per image and channel
    denoise_range: list[float] | None = None  # [start, end] of denoising, 0 = pure noise .. 1 = clean
    timestep_range: list[int] | None = None  # [min, max) raw timesteps; give this or denoise_range
    min_snr_gamma: float | None = None  # Min-SNR loss weighting (Hang et al. 2023)
    flow: FlowConfig = field(default_factory=FlowConfig)  # SD3/FLUX: noise-level density, loss weights, shift
    guidance: float = 3.5  # FLUX.1-dev: the distilled guidance scale trained (and sampled) with (kohya's default)
    save_every_n_steps: int = 0  # intermediate LoRA files; 0 = off
    save_every_n_epochs: int = 0
    save_state: bool = False  # also save the full training state (resumable) with each save
    resume: str | None = None  # a saved state folder to continue from exactly
    compile: str = "none"  # none | blocks (the UNet's repeated transformer blocks) | denoiser (all of it; CUDA)
    compile_mode: str = "default"  # default | reduce-overhead | max-autotune[-no-cudagraphs] | max-autotune-gemm
    compile_pad_products: bool = False  # Inductor pads products not multiples of 8 (rank 4) to aligned sizes
    fuse_lora_products: bool = False  # LoRA linear layers' thin products share the frozen layer's GEMMs
    cudnn_benchmark: bool = False  # CUDA: cuDNN times its convolution algorithms per shape, keeps the fastest
    lora_1x1_conv_as_matmul: bool = False  # LoRA factors on 1x1 convolutions (SD1 projections) run as products
    cuda_graphs: bool = False  # replay the UNet's forward+backward as CUDA graphs (GPU; one capture per bucket)


@dataclass
class OutputConfig:
    dir: str = "${hydra:runtime.output_dir}"
    name: str = "lora"
    comment: str = ""
    format: str = "safetensors"  # safetensors | pt | ckpt | bin (pickle formats need allow_pickle)
    allow_pickle: bool = False  # pickle files can run code when loaded: opt in explicitly
    metadata: bool = True  # false keeps only the keys loaders need
    precision: str = "fp32"  # fp32 | fp16 | bf16: dtype of the saved LoRA


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
    report_objective: bool = False  # report periodic evaluations of the objective to the pruner
    objective: str | None = None  # the sweep's (first) objective: what the trial reports and selects by
    direction: str = "maximize"  # of that objective
    pruner: str = "none"  # the sweep's pruner settings: Optuna keeps no pruner in its storage
    pruner_startup_trials: int = 1
    pruner_warmup_steps: int = 0
    run_name: str | None = None  # the trial's MLflow run name: its swept values (``dim=16 lr=0.0003``)
    label: str | None = None  # changes nothing: sweep it (sweep.label=a,b,c,d) for an A/A sweep of one setting


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
    """Put the root schema and one ``base_<group>`` schema per group into the ConfigStore's root."""
    store = ConfigStore.instance()
    store.store(name="base_config", node=Config)
    for group, schema in GROUP_SCHEMAS.items():
        store.store(name=f"base_{group}", node=schema)


def group_options(conf: Path = PROJECT_ROOT / "conf") -> dict[str, list[str]]:
    """Each option group under conf/ and its options (the YAML files), sorted."""
    groups = {group.name: sorted(f.stem for f in group.glob("*.yaml")) for group in conf.iterdir() if group.is_dir()}
    return {name: options for name, options in sorted(groups.items()) if options}


def added_groups(conf: Path = PROJECT_ROOT / "conf") -> list[str]:
    """The groups outside conf/config.yaml's defaults list: presets added with a + (``+experiment=example``,
    ``+search=lr_grid``, ``+debug=fast``)."""
    import yaml  # Hydra's own dependency

    defaults = yaml.safe_load((conf / "config.yaml").read_text(encoding="utf-8")).get("defaults", [])
    chosen = {next(iter(entry)).split()[-1].lstrip("/") for entry in defaults if isinstance(entry, dict)}
    return [group for group in group_options(conf) if group not in chosen]


def option_groups() -> str:
    """``--help``'s list of option groups and their options, the presets added with a +."""
    added = added_groups()
    return "\n".join(
        f"  {'+' if group in added else ''}{group}: {', '.join(options)}" for group, options in group_options().items()
    )


# Keys Hydra fills while a run starts: --help shows what they become instead of the interpolation.
_RUN_TIME_VALUES = {"${hydra:runtime.output_dir}": "outputs/runs/DATE/TIME (in a sweep outputs/multirun/DATE/TIME/N)"}
_INTERNAL_SECTIONS = ("hydra", "sweep", "defaults")  # Hydra's own node, the sweeper's per-trial fields, the defaults


def help_config(_root_: Any) -> str:
    """``--help``'s config: the keys a user sets, with their values as a run sees them.

    ``sweep`` (filled by the Optuna sweeper for each trial) and Hydra's own node are left out, and
    interpolations are shown resolved (``${project_path:data/sample}`` as the folder it names).
    """
    shown = OmegaConf.masked_copy(_root_, [k for k in _root_ if k not in _INTERNAL_SECTIONS])
    tree = _resolved_for_help(OmegaConf.to_container(shown, resolve=False), shown, "")
    # string.Template substitutes Hydra's $FLAGS_HELP after this text is in the template: $ is escaped
    return OmegaConf.to_yaml(tree).rstrip("\n").replace("$", "$$")


def _resolved_for_help(tree: Any, cfg: Any, key: str) -> Any:
    if isinstance(tree, dict):
        return {k: _resolved_for_help(v, cfg, f"{key}.{k}" if key else str(k)) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_resolved_for_help(v, cfg, f"{key}.{i}") for i, v in enumerate(tree)]
    if isinstance(tree, str) and "${" in tree:
        if tree in _RUN_TIME_VALUES:
            return _RUN_TIME_VALUES[tree]
        try:
            return OmegaConf.select(cfg, key, throw_on_missing=True)
        except Exception:  # an interpolation only a run can resolve: named, without the ${...} syntax
            return f"<set at run time: {tree[2:-1]}>"
    return tree


def register_resolvers() -> None:
    """``${project_path:data/sample}``: a path inside this checkout, whatever the working directory;
    ``${option_groups:}`` and ``${help_config:}``: the option groups and the config for ``--help``."""
    if not OmegaConf.has_resolver("project_path"):
        OmegaConf.register_new_resolver("project_path", lambda relative: str(PROJECT_ROOT / relative))
    if not OmegaConf.has_resolver("option_groups"):
        OmegaConf.register_new_resolver("option_groups", option_groups)
    if not OmegaConf.has_resolver("help_config"):
        OmegaConf.register_new_resolver("help_config", help_config)


register_resolvers()
register_configs()
