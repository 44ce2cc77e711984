"""The metadata of a LoRA file as the tools users load it with read it.

Three families of keys, in the formats kohya sd-scripts writes them (``train_network.py``,
``library/sai_model_spec.py``), since every UI parses those:

- ``ss_*``: the training settings. A1111/Forge classify the LoRA by ``ss_base_model_version``
  (``sdxl_*``) and ``ss_v2`` (``"True"`` = SD2; otherwise any metadata = SD1) and show
  ``ss_sd_model_name``, ``ss_resolution``, ``ss_bucket_info``, ``ss_dataset_dirs``,
  ``ss_tag_frequency``, ``ss_training_started_at``, ... Values are ``str()`` of Python values as kohya
  writes them (``"True"``, ``"None"``, ``"(512, 512)"``), JSON for the structured ones.
- ``modelspec.*``: the Stability AI model spec (Forge files a LoRA without it as "Unknown").
- ``sshs_model_hash`` / ``sshs_legacy_hash``: kohya's precomputed hashes, which UIs use instead of
  hashing the whole file (computed when the file is written, ``training.network.file``).

Plus our own: ``lora_sweeper_config`` (the resolved training config), ``lora_sweeper_config_sha256``
and ``lora_sweeper_run_id``, so a LoRA file found on disk leads back to its MLflow run.

``output.metadata=false`` keeps ``MINIMAL_METADATA_KEYS`` (kohya's ``--no_metadata`` set) plus
every ``modelspec.*`` key and the hashes, as kohya does, and the run id and config hash.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from training.families.embedded import embedded_model_note

# kohya's SS_METADATA_MINIMUM_KEYS: what loaders need to rebuild the network and classify the model.
MINIMAL_METADATA_KEYS = (
    "ss_v2",
    "ss_base_model_version",
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_args",
)
MODELSPEC_PREFIX = "modelspec."
HASH_KEYS = ("sshs_model_hash", "sshs_legacy_hash")
RUN_ID_KEY = "lora_sweeper_run_id"
CONFIG_KEY = "lora_sweeper_config"
CONFIG_HASH_KEY = "lora_sweeper_config_sha256"
IDENTITY_KEYS = (RUN_ID_KEY, CONFIG_HASH_KEY)  # kept with output.metadata=false
# Keys that differ between a run and its exact reproduction: when and by which run it was written.
VOLATILE_METADATA_KEYS = (
    "ss_session_id",
    "ss_training_started_at",
    "ss_training_finished_at",
    "modelspec.date",
    RUN_ID_KEY,
)
MODELSPEC_VERSION = "1.0.0"
# The optimizer arguments shown in ss_optimizer, as kohya shows the ones it was given.
OPTIMIZER_ARGS = ("betas", "weight_decay", "eps", "momentum", "nesterov", "d_coef")


def config_sha256(training_config: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of the training config: equal configs, equal hash."""
    return hashlib.sha256(json.dumps(training_config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass
class DatasetSummary:
    """What the metadata says about the data: kohya's per-folder counts, tags and buckets."""

    train_dirs: dict[str, dict[str, int]] = field(default_factory=dict)  # {folder: {n_repeats, img_count}}
    reg_dirs: dict[str, dict[str, int]] = field(default_factory=dict)
    num_train_images: int = 0  # images x repeats, as kohya counts them
    num_reg_images: int = 0
    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)
    buckets: dict[tuple[int, int], int] = field(default_factory=dict)  # (width, height) -> samples per epoch
    mean_aspect_error: float = 0.0


def summarize_dataset(
    records: Iterable[Any],
    record_buckets: Iterable[tuple[int, int]],
    image_sizes: Iterable[tuple[int, int]],
    tag_frequency: Mapping[str, Mapping[str, int]],
) -> DatasetSummary:
    """Count images per folder (kohya keys them by the folder's name), samples per bucket, and the
    mean |image aspect - bucket aspect| (kohya's ``mean_img_ar_error``)."""
    summary = DatasetSummary(tag_frequency={k: dict(v) for k, v in tag_frequency.items()})
    errors = []
    for record, bucket, (width, height) in zip(records, record_buckets, image_sizes, strict=True):
        dirs = summary.reg_dirs if record.is_reg else summary.train_dirs
        entry = dirs.setdefault(Path(record.path).parent.name, {"n_repeats": record.repeats, "img_count": 0})
        entry["img_count"] += 1
        if record.is_reg:
            summary.num_reg_images += record.repeats
        else:
            summary.num_train_images += record.repeats
        summary.buckets[bucket] = summary.buckets.get(bucket, 0) + record.repeats
        errors.append(abs(width / height - bucket[0] / bucket[1]))
    summary.mean_aspect_error = sum(errors) / len(errors) if errors else 0.0
    return summary


def bucket_info(summary: DatasetSummary) -> str:
    """kohya's ``ss_bucket_info``: ``{"buckets": {"0": {"resolution": [w, h], "count": n}}, "mean_img_ar_error": e}``.

    Counts are samples per epoch (images x repeats); buckets off is one bucket at the resolution.
    """
    buckets = {
        str(i): {"resolution": [width, height], "count": count}
        for i, ((width, height), count) in enumerate(sorted(summary.buckets.items()))
    }
    return json.dumps({"buckets": buckets, "mean_img_ar_error": summary.mean_aspect_error})


def optimizer_name(optimizer: Any) -> str:
    """kohya's ``ss_optimizer``: the class's full name, with the arguments it was given."""
    cls = type(optimizer)
    defaults = getattr(optimizer, "defaults", {})
    args = ",".join(f"{k}={defaults[k]}" for k in OPTIMIZER_ARGS if k in defaults)
    return f"{cls.__module__}.{cls.__name__}" + (f"({args})" if args else "")


def modelspec(
    *,
    architecture: str,
    prediction_type: str | None,
    title: str,
    resolution: int,
    clip_skip: int,
    timestep_range: tuple[int, int] | None,
    description: str | None = None,
) -> dict[str, str]:
    """The SAI model spec keys kohya writes for a LoRA of an ``architecture`` base model (the family's
    name, e.g. ``stable-diffusion-xl-v1-base``); ``modelspec.date`` is local time. ``description``
    (``modelspec.description``) marks a LoRA of an embedded test or toy model as such."""
    spec = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": datetime.fromtimestamp(int(time.time())).isoformat(),
    }
    if prediction_type is not None:  # epsilon or v; none for flow-matching models, as kohya writes them
        spec["modelspec.prediction_type"] = prediction_type
    if timestep_range is not None:
        spec["modelspec.timestep_range"] = f"{timestep_range[0]},{timestep_range[1]}"
    if clip_skip > 1:
        spec["modelspec.encoder_layer"] = str(clip_skip)
    if description:
        spec["modelspec.description"] = description
    return spec


def tag_frequency_json(tag_frequency: Mapping[str, Mapping[str, int]] | str) -> str:
    """``ss_tag_frequency`` as JSON, checked to parse: UIs ``json.loads`` it unguarded."""
    if isinstance(tag_frequency, str):
        json.loads(tag_frequency)  # raises on a broken value
        return tag_frequency
    return json.dumps({folder: dict(tags) for folder, tags in tag_frequency.items()})


def minimal_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """What ``output.metadata=false`` keeps: loaders' minimum, the model spec, the hashes, the run link."""
    keep = (*MINIMAL_METADATA_KEYS, *HASH_KEYS, *IDENTITY_KEYS)
    return {k: v for k, v in metadata.items() if k in keep or k.startswith(MODELSPEC_PREFIX)}


def stable_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """The metadata without the keys that change from run to run (times, run id): a reproduction matches it."""
    return {k: v for k, v in metadata.items() if k not in VOLATILE_METADATA_KEYS}


def metadata_sha256(metadata: Mapping[str, str]) -> str:
    """sha256 of ``stable_metadata`` as canonical JSON: a reproduced LoRA has the same."""
    return config_sha256(stable_metadata(metadata))


def session_id(started_at: float, run_id: str | None) -> str:
    """kohya's ``ss_session_id`` (a random int there): derived from the run id, else from the start time."""
    source = run_id or repr(started_at)
    return str(int(hashlib.sha256(source.encode()).hexdigest()[:8], 16))


def training_metadata(
    cfg: Any,
    trainer: Any,
    base: Any,
    *,
    summary: DatasetSummary,
    epoch: int,
    started_at: float,
    run_id: str | None,
) -> dict[str, str]:
    """Every run-level key kohya writes (``ss_*`` settings, data, model spec, run link), as strings.

    ``cfg`` is the run's config, ``trainer`` the ``training.loop.Trainer`` (its dataset, optimizer,
    step count) and ``base`` the loaded ``BaseModel``; the network keys come from ``kohya_metadata``.
    """
    train, data, network, optimizer = cfg.train, cfg.data, cfg.network, cfg.optimizer
    v_prediction = getattr(base.noise_scheduler.config, "prediction_type", None) == "v_prediction"  # none: flow
    batches = len(trainer.batches)
    timestep_range = None
    if train.denoise_range is not None or train.timestep_range is not None:
        low, high = trainer.timesteps
        timestep_range = (int(low), int(high))
    location = str(base.location)
    metadata: dict[str, Any] = {
        "ss_session_id": session_id(started_at, run_id),
        "ss_training_started_at": repr(started_at),
        "ss_training_finished_at": repr(time.time()),
        **base.family.file_metadata(base),
        "ss_sd_model_name": Path(location).name if Path(location).exists() else location,
        "ss_vae_name": (Path(cfg.model.vae).name if Path(cfg.model.vae).exists() else cfg.model.vae)
        if cfg.model.vae
        else None,
        "ss_resolution": (trainer.resolution, trainer.resolution),
        "ss_clip_skip": cfg.model.clip_skip,
        "ss_max_token_length": data.max_token_length,
        "ss_learning_rate": optimizer.lr,
        "ss_unet_lr": network.unet_lr if network.unet_lr is not None else optimizer.lr,
        "ss_text_encoder_lr": (network.text_encoder_lr if network.text_encoder_lr is not None else optimizer.lr)
        if network.train_text_encoder
        else None,
        "ss_lr_scheduler": cfg.scheduler.name,
        "ss_lr_warmup_steps": cfg.scheduler.warmup_steps,
        "ss_optimizer": optimizer_name(getattr(trainer.optimizer, "optimizer", trainer.optimizer)),
        "ss_max_grad_norm": train.max_grad_norm,
        "ss_max_train_steps": trainer.total_steps,
        "ss_num_epochs": max(1, -(-trainer.total_steps * train.grad_accum_steps // max(1, batches))),
        "ss_epoch": epoch,
        "ss_num_batches_per_epoch": batches,
        "ss_batch_size_per_device": train.batch_size,
        "ss_total_batch_size": train.batch_size * train.grad_accum_steps,
        "ss_gradient_accumulation_steps": train.grad_accum_steps,
        "ss_gradient_checkpointing": bool(cfg.model.gradient_checkpointing),
        "ss_mixed_precision": trainer.accelerator.mixed_precision,
        "ss_full_fp16": False,
        "ss_network_dropout": network.dropout,
        "ss_scale_weight_norms": network.max_norm,
        "ss_noise_offset": train.noise_offset or None,
        "ss_min_snr_gamma": train.min_snr_gamma,
        "ss_num_train_images": summary.num_train_images,
        "ss_num_reg_images": summary.num_reg_images,
        "ss_num_validation_images": 0,
        "ss_prior_loss_weight": data.prior_loss_weight,
        "ss_dataset_dirs": json.dumps(summary.train_dirs),
        "ss_reg_dataset_dirs": json.dumps(summary.reg_dirs),
        "ss_tag_frequency": tag_frequency_json(summary.tag_frequency),
        "ss_bucket_info": bucket_info(summary),
        "ss_enable_bucket": bool(cfg.bucket.enabled),
        "ss_min_bucket_reso": cfg.bucket.min_side,
        "ss_max_bucket_reso": cfg.bucket.max_side,
        "ss_bucket_no_upscale": bool(cfg.bucket.no_upscale),
        "ss_cache_latents": data.cache_latents != "none",
        "ss_flip_aug": bool(data.flip_aug),
        "ss_color_aug": bool(data.color_aug),
        "ss_random_crop": bool(data.random_crop),
        "ss_shuffle_caption": bool(data.shuffle_tags),
        "ss_keep_tokens": data.keep_tokens,
        "ss_caption_dropout_rate": cfg.dropout.caption_rate,
        "ss_caption_dropout_every_n_epochs": cfg.dropout.caption_every_n_epochs,
        "ss_caption_tag_dropout_rate": cfg.dropout.tag_rate,
    }
    if run_id:
        metadata[RUN_ID_KEY] = run_id
    metadata.update(
        modelspec(
            architecture=base.family.architecture(v_prediction, base),
            prediction_type=base.family.modelspec_prediction_type(v_prediction),
            title=cfg.output.name,
            resolution=trainer.resolution,
            clip_skip=cfg.model.clip_skip,
            timestep_range=timestep_range,
            description=embedded_model_note(base.identity.get("source", ""), base.family.label),
        )
    )
    return {k: str(v) for k, v in metadata.items()}


def kohya_metadata(
    network: Any,
    *,
    output_name: str,
    base_model_version: str,
    comment: str,
    seed: int,
    steps: int,
    resolved_config: dict[str, Any],
    v2: bool = False,
    network_module: str = "networks.lora",
    network_args: Mapping[str, str] | None = None,
    tag_frequency: str | Mapping[str, Mapping[str, int]] | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The network's ``ss_*`` keys (what loaders need to rebuild it), the step, and our resolved config.

    ``network`` is a ``training.network.lora.LoraNetwork``. ``tag_frequency`` is kohya's
    ``ss_tag_frequency`` (``{dataset folder: {tag: count}}``, a dict or JSON text); ``extra`` adds
    the run-level keys of ``training_metadata``.
    """
    metadata = {
        "ss_network_module": network_module,  # networks.lora_flux / networks.lora_sd3 for those families
        "ss_network_dim": str(network.dim),
        "ss_network_alpha": f"{network.alpha:g}",
        "ss_network_args": json.dumps(dict(network_args or {})),  # LyCORIS': {"algo": "loha", "conv_dim": "4", ...}
        "ss_v2": str(bool(v2)),
        "ss_base_model_version": base_model_version,
        "ss_output_name": output_name,
        "ss_training_comment": comment or "None",
        "ss_seed": str(seed),
        "ss_steps": str(steps),
        CONFIG_KEY: json.dumps(resolved_config, sort_keys=True),
        CONFIG_HASH_KEY: config_sha256(resolved_config),
    }
    if tag_frequency is not None:
        try:
            metadata["ss_tag_frequency"] = tag_frequency_json(tag_frequency)
        except json.JSONDecodeError as error:
            raise ValueError(f"ss_tag_frequency must be a JSON string ({error})") from error
    metadata.update(extra or {})
    return metadata
