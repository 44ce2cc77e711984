"""``network.type``: LoRA, LoCon, LoHa, LoKr and DoRA through the one loop, on the tiny models.

Each type's update is checked against its paper's formula on a small layer; each type's file is read
back the way the tools' loaders read it (``tool_delta`` below: the rules of A1111's built-in Lora
extension, ``network_lora.py`` / ``network_hada.py`` / ``network_lokr.py`` / ``network.py``'s weight
decomposition, and ComfyUI's ``weight_adapter``), and the weight that gives must be the one the
trained adapter applies, for every adapted module of the model, so names, shapes and scales are
built from the model and checked by what they do. Then training, save -> load, exact repeats, and
the combinations refused at startup.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open

from sweeper.config.validate import ConfigError, validate
from sweeper.run.setting import run
from sweeper.tracking.tracker import NullTracker
from tests.test_training import FAMILIES
from training.data.scan import scan_dataset
from training.families.loading import load_base_model
from training.loop import Trainer
from training.network.adapters import ADAPTER, adapter_config, adapter_parameters, attach_lora
from training.network.file import LoraFileError, load_lora_file
from training.network.lora import add_lora, remove_lora

# each type with the options that exercise it: conv layers where the type may have them, a LoKr
# whose small factor is low-rank too, and dims that leave some LoKr factors full (no rank tensor)
TYPES = {
    "lora": ["network.type=lora", "network.dim=4", "network.alpha=2"],
    "locon": ["network.type=locon", "network.dim=4", "network.alpha=2", "network.conv_dim=2", "network.conv_alpha=1"],
    "loha": ["network.type=loha", "network.dim=4", "network.alpha=2", "network.conv_dim=2"],
    "lokr": ["network.type=lokr", "network.dim=4", "network.alpha=2", "network.conv_dim=2", "network.lokr_factor=4"],
    "dora": ["network.type=dora", "network.dim=4", "network.alpha=2", "network.conv_dim=2"],
}


# --- the formulas, on one small layer


def _randomise(model: torch.nn.Module) -> None:
    """Non-zero adapter weights everywhere (fresh adapters are no-ops by design)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in adapter_parameters(model):
            if "magnitude" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))


def _params(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name.replace(f".{ADAPTER}", ""): p for name, p in adapter_parameters(layer)}


def test_lora_and_locon_add_up_times_down_scaled_by_alpha_over_dim_on_linear_and_3x3_conv_layers():
    """Hu et al. 2021 eq. 3; a 3x3 conv LoRA is a (dim, in, 3, 3) down conv then a 1x1 up (LyCORIS' LoCon)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.Conv2d(6, 8, 3, padding=1))
    attach_lora(model, adapter_config("locon", 3, 1.5, ["0"], conv_targets=["1"], conv_dim=2, conv_alpha=4.0))
    _randomise(model)
    linear, conv = _params(model[0]), _params(model[1])
    assert tuple(conv["lora_A.weight"].shape) == (2, 6, 3, 3) and tuple(conv["lora_B.weight"].shape) == (8, 2, 1, 1)
    x = torch.randn(5, 12)
    delta = linear["lora_B.weight"] @ linear["lora_A.weight"] * 1.5 / 3
    torch.testing.assert_close(model[0](x), model[0].get_base_layer()(x) + x @ delta.T, rtol=1e-5, atol=1e-5)
    image = torch.randn(2, 6, 7, 7)
    kernel = (conv["lora_B.weight"].flatten(1) @ conv["lora_A.weight"].flatten(1)).reshape(8, 6, 3, 3) * 4.0 / 2
    expected = model[1].get_base_layer()(image) + F.conv2d(image, kernel, padding=1)
    torch.testing.assert_close(model[1](image), expected, rtol=1e-4, atol=1e-4)


def test_loha_update_is_the_hadamard_product_of_two_low_rank_products():
    """LyCORIS (lycoris/functional/loha.py) and A1111's network_hada.py: ΔW = (w1a·w1b) ⊙ (w2a·w2b) · alpha/dim."""
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(12, 10))
    attach_lora(layer, adapter_config("loha", 3, 1.5, ["0"]))
    _randomise(layer)
    params = _params(layer[0])
    assert {k: tuple(v.shape) for k, v in params.items()} == {
        "hada_w1_a": (10, 3),
        "hada_w1_b": (3, 12),
        "hada_w2_a": (10, 3),
        "hada_w2_b": (3, 12),
    }
    delta = (params["hada_w1_a"] @ params["hada_w1_b"]) * (params["hada_w2_a"] @ params["hada_w2_b"]) * 1.5 / 3
    x = torch.randn(5, 12)
    torch.testing.assert_close(layer(x), layer[0].get_base_layer()(x) + x @ delta.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("dim", "factor", "shapes"),
    [
        # out 96 = 8 x 12, in 64 = 8 x 8 (sides nearest the square root); dim 2 < 12/2: w2 low-rank
        (2, -1, {"lokr_w1": (8, 8), "lokr_w2_a": (12, 2), "lokr_w2_b": (2, 8)}),
        # factor 4: out 96 = 4 x 24, in 64 = 4 x 16; dim 16 >= 24/2: both factors full
        (16, 4, {"lokr_w1": (4, 4), "lokr_w2": (24, 16)}),
    ],
)
def test_lokr_update_is_the_kronecker_product_of_its_factors(dim, factor, shapes):
    """KronA / LyCORIS' LoKr: ΔW = w1 ⊗ w2 · alpha/dim, w1 (out_l, in_m), w2 (out_k, in_n)."""
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(64, 96))
    attach_lora(layer, adapter_config("lokr", dim, 3.0, ["0"], lokr_factor=factor))
    _randomise(layer)
    params = _params(layer[0])
    assert {k: tuple(v.shape) for k, v in params.items()} == shapes
    w2 = params["lokr_w2"] if "lokr_w2" in params else params["lokr_w2_a"] @ params["lokr_w2_b"]
    delta = torch.kron(params["lokr_w1"], w2) * 3.0 / dim
    x = torch.randn(5, 64)
    torch.testing.assert_close(layer(x), layer[0].get_base_layer()(x) + x @ delta.T, rtol=1e-4, atol=1e-4)


def test_dora_is_a_learned_magnitude_times_the_normalised_direction():
    """Liu et al. 2024 eq. 5: W' = m · (W + ΔW) / ‖W + ΔW‖, the norm of each output feature's row."""
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(12, 10))
    attach_lora(layer, adapter_config("dora", 3, 1.5, ["0"]))
    _randomise(layer)
    params, base = _params(layer[0]), layer[0].get_base_layer()
    merged = base.weight + params["lora_B.weight"] @ params["lora_A.weight"] * 1.5 / 3
    weight = params["lora_magnitude_vector.weight"][:, None] * merged / merged.norm(dim=1, keepdim=True)
    x = torch.randn(5, 12)
    torch.testing.assert_close(layer(x), x @ weight.T + base.bias, rtol=1e-5, atol=1e-5)


# --- the file, as the tools read it


def tool_delta(tensors: dict[str, torch.Tensor], name: str, weight: torch.Tensor) -> torch.Tensor:
    """The change to ``weight`` that the tools make of module ``name`` of a file.

    LoRA/LoCon: up · down (a 3x3 down through its flattened kernel), scale alpha / down's rank.
    LoHa: (w1_a · w1_b) ⊙ (w2_a · w2_b), scale alpha / w1_b's rank. LoKr: kron(w1, w2), each factor
    whole or a product, scale alpha / the rank of w2_b, else of w1_b, and 1 when neither exists
    (A1111's ``network_lokr.py`` and ComfyUI's ``weight_adapter/lokr.py`` both). DoRA: the LoRA's
    merged weight W + ΔW with each output row rescaled to ``dora_scale`` (out, 1) over its own norm,
    LyCORIS' ``wd_on_output`` decomposition (its kohya wrapper's default). Of the loaders, ComfyUI
    picks that axis by the shape but divides by the base weight's row norm (an open fix:
    Comfy-Org/ComfyUI#15458), and A1111's mainline reads only the input axis: README, "Network types".
    """
    get = tensors.get
    if f"{name}.lora_down.weight" in tensors:
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        product, rank = up.flatten(1) @ down.flatten(1), down.shape[0]
    elif f"{name}.hada_w1_a" in tensors:
        w1 = tensors[f"{name}.hada_w1_a"] @ tensors[f"{name}.hada_w1_b"]
        product, rank = (
            w1 * (tensors[f"{name}.hada_w2_a"] @ tensors[f"{name}.hada_w2_b"]),
            get(f"{name}.hada_w1_b").shape[0],
        )
    else:
        w1 = get(f"{name}.lokr_w1")
        w1 = w1 if w1 is not None else tensors[f"{name}.lokr_w1_a"] @ tensors[f"{name}.lokr_w1_b"]
        w2 = get(f"{name}.lokr_w2")
        if w2 is None:
            w2 = tensors[f"{name}.lokr_w2_a"] @ tensors[f"{name}.lokr_w2_b"]
            w2 = w2.reshape(w2.shape[0], -1, *weight.shape[2:])
        product = torch.kron(w1.reshape(*w1.shape, *[1] * (weight.dim() - 2)), w2)
        rank_tensor = get(f"{name}.lokr_w2_b", get(f"{name}.lokr_w1_b"))
        rank = None if rank_tensor is None else rank_tensor.shape[0]
    scale = float(tensors[f"{name}.alpha"]) / rank if rank is not None else 1.0
    delta = product.reshape(weight.shape) * scale
    if f"{name}.dora_scale" in tensors:
        magnitude = tensors[f"{name}.dora_scale"]
        assert tuple(magnitude.shape) == (weight.shape[0], *[1] * (weight.dim() - 1))  # the output axis
        merged = weight + delta
        delta = merged * magnitude / merged.flatten(1).norm(dim=1).reshape(magnitude.shape) - weight
    return delta


@torch.no_grad()
def applied_delta(layer: BaseTunerLayer) -> torch.Tensor:
    """The change the live adapter makes to its layer's weight, from peft's own merge."""
    base = layer.get_base_layer()
    original = base.weight.detach().clone()
    layer.merge(adapter_names=[ADAPTER])
    delta = base.weight.detach() - original
    layer.unmerge()
    return delta


@pytest.mark.parametrize(
    ("network_type", "family"),
    [
        *((t, "sd1") for t in TYPES),
        *((t, "sdxl") for t in ("locon", "lokr", "dora", "loha")),
        *((t, family) for t in ("lora", "loha", "dora") for family in ("sd3", "flux")),  # fused q/k/v layers
    ],
)
def test_the_file_gives_the_tools_the_weight_the_adapter_applies_for_every_module(make_cfg, network_type, family):
    cfg = make_cfg(*FAMILIES[family], *TYPES[network_type], "network.train_text_encoder=true")
    base = load_base_model(cfg.model)
    network = add_lora(base, cfg.network, 1e-4)
    try:
        for part in network.adapted():
            _randomise(part.model)
        tensors = network.kohya_state_dict()
        seen, convs = set(), []
        for part in network.adapted():
            for flat, group in part.fused.items():  # one original layer: its modules' rows in order
                layers = [part.model.get_submodule(module) for module in group]
                weight = torch.cat([getattr(layer, "base_layer", layer).weight.detach() for layer in layers])
                applied = torch.cat(
                    [
                        applied_delta(layer) if isinstance(layer, BaseTunerLayer) else torch.zeros_like(layer.weight)
                        for layer in layers
                    ]
                )
                seen.add(part.kohya_prefix + flat)
                name = part.kohya_prefix + flat
                torch.testing.assert_close(tool_delta(tensors, name, weight), applied, rtol=1e-4, atol=1e-5, msg=name)
            in_groups = part.fused_modules
            for module, layer in part.model.named_modules():
                if not isinstance(layer, BaseTunerLayer) or module in in_groups:
                    continue
                name = part.kohya_prefix + part.kohya_name(module)  # the family's kohya name, from the model
                seen.add(name)
                weight = layer.get_base_layer().weight.detach()
                if weight.dim() == 4 and weight.shape[-1] == 3:
                    convs.append(name)
                torch.testing.assert_close(
                    tool_delta(tensors, name, weight), applied_delta(layer), rtol=1e-4, atol=1e-5, msg=name
                )
        assert {key.rsplit(".", 2 if key.endswith(".weight") else 1)[0] for key in tensors} == seen
        # kohya's LoRA leaves the 3x3 convolutions alone; network.conv_dim puts the others on them
        assert bool(convs) == (network_type != "lora" and family in ("sd1", "sdxl")), convs
    finally:
        remove_lora(network)


# --- training, save -> load, repeats


def _probe(base) -> torch.Tensor:
    """The denoiser's output on one fixed input (the LoRA as it stands)."""
    generator = torch.Generator().manual_seed(3)
    config = base.denoiser.config
    latents = torch.randn(1, config.in_channels, config.sample_size, config.sample_size, generator=generator)
    hidden = torch.randn(1, 4, config.cross_attention_dim, generator=generator)
    extra = {}
    if getattr(config, "addition_embed_type", None) == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(1, pooled), "time_ids": torch.zeros(1, 6)}}
    with torch.no_grad():
        return base.denoiser(latents, torch.tensor([500]), hidden, **extra).sample


@pytest.mark.slow
@pytest.mark.parametrize("network_type", ["locon", "loha", "lokr", "dora"])
def test_each_type_trains_with_the_base_frozen_and_loads_back_to_the_same_outputs(make_cfg, tmp_path, network_type):
    options = [*TYPES[network_type], "train.max_steps=30", "train.batch_size=4", "optimizer.lr=1e-2"]
    cfg = make_cfg(*options, f"output.dir={tmp_path / 'a'}")
    base = load_base_model(cfg.model)
    frozen = {k: v.clone() for k, v in base.denoiser.state_dict().items()}
    trainer = Trainer(cfg, base, scan_dataset(cfg.data.train_dir).records, NullTracker())
    result = trainer.fit(show_progress=False)
    first, last = result.losses[:10], result.losses[-10:]
    assert sum(last) / len(last) < 0.95 * sum(first) / len(first)
    own = {name for name, _ in adapter_parameters(base.denoiser)}
    after = {k.replace(".base_layer", ""): v for k, v in base.denoiser.state_dict().items() if k not in own}
    assert after.keys() == frozen.keys() and all(torch.equal(frozen[k], after[k]) for k in frozen)
    trained_output, tensors = _probe(base), trainer.network.kohya_state_dict()
    remove_lora(trainer.network)

    saved = run(make_cfg(*options, f"output.dir={tmp_path / 'b'}"), show_progress=False).lora_path
    again = run(make_cfg(*options, f"output.dir={tmp_path / 'c'}"), show_progress=False).lora_path
    file, repeat = load_lora_file(saved).tensors, load_lora_file(again).tensors
    assert file.keys() == tensors.keys() and all(torch.equal(file[k], repeat[k]) for k in file)  # same seed
    assert all(torch.equal(file[k], tensors[k].to(file[k].dtype)) for k in file)  # run() trains the same
    with safe_open(str(saved), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_network_module"] == "lycoris.kohya"
    args = json.loads(metadata["ss_network_args"])
    assert args["algo"] == {"dora": "lora"}.get(network_type, network_type) and args["conv_dim"] == "2"
    assert args.get("dora_wd") == ("True" if network_type == "dora" else None)

    # network.init_weights reads it into a fresh network of the type: every tensor, the same outputs
    resumed = make_cfg(*TYPES[network_type], "train.max_steps=1", f"network.init_weights={saved}")
    trainer = Trainer(resumed, base, scan_dataset(resumed.data.train_dir).records, NullTracker())
    try:
        assert trainer.init_report.loaded == sum(1 for k in file if not k.endswith(".alpha"))
        assert not trainer.init_report.unmatched and not trainer.init_report.missing
        torch.testing.assert_close(_probe(base), trained_output, rtol=1e-5, atol=1e-6)
        reloaded = trainer.network.kohya_state_dict()
        assert all(torch.allclose(reloaded[k], v, rtol=1e-6, atol=1e-7) for k, v in file.items())
    finally:
        remove_lora(trainer.network)
    # a file of another type says which type it holds
    with pytest.raises(LoraFileError, match=r"holds a \w+ network .*set network.type="):
        run(
            make_cfg(
                "network.dim=4",
                "network.type=loha" if network_type != "loha" else "network.type=lokr",
                f"network.init_weights={saved}",
            ),
            show_progress=False,
        )


# --- refused at startup


def test_network_type_options_are_refused_where_the_type_has_none_naming_the_key(make_cfg):
    with pytest.raises(ConfigError) as caught:
        validate(make_cfg("network.type=lohaa"))
    assert "network.type: unknown 'lohaa'; use one of lora, locon, loha, lokr, dora" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        validate(make_cfg("network.type=loha", "network.dropout=0.1", "network.max_norm=1.0", "network.lokr_factor=4"))
    message = str(caught.value)
    assert "network.dropout=0.1 is an option of network.type=lora/locon/dora, not of network.type=loha" in message
    assert "network.max_norm=1.0 is an option of network.type=lora/locon" in message
    assert "network.lokr_factor=4 is an option of network.type=lokr" in message
    with pytest.raises(ConfigError, match=r"network.conv_dim=4 is an option of .*LoCon.*or network.type=locon"):
        validate(make_cfg("network.conv_dim=4"))
    with pytest.raises(ConfigError, match=r"network.conv_alpha=1.0 has no conv layers to scale"):
        validate(make_cfg("network.type=dora", "network.conv_alpha=1"))
    with pytest.raises(ConfigError, match=r"network.lokr_factor must be -1"):
        validate(make_cfg("network.type=lokr", "network.lokr_factor=0"))
    with pytest.raises(ConfigError, match=r"network.type=lokr: FLUX.1's files fuse q, k and v"):
        validate(make_cfg("model.kind=flux", "network.type=lokr"))
    with pytest.raises(ConfigError, match=r"LoCon adapts a UNet's ResNet convolutions, and SD3"):
        validate(make_cfg("model.kind=sd3", "network.type=locon"))
    for options in TYPES.values():
        validate(make_cfg(*options))  # each type with its own options is fine


@pytest.mark.parametrize("network_type", list(TYPES))
def test_which_types_diffusers_load_lora_weights_takes_and_what_it_makes_of_them(make_cfg, network_type):
    """diffusers' kohya converter (0.42) takes LoRA and LoCon files and gives the trained adapter's outputs;
    it takes a DoRA file's LoRA part without its magnitudes (other outputs), and refuses LoHa and LoKr keys
    (README, "Network types": which tools load which type)."""
    from training.families.tiny_sd import build_tiny_pipeline

    cfg = make_cfg(*TYPES[network_type])
    base = load_base_model(cfg.model)
    network = add_lora(base, cfg.network, 1e-4)
    try:
        for part in network.adapted():
            _randomise(part.model)
        tensors, expected = network.kohya_state_dict(), _probe(base)
    finally:
        remove_lora(network)
    pipe = build_tiny_pipeline()
    pipe.unet.load_state_dict(base.denoiser.state_dict())  # the same base weights as the run's
    if network_type in ("loha", "lokr"):
        with pytest.raises(ValueError, match="have not been correctly renamed"):
            pipe.load_lora_weights(dict(tensors))
        return
    pipe.load_lora_weights(dict(tensors))
    base.denoiser, original = pipe.unet, base.denoiser
    try:
        loaded = _probe(base)
    finally:
        base.denoiser = original
    if network_type == "dora":
        assert not any("magnitude" in name for name in pipe.unet.state_dict()), "dora_scale is dropped"
        assert not torch.allclose(loaded, expected, rtol=1e-3, atol=1e-3)
    else:
        torch.testing.assert_close(loaded, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("network_type", "family"), [("dora", "sd3"), ("dora", "flux"), ("loha", "flux")])
def test_fused_layers_of_a_dora_or_loha_train_and_load_back_whole(make_cfg, tmp_path, network_type, family):
    """SD3/FLUX write q, k and v as one original layer: a DoRA's magnitudes ride along row by row, a
    LoHa's two products are block-diagonal like a LoRA's."""
    options = [*FAMILIES[family], f"network.type={network_type}", "network.dim=4", "network.alpha=2"]
    options.append("train.max_steps=4")
    saved = run(make_cfg(*options, f"output.dir={tmp_path}"), show_progress=False).lora_path
    file = load_lora_file(saved).tensors
    suffix = ".dora_scale" if network_type == "dora" else ".hada_w1_a"
    assert [k for k in file if k.endswith(suffix) and "_qkv." in k], "the fused q/k/v layers are written whole"
    cfg = make_cfg(*options[:-1], "train.max_steps=1", f"network.init_weights={saved}")
    base = load_base_model(cfg.model)
    trainer = Trainer(cfg, base, scan_dataset(cfg.data.train_dir).records, NullTracker())
    try:
        assert not trainer.init_report.unmatched and not trainer.init_report.missing
        reloaded = trainer.network.kohya_state_dict()
        assert reloaded.keys() == file.keys()
        assert all(torch.allclose(reloaded[k], v, rtol=1e-6, atol=1e-7) for k, v in file.items())
    finally:
        remove_lora(trainer.network)
