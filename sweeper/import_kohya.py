"""``python -m sweeper.import_kohya CONFIG.toml|CONFIG.json``: a kohya / LoRA_Easy config as a Hydra experiment.

Reads a kohya sd-scripts training TOML (flat, or sectioned like ``[model_arguments]``; an inline or
referenced ``dataset_config`` too) or a LoRA_Easy_Training_Scripts JSON (its own option names, e.g.
``net_dim``, are renamed to sd-scripts' first, as LoRA_Easy itself does), maps every option it knows
onto our keys (the table in PARAMETERS.md) and writes ``conf/experiment/<name>.yaml``:

    # @package _global_
    defaults:
      - override /optimizer: adamw     # group choices go through the defaults list
    network:
      dim: 32                          # network_dim

Run it with ``python -m sweeper +experiment=<name>``. The report lists every option mapped
(old -> new) and every option not mapped with the reason; only an unreadable input fails (exit 2).

Where kohya's default differs from ours and the file does not set the option, kohya's default is
written explicitly (network_alpha=1, the text encoder trained, 1600 steps, ``.caption`` files),
because the user's runs were trained that way.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sweeper.config import GROUP_SCHEMAS, PROJECT_ROOT, OutputConfig, TrainConfig
from training.atomic_file import write_text_atomically

CONF_DIR = PROJECT_ROOT / "conf"
DEFAULT_OUT = CONF_DIR / "experiment"
SECTIONS = ("model", "network", "optimizer", "scheduler", "precision", "bucket", "dropout", "data", "eval")
SECTIONS += ("tracking", "train", "output")
SCHEMAS: dict[str, type] = {**GROUP_SCHEMAS, "train": TrainConfig, "output": OutputConfig}

# LoRA_Easy_Training_Scripts' JSON names -> sd-scripts names (LoRA_Easy renames them the same way
# before calling sd-scripts), plus the kohya_ss GUI's few names of its own.
ALIASES = {
    "base_model": "pretrained_model_name_or_path",
    "img_folder": "train_data_dir",
    "reg_img_folder": "reg_data_dir",
    "output_folder": "output_dir",
    "change_output_name": "output_name",
    "shuffle_captions": "shuffle_caption",
    "train_resolution": "resolution",
    "buckets": "enable_bucket",
    "min_bucket_resolution": "min_bucket_reso",
    "max_bucket_resolution": "max_bucket_reso",
    "batch_size": "train_batch_size",  # also the dataset config's name
    "max_clip_token_length": "max_token_length",
    "max_steps": "max_train_steps",
    "num_epochs": "max_train_epochs",
    "num_workers": "max_data_loader_n_workers",
    "persistent_workers": "persistent_data_loader_workers",
    "test_seed": "seed",  # LoRA_Easy passes it to sd-scripts as --seed: the training seed
    "gradient_acc_steps": "gradient_accumulation_steps",
    "log_dir": "logging_dir",
    "use_lion": "use_lion_optimizer",
    "scheduler": "lr_scheduler",
    "cosine_restarts": "lr_scheduler_num_cycles",
    "scheduler_power": "lr_scheduler_power",
    "no_meta": "no_metadata",
    "save_as": "save_model_as",
    "lora_model_for_resume": "network_weights",
    "net_dim": "network_dim",
    "alpha": "network_alpha",
    "unet_only": "network_train_unet_only",
    "text_only": "network_train_text_encoder_only",
    "warmup_lr_ratio": "lr_warmup_ratio",
    "warmup_ratio": "lr_warmup_ratio",
    "epoch": "max_train_epochs",
    "max_resolution": "resolution",
    "optimizer": "optimizer_type",
}
LORA_EASY_MARKERS = {"base_model", "img_folder", "net_dim", "output_folder", "train_resolution", "general_args"}
VALUE_TABLES = {"optimizer_args", "network_args", "lr_scheduler_args"}  # tables that are one option's value

# Options with nothing to map to, and why.
NO_EQUIVALENT = {
    "full_fp16": "training the LoRA weights themselves in fp16 is not offered; precision=fp16 autocasts",
    "full_bf16": "training the LoRA weights themselves in bf16 is not offered; precision=bf16 autocasts",
    "logging_dir": "runs are tracked in MLflow, not TensorBoard: set tracking.uri / tracking.experiment",
    "log_prefix": "runs are tracked in MLflow: name runs with output.name, group them with tracking.experiment",
    "log_with": "runs are tracked in MLflow (tracking.enabled)",
    "log_tracker_name": "runs are tracked in MLflow: tracking.experiment",
    "log_tracker_config": "runs are tracked in MLflow",
    "log_config": "every run stores its resolved config (.hydra/ and the MLflow artifact config/resolved.yaml)",
    "wandb_api_key": "runs are tracked in MLflow, not Weights & Biases",
    "wandb_run_name": "runs are tracked in MLflow, not Weights & Biases",
    "save_json_folder": "every run stores its resolved config (.hydra/ and the MLflow artifact config/resolved.yaml)",
    "load_json_path": "this import is the way in; afterwards reuse a run's config with --config-dir/--config-name",
    "json_load_skip_list": "command-line overrides always win over the experiment file",
    "save_json_only": "print the composed config without training: python -m sweeper +experiment=NAME --cfg job",
    "multi_run_folder": "sweeps go to hydra.sweep.dir; pass hydra.sweep.dir=... on the command line",
    "lowram": "no low-RAM loading mode; models load once per process",
    "highvram": "no such mode",
    "vae_batch_size": "latents are encoded one batch at a time",
    "mem_eff_attn": "kohya's own memory-efficient attention: model.attention=sdpa does the same job",
    "save_last_n_epochs": "every intermediate file is kept; delete old ones yourself",
    "save_last_n_steps": "every intermediate file is kept; delete old ones yourself",
    "save_last_n_epochs_state": "every intermediate state is kept; delete old ones yourself",
    "save_last_n_steps_state": "every intermediate state is kept; delete old ones yourself",
    "save_n_epoch_ratio": "give train.save_every_n_epochs instead",
    "save_state_on_train_end": "train.save_state saves the state with every save, the last one included",
    "face_crop_aug_range": "no face-crop augmentation",
    "multires_noise_iterations": "multi-resolution (pyramid) noise is not offered; train.noise_offset is",
    "multires_noise_discount": "multi-resolution (pyramid) noise is not offered; train.noise_offset is",
    "adaptive_noise_scale": "no adaptive noise offset; train.noise_offset is a fixed offset",
    "ip_noise_gamma": "input-perturbation noise is not offered",
    "noise_offset_random_strength": "no random noise-offset strength",
    "zero_terminal_snr": "no zero-terminal-SNR rescaling of the noise schedule",
    "scale_v_pred_loss_like_noise_pred": "no v-prediction loss rescaling",
    "v_pred_like_loss": "no v-prediction-like loss term",
    "debiased_estimation_loss": "no debiased-estimation loss weighting; train.min_snr_gamma is the loss weighting",
    "loss_type": "the loss is MSE",
    "huber_schedule": "the loss is MSE",
    "huber_c": "the loss is MSE",
    "weighted_captions": "no (word:1.2) caption weighting",
    "sample_prompts": "periodic samples use eval.prompts (a list in the config), not a prompt file",
    "sample_every_n_epochs": "periodic evaluation counts steps: eval.every_n_steps",
    "sample_at_first": "the base model is always scored and sampled (clip_score_baseline, samples/baseline.png)",
    "dim_from_weights": "give network.dim equal to the rank of network.init_weights (it is checked at startup)",
    "base_weights": "merging other LoRAs into the base model before training is not offered",
    "base_weights_multiplier": "merging other LoRAs into the base model before training is not offered",
    "network_train_norm": "no norm-layer training",
    "lr_scheduler_type": "custom scheduler classes are not offered; pick scheduler=<name>",
    "lr_scheduler_args": "custom scheduler arguments are not offered",
    "lr_scheduler_min_lr_ratio": "no minimum-lr floor for the schedules",
    "class_tokens": "captions come from caption files; data.trigger_word prepends a word to every caption",
    "caption_prefix": "data.trigger_word prepends a word to every caption (kept in place by shuffling)",
    "caption_suffix": "no caption suffix",
    "caption_separator": "tags are comma-separated",
    "keep_tokens_separator": "keep_tokens counts leading comma-separated tags",
    "secondary_separator": "tags are comma-separated",
    "enable_wildcard": "no caption wildcards",
    "token_warmup_min": "no token warm-up",
    "token_warmup_step": "no token warm-up",
    "max_bucket_size": "bucket sizes are bounded by bucket.min_side / bucket.max_side",
    "persistent_data_loader_workers_count": "data.persistent_workers is a switch",
    "max_train_epochs_overrides": "give train.epochs",
    "output_config": "print the composed config with --cfg job",
    "mixed_precision_fp8": "no fp8 training",
    "fp8_base": "no fp8 base model",
    "cpu_offload_checkpointing": "no CPU offload",
    "ddp_timeout": "single-process training",
    "ddp_gradient_as_bucket_view": "single-process training",
    "ddp_static_graph": "single-process training",
    "deepspeed": "single-process training",
    "console_log_level": "progress and summary are printed; library logging is quiet",
    "console_log_file": "runs are tracked in MLflow",
    "console_log_simple": "runs are tracked in MLflow",
    "debug_dataset": "check the dataset with a run of train.max_steps=1",
    "tokenizer_cache_dir": "tokenizers load from the base model folder",
    "no_half_vae": "the VAE runs in the training precision",
    "in_json": "fine-tuning metadata JSON datasets are not read; use caption files",
    "persistent_workers_count": "data.persistent_workers is a switch",
    "stop_text_encoder_training": "no step to stop text-encoder training at",
    "training_comment_file": "put the comment in output.comment",
}

Setter = Callable[..., None]


class UnreadableConfig(Exception):
    """The input file cannot be read as a kohya TOML or a LoRA_Easy JSON."""


class Unfit(Exception):
    """This option's value cannot be mapped; the message is the reason."""


@dataclass
class Option:
    name: str  # the sd-scripts name, after renaming LoRA_Easy's
    label: str  # where and how the file spelled it, e.g. "network_arguments.network_dim" or "net_dim"
    value: Any


@dataclass
class Mapped:
    source: str
    target: str  # our key, "<group>=" for a group choice, or "" when nothing needs setting
    value: Any
    note: str = ""


@dataclass
class NotMapped:
    source: str
    value: Any
    reason: str


@dataclass
class ImportResult:
    """What one import produced: group choices, values by dotted key, and the report."""

    source: Path
    kind: str
    choices: dict[str, str] = field(default_factory=dict)  # group -> option (defaults-list override)
    values: dict[str, Any] = field(default_factory=dict)  # "network.dim" -> 32
    mapped: list[Mapped] = field(default_factory=list)
    unmapped: list[NotMapped] = field(default_factory=list)
    empty: list[NotMapped] = field(default_factory=list)  # null / "" in the file: our default stays
    origins: dict[str, str] = field(default_factory=dict)  # our key -> source label (YAML comments)
    order: dict[str, int] = field(default_factory=dict)  # source label -> position in the file (report order)

    def report(self, written: Path | None = None, name: str | None = None) -> str:
        lines = [f"Imported {self.source} ({self.kind})" + (f" -> {written}" if written else "")]
        lines.append(f"\nMapped ({len(self.mapped)}):")
        for m in self.mapped:
            if not m.target:
                shown = f"{m.source} = {_show(m.source, m.value)} -> nothing to set"
            elif m.target.endswith("="):
                shown = f"{m.source} -> {m.target}{m.value} (defaults list)"
            else:
                shown = f"{m.source} -> {m.target} = {_show(m.target, m.value)}"
            lines.append(f"  {shown}" + (f"   [{m.note}]" if m.note else ""))
        lines.append(f"\nNot mapped ({len(self.unmapped)}):")
        lines += [f"  {u.source} = {_show(u.source, u.value)}: {u.reason}" for u in self.unmapped] or ["  (none)"]
        if self.empty:
            lines.append(f"\nEmpty in the file, our default stays ({len(self.empty)}):")
            lines.append("  " + ", ".join(e.source for e in self.empty))
        if name:
            lines.append(f"\nRun it: python -m sweeper +experiment={name}")
        return "\n".join(lines)

    def yaml(self, name: str) -> str:
        """The experiment file: ``# @package _global_``, the group choices, then plain keys."""
        out = [
            "# @package _global_",
            f"# Imported from {self.source} ({self.kind}) by `python -m sweeper.import_kohya`.",
            f"# Use it: python -m sweeper +experiment={name}   (command-line overrides still win)",
        ]
        if self.choices:
            out.append("defaults:")
            out += [f"  - override /{group}: {option}" for group, option in self.choices.items()]
        nested: dict[str, dict[str, Any]] = {}
        for key, value in self.values.items():
            section, _, leaf = key.partition(".")
            nested.setdefault(section, {})[leaf] = value
        for section in sorted(nested, key=lambda s: SECTIONS.index(s) if s in SECTIONS else len(SECTIONS)):
            out.append("")
            out.append(f"{section}:")
            for leaf, value in nested[section].items():
                origin = _one_line(self.origins.get(f"{section}.{leaf}", ""))
                out.append(f"  {leaf}: {yaml_value(value)}" + (f"  # {origin}" if origin else ""))
        if self.unmapped:
            out.append("")
            out.append("# Not mapped (see the import report):")
            out += [f"#   {_one_line(u.source)}: {_one_line(u.reason)}" for u in self.unmapped]
        return "\n".join(out) + "\n"


# --- reading: the file -> options by sd-scripts name


def read_source(path: Path) -> tuple[str, dict[str, Any]]:
    """Parse the file; ``UnreadableConfig`` says why it cannot be."""
    if not path.is_file():
        raise UnreadableConfig(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise UnreadableConfig(f"{path}: cannot be read ({error})") from error
    parsers = [("toml", tomllib.loads), ("json", json.loads)]
    if path.suffix.lower() == ".json":
        parsers.reverse()
    errors = []
    for kind, parse in parsers:
        try:
            data = parse(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
            errors.append(f"not {kind.upper()}: {error}")
            continue
        if not isinstance(data, dict):
            raise UnreadableConfig(f"{path}: the {kind.upper()} holds a {type(data).__name__}, not a table of options")
        return kind, data
    raise UnreadableConfig(f"{path}: " + "; ".join(errors))


class _Collector:
    """Flattens sections, dataset configs and LoRA_Easy's names into one ``{sd-scripts name: Option}``."""

    def __init__(self, result: ImportResult, base_dir: Path) -> None:
        self.result = result
        self.base_dir = base_dir
        self.options: dict[str, Option] = {}

    def add(self, key: str, label: str, value: Any) -> None:
        name = ALIASES.get(key, key)
        self.result.order.setdefault(label, len(self.result.order))
        if value is None or (isinstance(value, str) and not value.strip()):
            self.result.empty.append(NotMapped(label, value, "empty"))
            return
        if name in self.options:
            earlier = self.options[name]
            self.result.unmapped.append(NotMapped(earlier.label, earlier.value, f"superseded by {label} (later wins)"))
        self.options[name] = Option(name, label, value)

    def walk(self, table: dict[str, Any], path: str = "") -> None:
        for key, value in table.items():
            label = f"{path}.{key}" if path else key
            if key == "datasets" and isinstance(value, list):
                self.datasets(value, label)
            elif key == "subsets" and isinstance(value, list):
                self.subsets(value, label)
            elif key == "dataset_config" and isinstance(value, str) and value.strip():
                self.dataset_config(value, label)
            elif isinstance(value, dict) and key not in VALUE_TABLES:
                self.walk(value, label)
            else:
                self.add(key, label, value)

    def dataset_config(self, value: str, label: str) -> None:
        candidates = [Path(value).expanduser()]
        if not candidates[0].is_absolute():
            candidates.insert(0, self.base_dir / value)
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            self.result.unmapped.append(
                NotMapped(label, value, "dataset config file not found; import it too, or set data.train_dir")
            )
            return
        try:
            data = tomllib.loads(found.read_text(encoding="utf-8-sig"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
            self.result.unmapped.append(NotMapped(label, value, f"dataset config cannot be read ({error})"))
            return
        self.result.mapped.append(Mapped(label, "", value, f"read {found}; its options are listed below"))
        self.walk(data, f"{Path(value).name}:")

    def datasets(self, datasets: list[Any], label: str) -> None:
        for index, dataset in enumerate(datasets):
            where = f"{label}[{index}]"
            if index > 0:
                self.result.unmapped.append(
                    NotMapped(
                        where,
                        "{...}",
                        "one dataset per run: put its images as <repeats>_<name>/ folders under data.train_dir",
                    )
                )
                continue
            if isinstance(dataset, dict):
                self.walk(dataset, where)

    def subsets(self, subsets: list[Any], label: str) -> None:
        subsets = [s for s in subsets if isinstance(s, dict)]
        train = [(i, s) for i, s in enumerate(subsets) if not s.get("is_reg")]
        reg = [(i, s) for i, s in enumerate(subsets) if s.get("is_reg")]
        for role, group in (("train", train), ("reg", reg)):
            for index, subset in group:
                where = f"{label}[{index}]"
                rest = {k: v for k, v in subset.items() if k not in ("image_dir", "num_repeats", "is_reg")}
                if "is_reg" in subset:
                    self.result.mapped.append(Mapped(f"{where}.is_reg", "", subset["is_reg"], "subset role"))
                if len(group) > 1:
                    for key in ("image_dir", "num_repeats"):
                        if key in subset:
                            self.result.unmapped.append(
                                NotMapped(
                                    f"{where}.{key}",
                                    subset[key],
                                    f"several {role} subsets: lay them out as "
                                    "<repeats>_<name>/ folders under one folder and give that folder",
                                )
                            )
                elif "image_dir" in subset:
                    self.add(
                        "train_data_dir" if role == "train" else "reg_data_dir",
                        f"{where}.image_dir",
                        subset["image_dir"],
                    )
                repeats = subset.get("num_repeats")
                if len(group) == 1 and repeats is not None:
                    if repeats == 1:
                        self.result.mapped.append(
                            Mapped(
                                f"{where}.num_repeats",
                                "",
                                repeats,
                                "images directly in the folder are used once per epoch",
                            )
                        )
                    else:
                        self.result.unmapped.append(
                            NotMapped(
                                f"{where}.num_repeats",
                                repeats,
                                f"repeats come from the folder name: move the "
                                f"images into a subfolder named {repeats}_<name>/",
                            )
                        )
                if role == "reg":
                    for key, value in rest.items():
                        self.result.unmapped.append(
                            NotMapped(f"{where}.{key}", value, "a setting of the regularisation subset only")
                        )
                else:
                    self.walk(rest, where)


# --- mapping: options -> our keys


class _Mapper:
    def __init__(self, result: ImportResult, options: dict[str, Option], conf_dir: Path) -> None:
        self.result = result
        self.options = options
        self.conf_dir = conf_dir
        self.present = set(options)

    def set(self, target: str, value: Any, option: Option | str, note: str = "") -> None:
        """Record ``target = value`` (checked against the schema) for ``option``."""
        source = option.label if isinstance(option, Option) else option
        section, _, leaf = target.partition(".")
        node = OmegaConf.structured(SCHEMAS[section])
        try:
            node[leaf] = value
            value = OmegaConf.to_container(node, resolve=False)[leaf]
        except OmegaConfBaseException as error:
            raise Unfit(f"{value!r} does not fit {target}: {str(error).splitlines()[0]}") from error
        previous = self.result.origins.get(target)
        if previous is not None and previous != source and self.result.values.get(target) != value:
            note = "; ".join(filter(None, [note, f"replaces the value from {previous}"]))
        self.result.values[target] = value
        self.result.origins[target] = source
        self.result.mapped.append(Mapped(source, target, value, note))

    def choose(self, group: str, option_name: str, option: Option | str, note: str = "") -> None:
        """A group choice, written as ``override /group: option`` (only if conf/<group>/<option>.yaml exists)."""
        source = option.label if isinstance(option, Option) else option
        available = sorted(p.stem for p in (self.conf_dir / group).glob("*.yaml"))
        if option_name not in available:
            raise Unfit(
                f"{group} '{option_name}' has no option file conf/{group}/{option_name}.yaml in this checkout "
                f"(available: {', '.join(available) or 'none'})"
            )
        self.result.choices[group] = option_name
        self.result.mapped.append(Mapped(source, f"{group}=", option_name, note))

    def nothing(self, option: Option, note: str) -> None:
        self.result.mapped.append(Mapped(option.label, "", option.value, note))

    def unmapped(self, option: Option, reason: str) -> None:
        self.result.unmapped.append(NotMapped(option.label, option.value, reason))

    def run(self) -> None:
        for keys, rule, always in RULES:
            taken = {k: self.options.pop(k) for k in keys if k in self.options}
            if not taken and not always:
                continue
            try:
                rule(self, taken)
            except Unfit as unfit:  # the rule's options that were not recorded yet
                recorded = {m.source for m in self.result.mapped} | {u.source for u in self.result.unmapped}
                for option in taken.values():
                    if option.label not in recorded:
                        self.unmapped(option, str(unfit))
        for option in self.options.values():
            reason = NO_EQUIVALENT.get(option.name)
            if reason and option.value is False:
                self.nothing(option, "off: nothing to set")
            else:
                self.unmapped(option, reason or "not an option this importer knows (kohya sd-scripts / LoRA_Easy)")
        order = self.result.order
        self.result.mapped.sort(key=lambda m: order.get(m.source, len(order)))
        self.result.unmapped.sort(key=lambda u: order.get(u.source.rpartition(".")[0], order.get(u.source, len(order))))


RULES: list[tuple[tuple[str, ...], Callable[[_Mapper, dict[str, Option]], None], bool]] = []


def rule(*keys: str, always: bool = False) -> Callable:
    """Register a mapping of ``keys``; ``always`` runs it even when none is present (kohya defaults)."""

    def register(fn: Callable[[_Mapper, dict[str, Option]], None]) -> Callable:
        RULES.append((keys, fn, always))
        return fn

    return register


def simple(key: str, target: str, convert: Callable[[Any], Any], note: str = "") -> None:
    """A one-to-one option; a value that does not convert is reported with the reason."""

    def apply(m: _Mapper, taken: dict[str, Option]) -> None:
        option = taken[key]
        try:
            m.set(target, convert(option.value), option, note)
        except Unfit as unfit:
            m.unmapped(option, str(unfit))

    RULES.append(((key,), apply, False))


# converters: raise Unfit with the reason


def as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise Unfit(f"expected true/false, got {value!r}")


def as_int(value: Any) -> int:
    if isinstance(value, bool):
        raise Unfit(f"expected a whole number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError) as error:
        raise Unfit(f"expected a whole number, got {value!r}") from error
    if not number.is_integer():
        raise Unfit(f"expected a whole number, got {value!r}")
    return int(number)


def as_float(value: Any) -> float:
    if isinstance(value, bool):
        raise Unfit(f"expected a number, got {value!r}")
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    try:
        return float(value)
    except (TypeError, ValueError) as error:
        raise Unfit(f"expected a number, got {value!r}") from error


def as_str(value: Any) -> str:
    if isinstance(value, (dict, list, bool)):
        raise Unfit(f"expected text, got {value!r}")
    return str(value)


def as_path(value: Any) -> str:
    if isinstance(value, bool):
        raise Unfit(f"expected a path, got {value!r} (a true/false here has no meaning in sd-scripts)")
    return as_str(value)


def as_extension(value: Any) -> str:
    text = as_str(value).strip()
    return text if text.startswith(".") else "." + text


for _key, _target, _convert in (
    ("vae", "model.vae", as_path),
    ("gradient_checkpointing", "model.gradient_checkpointing", as_bool),
    ("network_dim", "network.dim", as_int),
    ("network_dropout", "network.dropout", as_float),
    ("scale_weight_norms", "network.max_norm", as_float),
    ("network_weights", "network.init_weights", as_path),
    ("unet_lr", "network.unet_lr", as_float),
    ("learning_rate", "optimizer.lr", as_float),
    ("max_grad_norm", "train.max_grad_norm", as_float),
    ("lr_scheduler_num_cycles", "scheduler.num_cycles", as_int),
    ("lr_scheduler_power", "scheduler.power", as_float),
    ("reg_data_dir", "data.reg_dir", as_path),
    ("prior_loss_weight", "data.prior_loss_weight", as_float),
    ("shuffle_caption", "data.shuffle_tags", as_bool),
    ("keep_tokens", "data.keep_tokens", as_int),
    ("flip_aug", "data.flip_aug", as_bool),
    ("color_aug", "data.color_aug", as_bool),
    ("random_crop", "data.random_crop", as_bool),
    ("max_data_loader_n_workers", "data.num_workers", as_int),
    ("persistent_data_loader_workers", "data.persistent_workers", as_bool),
    ("enable_bucket", "bucket.enabled", as_bool),
    ("min_bucket_reso", "bucket.min_side", as_int),
    ("max_bucket_reso", "bucket.max_side", as_int),
    ("bucket_reso_steps", "bucket.step", as_int),
    ("bucket_no_upscale", "bucket.no_upscale", as_bool),
    ("train_batch_size", "train.batch_size", as_int),
    ("gradient_accumulation_steps", "train.grad_accum_steps", as_int),
    ("seed", "train.seed", as_int),
    ("noise_offset", "train.noise_offset", as_float),
    ("min_snr_gamma", "train.min_snr_gamma", as_float),
    ("save_every_n_epochs", "train.save_every_n_epochs", as_int),
    ("save_every_n_steps", "train.save_every_n_steps", as_int),
    ("save_state", "train.save_state", as_bool),
    ("output_dir", "output.dir", as_path),
    ("output_name", "output.name", as_path),
    ("training_comment", "output.comment", as_str),
    ("caption_dropout_rate", "dropout.caption_rate", as_float),
    ("caption_dropout_every_n_epochs", "dropout.caption_every_n_epochs", as_int),
    ("caption_tag_dropout_rate", "dropout.tag_rate", as_float),
    ("sample_every_n_steps", "eval.every_n_steps", as_int),
):
    simple(_key, _target, _convert)


@rule("pretrained_model_name_or_path")
def _base_model(m: _Mapper, taken: dict[str, Option]) -> None:
    option = taken["pretrained_model_name_or_path"]
    path = as_path(option.value)
    m.choose("model", "diffusers", option, "a real model instead of the built-in tiny one")
    note = ""
    if path.lower().endswith((".ckpt", ".pt", ".bin")):
        note = "a pickle checkpoint: convert it to .safetensors or a diffusers folder (model.path accepts those)"
    elif path.lower().endswith(".safetensors"):
        note = "a single-file checkpoint: to load it offline also set model.config_dir (see conf/model/diffusers.yaml)"
    m.set("model.path", path, option, note)


@rule("v2")
def _v2(m: _Mapper, taken: dict[str, Option]) -> None:
    option = taken["v2"]
    m.set("model.kind", "sd2" if as_bool(option.value) else "sd1", option)


@rule("v_parameterization")
def _v_parameterization(m: _Mapper, taken: dict[str, Option]) -> None:
    option = taken["v_parameterization"]
    if isinstance(option.value, str) and option.value.lower() not in ("true", "false"):
        raise Unfit("v_parameterization is a switch (velocity loss target), not a normalisation choice")
    v = as_bool(option.value)
    m.set("model.prediction_type", "v_prediction" if v else "epsilon", option, "" if v else "kohya's loss target")


@rule("clip_skip")
def _clip_skip(m: _Mapper, taken: dict[str, Option]) -> None:
    option = taken["clip_skip"]
    if isinstance(option.value, bool):
        raise Unfit("clip_skip is a number of layers (1 = last, 2 = penultimate), not true/false")
    m.set("model.clip_skip", as_int(option.value), option)


@rule("max_token_length")
def _max_token_length(m: _Mapper, taken: dict[str, Option]) -> None:
    option = taken["max_token_length"]
    length = as_int(option.value)
    if length not in (75, 150, 225):
        raise Unfit(f"max_token_length must be 75, 150 or 225 (got {length})")
    m.set("data.max_token_length", length, option)


@rule("xformers", "sdpa", "mem_eff_attn")
def _attention(m: _Mapper, taken: dict[str, Option]) -> None:
    for name, kernel in (("xformers", "xformers"), ("sdpa", "sdpa")):
        if name in taken:
            option = taken[name]
            if isinstance(option.value, list):
                raise Unfit("xformers is the attention kernel switch (true/false), not a list of transforms")
            if as_bool(option.value):
                m.set(
                    "model.attention",
                    kernel,
                    option,
                    "xformers only if installed on CUDA" if kernel == "xformers" else "",
                )
            else:
                m.nothing(option, "off: the default attention (torch SDPA) computes the same")
    if "mem_eff_attn" in taken:
        option = taken["mem_eff_attn"]
        if as_bool(option.value):
            m.set("model.attention", "sdpa", option, "kohya's memory-efficient attention; torch SDPA does this")
        else:
            m.nothing(option, "off: nothing to set")


@rule("mixed_precision", "full_fp16", "full_bf16")
def _mixed_precision(m: _Mapper, taken: dict[str, Option]) -> None:
    for name in ("full_fp16", "full_bf16"):
        if name in taken:
            option = taken[name]
            if as_bool(option.value):
                m.unmapped(option, NO_EQUIVALENT[name])
            else:
                m.nothing(option, "off: nothing to set")
    if "mixed_precision" in taken:
        option = taken["mixed_precision"]
        value = option.value
        if isinstance(value, bool):
            raise Unfit("mixed_precision names a dtype (no, fp16, bf16), not true/false")
        choice = {"no": "fp32", "fp32": "fp32", "float": "fp32", "fp16": "fp16", "bf16": "bf16"}.get(str(value).lower())
        if choice is None:
            raise Unfit(f"unknown mixed_precision {value!r}; use no, fp16 or bf16")
        m.choose("precision", choice, option)


@rule("save_precision")
def _save_precision(m: _Mapper, taken: dict[str, Option]) -> None:
    option = taken["save_precision"]
    value = {"float": "fp32", "fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}.get(str(option.value).lower())
    if value is None:
        raise Unfit(f"save_precision is a dtype (float, fp16, bf16), got {option.value!r}")
    m.set("output.precision", value, option)


@rule("save_model_as")
def _save_model_as(m: _Mapper, taken: dict[str, Option]) -> None:
    option = taken["save_model_as"]
    value = str(option.value).lower()
    if value == "safetensors":
        m.set("output.format", "safetensors", option)
    elif value in ("ckpt", "pt", "bin"):
        m.unmapped(
            option,
            "pickle files can run code when loaded, so the importer keeps safetensors; to really write one, "
            f"set output.format={value} output.allow_pickle=true",
        )
    else:
        raise Unfit(f"{option.value!r}: only a single LoRA file is written (safetensors, or pickle with opt-in)")


@rule("no_metadata")
def _no_metadata(m: _Mapper, taken: dict[str, Option]) -> None:
    option = taken["no_metadata"]
    m.set("output.metadata", not as_bool(option.value), option, "no_metadata inverted")


@rule("network_module")
def _network_module(m: _Mapper, taken: dict[str, Option]) -> None:
    option = taken["network_module"]
    if not str(option.value).endswith("networks.lora"):
        raise Unfit(f"only plain LoRA (networks.lora) is trained here, not {option.value!r} (LyCORIS etc.)")
    m.nothing(option, "LoRA: the only network here")


@rule("network_alpha", always=True)
def _network_alpha(m: _Mapper, taken: dict[str, Option]) -> None:
    if "network_alpha" in taken:
        option = taken["network_alpha"]
        m.set("network.alpha", as_float(option.value), option)
    else:
        m.set("network.alpha", 1.0, "(network_alpha absent)", "kohya's default alpha is 1 (ours would be alpha = dim)")


@rule("network_args")
def _network_args(m: _Mapper, taken: dict[str, Option]) -> None:
    option = taken["network_args"]
    for key, value in _key_values(option.value):
        reason = {
            "conv_dim": "LoRA on conv layers (LoCon) is not offered; unet_targets name linear layers",
            "conv_alpha": "LoRA on conv layers (LoCon) is not offered",
            "dropout": "use network.dropout (dropout on the rank activations)",
            "rank_dropout": "no rank dropout; network.dropout is kohya's network_dropout",
            "module_dropout": "no module dropout",
            "algo": "only plain LoRA is trained here",
        }.get(key, "network arguments of other network modules are not offered")
        m.result.unmapped.append(NotMapped(f"{option.label}.{key}", value, reason))


@rule("network_train_unet_only", "network_train_text_encoder_only", "text_encoder_lr", always=True)
def _parts(m: _Mapper, taken: dict[str, Option]) -> None:
    unet_only, te_only = taken.get("network_train_unet_only"), taken.get("network_train_text_encoder_only")
    if unet_only is not None and as_bool(unet_only.value):
        m.set("network.train_text_encoder", False, unet_only)
    elif te_only is None or not as_bool(te_only.value):
        m.set(
            "network.train_text_encoder",
            True,
            unet_only or "(network_train_unet_only absent)",
            "kohya trains the text-encoder LoRA too unless network_train_unet_only",
        )
    if te_only is not None:
        if as_bool(te_only.value):
            m.set("network.train_unet", False, te_only)
            m.set("network.train_text_encoder", True, te_only)
        else:
            m.nothing(te_only, "off: nothing to set")
    if "text_encoder_lr" in taken:
        option = taken["text_encoder_lr"]
        if isinstance(option.value, list) and len(option.value) > 1:
            m.unmapped(option, "one learning rate per text encoder (SDXL); SD1/SD2 have one text encoder")
        else:
            try:
                m.set("network.text_encoder_lr", as_float(option.value), option)
            except Unfit as unfit:
                m.unmapped(option, str(unfit))


OPTIMIZERS = {
    "adamw": "adamw",
    "torch.optim.adamw": "adamw",
    "adamw8bit": "adamw8bit",
    "bitsandbytes.optim.adamw8bit": "adamw8bit",
    "lion": "lion",
    "lion_pytorch.lion": "lion",
    "sgdnesterov": "sgd",
    "sgd": "sgd",
    "torch.optim.sgd": "sgd",
    "adafactor": "adafactor",
    "transformers.optimization.adafactor": "adafactor",
    "prodigy": "prodigy",
    "prodigyopt.prodigy": "prodigy",
}


@rule("optimizer_type", "use_8bit_adam", "use_lion_optimizer")
def _optimizer(m: _Mapper, taken: dict[str, Option]) -> None:
    chosen: tuple[str, Option] | None = None
    for name, ours in (("use_8bit_adam", "adamw8bit"), ("use_lion_optimizer", "lion")):
        if name in taken:
            if as_bool(taken[name].value):
                chosen = (ours, taken[name])
            else:
                m.nothing(taken[name], "off: nothing to set")
    if "optimizer_type" in taken:
        option = taken["optimizer_type"]
        ours = OPTIMIZERS.get(str(option.value).strip().lower())
        if ours is None:
            m.unmapped(
                option,
                f"optimizer {option.value!r} is not offered; optimizer=adamw|adamw8bit|lion|sgd|adafactor|prodigy",
            )
        elif chosen is not None:
            m.unmapped(chosen[1], f"superseded by {option.label}={option.value!r} (sd-scripts gives it precedence)")
            chosen = (ours, option)
        else:
            chosen = (ours, option)
    if chosen is None:
        return
    ours, option = chosen
    try:
        m.choose("optimizer", ours, option)
    except Unfit as unfit:
        m.unmapped(option, str(unfit))
        return
    if str(option.value).strip().lower() == "sgdnesterov":
        m.set("optimizer.nesterov", True, option, "SGDNesterov = SGD with Nesterov momentum")


@rule("optimizer_args")
def _optimizer_args(m: _Mapper, taken: dict[str, Option]) -> None:
    option = taken["optimizer_args"]
    for key, value in _key_values(option.value):
        label = f"{option.label}.{key}"
        try:
            if key == "betas":
                parts = value if isinstance(value, list) else str(value).strip("()[] ").split(",")
                m.set("optimizer.betas", [float(p) for p in parts], label)
            elif key in ("weight_decay", "eps", "momentum", "d_coef"):
                m.set(f"optimizer.{key}", as_float(value), label)
            elif key == "nesterov":
                m.set("optimizer.nesterov", as_bool(value), label)
            else:
                m.result.unmapped.append(NotMapped(label, value, "no such setting in our optimizer options"))
        except (Unfit, ValueError) as error:
            m.result.unmapped.append(NotMapped(label, value, str(error)))


SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


@rule("lr_scheduler")
def _scheduler(m: _Mapper, taken: dict[str, Option]) -> None:
    option = taken["lr_scheduler"]
    name = str(option.value).strip().lower()
    if name not in SCHEDULERS:
        raise Unfit(f"schedule {option.value!r} is not offered; scheduler={'|'.join(SCHEDULERS)}|plateau")
    m.choose("scheduler", name, option)


@rule("lr_warmup_steps", "lr_warmup_ratio")
def _warmup(m: _Mapper, taken: dict[str, Option]) -> None:
    if "lr_warmup_ratio" in taken:
        option = taken["lr_warmup_ratio"]
        ratio = as_float(option.value)
        if not 0 <= ratio < 1:
            m.unmapped(option, f"a warm-up ratio must be in [0, 1) (got {ratio})")
        else:
            m.set("scheduler.warmup_steps", ratio, option, "a value < 1 is a fraction of the total steps")
            if "lr_warmup_steps" in taken:
                m.unmapped(taken.pop("lr_warmup_steps"), f"superseded by {option.label}")
    if "lr_warmup_steps" in taken:
        option = taken["lr_warmup_steps"]
        m.set("scheduler.warmup_steps", as_float(option.value), option)


@rule("resolution")
def _resolution(m: _Mapper, taken: dict[str, Option]) -> None:
    option = taken["resolution"]
    value = option.value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        sides = [as_int(value)]
    elif isinstance(value, (list, tuple)):
        sides = [as_int(v) for v in value]
    else:
        sides = [as_int(p) for p in re.split(r"[,x× ]+", str(value).strip()) if p]
    if not sides or len(sides) > 2:
        raise Unfit(f"expected a side or width,height, got {value!r}")
    if len(set(sides)) > 1:
        side = round(math.sqrt(sides[0] * sides[1]) / 64) * 64
        raise Unfit(
            f"non-square {sides[0]}x{sides[1]}: bucket.resolution is one side (area cap side²); "
            f"e.g. bucket.resolution={side} bucket.enabled=true"
        )
    m.set("bucket.resolution", sides[0], option)


@rule("max_train_steps", "max_train_epochs", always=True)
def _length(m: _Mapper, taken: dict[str, Option]) -> None:
    steps, epochs = taken.get("max_train_steps"), taken.get("max_train_epochs")
    if epochs is not None:
        m.set("train.epochs", as_int(epochs.value), epochs)
        m.set("train.max_steps", None, epochs, "sd-scripts: max_train_epochs overrides max_train_steps")
        if steps is not None:
            m.unmapped(steps, f"sd-scripts ignores it when {epochs.label} is set")
    elif steps is not None:
        m.set("train.max_steps", as_int(steps.value), steps)
    else:
        m.set("train.max_steps", 1600, "(max_train_steps absent)", "sd-scripts' default length")


@rule("min_timestep", "max_timestep")
def _timesteps(m: _Mapper, taken: dict[str, Option]) -> None:
    low = as_int(taken["min_timestep"].value) if "min_timestep" in taken else 0
    high = as_int(taken["max_timestep"].value) if "max_timestep" in taken else 1000
    for option in taken.values():
        m.set("train.timestep_range", [low, high], option, "[min, max) raw timesteps")


@rule("cache_latents", "cache_latents_to_disk")
def _cache(m: _Mapper, taken: dict[str, Option]) -> None:
    memory = "cache_latents" in taken and as_bool(taken["cache_latents"].value)
    disk = "cache_latents_to_disk" in taken and as_bool(taken["cache_latents_to_disk"].value)
    mode = "disk" if disk else "memory" if memory else "none"
    for option in taken.values():
        m.set("data.cache_latents", mode, option)


@rule("train_data_dir", "caption_extension", always=True)
def _data_dir(m: _Mapper, taken: dict[str, Option]) -> None:
    if "train_data_dir" in taken:
        option = taken["train_data_dir"]
        m.set("data.train_dir", as_path(option.value), option)
    if "caption_extension" in taken:
        option = taken["caption_extension"]
        value = as_extension(option.value)
        m.set("data.caption_extension", value, option, "" if value == option.value else "a leading dot added")
    elif "train_data_dir" in taken:
        m.set(
            "data.caption_extension",
            ".caption",
            "(caption_extension absent)",
            "sd-scripts' default caption extension is .caption",
        )


@rule("resume", "load_previous_save_state")
def _resume(m: _Mapper, taken: dict[str, Option]) -> None:
    for option in taken.values():
        if isinstance(option.value, bool):
            if option.value:
                m.unmapped(option, "give the saved state folder: train.resume=<folder>")
            else:
                m.nothing(option, "off: nothing to set")
        else:
            m.set("train.resume", as_path(option.value), option)


@rule("sample_sampler")
def _sampler(m: _Mapper, taken: dict[str, Option]) -> None:
    option = taken["sample_sampler"]
    name = str(option.value).lower()
    ours = {"ddim": "ddim", "euler": "euler", "k_euler": "euler", "dpmsolver++": "dpm++", "dpm++": "dpm++"}
    ours |= {"ddpm": "ddpm"}
    if name not in ours:
        raise Unfit(f"sampler {option.value!r} is not offered; eval.sampler=ddim|euler|dpm++|ddpm")
    m.set("eval.sampler", ours[name], option)


@rule("tag_occurrence_txt_file", "sort_tag_occurrence_alphabetically")
def _tag_stats(m: _Mapper, taken: dict[str, Option]) -> None:
    wanted = "tag_occurrence_txt_file" in taken and as_bool(taken["tag_occurrence_txt_file"].value)
    alpha = "sort_tag_occurrence_alphabetically" in taken and as_bool(taken["sort_tag_occurrence_alphabetically"].value)
    for option in taken.values():
        if wanted:
            m.set("data.tag_stats", "alpha" if alpha else "count", option)
        else:
            m.nothing(option, "no tag table asked for")


# --- writing


def import_config(path: str | Path, conf_dir: str | Path = CONF_DIR) -> ImportResult:
    """Read and map one config file (``UnreadableConfig`` if it cannot be read); writes nothing."""
    path = Path(path)
    kind, data = read_source(path)
    easy = bool(LORA_EASY_MARKERS & set(data))
    label = {
        ("toml", False): "kohya sd-scripts TOML",
        ("toml", True): "LoRA_Easy_Training_Scripts TOML",
        ("json", True): "LoRA_Easy_Training_Scripts JSON",
        ("json", False): "JSON with sd-scripts option names",
    }[(kind, easy)]
    result = ImportResult(source=path, kind=label)
    collector = _Collector(result, path.parent)
    collector.walk(data)
    _Mapper(result, collector.options, Path(conf_dir)).run()
    return result


def write_experiment(result: ImportResult, name: str, out_dir: str | Path = DEFAULT_OUT) -> Path:
    """Write ``<out_dir>/<name>.yaml`` under a temporary name, then rename it into place."""
    return write_text_atomically(Path(out_dir) / f"{name}.yaml", result.yaml(name))


def experiment_name(path: str | Path) -> str:
    """A Hydra-friendly option name from a file name: letters, digits, ``_`` and ``-``."""
    return _safe_name(Path(path).stem)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "imported"


def yaml_value(value: Any) -> str:
    """One YAML flow value that OmegaConf reads back as the same value (floats keep a dot, ``${`` escaped)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return {math.inf: ".inf", -math.inf: "-.inf"}.get(value, ".nan")
        text = repr(value)
        mantissa, e, exponent = text.partition("e")
        if e and "." not in mantissa:
            text = f"{mantissa}.0e{exponent}"
        return text
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    # OmegaConf would resolve "${...}": escape it as \${, doubling any backslashes right before it
    text = re.sub(r"(\\*)\$\{", lambda found: found.group(1) * 2 + "\\${", str(value))
    return json.dumps(text, ensure_ascii=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sweeper.import_kohya",
        description="Turn a kohya sd-scripts TOML or LoRA_Easy_Training_Scripts JSON into a Hydra experiment file.",
    )
    parser.add_argument("config", help="the kohya .toml or LoRA_Easy .json file")
    parser.add_argument("--name", help="experiment name (default: the file name)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder to write <name>.yaml in (conf/experiment)")
    parser.add_argument("--conf-dir", default=str(CONF_DIR), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        result = import_config(args.config, args.conf_dir)
    except UnreadableConfig as error:
        print(f"cannot import: {error}", file=sys.stderr)
        return 2
    name = experiment_name(args.config) if args.name is None else _safe_name(args.name)
    written = write_experiment(result, name, args.out)
    print(result.report(written, name))
    return 0


# --- small helpers


def _key_values(value: Any) -> list[tuple[str, Any]]:
    """kohya's ``["weight_decay=0.1", "betas=0.9,0.99"]`` or LoRA_Easy's ``{"weight_decay": "0.1"}``."""
    if isinstance(value, dict):
        return list(value.items())
    items = value if isinstance(value, list) else str(value).split()
    pairs = []
    for item in items:
        key, _, val = str(item).partition("=")
        pairs.append((key.strip(), val.strip()))
    return pairs


_SECRET = re.compile(r"(api_key|secret|password|(^|_)token)$", re.IGNORECASE)


def _show(label: str, value: Any) -> str:
    """A value for the report; credentials (``wandb_api_key``, ``hf_token``) are never printed."""
    if _SECRET.search(re.split(r"[.:\]]", label)[-1] or label):
        return "***"
    return json.dumps(value, ensure_ascii=False)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


if __name__ == "__main__":
    sys.exit(main())
