"""The LoRA file on disk: kohya-compatible keys and ``ss_*`` metadata, written atomically, and read back.

Writing (``output.*``): safetensors by default; the pickle formats (``pt``/``ckpt``/``bin``, a
``torch.save`` of the state dict as kohya writes them) only with ``output.allow_pickle=true``, because
loading a pickle file can run arbitrary code. ``output.precision`` casts every tensor (the ``.alpha``
scalars too); ``output.metadata=false`` keeps only the keys loaders need. Textual-inversion vectors
can ride along as ``bundle_emb.<name>.string_to_param.*``, the A1111/kohya bundle convention.

Reading (``network.init_weights``): ``load_lora_file`` reads ours or any kohya LoRA file, and
``peft_state_from_kohya`` maps kohya's flattened names (``lora_unet_down_blocks_0_..._to_q``) back onto
the dotted module names of a peft-adapted model. The underscore in a kohya name may be a dot or a real
underscore (``down_blocks`` vs ``down.blocks``), so names are resolved against the model's actual
modules rather than guessed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save

from training.atomic_file import write_atomically
from training.network.lora import ADAPTER, LoraNetwork, LoraPart
from training.network.metadata import metadata_sha256, minimal_metadata
from training.network.types import FILE_SUFFIXES, FUSED_FACTORS, RANK_TENSORS, type_of_file
from training.output_dir import rescue_folders, unique_rescue_path

logger = logging.getLogger(__name__)

FORMATS = ("safetensors", "pt", "ckpt", "bin")
PICKLE_FORMATS = ("pt", "ckpt", "bin")
PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
EMBEDDING_PREFIX = "bundle_emb."
EMBEDDING_PARAM = "string_to_param.*"  # the key an A1111 .pt embedding keeps its vectors under
PICKLE_WARNING = (
    "writing {path} as a pickle file (output.format={fmt}): loading a pickle file can run arbitrary code, "
    "so only share it with people who trust you; safetensors is the safe format. Pickle files carry no metadata."
)
_DOWN, _UP, _ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"
# a file tensor's suffix -> the peft parameter it loads into (training/network/types.py names them)
_PEFT_NAMES = {
    _DOWN: "lora_A.{adapter}.weight",
    _UP: "lora_B.{adapter}.weight",
    ".dora_scale": "lora_magnitude_vector.{adapter}.weight",
    **{f".{name}": f"{name}.{{adapter}}" for name in (*FILE_SUFFIXES["loha"], *FILE_SUFFIXES["lokr"])},
}
# the network a file tensor's suffix belongs to, for messages
_KIND = {_DOWN: "lora", _UP: "lora", ".dora_scale": "dora"}
# suffixes whose first dimension is the rank (a down); the ups have it last
_RANK_FIRST = {_DOWN, ".hada_w1_b", ".hada_w2_b", ".lokr_w1_b", ".lokr_w2_b"}
_RANK_LAST = {_UP, ".hada_w1_a", ".hada_w2_a", ".lokr_w1_a", ".lokr_w2_a"}


class LoraFileError(ValueError):
    """A LoRA file that cannot be written or used as asked; the message names the key to change."""


# --- writing


def output_problems(output_cfg: Any) -> list[str]:
    """Every problem of the ``output`` section, for startup validation (nothing is written)."""
    problems = []
    fmt = output_cfg.format
    if fmt not in FORMATS:
        problems.append(
            f"output.format: {fmt!r} is not one of {', '.join(FORMATS)}; use output.format=safetensors "
            "(the pickle formats pt/ckpt/bin also need output.allow_pickle=true)"
        )
    elif fmt in PICKLE_FORMATS and not output_cfg.allow_pickle:
        problems.append(_pickle_refusal("output.format", fmt))
    if output_cfg.precision not in PRECISIONS:
        problems.append(
            f"output.precision: {output_cfg.precision!r} is not one of {', '.join(PRECISIONS)}; "
            "e.g. output.precision=fp16 halves the file size"
        )
    name = str(output_cfg.name)
    if not name.strip() or name.startswith(".") or any(c in name for c in ("/", "\\", "\0")):
        problems.append(
            f"output.name: {name!r} must be a plain file name, without folders and not starting with a dot "
            "('.', '..' and '.name' give hidden or misplaced files); e.g. output.name=lora, folders go in output.dir"
        )
    return problems


def lora_file_path(output_cfg: Any, stem: str | None = None) -> Path:
    """``<output.dir>/<stem or output.name>.<output.format>``; ``stem`` names intermediate saves."""
    return with_format_suffix(Path(output_cfg.dir) / (stem or output_cfg.name), output_cfg.format)


def with_format_suffix(path: str | Path, file_format: str) -> Path:
    """The extension follows the format: a known LoRA extension is replaced, anything else kept (``my.v2``)."""
    path = Path(path)
    if path.suffix.lstrip(".").lower() in FORMATS:
        path = path.with_suffix("")
    return path.with_name(f"{path.name}.{file_format}")


def cast_tensors(tensors: dict[str, torch.Tensor], precision: str | None) -> dict[str, torch.Tensor]:
    """Floating tensors (weights, ``.alpha`` and embeddings alike) in the saved dtype; None keeps them."""
    if precision is None:
        return dict(tensors)
    if precision not in PRECISIONS:
        raise LoraFileError(f"output.precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}


def select_metadata(metadata: dict[str, Any], full: bool = True) -> dict[str, str]:
    """All keys as strings, or (``output.metadata=false``) the minimal set loaders need."""
    metadata = {k: str(v) for k, v in metadata.items()}
    return metadata if full else minimal_metadata(metadata)


def kohya_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """kohya's ``sshs_model_hash`` and ``sshs_legacy_hash`` (sd-webui-additional-networks' hashes).

    As kohya computes them, over the file serialized with only its ``ss_*`` metadata: the model hash
    is the sha256 of the tensor data after the header (so it equals that of the written file and
    ignores every metadata key), the legacy hash the first 8 hex digits of the sha256 of bytes
    1 MiB .. 1 MiB + 64 KiB. The header is canonical (sorted) so the legacy hash is reproducible.
    """
    blob = canonical_safetensors(save(tensors, metadata={k: v for k, v in metadata.items() if k.startswith("ss_")}))
    header_end = 8 + int.from_bytes(blob[:8], "little")
    return {
        "sshs_model_hash": hashlib.sha256(blob[header_end:]).hexdigest(),
        "sshs_legacy_hash": hashlib.sha256(blob[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8],
    }


def read_metadata(path: str | Path) -> dict[str, str]:
    """A safetensors file's metadata (the header only: cheap for any size)."""
    with safe_open(str(path), framework="pt") as file:
        return dict(file.metadata() or {})


def lora_identity(path: str | Path) -> dict[str, str]:
    """What a reproduction must match: the tensors' hash and the hash of the metadata without times
    and run id (``tensors_sha256``, ``metadata_sha256``); empty for pickle files."""
    if file_format_of(path) != "safetensors":
        return {}
    return {"tensors_sha256": tensors_sha256(path), "metadata_sha256": metadata_sha256(read_metadata(path))}


def tensors_sha256(path: str | Path) -> str:
    """sha256 of a safetensors file's tensor data (after the header): equal tensors, equal hash,
    whatever the metadata. It is the file's ``sshs_model_hash``."""
    with open(path, "rb") as file:
        file.seek(8 + int.from_bytes(file.read(8), "little"))
        return hashlib.file_digest(file, "sha256").hexdigest()


def save_lora_file(
    path: str | Path,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, Any],
    *,
    file_format: str = "safetensors",
    allow_pickle: bool = False,
    precision: str | None = None,
    full_metadata: bool = True,
) -> Path:
    """Write the file under a temporary name, then rename: a crash never leaves a look-alike file.

    Returns the path written, whose extension follows ``file_format``. Pickle formats raise
    ``LoraFileError`` unless ``allow_pickle``; with it they are written with a logged warning.
    """
    if file_format not in FORMATS:
        raise LoraFileError(f"output.format: {file_format!r} is not one of {', '.join(FORMATS)}")
    if file_format in PICKLE_FORMATS and not allow_pickle:
        raise LoraFileError(_pickle_refusal("output.format", file_format))
    path = with_format_suffix(path, file_format)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in cast_tensors(tensors, precision).items()}
    if file_format == "safetensors":
        selected = select_metadata(metadata, full_metadata)
        selected.update(kohya_hashes(tensors, selected))
        blob = canonical_safetensors(save(tensors, metadata=selected))
        write_atomically(path, lambda tmp: tmp.write_bytes(blob))
    else:
        logger.warning(PICKLE_WARNING.format(path=path, fmt=file_format))
        write_atomically(path, lambda tmp: torch.save(tensors, tmp))
    return path


def canonical_safetensors(blob: bytes) -> bytes:
    """The same file with its JSON header's keys sorted, so equal tensors + metadata give equal bytes.

    safetensors keeps metadata in a hash map, whose order changes between processes; a
    reproduction must be able to compare LoRA files by hash (sweeper.reproduce).
    """
    length = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + length])
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False, sort_keys=True).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes
    return len(text).to_bytes(8, "little") + text + blob[8 + length :]


class LoraNotSavedError(OSError):
    """The LoRA could not be written to ``output.dir``; ``rescued`` is where it was kept instead (or None)."""

    def __init__(self, message: str, intended: Path, rescued: Path | None) -> None:
        super().__init__(message)
        self.intended = intended
        self.rescued = rescued


def save_lora(
    output_cfg: Any, tensors: dict[str, torch.Tensor], metadata: dict[str, Any], *, stem: str | None = None
) -> Path:
    """``save_lora_file`` as the ``output`` section says (dir, name, format, pickle opt-in, precision, metadata).

    A write that fails with ``OSError`` (folder gone read-only or full since startup) does not lose the
    trained weights: the same file is written to a rescue folder and ``LoraNotSavedError`` says where.
    """
    options = {
        "file_format": output_cfg.format,
        "allow_pickle": output_cfg.allow_pickle,
        "precision": output_cfg.precision,
        "full_metadata": output_cfg.metadata,
    }
    intended = lora_file_path(output_cfg, stem)
    try:
        return save_lora_file(intended, tensors, metadata, **options)
    except OSError as error:
        failures = [f"{intended}: {error}"]
        for folder in rescue_folders():
            try:
                rescued = save_lora_file(unique_rescue_path(folder, intended.name), tensors, metadata, **options)
            except OSError as rescue_error:
                failures.append(f"{folder}: {rescue_error}")
                continue
            logger.error("could not write %s (%s); the LoRA was kept at %s", intended, error, rescued)
            raise LoraNotSavedError(
                f"could not write the LoRA to {intended} ({error}); the trained file was kept at {rescued}: "
                "copy it where you want it, and check output.dir (free space, permissions)",
                intended,
                rescued,
            ) from error
        raise LoraNotSavedError(
            f"could not write the LoRA to {intended}, nor to a rescue folder; it is lost:\n  " + "\n  ".join(failures),
            intended,
            None,
        ) from error


def bundle_embeddings(tensors: dict[str, torch.Tensor], embeddings: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LoRA tensors plus each embedding as ``bundle_emb.<name>.string_to_param.*`` ([num_vectors, dim]).

    A1111 (and Forge/ComfyUI extensions) register such an embedding under ``<name>`` when the LoRA is
    loaded, so a LoRA co-trained with a textual inversion ships as one file. Returns a new dict.
    """
    bundled = dict(tensors)
    for name, vectors in embeddings.items():
        if not name or "." in name or any(c.isspace() for c in name):
            raise LoraFileError(f"embedding name {name!r} must be non-empty, without dots or spaces")
        if vectors.dim() == 1:
            vectors = vectors.unsqueeze(0)
        if vectors.dim() != 2:
            raise LoraFileError(f"embedding {name!r} must be [num_vectors, dim], got shape {tuple(vectors.shape)}")
        key = f"{EMBEDDING_PREFIX}{name}.{EMBEDDING_PARAM}"
        if key in bundled:
            raise LoraFileError(f"embedding {name!r} is already bundled")
        bundled[key] = vectors.detach().to("cpu").clone().contiguous()
    return bundled


def embeddings_of(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{name: [num_vectors, dim]}`` of the bundled embeddings (SD1/2 form; SDXL's clip_l/clip_g skipped)."""
    found = {}
    for key, value in tensors.items():
        if not key.startswith(EMBEDDING_PREFIX):
            continue
        name, _, rest = key[len(EMBEDDING_PREFIX) :].partition(".")
        if rest.startswith("string_to_param."):
            found[name] = value
        else:
            logger.info("skipping bundled embedding part %s (only string_to_param embeddings are read)", key)
    return found


def read_bundled_embeddings(path: str | Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The embeddings bundled in a LoRA file, by name."""
    return embeddings_of(load_lora_file(path, allow_pickle=allow_pickle).tensors)


# --- reading


@dataclass
class LoraFileContents:
    """A LoRA file as read: tensors by kohya name, metadata, and its rank/alpha (most common over modules)."""

    path: Path
    file_format: str
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    ranks: dict[str, int]  # kohya module name (``lora_unet_...``) -> its rank (lora_down, hada_w1_b, lokr_w*_b)
    alphas: dict[str, float]  # kohya module name -> alpha (kohya: alpha = rank when the file has none)
    dim: int | None  # None when no tensor says a rank (no weights, or a LoKr of full factors only)
    alpha: float | None

    @property
    def has_weights(self) -> bool:
        """Whether any tensor is a network weight of a type we train (lora_down, hada_*, lokr_*, ...)."""
        return any(key.endswith(suffix) for key in self.tensors for suffix in _PEFT_NAMES)

    @property
    def embeddings(self) -> dict[str, torch.Tensor]:
        return embeddings_of(self.tensors)


def file_format_of(path: str | Path) -> str:
    """``safetensors`` or a pickle format, from the extension, else from the first bytes."""
    path = Path(path)
    suffix = path.suffix.lstrip(".").lower()
    if suffix in FORMATS:
        return suffix
    with open(path, "rb") as file:
        head = file.read(9)
    return "safetensors" if len(head) == 9 and head[8:9] == b"{" else "pt"


def file_ranks(shapes: dict[str, Any]) -> dict[str, int]:
    """Module name -> rank, from the tensor shapes of a file (its network type's rank tensors)."""
    suffixes = tuple("." + name for name in RANK_TENSORS[type_of_file(list(shapes))])
    ranks = {}
    for key, shape in shapes.items():
        suffix = next((s for s in suffixes if key.endswith(s)), None)
        if suffix is not None:
            ranks[key[: -len(suffix)]] = int(shape[0])
    return ranks


def load_lora_file(path: str | Path, *, allow_pickle: bool = False) -> LoraFileContents:
    """Read a LoRA file (ours or kohya's). Pickle files only with ``allow_pickle`` (``output.allow_pickle``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LoraFileError(f"network.init_weights: LoRA file '{path}' does not exist")
    file_format = file_format_of(path)
    if file_format == "safetensors":
        tensors, metadata = {}, {}
        with safe_open(str(path), framework="pt") as lora:
            metadata = dict(lora.metadata() or {})
            for key in lora.keys():  # noqa: SIM118 - safe_open is not iterable
                tensors[key] = lora.get_tensor(key)
    else:
        if not allow_pickle:
            raise LoraFileError(
                f"network.init_weights: '{path}' is a pickle file, which can run arbitrary code when loaded; "
                "convert it to safetensors, or set output.allow_pickle=true if you trust where it came from"
            )
        logger.warning("loading pickle file %s (output.allow_pickle=true): it could run code", path)
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        if not isinstance(state, dict):
            raise LoraFileError(f"network.init_weights: '{path}' does not hold a state dict")
        tensors, metadata = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, {}

    ranks = file_ranks({key: value.shape for key, value in tensors.items()})
    alphas = {k[: -len(_ALPHA)]: float(v) for k, v in tensors.items() if k.endswith(_ALPHA) and v.numel() == 1}
    alphas = {module: alphas.get(module, float(rank)) for module, rank in ranks.items()}
    dim = Counter(ranks.values()).most_common(1)[0][0] if ranks else None
    alpha = Counter(alphas.values()).most_common(1)[0][0] if alphas else None
    return LoraFileContents(path, file_format, tensors, metadata, ranks, alphas, dim, alpha)


@dataclass
class KohyaMatch:
    """kohya tensors of one model mapped onto its peft adapter (``<module>.lora_A.<adapter>.weight``)."""

    state: dict[str, torch.Tensor] = field(default_factory=dict)
    alphas: dict[str, float] = field(default_factory=dict)  # dotted module name -> alpha in the file
    unmatched: dict[str, str] = field(default_factory=dict)  # file key -> why it was not used
    missing: list[str] = field(default_factory=list)  # adapted modules the file has no weights for


def peft_state_from_kohya(tensors: dict[str, torch.Tensor], part: LoraPart, adapter_name: str = ADAPTER) -> KohyaMatch:
    """Map the ``part.kohya_prefix`` keys of a kohya state dict onto the part's peft parameter names.

    Each flattened kohya name is looked up among the names the family gives the model's real
    modules (``part.kohya_names``: the module path with dots as ``_`` for SD1/SD2, the original
    SDXL naming for an SDXL UNet, ``text_model.`` put back for transformers 5 text encoders), so
    ``down_blocks_0`` resolves to ``down_blocks.0`` without guessing. Keys of other prefixes are
    ignored. Raises ``LoraFileError`` when a tensor's rank (or shape) does not fit the adapter.
    """
    model, prefix = part.model, part.kohya_prefix
    tensors = split_fused(tensors, part)
    adapted: dict[str, list[str]] = {}
    every: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        is_adapted = adapter_name in getattr(module, "scaling", {})  # a tuner layer of any type
        for flat in part.kohya_names.get(name, [name.replace(".", "_")]):
            every.setdefault(flat, []).append(name)
            if is_adapted and name not in adapted.get(flat, []):
                adapted.setdefault(flat, []).append(name)
    parameters = dict(model.named_parameters())

    match = KohyaMatch()
    mismatched: list[str] = []
    ranks: Counter[int] = Counter()
    for key, value in tensors.items():
        if not key.startswith(prefix):
            continue
        suffix = next((s for s in (*_PEFT_NAMES, _ALPHA) if key.endswith(s)), None)
        if suffix is None:
            match.unmatched[key] = (
                "not a tensor of a network type trained here (lora_down/up, dora_scale, hada_w*, lokr_w*, alpha); "
                "other LyCORIS parts (Tucker cores, norms, ...) are unused"
            )
            continue
        flat = key[len(prefix) : -len(suffix)]
        names = adapted.get(flat, [])
        if len(names) > 1:
            match.unmatched[key] = f"ambiguous: matches modules {', '.join(names)}"
            continue
        if not names:
            if flat in every:
                match.unmatched[key] = (
                    f"module '{every[flat][0]}' has no LoRA adapter in this run "
                    "(not in network.unet_targets / network.text_encoder_targets)"
                )
            else:
                match.unmatched[key] = "no module of that name in the model (another base model architecture?)"
            continue
        module = names[0]
        if suffix == _ALPHA:
            match.alphas[module] = float(value)
            continue
        target = f"{module}.{_PEFT_NAMES[suffix].format(adapter=adapter_name)}"
        if target not in parameters:
            kind = _KIND.get(suffix, suffix[1:5])  # lora, dora, hada (loha), lokr
            kind = {"hada": "loha"}.get(kind, kind)
            raise LoraFileError(
                f"network.init_weights: the file holds a {kind} network ({key}) but this run's network.type has "
                f"no such tensor; set network.type={kind} (and its options as the file's ss_network_args say)"
            )
        expected = parameters[target].shape
        if suffix == ".dora_scale" and value.numel() == parameters[target].numel():
            value = value.reshape(expected)  # LyCORIS' (out, 1) column, peft's (out,) vector
        if tuple(value.shape) != tuple(expected):
            # the rank is the first dimension of a down (lora_down, hada_w*_b, lokr_w*_b), the last of an up
            first, last = suffix in _RANK_FIRST, suffix in _RANK_LAST
            file_rank, model_rank = (value.shape[0], expected[0]) if first else (value.shape[-1], expected[-1])
            if first or last:
                ranks[file_rank] += 1
            mismatched.append(
                f"{key}: shape {tuple(value.shape)} in the file, {tuple(expected)} in the adapter"
                + (f" (rank {file_rank} vs {model_rank})" if (first or last) and file_rank != model_rank else "")
            )
            continue
        match.state[target] = value
    unscale_full_lokr(match.state, model, adapter_name)

    if mismatched:
        model_rank = next(
            (
                m.r[adapter_name]
                for m in model.modules()
                if isinstance(getattr(m, "r", None), dict) and adapter_name in m.r
            ),
            None,
        )
        file_ranks = sorted(ranks)
        if model_rank is not None and file_ranks and model_rank not in file_ranks:
            hint = (
                f"the file has rank {', '.join(map(str, file_ranks))} but network.dim={model_rank}; the rank must "
                f"match to continue from it: set network.dim={file_ranks[0]}"
            )
        else:
            hint = "the file was trained for a different base model architecture"
        shown = "\n  ".join(mismatched[:5]) + (f"\n  ... {len(mismatched) - 5} more" if len(mismatched) > 5 else "")
        raise LoraFileError(f"network.init_weights: {hint}\n  {shown}")

    every_adapted = sorted({name for names in adapted.values() for name in names})
    own: dict[str, list[str]] = {}  # module -> its adapter parameters (module.<tuner attribute>.<adapter>...)
    for name in parameters:
        parts = name.split(".")
        if adapter_name in parts:
            own.setdefault(".".join(parts[: parts.index(adapter_name) - 1]), []).append(name)
    match.missing = [m for m in every_adapted if not own.get(m) or any(n not in match.state for n in own[m])]
    return match


def unscale_full_lokr(state: dict[str, torch.Tensor], model: torch.nn.Module, adapter_name: str = ADAPTER) -> None:
    """A LoKr module of two full factors is stored with its scale in ``lokr_w2`` (the loaders apply it
    unscaled, training/network/lora.py ``to_file``); peft scales it by alpha/dim, so divide it out."""
    for key in [k for k in state if k.endswith(f".lokr_w2.{adapter_name}")]:
        module = key[: -len(f".lokr_w2.{adapter_name}")]
        if f"{module}.lokr_w1.{adapter_name}" in state:
            state[key] = state[key] / model.get_submodule(module).scaling[adapter_name]


def split_fused(tensors: dict[str, torch.Tensor], part: LoraPart) -> dict[str, torch.Tensor]:
    """``tensors`` with each fused original layer of ``part`` (SD3/FLUX's qkv) split into its modules,
    under the modules' own flat names, so they match one adapter each.

    A block-diagonal up (kohya's ``split_qkv``, and ours) gives each module its own rank slice with
    alpha scaled to keep alpha/rank; a dense up (one down shared by q, k and v) gives every module
    the whole down, its rows of the up and the same alpha (modules without rows get nothing). A LoHa
    splits the same way, both of its products at once (a Hadamard product is row by row); a DoRA's
    ``dora_scale`` gives each module its rows' magnitudes.
    """
    tensors = dict(tensors)
    for flat, group in part.fused.items():
        name = part.kohya_prefix + flat
        factors = next(
            (f for f in FUSED_FACTORS.values() if all(f"{name}.{key}" in tensors for key in (*f[0], *f[1]))), None
        )
        if factors is None:
            continue
        downs, ups = ({f".{key}": tensors.pop(f"{name}.{key}") for key in keys} for keys in factors)
        rank = next(iter(downs.values())).shape[0]
        alpha = float(tensors.pop(name + _ALPHA, torch.tensor(float(rank))))
        sizes = [part.out_features(module) for module in group]
        # module -> its rows of every up
        rows = {module: {} for module in group}
        for key, up in ups.items():
            for module, block in zip(group, up.split(sizes), strict=True):
                rows[module][key] = block
        scale = tensors.pop(name + ".dora_scale", None)  # DoRA: one magnitude per row, the modules' in order
        scales = dict(zip(group, scale.reshape(-1).split(sizes), strict=True)) if scale is not None else {}
        blocks = [(module, torch.cat(list(rows[module].values()), dim=1)) for module in group]
        used = [(module, block) for module, block in blocks if block.abs().sum() > 0]
        # every module its own rank slice (kohya's split_qkv; ours when all were adapted), else the
        # modules that have rows (ours for part of a group); a zero block is a module that learned nothing
        members = next((m for m in (blocks, used) if m and rank % len(m) == 0 and _block_diagonal(rows, m, rank)), None)
        for k, (module, _) in enumerate(members or used):
            own = part.kohya_prefix + module.replace(".", "_")
            share = rank // len(members) if members else rank
            columns = slice(k * share, (k + 1) * share) if members else slice(None)
            for key, down in downs.items():
                tensors[own + key] = down[columns]
            for key, block in rows[module].items():
                tensors[own + key] = block[:, columns]
            tensors[own + _ALPHA] = torch.tensor(alpha * share / rank)
            if module in scales:
                tensors[own + ".dora_scale"] = scales[module]
    return tensors


def _block_diagonal(
    rows: dict[str, dict[str, torch.Tensor]], members: list[tuple[str, torch.Tensor]], rank: int
) -> bool:
    """Whether member k's rows of every up use only the k-th of len(members) equal rank slices."""
    share = rank // len(members)
    return all(
        block[:, : k * share].abs().sum() == 0 and block[:, (k + 1) * share :].abs().sum() == 0
        for k, (module, _) in enumerate(members)
        for block in rows[module].values()
    )


@dataclass
class InitWeightsReport:
    """What ``apply_init_weights`` did: log ``lines()`` and keep it with the run."""

    path: Path
    loaded: int  # tensors copied into the adapters
    unmatched: dict[str, str]  # file key -> reason it was not used
    missing: list[str]  # adapted modules left at their fresh init (e.g. "unet:down_blocks.0...to_q")
    file_alpha: float | None
    alpha: float  # the configured alpha (kept: it is the run's network.alpha)
    alpha_note: str | None = None

    def lines(self) -> list[str]:
        out = [f"network.init_weights: loaded {self.loaded} tensors from {self.path}"]
        if self.alpha_note:
            out.append(self.alpha_note)
        if self.unmatched:
            out.append(f"{len(self.unmatched)} key(s) in the file were not used:")
            out += [f"  {key}: {reason}" for key, reason in sorted(self.unmatched.items())]
        if self.missing:
            out.append(f"{len(self.missing)} adapted module(s) had no weights in the file and keep a fresh init:")
            out += [f"  {name}" for name in self.missing]
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


def apply_init_weights(network: LoraNetwork, path: str | Path, *, allow_pickle: bool = False) -> InitWeightsReport:
    """Copy a LoRA file's weights into the live adapters (weights only: the optimizer starts fresh).

    Copies in place, so the optimizer's parameter groups keep pointing at the same tensors. The
    rank must equal ``network.dim`` (``LoraFileError`` otherwise). A file alpha that differs from the
    configured one is reported, not adopted: the run trains at its own ``network.alpha``.
    """
    contents = load_lora_file(path, allow_pickle=allow_pickle)
    if not contents.has_weights:
        raise LoraFileError(
            f"network.init_weights: '{contents.path}' holds no kohya LoRA weights (*.lora_down.weight); "
            "give a LoRA file written by this tool, kohya sd-scripts or a compatible trainer"
        )
    if contents.ranks and network.dim not in contents.ranks.values():
        raise LoraFileError(
            f"network.init_weights: '{contents.path}' has rank {contents.dim} but network.dim={network.dim}; "
            f"the rank must match to continue from it: set network.dim={contents.dim}"
        )

    unmatched: dict[str, str] = {}
    missing: list[str] = []
    loaded = 0
    file_alphas: dict[str, float] = {}
    claimed: set[str] = set()
    for part in network.parts:
        label = part.label
        keys = [k for k in contents.tensors if k.startswith(part.kohya_prefix)]
        claimed.update(keys)
        if not part.trains:
            unmatched.update({k: f"the {label} gets no LoRA in this run ({part.why_off})" for k in keys})
            continue
        match = peft_state_from_kohya(contents.tensors, part, ADAPTER)
        parameters = dict(part.model.named_parameters())
        with torch.no_grad():
            for name, value in match.state.items():
                parameters[name].copy_(value.to(parameters[name].device, parameters[name].dtype))
        loaded += len(match.state)
        unmatched.update(match.unmatched)
        missing += [f"{label}:{name}" for name in match.missing]
        file_alphas.update({f"{label}:{m}": a for m, a in match.alphas.items()})
    for key in contents.tensors:
        if key in claimed:
            continue
        if key.startswith(EMBEDDING_PREFIX):
            unmatched[key] = "a bundled textual-inversion embedding, not a LoRA weight (read_bundled_embeddings)"
        else:
            prefixes = " / ".join(f"{part.kohya_prefix}*" for part in network.parts)
            unmatched[key] = f"not a kohya LoRA key of this model family ({prefixes})"
    if loaded == 0:
        first = "\n  ".join(f"{k}: {r}" for k, r in list(unmatched.items())[:5])
        raise LoraFileError(
            f"network.init_weights: nothing in '{contents.path}' fits this model's adapters:\n  {first}"
        )

    file_alpha = Counter(file_alphas.values()).most_common(1)[0][0] if file_alphas else contents.alpha
    note = None
    differing = sorted({a for a in file_alphas.values() if abs(a - network.alpha) > 1e-6 * max(1.0, network.alpha)})
    if differing:
        shown = ", ".join(f"{a:g}" for a in differing)
        note = (
            f"alpha differs: the file was trained with alpha {shown}, this run uses network.alpha={network.alpha:g}; "
            f"the loaded update is scaled by {network.alpha:g}/{network.dim} instead of "
            f"{differing[0]:g}/{network.dim} (set network.alpha={differing[0]:g} to continue at the file's strength)"
        )
    report = InitWeightsReport(contents.path, loaded, unmatched, missing, file_alpha, network.alpha, note)
    for line in report.lines():
        logger.info(line)
    return report


def init_weights_problems(network_cfg: Any, *, allow_pickle: bool = False) -> list[str]:
    """Startup check of ``network.init_weights``: the file exists, is readable, and its rank is network.dim.

    Reads only the safetensors header (shapes, metadata), so it is cheap even for large files.
    """
    path = network_cfg.init_weights
    if not path:
        return []
    path = Path(path).expanduser()
    if not path.is_file():
        return [f"network.init_weights: LoRA file '{path}' does not exist"]
    try:
        file_format = file_format_of(path)
        if file_format != "safetensors":
            return [] if allow_pickle else [_pickle_refusal("network.init_weights", file_format, reading=True)]
        with safe_open(str(path), framework="pt") as lora:
            shapes = {key: lora.get_slice(key).get_shape() for key in lora.keys()}  # noqa: SIM118
    except Exception as error:  # safetensors raises its own SafetensorError for a file that is not one
        return [
            f"network.init_weights: '{path}' cannot be read as a LoRA file ({type(error).__name__}: {error}); "
            "give a .safetensors LoRA file (or fix the path)"
        ]
    if not any(key.endswith(suffix) for key in shapes for suffix in _PEFT_NAMES):
        return [f"network.init_weights: '{path}' holds no kohya LoRA weights (*.lora_down.weight)"]
    ranks = set(file_ranks(shapes).values())
    if ranks and network_cfg.dim not in ranks:
        rank = min(ranks)
        return [
            f"network.init_weights: '{path}' has rank {rank} but network.dim={network_cfg.dim}; "
            f"the rank must match to continue from it: set network.dim={rank}"
        ]
    return []


# --- helpers


def _pickle_refusal(key: str, fmt: str, reading: bool = False) -> str:
    what = "reads" if reading else "writes"
    return (
        f"{key}: {fmt!r} {what} a pickle file, which can run arbitrary code when loaded; use safetensors "
        "(output.format=safetensors), or set output.allow_pickle=true to opt in explicitly"
    )
