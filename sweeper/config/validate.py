"""Check a whole config before anything heavy is loaded, and report every problem at once.

A sweep must not spend an hour before learning that an option is impossible, and a user fixing a
config wants the full list, not one error per attempt. The checks come in two parts: the config's
own values and the data folders (``early_problems``: no torch, diffusers or transformers, so the
command line reports them in about a second; torch is asked only when a check needs to know whether
a CUDA GPU is here), then the model, network file and speed options, whose checks live beside the
code that uses diffusers, transformers and peft.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from dataclasses import dataclass
from typing import Any

from evaluation.metric_names import DIRECTIONS, SAMPLER_NAMES, SELECTIONS, evaluated_metric, metric_name
from sweeper.config.eval_prompts import EvalPrompts, resolve_eval_prompts
from sweeper.config.schema_check import schema_problems
from training.cache.latent_options import incompatible_with_cache
from training.data.buckets import bucket_problems, resolve_bucket_settings
from training.data.missing_captions import MISSING_CAPTION_CHOICES, apply_missing_captions
from training.data.scan import DatasetScan, scan_dataset, scan_folders
from training.network.types import NETWORK_TYPES, OPTION_OFF, TYPE_OPTIONS
from training.objective.flow_options import flow_problems
from training.optim_options import optimizer_problems, scheduler_problems
from training.output_dir import estimated_lora_bytes, output_dir_problems
from training.speed.attention_options import attention_problem, sdpa_backend_problem
from training.speed.compile_options import compile_problems
from training.speed.fp8_options import fp8_matmul_problems
from training.speed.fused_lora_options import fused_lora_problems, plain_lora_problems
from training.state_files import resume_problem
from training.text.encoding_options import max_token_length_problem

PRECISIONS = ("fp32", "fp16", "bf16", "auto")


class ConfigError(ValueError):
    """One or more config problems; the message lists each with the key and the fix."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        listing = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in the config, nothing was trained:\n{listing}")


@dataclass
class Validated:
    """What validation learned and training reuses (the dataset scan is not done twice)."""

    dataset: DatasetScan
    regularisation: DatasetScan | None = None
    held_out: DatasetScan | None = None  # data.val_dir's images (val_loss)
    eval_prompts: EvalPrompts | None = None  # eval.prompts, or what null means for this data


def validate(cfg: Any) -> Validated:
    """Raise ``ConfigError`` naming every problem; return the dataset scan when all is well."""
    problems, validated = _config_and_data_problems(cfg)
    problems += _model_network_and_speed_problems(cfg)
    if problems:
        raise ConfigError(problems)
    return validated


class CudaHere:
    """Truthy when torch sees a CUDA GPU. Only the checks of CUDA-only options ask (``if not cuda``
    after their option matched), so a config without one is checked without importing torch (~2 s);
    where no GPU driver library can be loaded, torch could not see a GPU either, and is not asked."""

    def __bool__(self) -> bool:
        if not _gpu_driver_loadable():
            return False
        import torch

        return torch.cuda.is_available()


@functools.cache
def _gpu_driver_loadable() -> bool:
    """Whether the library torch reaches a GPU through loads here: CUDA's driver (``libcuda``,
    ``nvcuda.dll``) or ROCm's HIP runtime (torch's ROCm builds answer ``torch.cuda`` through it)."""
    names = {
        "linux": ("libcuda.so.1", "libcuda.so", "libamdhip64.so"),
        "win32": ("nvcuda.dll", "amdhip64.dll"),
    }.get(sys.platform, ())
    for name in names:
        try:
            ctypes.CDLL(name)
        except OSError:
            continue
        return True
    return False


def early_problems(cfg: Any) -> list[str]:
    """The problems of the config's values and data folders, found without loading the model libraries:
    what the command line reports before importing them (``validate`` repeats them with the rest)."""
    return _config_and_data_problems(cfg)[0]


def _config_and_data_problems(cfg: Any) -> tuple[list[str], Validated]:
    problems: list[str] = schema_problems(cfg)  # unknown keys (``+network.dimm=8``), nan / inf
    problems += _network_problems(cfg.network)
    problems += _optimizer_problems(cfg)
    problems += _train_problems(cfg)
    problems += _eval_problems(cfg.eval)
    problems += _concept_problems(cfg)
    problems += _data_problems(cfg)
    problems += _embedding_problems(cfg)
    expected = estimated_lora_bytes(cfg.network.dim, cfg.model.source, cfg.output.precision)
    problems += output_dir_problems(cfg.output, expected)
    problems += incompatible_with_cache(cfg.data)
    problems += compile_problems(
        cfg.train.compile, cfg.train.compile_mode, cuda=CudaHere(), pad_products=cfg.train.compile_pad_products
    )
    problems += fused_lora_problems(
        cfg.train.fuse_lora_products, cfg.network.type, cfg.network.dropout, cfg.precision.fp8_matmul
    )
    problems += plain_lora_problems(
        "train.lora_1x1_conv_as_matmul", cfg.train.lora_1x1_conv_as_matmul, cfg.network.type
    )
    problems += _machine_problems(cfg)
    scan = _scan(cfg, cfg.data.train_dir, "data.train_dir")
    problems += scan.problems
    regularisation = None
    if cfg.data.reg_dir is not None or any(subset.is_reg for subset in cfg.data.subsets):
        regularisation = _scan(cfg, cfg.data.reg_dir, "data.reg_dir")
        problems += regularisation.problems
    held_out = None
    if cfg.data.val_dir:
        held_out = _scan(cfg, cfg.data.val_dir, "data.val_dir")
        problems += held_out.problems
    eval_prompts = None
    if not scan.problems:  # prompts derived from captions need the captions
        eval_prompts, prompt_problems = resolve_eval_prompts(cfg, scan.records)
        problems += prompt_problems
    return problems, Validated(scan, regularisation, held_out, eval_prompts)


def _machine_problems(cfg: Any) -> list[str]:
    """What this machine cannot run (a CUDA-only optimizer or attention kernel) and the schedule's values:
    with the early checks, so the command line names them with the rest (an imported config's fixes)."""
    cuda = CudaHere()
    problems = optimizer_problems(cfg.optimizer, cuda)
    problems += scheduler_problems(cfg.scheduler, cfg.train.max_steps, cfg.eval.every_n_steps)
    if problem := attention_problem(cfg.model.attention, cuda):
        problems.append(problem)
    if problem := sdpa_backend_problem(cfg.model.sdpa_backend, cfg.model.attention, cuda):
        problems.append(problem)
    problems += fp8_matmul_problems(cfg.precision.fp8_matmul, cuda)
    return problems


def _model_network_and_speed_problems(cfg: Any) -> list[str]:
    """The checks that live beside diffusers / transformers / peft code: imported only here."""
    from training.families.loading import model_problems
    from training.network.file import init_weights_problems, output_problems
    from training.speed.cuda_graph import cuda_graph_problems

    problems = model_problems(cfg.model, cfg.network, cfg.train, cfg.eval)
    problems += output_problems(cfg.output)
    problems += init_weights_problems(cfg.network, allow_pickle=cfg.output.allow_pickle)
    problems += cuda_graph_problems(
        cfg.train.cuda_graphs,
        grad_accum_steps=cfg.train.grad_accum_steps,
        compile_mode=cfg.train.compile_mode,
        checkpointing=cfg.model.gradient_checkpointing,
    )
    return problems


def _scan(cfg: Any, folder: str | None, key: str) -> DatasetScan:
    """One image folder, with ``data.missing_captions`` applied (when it names a policy); the training and
    regularisation folders come with their ``data.subsets`` entries."""
    if key in ("data.train_dir", "data.reg_dir"):
        scan = scan_folders(cfg.data, reg=key == "data.reg_dir")
    else:
        scan = scan_dataset(folder, cfg.data.caption_extension, cfg.data.on_bad_image, key=key)
    if cfg.data.missing_captions not in MISSING_CAPTION_CHOICES:
        return scan  # reported once by _data_problems
    return apply_missing_captions(scan, cfg.data.missing_captions, cfg.data.caption_extension, key)


def _network_problems(network: Any) -> list[str]:
    problems = []
    if network.alpha is not None and network.scale is not None:
        problems.append(
            "network.alpha and network.scale are both set; scale = alpha/dim, so give only one "
            "(e.g. drop network.scale)"
        )
    if network.dim < 1:
        problems.append(f"network.dim must be >= 1 (got {network.dim})")
    if network.alpha is not None and network.alpha <= 0:
        problems.append(f"network.alpha must be > 0 (got {network.alpha})")
    if network.scale is not None and network.scale <= 0:
        problems.append(f"network.scale must be > 0 (got {network.scale})")
    if not 0 <= network.dropout < 1:
        problems.append(f"network.dropout must be in [0, 1) (got {network.dropout})")
    if not (network.train_unet or network.train_text_encoder):
        problems.append("network.train_unet and network.train_text_encoder are both false; nothing would train")
    problems += network_type_problems(network)
    return problems


def network_type_problems(network: Any) -> list[str]:
    """``network.type`` and the options only some types have, naming the key and the fix."""
    if network.type not in NETWORK_TYPES:
        return [f"network.type: unknown '{network.type}'; use one of {', '.join(NETWORK_TYPES)}"]
    problems = []
    for key, types in TYPE_OPTIONS.items():
        value, off = getattr(network, key), OPTION_OFF[key]
        if network.type in types or value == off or (off == 0.0 and value == 0):
            continue
        hint = " (LoCon: LoRA on the convolutions too)" if key.startswith("conv_") and network.type == "lora" else ""
        problems.append(
            f"network.{key}={value} is an option of network.type={'/'.join(types)}{hint}, not of "
            f"network.type={network.type}: set network.{key}={'null' if off is None else off}"
            + (" or network.type=locon" if hint else "")
        )
    if network.conv_dim is not None and network.conv_dim < 1:
        problems.append(f"network.conv_dim must be >= 1, or null for no conv layers (got {network.conv_dim})")
    if network.conv_alpha is not None and network.conv_alpha <= 0:
        problems.append(f"network.conv_alpha must be > 0, or null for conv_dim x alpha/dim (got {network.conv_alpha})")
    if network.conv_alpha is not None and network.conv_dim is None and network.type in ("loha", "lokr", "dora"):
        problems.append(
            f"network.conv_alpha={network.conv_alpha} has no conv layers to scale: network.type={network.type} "
            "adapts the convolutions only with network.conv_dim set; set network.conv_dim or network.conv_alpha=null"
        )
    if network.lokr_factor == 0 or network.lokr_factor < -1:
        problems.append(
            f"network.lokr_factor must be -1 (the factor nearest the square root) or >= 1 (got {network.lokr_factor})"
        )
    return problems


def _optimizer_problems(cfg: Any) -> list[str]:
    """The per-part learning rates (the optimizer's own options are checked in training.optim)."""
    problems = []
    for key, value in (
        ("network.unet_lr", cfg.network.unet_lr),
        ("network.text_encoder_lr", cfg.network.text_encoder_lr),
        ("network.text_encoder_2_lr", cfg.network.text_encoder_2_lr),
    ):
        if value is not None and value < 0:
            problems.append(f"{key} must be >= 0 (got {value}); a learning rate cannot be negative")
    return problems


def _train_problems(cfg: Any) -> list[str]:
    problems = []
    train = cfg.train
    if train.max_steps is None and train.epochs is None:
        problems.append("train.max_steps and train.epochs are both null; set at least one (e.g. train.max_steps=1000)")
    for key in ("max_steps", "epochs", "batch_size", "grad_accum_steps", "log_every_n_steps"):
        value = getattr(train, key)
        if value is not None and value < 1:
            problems.append(f"train.{key} must be >= 1 (got {value})")
    if train.replicates < 1:
        problems.append(f"train.replicates must be >= 1 (1 = one training run; got {train.replicates})")
    elif train.replicates > 1 and train.resume:
        problems.append("train.resume continues one run; it cannot be combined with train.replicates > 1")
    problems += _loss_problems(train)
    problems += flow_problems(train.flow)
    if train.max_grad_norm < 0:
        problems.append(f"train.max_grad_norm must be >= 0 (0 disables clipping; got {train.max_grad_norm})")
    precision = cfg.precision.mixed
    if precision not in PRECISIONS:
        problems.append(f"precision.mixed: unknown value '{precision}'; use one of {', '.join(PRECISIONS)}")
    elif precision == "fp16" and not CudaHere():
        problems.append("precision=fp16 needs a CUDA GPU (loss scaling); use precision=fp32 or bf16 on the CPU")
    resolution = cfg.bucket.resolution
    if resolution is not None and (resolution < 8 or resolution % 8):
        problems.append(f"bucket.resolution must be a positive multiple of 8 (got {resolution})")
    for key in ("caption_rate", "tag_rate"):
        if not 0 <= getattr(cfg.dropout, key) <= 1:
            problems.append(f"dropout.{key} must be in [0, 1] (got {getattr(cfg.dropout, key)})")
    if cfg.dropout.caption_every_n_epochs < 0:
        problems.append("dropout.caption_every_n_epochs must be >= 0 (0 = never)")
    if cfg.data.num_workers < 0:
        problems.append(f"data.num_workers must be >= 0 (got {cfg.data.num_workers})")
    return problems


def _loss_problems(train: Any) -> list[str]:
    """Timestep range, noise offset, min-SNR and saving options."""
    problems = []
    if train.denoise_range is not None and train.timestep_range is not None:
        problems.append(
            "train.denoise_range and train.timestep_range are both set; they say the same thing "
            "(fractions of denoising vs raw timesteps): give only one"
        )
    if train.denoise_range is not None:
        values = list(train.denoise_range)
        if len(values) != 2 or not 0 <= values[0] < values[1] <= 1:
            problems.append(f"train.denoise_range must be [start, end] with 0 <= start < end <= 1 (got {values})")
    if train.timestep_range is not None:
        values = list(train.timestep_range)
        if len(values) != 2 or not 0 <= values[0] < values[1]:
            problems.append(f"train.timestep_range must be [min, max) with 0 <= min < max (got {values})")
    if train.noise_offset < 0:
        problems.append(f"train.noise_offset must be >= 0 (got {train.noise_offset})")
    if train.min_snr_gamma is not None and train.min_snr_gamma <= 0:
        problems.append(f"train.min_snr_gamma must be > 0, or null to disable (got {train.min_snr_gamma})")
    for key in ("save_every_n_steps", "save_every_n_epochs"):
        if getattr(train, key) < 0:
            problems.append(f"train.{key} must be >= 0 (0 = off)")
    if problem := resume_problem(train.resume):
        problems.append(problem)
    return problems


def _data_problems(cfg: Any) -> list[str]:
    data, bucket = cfg.data, cfg.bucket
    problems = []
    if problem := max_token_length_problem(data.max_token_length):
        problems.append(problem)
    if data.keep_tokens < 0:
        problems.append(f"data.keep_tokens must be >= 0 (got {data.keep_tokens})")
    if data.prior_loss_weight < 0:
        problems.append(f"data.prior_loss_weight must be >= 0 (got {data.prior_loss_weight})")
    if data.tag_stats not in (None, "count", "alpha"):
        problems.append(f"data.tag_stats must be count, alpha or null (got {data.tag_stats})")
    if not 0 <= data.val_split < 1:
        problems.append(f"data.val_split must be in [0, 1): the fraction of images held out (got {data.val_split})")
    if data.val_split and data.val_dir:
        problems.append("data.val_split and data.val_dir both set: hold out a fraction or give a folder, not both")
    if data.cache_latents not in ("none", "memory", "disk"):
        problems.append(f"data.cache_latents must be none, memory or disk (got {data.cache_latents})")
    if data.missing_captions not in MISSING_CAPTION_CHOICES:
        problems.append(
            f"data.missing_captions: {data.missing_captions!r} is not one of {', '.join(MISSING_CAPTION_CHOICES)}"
        )
    if bucket.step is not None and (bucket.step < 8 or bucket.step % 8):
        problems.append(f"bucket.step must be a positive multiple of 8, or null for auto (got {bucket.step})")
    if bucket.min_side is not None and bucket.max_side is not None and bucket.min_side > bucket.max_side:
        problems.append(f"bucket.min_side ({bucket.min_side}) is larger than bucket.max_side ({bucket.max_side})")
    elif bucket.enabled and bucket.resolution and not problems:
        problems += bucket_problems(*resolve_bucket_settings(bucket, bucket.resolution))
    return problems


def _embedding_problems(cfg: Any) -> list[str]:
    embedding = cfg.network.embedding
    problems = []
    if cfg.network.max_norm is not None and cfg.network.max_norm <= 0:
        problems.append(f"network.max_norm must be > 0, or null to disable (got {cfg.network.max_norm})")
    if not embedding.enabled:
        return problems
    if not (embedding.token or cfg.data.trigger_word):
        problems.append("network.embedding.enabled needs a token: set data.trigger_word (or network.embedding.token)")
    if embedding.num_vectors < 1:
        problems.append(f"network.embedding.num_vectors must be >= 1 (got {embedding.num_vectors})")
    if embedding.lr < 0:
        problems.append(f"network.embedding.lr must be >= 0 (got {embedding.lr})")
    return problems


def _eval_problems(eval_cfg: Any) -> list[str]:
    problems = []
    if eval_cfg.prompts is not None and not eval_cfg.prompts:
        problems.append(
            "eval.prompts is empty; give at least one prompt, e.g. eval.prompts='[a photo of sks]', "
            "or null to take them from your captions"
        )
    for key in ("images_per_prompt", "num_inference_steps", "batch_size"):
        if getattr(eval_cfg, key) < 1:
            problems.append(f"eval.{key} must be >= 1 (got {getattr(eval_cfg, key)})")
    if eval_cfg.every_n_steps < 0:
        problems.append("eval.every_n_steps must be >= 0 (0 = only at the end)")
    if eval_cfg.sampler not in SAMPLER_NAMES:
        problems.append(f"eval.sampler: unknown sampler '{eval_cfg.sampler}'; use one of {', '.join(SAMPLER_NAMES)}")
    if eval_cfg.select not in SELECTIONS:
        problems.append(f"eval.select: {eval_cfg.select!r} is not one of {', '.join(SELECTIONS)}")
    if metric_name(eval_cfg.objective) not in DIRECTIONS:
        problems.append(f"eval.objective: unknown metric {eval_cfg.objective!r}; use one of {', '.join(DIRECTIONS)}")
    if len(set(eval_cfg.seeds)) != len(eval_cfg.seeds):
        problems.append(f"eval.seeds: {list(eval_cfg.seeds)} repeats a seed (it would count the same images twice)")
    concept = eval_cfg.concept
    if concept.labels and concept.target not in concept.labels:
        problems.append(
            f"eval.concept.target={concept.target!r} is not one of eval.concept.labels {list(concept.labels)}; "
            "name the label the LoRA's samples should get"
        )
    elif concept.target is not None and concept.labels is not None and not concept.labels:
        problems.append("eval.concept.target is set but eval.concept.labels is empty; give the candidate labels")
    return problems


def _concept_problems(cfg: Any) -> list[str]:
    """An objective of ``concept_acc`` where no concept is defined would rank runs by nothing."""
    from sweeper.config.eval_concept import choose_concept

    wanted = [
        key
        for key, objective in (("eval.objective", cfg.eval.objective), ("sweep.objective", cfg.sweep.objective))
        if objective and evaluated_metric(str(objective)) == "concept_acc"
    ]
    choice = choose_concept(cfg)
    if not wanted or choice.enabled:
        return []
    return [f"{' and '.join(wanted)}: concept_acc is off for this run ({choice.why})"]
