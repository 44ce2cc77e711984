"""The mapping rules: sd-scripts options (LoRA_Easy's renamed) -> our keys, with kohya's meaning.

Each rule takes the options it names; ``simple`` ones are one-to-one. Where kohya's default differs
from ours and the file leaves the option out, kohya's default is written (``always`` rules), because
the user's runs were trained that way. PARAMETERS.md is the table behind them.
"""

from __future__ import annotations

import math
import re

from sweeper.kohya_import.convert import (
    Unfit,
    as_bool,
    as_extension,
    as_float,
    as_int,
    as_path,
    as_str,
    key_values,
)
from sweeper.kohya_import.machine import writable_folder_problem
from sweeper.kohya_import.mapper import Mapper, rule, simple
from sweeper.kohya_import.result import Mapped, NotMapped, OnThisMachine, Option
from sweeper.kohya_import.tables import (
    CUSTOM_SCHEDULERS,
    NETWORK_ARGS,
    NO_EQUIVALENT,
    OPTIMIZERS,
    SCHEDULERS,
    SDXL_ONLY_ALIASES,
)
from training.network.types import NETWORK_TYPES, TYPE_OPTIONS

# sd-scripts' bucket defaults, whatever the resolution (train_util's arguments and config_util's dataset params)
KOHYA_BUCKETS = {"min_bucket_reso": 256, "max_bucket_reso": 1024, "bucket_reso_steps": 64}

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
    ("bucket_no_upscale", "bucket.no_upscale", as_bool),
    ("train_batch_size", "train.batch_size", as_int),
    ("gradient_accumulation_steps", "train.grad_accum_steps", as_int),
    ("seed", "train.seed", as_int),
    ("noise_offset", "train.noise_offset", as_float),
    ("min_snr_gamma", "train.min_snr_gamma", as_float),
    ("save_every_n_epochs", "train.save_every_n_epochs", as_int),
    ("save_every_n_steps", "train.save_every_n_steps", as_int),
    ("save_state", "train.save_state", as_bool),
    ("output_name", "output.name", as_path),
    ("training_comment", "output.comment", as_str),
    ("caption_dropout_rate", "dropout.caption_rate", as_float),
    ("caption_dropout_every_n_epochs", "dropout.caption_every_n_epochs", as_int),
    ("caption_tag_dropout_rate", "dropout.tag_rate", as_float),
    ("sample_every_n_steps", "eval.every_n_steps", as_int),
):
    simple(_key, _target, _convert)


@rule("pretrained_model_name_or_path")
def _base_model(m: Mapper, taken: dict[str, Option]) -> None:
    option = taken["pretrained_model_name_or_path"]
    path = as_path(option.value)
    m.choose("model", "diffusers", option, "a real model instead of the built-in tiny one")
    note = ""
    if path.lower().endswith((".ckpt", ".pt", ".bin")):
        note = "a pickle checkpoint: convert it to .safetensors or a diffusers folder (model.path accepts those)"
    elif path.lower().endswith(".safetensors"):
        note = "a single-file checkpoint: to load it offline also set model.config_dir (see conf/model/diffusers.yaml)"
    m.set("model.path", path, option, note)


@rule("sdxl", "v2")
def _model_kind(m: Mapper, taken: dict[str, Option]) -> None:
    """The model family. sd-scripts trains SDXL with its own script (sdxl_train_network.py), which a kohya TOML does
    not name, and SD1 by leaving v2 off: neither is written then, and model.kind=null detects the family from the
    model files. ``sdxl = true`` (LoRA_Easy, the kohya_ss GUI) or the import's ``--sdxl`` says SDXL."""
    sdxl, v2 = taken.get("sdxl"), taken.get("v2")
    xl = False
    if sdxl is not None:
        try:
            xl = as_bool(sdxl.value)
        except Unfit as unfit:
            m.unmapped(sdxl, str(unfit))
        else:
            if xl:
                m.set("model.kind", "sdxl", sdxl, "sd-scripts' sdxl_train_network.py")
            else:
                m.nothing(sdxl, "off: nothing to set")
    if v2 is None:
        return
    if not as_bool(v2.value):
        detected = "not SD2: model.kind=null detects SD1 or SDXL from the model files"
        m.nothing(v2, f"SDXL: model.kind from {sdxl.label}" if xl else detected)
    elif xl:
        m.unmapped(v2, f"sd-scripts refuses v2 with SDXL (an SD2 switch); model.kind=sdxl from {sdxl.label}")
    else:
        m.set("model.kind", "sd2", v2)


@rule("v_parameterization")
def _v_parameterization(m: Mapper, taken: dict[str, Option]) -> None:
    option = taken["v_parameterization"]
    if isinstance(option.value, str) and option.value.lower() not in ("true", "false"):
        raise Unfit("v_parameterization is a switch (velocity loss target), not a normalisation choice")
    v = as_bool(option.value)
    note = "kohya's loss target" if not v else "v-prediction SDXL models only (sd-scripts warns)" if _is_sdxl(m) else ""
    m.set("model.prediction_type", "v_prediction" if v else "epsilon", option, note)


@rule("clip_skip")
def _clip_skip(m: Mapper, taken: dict[str, Option]) -> None:
    option = taken["clip_skip"]
    if isinstance(option.value, bool):
        raise Unfit("clip_skip is a number of layers (1 = last, 2 = penultimate), not true/false")
    layers = as_int(option.value)
    if _is_sdxl(m) and layers != 1:
        raise Unfit(
            "sd-scripts ignores clip_skip when training SDXL (it only warns): those runs used SDXL's own "
            "penultimate text-encoder layers, which our default model.clip_skip=1 gives"
        )
    m.set("model.clip_skip", layers, option)


@rule("max_token_length")
def _max_token_length(m: Mapper, taken: dict[str, Option]) -> None:
    option = taken["max_token_length"]
    length = as_int(option.value)
    if length not in (75, 150, 225):
        raise Unfit(f"max_token_length must be 75, 150 or 225 (got {length})")
    m.set("data.max_token_length", length, option)


@rule("xformers", "sdpa", "mem_eff_attn")
def _attention(m: Mapper, taken: dict[str, Option]) -> None:
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
def _mixed_precision(m: Mapper, taken: dict[str, Option]) -> None:
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
def _save_precision(m: Mapper, taken: dict[str, Option]) -> None:
    option = taken["save_precision"]
    value = {"float": "fp32", "fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}.get(str(option.value).lower())
    if value is None:
        raise Unfit(f"save_precision is a dtype (float, fp16, bf16), got {option.value!r}")
    m.set("output.precision", value, option)


@rule("save_model_as")
def _save_model_as(m: Mapper, taken: dict[str, Option]) -> None:
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
def _no_metadata(m: Mapper, taken: dict[str, Option]) -> None:
    option = taken["no_metadata"]
    m.set("output.metadata", not as_bool(option.value), option, "no_metadata inverted")


# network_args that set one of our keys once the module/algo is known, and how each is read
TYPE_ARGS = {
    "conv_dim": ("network.conv_dim", as_int),
    "conv_alpha": ("network.conv_alpha", as_float),
    "factor": ("network.lokr_factor", as_int),
    "decompose_both": ("network.decompose_both", as_bool),
}
# sd-scripts' native LyCORIS-style modules (networks/loha.py, networks/lokr.py) -> network.type
KOHYA_MODULE_TYPES = {"networks.loha": "loha", "networks.lokr": "lokr"}


@rule("network_module", "network_args")
def _network(m: Mapper, taken: dict[str, Option]) -> None:
    """The network module and its arguments together (training/network/types.py): LyCORIS'
    ``lycoris.kohya`` says its type in ``network_args``' ``algo`` (``dora_wd`` makes a LoRA a DoRA,
    ``conv_dim`` a LoCon), sd-scripts' ``networks.lora`` with ``conv_dim`` is its LoCon (LoRA-C3Lier),
    ``networks.loha`` / ``networks.lokr`` its own LoHa / LoKr, and its FLUX/SD3 modules say the family."""
    module_option, args_option = taken.get("network_module"), taken.get("network_args")
    args = {str(k).lower(): v for k, v in key_values(args_option.value)} if args_option is not None else {}
    module = str(module_option.value) if module_option is not None else "networks.lora"
    network_type, used = _network_type(m, module, module_option or args_option, args, module_option is not None)
    for key, value in args.items():
        label = f"{args_option.label}.{key}"
        if key in used:
            target = "network.type" if network_type else ""
            m.result.mapped.append(Mapped(label, target, value, "read with network_module"))
        elif key in ("conv_dim", "conv_alpha") and not _conv_dim(args):
            m.nothing_for(label, value, "conv_dim 0: no conv layers (network.conv_dim=null)")
        elif key in TYPE_ARGS and network_type in TYPE_OPTIONS[TYPE_ARGS[key][0].split(".")[1]]:
            target, convert = TYPE_ARGS[key]
            try:
                m.set(target, convert(value), label, f"network.type={network_type}")
            except Unfit as unfit:
                m.result.unmapped.append(NotMapped(label, value, str(unfit)))
        else:
            reason = NETWORK_ARGS.get(key, "network arguments of other network modules are not offered")
            if key in TYPE_ARGS:
                reason = f"not an option of network.type={network_type or 'lora'}"
            m.result.unmapped.append(NotMapped(label, value, reason))


def _conv_dim(args: dict) -> int:
    """network_args' conv_dim (0 or absent: no conv layers, LyCORIS' and kohya's default)."""
    try:
        return int(float(args.get("conv_dim", 0) or 0))
    except ValueError:
        return 0


def _network_type(m: Mapper, module: str, option: Option, args: dict, given: bool) -> tuple[str | None, set[str]]:
    """Set network.type (and the family of a FLUX/SD3 module); the type and the args that said it.
    ``given``: the file names its network_module (else kohya's default, networks.lora)."""
    if module.endswith(("networks.lora_flux", "networks.lora_sd3")):  # sd-scripts' FLUX.1 / SD3 LoRA
        m.set("model.kind", "flux" if module.endswith("flux") else "sd3", option, "its family's LoRA")
        return "lora", set()
    if module == "lycoris.kohya":
        algo = str(args.get("algo", "lora")).lower()
        dora = as_bool(args.get("dora_wd", False))
        if algo in ("lora", "locon"):
            network_type = "dora" if dora else "locon" if _conv_dim(args) > 0 else "lora"
        elif algo in ("loha", "lokr") and not dora:
            network_type = algo
        else:
            what = f"LyCORIS algo={algo}" + (" with dora_wd (DoRA is offered on LoRA / LoCon only)" if dora else "")
            m.unmapped(option, f"{what} is not offered; network.type is one of {', '.join(NETWORK_TYPES)}")
            return None, {"algo", "dora_wd"}
        m.set("network.type", network_type, option, f"LyCORIS algo={algo}" + (" dora_wd" if dora else ""))
        return network_type, {"algo", "dora_wd"} & set(args)
    if module in KOHYA_MODULE_TYPES:
        m.set("network.type", KOHYA_MODULE_TYPES[module], option, "sd-scripts' own module")
        return KOHYA_MODULE_TYPES[module], set()
    if module.endswith("networks.lora"):
        if _conv_dim(args) > 0:  # kohya's LoRA-C3Lier: LoRA on the 3x3 convolutions too
            m.set("network.type", "locon", option, "networks.lora with conv_dim (LoRA-C3Lier)")
            return "locon", set()
        if given:
            m.nothing(option, "LoRA: network.type=lora (the default)")
        return "lora", set()
    m.unmapped(option, f"{module!r} is not offered; network.type is one of {', '.join(NETWORK_TYPES)}")
    return None, set()


@rule("network_alpha", always=True)
def _network_alpha(m: Mapper, taken: dict[str, Option]) -> None:
    if "network_alpha" in taken:
        option = taken["network_alpha"]
        m.set("network.alpha", as_float(option.value), option)
    else:
        m.set("network.alpha", 1.0, "(network_alpha absent)", "kohya's default alpha is 1 (ours would be alpha = dim)")


@rule("network_train_unet_only", "network_train_text_encoder_only", "text_encoder_lr", always=True)
def _parts(m: Mapper, taken: dict[str, Option]) -> None:
    """Which LoRA parts train: kohya trains the text encoder's too unless network_train_unet_only, or its
    learning rate is 0 (then it would train nothing, and a frozen text encoder's outputs can be cached)."""
    unet_only, te_only = taken.get("network_train_unet_only"), taken.get("network_train_text_encoder_only")
    te_lr = taken.get("text_encoder_lr")
    rates: list[float] = []  # the text encoders' learning rates as applied
    if te_lr is not None:
        try:
            rates = _text_encoder_rates(m, te_lr)
        except Unfit as unfit:
            m.unmapped(te_lr, str(unfit))
    if te_only is not None and not as_bool(te_only.value):
        m.nothing(te_only, "off: nothing to set")
    if unet_only is not None and as_bool(unet_only.value):
        m.set("network.train_text_encoder", False, unet_only)
    elif te_only is not None and as_bool(te_only.value):
        m.set("network.train_unet", False, te_only)
        m.set("network.train_text_encoder", True, te_only)
    elif te_lr is not None and rates and not any(rates):
        m.set("network.train_text_encoder", False, te_lr, "a learning rate of 0 trains nothing: kept frozen")
    else:
        m.set(
            "network.train_text_encoder",
            True,
            unet_only or "(network_train_unet_only absent)",
            "kohya trains the text-encoder LoRA too unless network_train_unet_only",
        )
    if (
        unet_only is not None
        and not as_bool(unet_only.value)
        and m.result.origins.get("network.train_text_encoder") != unet_only.label
    ):
        m.nothing(unet_only, "off: nothing to set")


def _text_encoder_rates(m: Mapper, option: Option) -> list[float]:
    """sd-scripts' text_encoder_lr: one rate, or a list of one per text encoder (SDXL has two; a single rate, or a
    list of one, serves both). Records the mapping and returns the rates that apply."""
    value = option.value
    if isinstance(value, str) and len(parts := re.split(r"[,\s]+", value.strip())) > 1:
        value = parts  # "1e-5 2e-5", as on sd-scripts' command line
    rates = [as_float(v) for v in (value if isinstance(value, list) else [value])]
    if len(rates) > 2:
        raise Unfit(f"at most two learning rates, one per text encoder (SDXL has two); got {len(rates)}")
    if not rates:
        m.nothing(option, "an empty list: the text encoders train at optimizer.lr, as in sd-scripts")
    elif len(rates) == 1:
        both = "both SDXL text encoders (network.text_encoder_2_lr=null follows it)" if _is_sdxl(m) else ""
        m.set("network.text_encoder_lr", rates[0], option, both)
    elif _is_on(m, "v2") and not _is_sdxl(m):
        m.set("network.text_encoder_lr", rates[0], option, "SD2 has one text encoder: sd-scripts uses the first rate")
        rates = rates[:1]
    else:
        m.set("network.text_encoder_lr", rates[0], option, "SDXL's first text encoder (CLIP ViT-L)" + _sdxl_hint(m))
        m.set("network.text_encoder_2_lr", rates[1], option, "SDXL's second text encoder (OpenCLIP ViT-bigG)")
    return rates


@rule("optimizer_type", "use_8bit_adam", "use_lion_optimizer")
def _optimizer(m: Mapper, taken: dict[str, Option]) -> None:
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
def _optimizer_args(m: Mapper, taken: dict[str, Option]) -> None:
    option = taken["optimizer_args"]
    for key, value in key_values(option.value):
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


@rule("lr_scheduler", "lr_scheduler_type", "lr_scheduler_num_cycles", "lr_scheduler_power")
def _scheduler(m: Mapper, taken: dict[str, Option]) -> None:
    name = None
    if "lr_scheduler_type" in taken:  # a scheduler class (LoRA_Easy's own); sd-scripts prefers it
        option = taken["lr_scheduler_type"]
        closest = CUSTOM_SCHEDULERS.get(str(option.value).rsplit(".", 1)[-1].lower())
        m.unmapped(option, f"custom scheduler classes are not offered; {closest or 'pick scheduler=<name>'}")
        if "lr_scheduler" in taken:
            m.unmapped(taken.pop("lr_scheduler"), f"sd-scripts uses {option.label} instead")
    if "lr_scheduler" in taken:
        option = taken["lr_scheduler"]
        name = str(option.value).strip().lower()
        if name not in SCHEDULERS:
            m.unmapped(option, f"schedule {option.value!r} is not offered; scheduler={'|'.join(SCHEDULERS)}|plateau")
            name = None
        else:
            try:
                m.choose("scheduler", name, option)
            except Unfit as unfit:
                m.unmapped(option, str(unfit))
    for key, target, convert, used_by in (
        ("lr_scheduler_num_cycles", "scheduler.num_cycles", as_int, "cosine_with_restarts"),
        ("lr_scheduler_power", "scheduler.power", as_float, "polynomial"),
    ):
        if key in taken:
            note = (
                ""
                if name == used_by
                else f"read by {used_by} only (sd-scripts ignores it with {name or 'this schedule'})"
            )
            try:
                m.set(target, convert(taken[key].value), taken[key], note)
            except Unfit as unfit:
                m.unmapped(taken[key], str(unfit))


@rule("lr_warmup_steps", "lr_warmup_ratio")
def _warmup(m: Mapper, taken: dict[str, Option]) -> None:
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
        steps = as_float(option.value)
        # sd-scripts reads lr_warmup_steps < 1 as a ratio of the total steps, as scheduler.warmup_steps does
        note = "a value < 1 is a fraction of the total steps, in sd-scripts too" if 0 < steps < 1 else ""
        m.set("scheduler.warmup_steps", steps, option, note)


@rule("resolution")
def _resolution(m: Mapper, taken: dict[str, Option]) -> None:
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
    native = 1024 if _is_sdxl(m) else 768 if _is_on(m, "v2") and _is_on(m, "v_parameterization") else 512
    m.resolution = sides[0]
    if sides[0] == native:  # left to follow the model, so model=tiny trains at the tiny model's own 64 px
        m.nothing(option, f"the model's native resolution: bucket.resolution=null follows the model ({native} here)")
    else:
        m.set("bucket.resolution", sides[0], option)


@rule("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", always=True)
def _bucket_sides(m: Mapper, taken: dict[str, Option]) -> None:
    """kohya's defaults (256 and 1024 at 512 px, step 64) are ours relative to the resolution: left out, so
    they follow it (and the model) as ours do; other values are written. kohya's defaults stay 256 / 1024 at any
    resolution, so where the file leaves them out at another one (1024 px for SDXL) they are written too."""
    side = m.resolution
    for key, target, default, meaning in (
        ("min_bucket_reso", "bucket.min_side", side // 2 if side else None, "half the resolution"),
        ("max_bucket_reso", "bucket.max_side", side * 2 if side else None, "twice the resolution"),
        ("bucket_reso_steps", "bucket.step", 64 if side and side >= 512 else None, "64 from 512 px up"),
    ):
        if key not in taken:
            kohya = KOHYA_BUCKETS[key]
            if side and kohya != default and _is_on(m, "enable_bucket"):
                m.set(target, kohya, f"({key} absent)", f"sd-scripts' default at any resolution (ours: {meaning})")
            continue
        value = as_int(taken[key].value)
        if value == default:
            m.nothing(taken[key], f"our default follows the resolution: {meaning}")
        else:
            note = "SDXL allows multiples of 32 (SD1/SD2 of 64)" if key == "bucket_reso_steps" and _is_sdxl(m) else ""
            m.set(target, value, taken[key], note)


def _is_on(m: Mapper, name: str) -> bool:
    """Whether the file switches ``name`` on (read from all its options, mapped or not)."""
    option = m.all_options.get(name)
    try:
        return option is not None and as_bool(option.value)
    except Unfit:
        return False


def _is_sdxl(m: Mapper) -> bool:
    """Whether the file trains SDXL: ``sdxl = true`` (LoRA_Easy, the kohya_ss GUI) or the import's ``--sdxl``."""
    return _is_on(m, "sdxl")


def _sdxl_hint(m: Mapper) -> str:
    """A note's ending for an option of sd-scripts' SDXL scripts in a file that does not say SDXL."""
    return "" if _is_sdxl(m) else "; an SDXL option: import with --sdxl if the file is for sdxl_train_network.py"


def _gui_sdxl_only(m: Mapper, option: Option) -> bool:
    """The kohya_ss GUI's ``sdxl_*`` switches reach sd-scripts only when it trains SDXL: otherwise nothing to set."""
    if option.label.rpartition(".")[2] in SDXL_ONLY_ALIASES and not _is_sdxl(m):
        m.nothing(option, "the kohya_ss GUI passes it on only when it trains SDXL")
        return True
    return False


@rule("max_train_steps", "max_train_epochs", always=True)
def _length(m: Mapper, taken: dict[str, Option]) -> None:
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
def _timesteps(m: Mapper, taken: dict[str, Option]) -> None:
    low = as_int(taken["min_timestep"].value) if "min_timestep" in taken else 0
    high = as_int(taken["max_timestep"].value) if "max_timestep" in taken else 1000
    for option in taken.values():
        if (low, high) == (0, 1000):
            m.nothing(option, "every timestep: the default")
        else:
            m.set("train.timestep_range", [low, high], option, "[min, max) raw timesteps")


@rule("cache_latents", "cache_latents_to_disk")
def _cache(m: Mapper, taken: dict[str, Option]) -> None:
    memory = "cache_latents" in taken and as_bool(taken["cache_latents"].value)
    disk = "cache_latents_to_disk" in taken and as_bool(taken["cache_latents_to_disk"].value)
    mode = "disk" if disk else "memory" if memory else "none"
    for option in taken.values():
        m.set("data.cache_latents", mode, option)


@rule("train_data_dir", "caption_extension", always=True)
def _data_dir(m: Mapper, taken: dict[str, Option]) -> None:
    if "train_data_dir" in taken:
        option = taken["train_data_dir"]
        m.set("data.train_dir", as_path(option.value), option)
    if "caption_extension" in taken:
        option = taken["caption_extension"]
        value = as_extension(option.value)
        m.set("data.caption_extension", value, option, "" if value == option.value else "a leading dot added")
    elif "train_data_dir" in taken or m.plan.inherits_extension:
        m.set(
            "data.caption_extension",
            ".caption",
            "(caption_extension absent)",
            "sd-scripts' default caption extension is .caption",
        )
    folder = taken.get("train_data_dir")
    if folder is not None and "subsets[" not in folder.label:  # sd-scripts' DreamBooth layout
        note = "sd-scripts captions them with the <name> of their <repeats>_<name> folder"
        m.set("data.missing_captions", "class_tokens", "(images without a caption file)", note)
    elif folder is not None or m.plan.entries:  # a dataset config's subsets
        note = "sd-scripts gives them their subset's class_tokens, or trains them uncaptioned with a warning"
        m.set("data.missing_captions", "warn", "(images without a caption file)", note)


@rule("resume", "load_previous_save_state")
def _resume(m: Mapper, taken: dict[str, Option]) -> None:
    for option in taken.values():
        if isinstance(option.value, bool):
            if option.value:
                m.unmapped(option, "give the saved state folder: train.resume=<folder>")
            else:
                m.nothing(option, "off: nothing to set")
        else:
            m.set("train.resume", as_path(option.value), option)


@rule("sample_sampler")
def _sampler(m: Mapper, taken: dict[str, Option]) -> None:
    option = taken["sample_sampler"]
    name = str(option.value).lower()
    ours = {"ddim": "ddim", "euler": "euler", "k_euler": "euler", "dpmsolver++": "dpm++", "dpm++": "dpm++"}
    ours |= {"ddpm": "ddpm"}
    if name not in ours:
        raise Unfit(f"sampler {option.value!r} is not offered; eval.sampler=ddim|euler|dpm++|ddpm")
    m.set("eval.sampler", ours[name], option)


@rule("tag_occurrence_txt_file", "sort_tag_occurrence_alphabetically")
def _tag_stats(m: Mapper, taken: dict[str, Option]) -> None:
    wanted = "tag_occurrence_txt_file" in taken and as_bool(taken["tag_occurrence_txt_file"].value)
    alpha = "sort_tag_occurrence_alphabetically" in taken and as_bool(taken["sort_tag_occurrence_alphabetically"].value)
    for option in taken.values():
        if wanted:
            m.set("data.tag_stats", "alpha" if alpha else "count", option)
        else:
            m.nothing(option, "no tag table asked for")


@rule("train_mode")
def _train_mode(m: Mapper, taken: dict[str, Option]) -> None:
    option = taken["train_mode"]
    if str(option.value).strip().lower() != "lora":
        raise Unfit(f"LoRA_Easy's {option.value!r} training: only LoRA is trained here")
    m.nothing(option, "LoRA training")


@rule("cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk")
def _cache_text(m: Mapper, taken: dict[str, Option]) -> None:
    """sd-scripts caches the text encoders' outputs (both of SDXL's) only while they are frozen, and turns the cache
    on with ``_to_disk`` too; here the cache is kept in memory and is skipped while a text encoder trains."""
    used = "both text encoders' outputs, used while they are" if _is_sdxl(m) else "used while the text encoder is"
    used += " frozen (network.train_text_encoder=false)"
    if m.result.values.get("network.train_text_encoder"):  # kohya trains it unless network_train_unet_only
        used += "; the text-encoder LoRA trains here (sd-scripts refuses that with this cache), so it is skipped"
    for name, option in taken.items():
        if _gui_sdxl_only(m, option):
            continue
        try:
            on = as_bool(option.value)
        except Unfit as unfit:
            m.unmapped(option, str(unfit))
            continue
        if name == "cache_text_encoder_outputs":
            m.set("data.cache_text_embeddings", on, option, used + (_sdxl_hint(m) if on else ""))
        elif on:
            note = "kept in memory: no on-disk text cache (sd-scripts turns cache_text_encoder_outputs on with it)"
            m.set("data.cache_text_embeddings", True, option, note)
        else:
            m.nothing(option, "off: nothing to set")


@rule("no_half_vae")
def _no_half_vae(m: Mapper, taken: dict[str, Option]) -> None:
    option = taken["no_half_vae"]
    if _gui_sdxl_only(m, option):
        return
    if as_bool(option.value):
        m.set("model.vae_precision", "fp32", option, "the VAE encodes and decodes in fp32 under fp16 / bf16")
    else:
        note = "off: model.vae_precision=auto, the training precision except fp32 for SDXL's VAE under fp16"
        m.nothing(option, f"{note} (it overflows in half; sd-scripts would run it in fp16)")


@rule("output_dir")
def _output_dir(m: Mapper, taken: dict[str, Option]) -> None:
    """Written only when runs can write there on this machine: another machine's folder (``F:/Desktop``)
    would stop every run at startup, so runs then write to their Hydra run folder."""
    option = taken["output_dir"]
    folder = as_path(option.value)
    problem = writable_folder_problem(folder)
    if problem is None:
        m.set("output.dir", folder, option)
        return
    reason = (
        f"output_dir {folder!r} is left out: {problem}; runs write to their run folder (outputs/runs/...), "
        "or choose one with output.dir=<folder>"
    )
    m.result.here.append(OnThisMachine(option.label, reason))
