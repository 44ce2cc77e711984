"""SD3/SD3.5 and FLUX.1 through the one loop, on tiny models built in code (training.families.tiny_mmdit).

Training (loss, frozen base and T5, the CLIP encoders' LoRA), the LoRA file's kohya names for every
module checked against diffusers' own converters (its kohya FLUX LoRA converter at FLUX.1's real size,
its SD3 checkpoint converter), every key mapped to a module and back, a sweep and a reproduction.
(Bit-identical repeats and exact resume for both families: tests/test_training.py, tests/test_parity.py.)
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers, swap_scale_shift
from mlflow.tracking import MlflowClient
from safetensors import safe_open
from safetensors.torch import save_file

from sweeper import reproduce
from sweeper.config.validate import validate
from sweeper.run.setting import run
from sweeper.tracking.tracker import NullTracker
from tests.conftest import run_main
from training.data.scan import scan_dataset
from training.families.flux import FLUX
from training.families.loading import load_base_model
from training.families.mmdit import UNET_DEFAULT_TARGETS
from training.families.sd3 import SD3
from training.families.tiny_mmdit import build_tiny_sd3_pipeline
from training.loop import Trainer
from training.network.file import lora_identity, peft_state_from_kohya
from training.network.lora import LoraPart, kohya_tensors, remove_lora

FLOW = {"sd3": ["model.kind=sd3"], "flux": ["model.kind=flux"]}


def _frozen(base) -> list[dict[str, torch.Tensor]]:
    return [
        {k.replace(".base_layer", ""): v.clone() for k, v in m.state_dict().items() if "lora_" not in k}
        for m in base.frozen_modules
    ]


@pytest.mark.parametrize("family", FLOW)
def test_flow_loss_falls_only_lora_changes_and_the_clip_encoders_train(make_cfg, family):
    cfg = make_cfg(
        *FLOW[family],
        "train.max_steps=40",
        "train.batch_size=4",
        "optimizer.lr=3e-3",
        "network.train_text_encoder=true",
        "network.text_encoder_lr=1e-3",
    )
    base = load_base_model(cfg.model)
    before = _frozen(base)
    trainer = Trainer(cfg, base, scan_dataset(cfg.data.train_dir).records, NullTracker())
    result = trainer.fit(show_progress=False)
    first, last = result.losses[:10], result.losses[-10:]
    assert sum(last) / len(last) < 0.95 * sum(first) / len(first)
    assert all(
        a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        for a, b in zip(before, _frozen(base), strict=True)
    ), "the base model (T5 included) must not change"
    prefixes = {key.split("_", 2)[1] for key in trainer.network.kohya_state_dict()}
    assert prefixes == ({"unet", "te1", "te2"} if family == "sd3" else {"unet", "te1"})
    remove_lora(trainer.network)


@pytest.mark.parametrize(
    ("family", "targets"),
    [("sd3", []), ("flux", []), ("flux", ["network.unet_targets=[to_q,proj_mlp,proj_out]"])],
)
def test_every_lora_key_maps_to_a_module_and_back(make_cfg, family, targets):
    """Written under kohya's names (fused groups block-diagonal, whole or in part), read back: the same tensors."""
    cfg = make_cfg(*FLOW[family], *targets, "train.max_steps=3", "network.dim=4", "network.alpha=2")
    base = load_base_model(cfg.model)
    trainer = Trainer(cfg, base, scan_dataset(cfg.data.train_dir).records, NullTracker())
    trainer.fit(show_progress=False)
    tensors = trainer.network.kohya_state_dict()
    assert any(key.endswith(("qkv.lora_down.weight", "linear1.lora_down.weight")) for key in tensors)
    for part in trainer.network.adapted():
        match = peft_state_from_kohya(tensors, part)
        assert not match.unmatched and not match.missing
        live = dict(part.model.named_parameters())
        adapted = [name for name in live if ".lora_A." in name or ".lora_B." in name]
        assert sorted(match.state) == sorted(adapted)
        assert all(torch.equal(value, live[name].detach()) for name, value in match.state.items())
        assert set(match.alphas.values()) == {2.0}  # a fused layer's alpha x its modules, divided back
    remove_lora(trainer.network)


def test_flux_names_and_scales_match_diffusers_kohya_converter():
    """FLUX.1-dev's real transformer (on the meta device: names and shapes, no weights): every module's
    LoRA, written by us, comes out of diffusers' kohya FLUX converter on the same module with the same update."""
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(guidance_embeds=True)  # FLUX.1's default config: 19 + 38 blocks
    part = LoraPart(
        "unet",
        transformer,
        FLUX.unet_prefix,
        True,
        "",
        {module: [flat] for module, flat in FLUX.kohya_unet_names(transformer).items()},
        FLUX.kohya_fused_names(transformer),
    )
    modules = FLUX.lora_targets(transformer, UNET_DEFAULT_TARGETS)
    rank, alpha, generator = 2, 1.0, torch.Generator().manual_seed(0)
    pairs = {}
    for module in modules:
        layer = transformer.get_submodule(module)
        pairs[module] = {
            "down": torch.randn(rank, layer.in_features, generator=generator),
            "up": torch.randn(layer.out_features, rank, generator=generator),
        }
    factors = {m: {"lora_down.weight": p["down"], "lora_up.weight": p["up"]} for m, p in pairs.items()}
    converted = _convert_kohya_flux_lora_to_diffusers(kohya_tensors(part, factors, dict.fromkeys(pairs, alpha)))
    assert {key.rsplit(".lora_", 1)[0] for key in converted} == {f"transformer.{module}" for module in modules}
    for module, pair in pairs.items():
        probe = torch.randn(pair["down"].shape[1], 3, generator=generator)
        down, up = converted[f"transformer.{module}.lora_A.weight"], converted[f"transformer.{module}.lora_B.weight"]
        expected = pair["up"] @ (pair["down"] @ probe) * alpha / rank
        torch.testing.assert_close(up @ (down @ probe), expected, rtol=1e-4, atol=1e-4)


def sd3_original_checkpoint(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The transformer in Stability AI's original layout, built from our names (fused qkv concatenated)
    plus the frame no LoRA touches (embeddings, norms, final layer)."""
    state = transformer.state_dict()
    names = SD3.kohya_names(transformer)
    original = {}
    for module, name in names.single.items():
        for kind in ("weight", "bias"):
            original[f"{name}.{kind}"] = state[f"{module}.{kind}"]
    for name, group in names.fused.items():
        for kind in ("weight", "bias"):
            original[f"{name}.{kind}"] = torch.cat([state[f"{module}.{kind}"] for module in group])
    frame = {
        "x_embedder.proj": "pos_embed.proj",
        "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
        "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
        "context_embedder": "context_embedder",
        "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
        "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
        "final_layer.linear": "proj_out",
    }
    for theirs, ours in frame.items():
        for kind in ("weight", "bias"):
            original[f"{theirs}.{kind}"] = state[f"{ours}.{kind}"]
    original["pos_embed"] = state["pos_embed.pos_embed"]
    width = transformer.config.caption_projection_dim
    last = len(transformer.transformer_blocks) - 1
    for kind in ("weight", "bias"):
        original[f"final_layer.adaLN_modulation.1.{kind}"] = swap_scale_shift(state[f"norm_out.linear.{kind}"], width)
        original[f"joint_blocks.{last}.context_block.adaLN_modulation.1.{kind}"] = swap_scale_shift(
            state[f"transformer_blocks.{last}.norm1_context.linear.{kind}"], width
        )
    for i in range(last + 1):
        for theirs, ours in (("x_block.attn", "attn"), ("context_block.attn", "attn"), ("x_block.attn2", "attn2")):
            added = "added_" if theirs.startswith("context") else ""
            for q in ("q", "k"):
                key = f"transformer_blocks.{i}.{ours}.norm_{added}{q}.weight"
                if key in state:
                    original[f"joint_blocks.{i}.{theirs}.ln_{q}.weight"] = state[key]
    return original


def test_sd3_names_match_diffusers_sd3_checkpoint_converter():
    """Our names (and the frame) make an original-layout SD3.5 checkpoint that diffusers' converter
    turns back into exactly the transformer's weights: every LoRA module's name is the original's."""
    transformer = build_tiny_sd3_pipeline().transformer
    state = transformer.state_dict()
    converted = convert_sd3_transformer_checkpoint_to_diffusers(sd3_original_checkpoint(transformer))
    assert converted.keys() == state.keys()
    assert all(torch.equal(converted[key], state[key]) for key in state)


def test_an_sd3_file_of_the_transformer_alone_loads_with_the_config_folders_text_encoders(make_cfg, tmp_path):
    """As SD3.5 ships (the MMDiT in a file, text encoders apart): the transformer from the file through
    diffusers' converter, the rest from model.config_dir; detected from the file's tensor names."""
    pipeline = build_tiny_sd3_pipeline()
    pipeline.save_pretrained(tmp_path / "sd3")
    checkpoint = {
        f"model.diffusion_model.{k}": v.contiguous() for k, v in sd3_original_checkpoint(pipeline.transformer).items()
    }
    save_file(checkpoint, tmp_path / "sd3.safetensors")
    cfg = make_cfg(
        "model=diffusers", f"model.path={tmp_path / 'sd3.safetensors'}", f"model.config_dir={tmp_path / 'sd3'}"
    )
    validate(cfg)
    base = load_base_model(cfg.model)
    assert base.kind == "sd3" and base.t5 is not None
    expected, loaded = pipeline.transformer.state_dict(), base.denoiser.state_dict()
    assert expected.keys() == loaded.keys() and all(torch.equal(expected[k], loaded[k]) for k in expected)


def test_a_two_trial_flux_sweep_and_an_sd3_reproduction(make_cfg, tmp_path, monkeypatch, capsys):
    done = run_main(
        "-m",
        "model=tiny",
        "model.kind=flux",
        "eval.clip_model=tiny",
        "train.max_steps=3",
        "train.batch_size=2",
        "eval.num_inference_steps=2",
        "eval.images_per_prompt=1",
        "network.dim=4,8",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("lora-sweeper")
    children = [r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    assert sorted(int(c.data.params["network.dim"]) for c in children) == [4, 8]
    assert {c.data.params["model.kind"] for c in children} == {"flux"}

    monkeypatch.chdir(tmp_path)
    cfg = make_cfg(*FLOW["sd3"], "train.max_steps=4", "data.flip_aug=true", "network.dim=4")
    result = run(cfg, show_progress=False)
    with safe_open(str(result.lora_path), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_network_module"] == "networks.lora_sd3"
    assert metadata["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora"
    assert "modelspec.prediction_type" not in metadata  # kohya writes none for flow models
    capsys.readouterr()
    code = reproduce.main(
        [result.run_id, "--tracking-uri", result.tracking_uri, "--output-dir", str(tmp_path / "again")]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert lora_identity(tmp_path / "again" / f"{cfg.output.name}.safetensors") == lora_identity(result.lora_path)
