"""The importer's tables: option names to rename, options with nothing to map to (and why), choices."""

from __future__ import annotations

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
    "warmup_ratio": "lr_warmup_ratio",  # LoRA_Easy's TOML: it turns the ratio into lr_warmup_steps
    "epoch": "max_train_epochs",
    "max_resolution": "resolution",
    "optimizer": "optimizer_type",
    "tag_occurrence": "tag_occurrence_txt_file",  # LoRA_Easy's TOML (saving_args): a tag table by count
    "sdxl_no_half_vae": "no_half_vae",  # the kohya_ss GUI's; it passes them on for SDXL only
    "sdxl_cache_text_encoder_outputs": "cache_text_encoder_outputs",
}
# The kohya_ss GUI's names above that it passes on to sd-scripts only when training SDXL
SDXL_ONLY_ALIASES = {"sdxl_no_half_vae", "sdxl_cache_text_encoder_outputs"}
LORA_EASY_MARKERS = {"base_model", "img_folder", "net_dim", "output_folder", "train_resolution", "general_args"}
VALUE_TABLES = {"optimizer_args", "network_args", "lr_scheduler_args"}  # tables that are one option's value
# LoRA_Easy's TOML: one table per UI section, holding `args` (sd-scripts' config file) and/or
# `dataset_args` (its dataset config); [optimizer_args.args] is a section, while
# [optimizer_args.args.optimizer_args] is the value of sd-scripts' optimizer_args.
SECTION_PARTS = {"args", "dataset_args"}

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
    "save_toml": "every run stores its resolved config (.hydra/ and the MLflow artifact config/resolved.yaml)",
    "save_toml_location": "every run stores its resolved config (.hydra/ and the MLflow artifact config/resolved.yaml)",
    "load_json_path": "this import is the way in; afterwards reuse a run's config with --config-dir/--config-name",
    "json_load_skip_list": "command-line overrides always win over the experiment file",
    "save_json_only": "print the composed config without training: python -m sweeper +experiment=NAME --cfg job",
    "multi_run_folder": "sweeps go to hydra.sweep.dir; pass hydra.sweep.dir=... on the command line",
    "tag_file_location": "the tag table is the run's MLflow artifact data/tag_frequency.tsv",
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
    "lr_scheduler_args": "custom scheduler arguments are not offered",
    "lr_scheduler_min_lr_ratio": "no minimum-lr floor for the schedules",
    "class_tokens": "give each folder's class tokens in its data.subsets entry (class_tokens)",
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
    "fp8_base": "no fp8 storage of the base model (memory); precision.fp8_matmul multiplies in fp8 for speed",
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
    "in_json": "fine-tuning metadata JSON datasets are not read; use caption files",
    "persistent_workers_count": "data.persistent_workers is a switch",
    "stop_text_encoder_training": "no step to stop text-encoder training at",
    "training_comment_file": "put the comment in output.comment",
    "fa": "LoRA-FA (a frozen lora_down) is not offered; plain LoRA is trained",
    "alpha_mask": "no alpha-channel loss masks; transparent pixels are composited onto white",
    # sd-scripts' SDXL scripts (sdxl_train_network.py, and sdxl_train.py's full fine-tuning)
    "disable_mmap_load_safetensors": "safetensors load memory-mapped as usual; the switch only speeds loading (WSL)",
    "fused_backward_pass": "no fused backward pass: the optimizer steps once after the backward pass (more memory)",
    "fused_optimizer_groups": "no fused optimizer groups: the optimizer steps after the backward pass (more memory)",
    "train_text_encoder": (
        "sdxl_train.py's full fine-tuning switch, which LoRA training ignores: the text-encoder LoRA trains "
        "unless network_train_unet_only (network.train_text_encoder)"
    ),
    "learning_rate_te1": "sdxl_train.py's full fine-tuning rate, which LoRA training ignores: give text_encoder_lr",
    "learning_rate_te2": "sdxl_train.py's full fine-tuning rate, which LoRA training ignores: give text_encoder_lr",
    "block_lr": "no per-block learning rates (sdxl_train.py's full fine-tuning)",
}

# sd3_train_network.py / flux_train_network.py options with nothing to map to, and why
NO_EQUIVALENT |= {
    "clip_l": "separate component files are not read: give a diffusers SD3/FLUX.1 folder as model.path or config_dir",
    "clip_g": "separate component files are not read: give a diffusers SD3 folder as model.path or config_dir",
    "t5xxl": "separate component files are not read: give a diffusers SD3/FLUX.1 folder (model.t5 switches T5)",
    "ae": "separate component files are not read: give a diffusers FLUX.1 folder as model.config_dir",
    "apply_t5_attn_mask": "T5's padding is attended, as the diffusers pipelines do",
    "fp8_base": "no fp8 storage of the base model (memory); precision.fp8_matmul multiplies in fp8 for speed",
    "fp8_base_unet": "no fp8 storage of the base model (memory); precision.fp8_matmul multiplies in fp8 for speed",
    "blocks_to_swap": "no block swapping to the CPU; model.gradient_checkpointing saves memory",
    "cpu_offload_checkpointing": "no CPU offload of checkpoints",
    "split_mode": "no split mode",
    "t5xxl_device": "T5 runs on the training device",
    "t5xxl_dtype": "T5 runs in the training precision (fp32 under fp16)",
    "enable_scaled_pos_embed": "the transformer's own position embedding is used",
    "disable_mmap_load_safetensors": "weights load through diffusers",
}

# Optimizer names (sd-scripts' optimizer_type, lowercased) -> our optimizer option
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
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
# LoRA_Easy's own schedules (lr_scheduler_type): the closest of ours, for the report
CUSTOM_SCHEDULERS = {
    "cosineannealingwarmuprestarts": "cosine_with_restarts with scheduler.num_cycles (no decaying peaks or min_lr)",
    "rex": "no REX schedule; linear or polynomial decay is the closest",
}

# network_args keys of other network modules, and why each is not mapped
NETWORK_ARGS = {
    "conv_dim": "the conv layers' rank: network.conv_dim with network.type=locon/loha/lokr/dora",
    "conv_alpha": "the conv layers' alpha: network.conv_alpha with network.type=locon/loha/lokr/dora",
    "dropout": "use network.dropout (dropout on the rank activations)",
    "rank_dropout": "no rank dropout; network.dropout is kohya's network_dropout",
    "module_dropout": "no module dropout",
    "algo": 'read with network_module = "lycoris.kohya" (lora/locon/loha/lokr: network.type)',
    "dora_wd": 'read with network_module = "lycoris.kohya" (network.type=dora)',
    "factor": "LoKr's factor: network.lokr_factor with network.type=lokr",
    "decompose_both": "LoKr's option: network.decompose_both with network.type=lokr",
    "preset": "LyCORIS presets are not offered; network.unet_targets names the layers",
    "unit": "DyLoRA is not offered",
    "use_tucker": "LyCORIS Tucker decomposition is not offered",
    "train_norm": "no norm-layer training",
    "rescaled": "LyCORIS rescaling is not offered",
    "constrain": "LyCORIS constraints are not offered",
    "down_lr_weight": "no per-block learning-rate weights",
    "mid_lr_weight": "no per-block learning-rate weights",
    "up_lr_weight": "no per-block learning-rate weights",
    "block_lr_zero_threshold": "no per-block learning-rate weights",
    "block_dims": "one rank for every layer (network.dim)",
    "block_alphas": "one alpha for every layer (network.alpha)",
    "conv_block_dims": "one conv rank for every conv layer (network.conv_dim)",
    "conv_block_alphas": "one conv alpha for every conv layer (network.conv_alpha)",
    "split_qkv": "q, k and v always have LoRAs of their own; the file stores them as kohya's fused qkv either way",
    "train_blocks": "network.unet_targets names the layers (e.g. single_transformer_blocks modules)",
    "train_t5xxl": "T5 never gets a LoRA here; network.train_text_encoder trains the CLIP encoders",
    "in_dims": "no LoRA on the input embedders",
    "emb_dims": "no LoRA on the embedders",
    "train_double_block_indices": "no per-block selection; one rank for every layer",
    "train_single_block_indices": "no per-block selection; one rank for every layer",
}

# Dataset-config subset options: those a data.subsets entry holds per folder, and sd-scripts'
# defaults of the others (all folders share one value here)
FOLDER_KEYS = ("image_dir", "num_repeats", "caption_extension", "keep_tokens", "class_tokens", "is_reg", "name")
SUBSET_DEFAULTS = {
    "shuffle_caption": False,
    "flip_aug": False,
    "color_aug": False,
    "random_crop": False,
    "caption_dropout_rate": 0.0,
    "caption_dropout_every_n_epochs": 0,
    "caption_tag_dropout_rate": 0.0,
}
