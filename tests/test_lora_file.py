"""The LoRA file: output options (format, pickle opt-in, precision, metadata), bundled embeddings,
and loading a file back into live adapters for ``network.init_weights``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from safetensors import safe_open
from safetensors.torch import save_file

from training.families.loading import load_base_model
from training.network.file import (
    LoraFileError,
    apply_init_weights,
    bundle_embeddings,
    init_weights_problems,
    load_lora_file,
    output_problems,
    peft_state_from_kohya,
    read_bundled_embeddings,
    save_lora,
    save_lora_file,
)
from training.network.lora import LoraPart, add_lora, remove_leftover_adapters, remove_lora
from training.network.metadata import MINIMAL_METADATA_KEYS, kohya_metadata

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
TE_Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


def output_cfg(tmp_path: Path, **changes) -> SimpleNamespace:
    values = dict(dir=str(tmp_path), name="lora", comment="", format="safetensors", allow_pickle=False, metadata=True)
    values["precision"] = "fp32"
    return SimpleNamespace(**{**values, **changes})


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        f"{Q}.lora_down.weight": torch.randn(4, 32, generator=g),
        f"{Q}.lora_up.weight": torch.randn(32, 4, generator=g),
        f"{Q}.alpha": torch.tensor(2.0),
    }


def sample_metadata(**kwargs) -> dict[str, str]:
    network = SimpleNamespace(dim=4, alpha=2.0)
    return kohya_metadata(
        network,
        output_name="shapes",
        base_model_version="tiny_sd_v1",
        comment="a comment",
        seed=7,
        steps=20,
        resolved_config={"network": {"dim": 4}},
        **kwargs,
    )


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as lora:
        return {k: lora.get_tensor(k) for k in lora.keys()}, dict(lora.metadata() or {})  # noqa: SIM118


# --- output options


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, []),
        ({"format": "ckpt", "allow_pickle": True}, []),
        ({"format": "onnx"}, ["output.format"]),
        ({"format": "ckpt"}, ["output.format", "output.allow_pickle"]),
        ({"format": "bin"}, ["output.allow_pickle"]),
        ({"precision": "fp8"}, ["output.precision"]),
        ({"name": "sub/dir"}, ["output.name"]),
    ],
)
def test_output_problems_name_the_keys(tmp_path, changes, expected):
    problems = output_problems(output_cfg(tmp_path, **changes))
    if not expected:
        assert problems == []
    else:
        assert len(problems) == 1
        assert all(key in problems[0] for key in expected)


def test_output_problems_lists_every_problem_at_once(tmp_path):
    problems = output_problems(output_cfg(tmp_path, format="pt", precision="half"))
    assert len(problems) == 2
    assert any("output.allow_pickle" in p for p in problems) and any("output.precision" in p for p in problems)


def test_default_format_is_safetensors_written_atomically(tmp_path):
    path = save_lora(output_cfg(tmp_path), sample_tensors(), sample_metadata())
    assert path == tmp_path / "lora.safetensors"
    tensors, metadata = read_safetensors(path)
    assert torch.equal(tensors[f"{Q}.lora_up.weight"], sample_tensors()[f"{Q}.lora_up.weight"])
    assert metadata["ss_output_name"] == "shapes"
    assert [p.name for p in tmp_path.iterdir()] == ["lora.safetensors"], "no temporary file left behind"


def test_pickle_formats_are_refused_without_the_opt_in(tmp_path):
    with pytest.raises(LoraFileError) as error:
        save_lora(output_cfg(tmp_path, format="ckpt"), sample_tensors(), sample_metadata())
    assert "output.format" in str(error.value) and "output.allow_pickle" in str(error.value)
    assert list(tmp_path.iterdir()) == [], "nothing may be written"


@pytest.mark.parametrize("file_format", ["pt", "ckpt", "bin"])
def test_pickle_formats_with_opt_in_warn_and_load_back(tmp_path, caplog, file_format):
    cfg = output_cfg(tmp_path, format=file_format, allow_pickle=True)
    with caplog.at_level(logging.WARNING, logger="training.network.file"):
        path = save_lora(cfg, sample_tensors(), sample_metadata())
    assert path == tmp_path / f"lora.{file_format}"
    assert any("pickle" in r.getMessage() and "run arbitrary code" in r.getMessage() for r in caplog.records)
    loaded = torch.load(path, weights_only=True)
    assert loaded.keys() == sample_tensors().keys()
    assert all(torch.equal(loaded[k], v) for k, v in sample_tensors().items())
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_extension_follows_the_format(tmp_path):
    tensors, metadata = sample_tensors(), sample_metadata()
    assert save_lora_file(tmp_path / "a.safetensors", tensors, metadata, file_format="pt", allow_pickle=True).name == (
        "a.pt"
    )
    assert save_lora_file(tmp_path / "b.ckpt", tensors, metadata).name == "b.safetensors"
    assert save_lora_file(tmp_path / "c.v2", tensors, metadata).name == "c.v2.safetensors"
    assert save_lora(output_cfg(tmp_path), tensors, metadata, stem="lora-step000010").name == (
        "lora-step000010.safetensors"
    )


@pytest.mark.parametrize(
    ("precision", "dtype"), [("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)]
)
def test_precision_casts_every_tensor_alpha_included(tmp_path, precision, dtype):
    tensors = bundle_embeddings(sample_tensors(), {"tok": torch.randn(2, 32)})
    path = save_lora(output_cfg(tmp_path, precision=precision), tensors, sample_metadata())
    saved, _ = read_safetensors(path)
    assert {t.dtype for t in saved.values()} == {dtype}
    assert float(saved[f"{Q}.alpha"]) == 2.0
    assert torch.allclose(
        saved[f"{Q}.lora_down.weight"].float(), tensors[f"{Q}.lora_down.weight"], atol=1e-2, rtol=1e-2
    )


def test_metadata_false_keeps_only_what_loaders_need(tmp_path):
    full = save_lora(output_cfg(tmp_path, name="full"), sample_tensors(), sample_metadata())
    slim = save_lora(output_cfg(tmp_path, name="slim", metadata=False), sample_tensors(), sample_metadata())
    _, full_meta = read_safetensors(full)
    _, slim_meta = read_safetensors(slim)
    assert set(slim_meta) == {
        *MINIMAL_METADATA_KEYS,
        "sshs_model_hash",
        "sshs_legacy_hash",
        "lora_sweeper_config_sha256",
    }
    assert slim_meta["ss_network_dim"] == "4" and slim_meta["ss_network_alpha"] == "2"
    assert {"ss_output_name", "ss_training_comment", "ss_seed", "lora_sweeper_config"} <= set(full_meta)


def test_tag_frequency_is_stored_as_json(tmp_path):
    frequency = {"10_shapes": {"circle": 3, "red": 2}}
    path = save_lora(output_cfg(tmp_path), sample_tensors(), sample_metadata(tag_frequency=json.dumps(frequency)))
    assert json.loads(read_safetensors(path)[1]["ss_tag_frequency"]) == frequency
    assert json.loads(sample_metadata(tag_frequency=frequency)["ss_tag_frequency"]) == frequency
    with pytest.raises(ValueError, match="ss_tag_frequency"):
        sample_metadata(tag_frequency="{not json")
    assert "ss_tag_frequency" not in sample_metadata()


# --- bundled textual-inversion embeddings


def test_bundled_embeddings_round_trip(tmp_path):
    vectors = {"shapetok": torch.randn(3, 32), "other": torch.randn(1, 32)}
    tensors = bundle_embeddings(sample_tensors(), vectors)
    assert "bundle_emb.shapetok.string_to_param.*" in tensors
    assert f"{Q}.lora_down.weight" in tensors and len(tensors) == len(sample_tensors()) + 2
    path = save_lora(output_cfg(tmp_path), tensors, sample_metadata())
    read = read_bundled_embeddings(path)
    assert read.keys() == vectors.keys()
    assert all(torch.equal(read[name], vectors[name]) for name in vectors)
    assert read_bundled_embeddings(save_lora(output_cfg(tmp_path, name="plain"), sample_tensors(), {})) == {}


@pytest.mark.parametrize("name", ["", "a.b", "two words"])
def test_bundle_rejects_names_loaders_cannot_parse(name):
    with pytest.raises(LoraFileError):
        bundle_embeddings({}, {name: torch.zeros(1, 8)})


def test_bundle_rejects_bad_shapes_and_duplicates():
    with pytest.raises(LoraFileError, match="num_vectors"):
        bundle_embeddings({}, {"tok": torch.zeros(1, 2, 8)})
    once = bundle_embeddings({}, {"tok": torch.zeros(8)})
    assert once["bundle_emb.tok.string_to_param.*"].shape == (1, 8)
    with pytest.raises(LoraFileError, match="already"):
        bundle_embeddings(once, {"tok": torch.zeros(1, 8)})


# --- reading files


def test_load_refuses_pickle_unless_opted_in(tmp_path):
    path = save_lora_file(tmp_path / "x", sample_tensors(), {}, file_format="ckpt", allow_pickle=True)
    with pytest.raises(LoraFileError, match=r"output\.allow_pickle"):
        load_lora_file(path)
    contents = load_lora_file(path, allow_pickle=True)
    assert contents.file_format == "ckpt" and contents.dim == 4 and contents.alpha == 2.0
    assert init_weights_problems(SimpleNamespace(init_weights=str(path), dim=4))[0].count("output.allow_pickle") == 1
    assert init_weights_problems(SimpleNamespace(init_weights=str(path), dim=4), allow_pickle=True) == []


def test_load_reads_dim_alpha_and_metadata(tmp_path):
    path = save_lora(output_cfg(tmp_path), sample_tensors(), sample_metadata())
    contents = load_lora_file(path)
    assert (contents.dim, contents.alpha, contents.file_format) == (4, 2.0, "safetensors")
    assert contents.metadata["ss_network_dim"] == "4"
    assert contents.ranks == {Q: 4} and contents.alphas == {Q: 2.0}
    with pytest.raises(LoraFileError, match="does not exist"):
        load_lora_file(tmp_path / "missing.safetensors")


def test_a_file_without_alpha_has_alpha_equal_to_rank(tmp_path):
    """kohya's rule when a module has no ``.alpha`` tensor."""
    tensors = {k: v for k, v in sample_tensors().items() if not k.endswith(".alpha")}
    save_file(tensors, tmp_path / "x.safetensors")
    assert load_lora_file(tmp_path / "x.safetensors").alpha == 4.0


def test_dotted_and_underscored_names_resolve_against_the_real_modules():
    """``a_b.c`` and ``a.b_c`` both flatten to ``a_b_c``: that must be reported, not guessed."""

    class Inner(torch.nn.Module):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.add_module(name, torch.nn.Linear(4, 4))

    model = torch.nn.Module()
    model.add_module("a_b", Inner("c"))
    model.add_module("a", Inner("b_c"))
    model.add_module("to_out", torch.nn.ModuleList([torch.nn.Linear(4, 4)]))
    model = inject_adapter_in_model(LoraConfig(r=2, target_modules=["c", "b_c", "0"]), model)
    tensors = {
        "lora_unet_a_b_c.lora_down.weight": torch.ones(2, 4),
        "lora_unet_to_out_0.lora_down.weight": torch.ones(2, 4),
        "lora_unet_to_out_0.lora_up.weight": torch.ones(4, 2),
        "lora_unet_to_out_0.alpha": torch.tensor(1.0),
        "lora_te_text_model_other.lora_down.weight": torch.ones(2, 4),
    }
    part = LoraPart("unet", model, "lora_unet_", True, "")
    match = peft_state_from_kohya(tensors, part)
    assert set(match.state) == {"to_out.0.lora_A.default.weight", "to_out.0.lora_B.default.weight"}
    assert "ambiguous" in match.unmatched["lora_unet_a_b_c.lora_down.weight"]
    assert match.alphas == {"to_out.0": 1.0}
    assert sorted(match.missing) == ["a.b_c", "a_b.c"]
    assert not any(k.startswith("lora_te_") for k in match.unmatched), "other prefixes are left alone"


# --- network.init_weights on the tiny model


@pytest.fixture(scope="module")
def base():
    from tests.conftest import compose_config

    return load_base_model(compose_config([]).model)


@pytest.fixture
def make_network(base):
    from tests.conftest import compose_config

    def make(*overrides: str, seed: int = 0):
        cfg = compose_config(["network.dim=4", "network.alpha=2", "network.train_text_encoder=true", *overrides])
        torch.manual_seed(seed)
        return add_lora(base, cfg.network, 1e-3)

    yield make
    remove_leftover_adapters(base.denoiser, *base.text_encoders)


def randomise(network, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g))


def test_init_weights_round_trip_restores_every_tensor(tmp_path, make_network):
    trained = make_network()
    randomise(trained, seed=1)
    expected = trained.kohya_state_dict()
    assert any(k.startswith("lora_te_text_model_") for k in expected)
    path = save_lora(output_cfg(tmp_path), expected, sample_metadata())
    remove_lora(trained)

    fresh = make_network(seed=5)
    before = {id(p): p for p in fresh.parameters()}
    assert not torch.equal(fresh.kohya_state_dict()[f"{Q}.lora_down.weight"], expected[f"{Q}.lora_down.weight"])
    report = apply_init_weights(fresh, path)

    loaded = fresh.kohya_state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert report.loaded == sum(1 for k in expected if not k.endswith(".alpha"))
    assert report.unmatched == {} and report.missing == [] and report.alpha_note is None
    assert {id(p) for p in fresh.parameters()} == set(before), "the optimizer's parameters stay the same objects"
    assert init_weights_problems(SimpleNamespace(init_weights=str(path), dim=4)) == []


def test_a_hand_made_kohya_file_with_another_alpha_loads_with_a_report(tmp_path, make_network, base):
    network = make_network("network.alpha=4", "network.unet_targets=[to_q,to_k,to_v,to_out.0]")  # proj_in: no adapter
    unet_q = base.denoiser.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    te_q = base.text_encoder.get_submodule("encoder.layers.0.self_attn.q_proj")
    g = torch.Generator().manual_seed(3)
    tensors = {
        f"{Q}.lora_down.weight": torch.randn(4, unet_q.in_features, generator=g),
        f"{Q}.lora_up.weight": torch.randn(unet_q.out_features, 4, generator=g),
        f"{Q}.alpha": torch.tensor(1.0),
        f"{TE_Q}.lora_down.weight": torch.randn(4, te_q.in_features, generator=g),
        f"{TE_Q}.lora_up.weight": torch.randn(te_q.out_features, 4, generator=g),
        f"{TE_Q}.alpha": torch.tensor(1.0),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 4),
        "lora_unet_mid_block_nonexistent_layer.lora_down.weight": torch.zeros(4, 4),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 4),
    }
    path = tmp_path / "kohya_by_hand.safetensors"
    save_file(tensors, path)  # kohya writes no metadata when --no_metadata

    report = apply_init_weights(network, path)
    state = network.kohya_state_dict()
    for key in (f"{Q}.lora_down.weight", f"{Q}.lora_up.weight", f"{TE_Q}.lora_down.weight", f"{TE_Q}.lora_up.weight"):
        assert torch.equal(state[key], tensors[key])
    assert float(state[f"{Q}.alpha"]) == 4.0, "the configured alpha is kept"
    assert report.loaded == 4 and report.file_alpha == 1.0
    assert "alpha" in report.alpha_note and "1" in report.alpha_note and "network.alpha=4" in report.alpha_note
    assert "no LoRA adapter" in report.unmatched["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"]
    assert "no module" in report.unmatched["lora_unet_mid_block_nonexistent_layer.lora_down.weight"]
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in report.unmatched
    assert "unet:down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k" in report.missing
    text = str(report)
    assert "alpha differs" in text and "proj_in" in text and "to_k" in text


def test_text_encoder_weights_are_reported_when_it_is_not_trained(tmp_path, make_network):
    trained = make_network()
    randomise(trained, seed=2)
    path = save_lora(output_cfg(tmp_path), trained.kohya_state_dict(), {})
    remove_lora(trained)
    unet_only = make_network("network.train_text_encoder=false")
    report = apply_init_weights(unet_only, path)
    assert report.unmatched and all(k.startswith("lora_te_") for k in report.unmatched)
    assert all("network.train_text_encoder" in reason for reason in report.unmatched.values())


def test_rank_mismatch_is_a_clear_error(tmp_path, make_network):
    wide = make_network("network.dim=8")
    randomise(wide, seed=4)
    path = save_lora(output_cfg(tmp_path), wide.kohya_state_dict(), {})
    remove_lora(wide)
    narrow = make_network("network.dim=4")
    with pytest.raises(LoraFileError) as error:
        apply_init_weights(narrow, path)
    assert "rank 8" in str(error.value) and "network.dim=4" in str(error.value) and "network.dim=8" in str(error.value)
    problems = init_weights_problems(SimpleNamespace(init_weights=str(path), dim=4))
    assert len(problems) == 1 and "set network.dim=8" in problems[0]


def test_mixed_ranks_are_checked_module_by_module(tmp_path, make_network, base):
    network = make_network()
    state = network.kohya_state_dict()
    state[f"{Q}.lora_down.weight"] = torch.zeros(8, state[f"{Q}.lora_down.weight"].shape[1])
    save_file(state, tmp_path / "mixed.safetensors")
    with pytest.raises(LoraFileError, match=r"rank 8 .*network.dim=4"):
        apply_init_weights(network, tmp_path / "mixed.safetensors")


def test_a_file_with_nothing_for_this_model_is_an_error(tmp_path, make_network):
    network = make_network()
    save_file({"lora_unet_no_such_block.lora_down.weight": torch.zeros(4, 4)}, tmp_path / "other.safetensors")
    with pytest.raises(LoraFileError, match="nothing in"):
        apply_init_weights(network, tmp_path / "other.safetensors")
    save_file({"unrelated": torch.zeros(2)}, tmp_path / "none.safetensors")
    with pytest.raises(LoraFileError, match="no kohya LoRA weights"):
        apply_init_weights(network, tmp_path / "none.safetensors")
