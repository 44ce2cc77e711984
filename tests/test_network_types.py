"""``network.type``: LoRA and LoHa through the one loop, on the tiny models.

LoHa's update checked against LyCORIS' formula on a small layer, its file's names and shapes built
from the model (LyCORIS' ``lycoris.kohya`` layout), training, save -> load, exact repeats, and the
combinations refused at startup.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sweeper.config.validate import ConfigError, validate
from sweeper.run.setting import run
from sweeper.tracking.tracker import NullTracker
from tests.test_training import FAMILIES
from training.data.scan import scan_dataset
from training.families.loading import load_base_model
from training.loop import Trainer
from training.network.adapters import adapter_config, adapter_parameters, attach_lora
from training.network.file import LoraFileError
from training.network.lora import remove_lora

LOHA = ["network.type=loha", "network.dim=4", "network.alpha=2"]


def test_loha_update_is_the_hadamard_product_of_two_low_rank_products():
    """LyCORIS (lycoris/functional/loha.py) and A1111's network_hada.py: ΔW = (w1a·w1b) ⊙ (w2a·w2b) · alpha/dim."""
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(12, 10))
    attach_lora(layer, adapter_config("loha", 3, 1.5, ["0"]))
    params = {name.split(".")[-2]: p for name, p in adapter_parameters(layer)}
    assert {k: tuple(v.shape) for k, v in params.items()} == {
        "hada_w1_a": (10, 3),
        "hada_w1_b": (3, 12),
        "hada_w2_a": (10, 3),
        "hada_w2_b": (3, 12),
    }
    with torch.no_grad():
        for p in params.values():
            p.normal_()
    delta = (params["hada_w1_a"] @ params["hada_w1_b"]) * (params["hada_w2_a"] @ params["hada_w2_b"]) * 1.5 / 3
    x = torch.randn(5, 12)
    base = layer[0].get_base_layer()
    torch.testing.assert_close(layer(x), base(x) + x @ delta.T, rtol=1e-5, atol=1e-5)


def _train(cfg):
    base = load_base_model(cfg.model)
    frozen = {k: v.clone() for k, v in base.denoiser.state_dict().items()}
    trainer = Trainer(cfg, base, scan_dataset(cfg.data.train_dir).records, NullTracker())
    result = trainer.fit(show_progress=False)
    return base, frozen, trainer, result


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_loha_trains_with_the_base_frozen_and_its_file_holds_every_adapted_module(make_cfg, family):
    cfg = make_cfg(*FAMILIES[family], *LOHA, "train.max_steps=40", "train.batch_size=4", "optimizer.lr=1e-2")
    base, frozen, trainer, result = _train(cfg)
    first, last = result.losses[:10], result.losses[-10:]
    assert sum(last) / len(last) < 0.95 * sum(first) / len(first)
    after = {k.replace(".base_layer", ""): v for k, v in base.denoiser.state_dict().items() if "hada_" not in k}
    assert after.keys() == frozen.keys() and all(torch.equal(frozen[k], after[k]) for k in frozen)
    tensors = trainer.network.kohya_state_dict()
    part = trainer.network.parts[0]
    adapted = sorted({name.rsplit(".hada_", 1)[0] for name, _ in adapter_parameters(part.model)})
    expected = set()
    for module in adapted:  # names built from the model: the family's kohya name of every adapted module
        layer = part.model.get_submodule(module).get_base_layer()
        rows, columns = layer.weight.shape[0], layer.weight[0].numel()
        flat = part.kohya_prefix + part.kohya_name(module)
        shapes = {"hada_w1_a": (rows, 4), "hada_w1_b": (4, columns), "hada_w2_a": (rows, 4), "hada_w2_b": (4, columns)}
        for suffix, shape in shapes.items():
            assert tuple(tensors[f"{flat}.{suffix}"].shape) == shape, (flat, suffix)
            expected.add(f"{flat}.{suffix}")
        assert float(tensors[f"{flat}.alpha"]) == 2.0
        expected.add(f"{flat}.alpha")
    assert expected == set(tensors)
    remove_lora(trainer.network)


def test_a_loha_file_loads_back_and_the_same_seed_repeats_it(make_cfg, tmp_path):
    cfg = make_cfg(*LOHA, "train.max_steps=6", f"output.dir={tmp_path / 'a'}")
    first = run(cfg, show_progress=False)
    with safe_open(str(first.lora_path), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert json.loads(metadata["ss_network_args"]) == {"algo": "loha"}
    again = run(make_cfg(*LOHA, "train.max_steps=6", f"output.dir={tmp_path / 'b'}"), show_progress=False)
    a, b = load_file(first.lora_path), load_file(again.lora_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # network.init_weights reads it into a fresh LoHa: every tensor, none left at its initial value
    resumed = make_cfg(*LOHA, "train.max_steps=1", f"network.init_weights={first.lora_path}")
    base = load_base_model(resumed.model)
    trainer = Trainer(resumed, base, scan_dataset(resumed.data.train_dir).records, NullTracker())
    assert trainer.init_report.loaded == sum(1 for k in a if not k.endswith(".alpha"))
    assert not trainer.init_report.unmatched and not trainer.init_report.missing
    assert all(torch.equal(a[k], v) for k, v in trainer.network.kohya_state_dict().items())
    remove_lora(trainer.network)
    # a LoHa file into a LoRA run says which type it holds
    with pytest.raises(LoraFileError, match=r"holds a LoHa .*set network.type=loha"):
        run(make_cfg("network.dim=4", f"network.init_weights={first.lora_path}"), show_progress=False)


def test_network_type_combinations_are_refused_at_startup_naming_the_key(make_cfg):
    with pytest.raises(ConfigError) as caught:
        validate(make_cfg("network.type=lohaa"))
    assert "network.type: unknown 'lohaa'; use one of lora, loha" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        validate(make_cfg(*LOHA, "network.dropout=0.1", "network.max_norm=1.0"))
    assert "network.dropout is kohya's LoRA option" in str(caught.value)
    assert "network.max_norm is kohya's LoRA option" in str(caught.value)
    with pytest.raises(ConfigError, match=r"network.type=loha: FLUX.1's files fuse q, k and v"):
        validate(make_cfg("model.kind=flux", *LOHA))
