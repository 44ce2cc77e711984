"""``train.fuse_lora_products``: the LoRA's thin products ride in the frozen layer's GEMMs, and every
number stays peft's (float64 on the CPU: equal to rounding; compiled blocks and the training loop too)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model

from sweeper.config.validate import ConfigError, validate
from sweeper.tracking.tracker import NullTracker
from tests.test_speed_levers import lora_gradients, tiny_lora_unet
from training.data.scan import scan_dataset
from training.families.loading import load_base_model
from training.loop import Trainer
from training.network.adapters import adapter_parameters
from training.network.lora import remove_lora
from training.speed import fused_lora
from training.speed.fused_lora import LoraProduct, configure_fused_lora, fusion_pays, lora_linear
from training.speed.fused_lora_options import fused_lora_problems


class Block(torch.nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.up = torch.nn.Linear(24, 40, bias=bias)
        self.down = torch.nn.Linear(40, 24, bias=bias)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


def lora_block(bias: bool, rank: int = 4, dtype=torch.float64) -> torch.nn.Module:
    """Two adapted layers, lora_B drawn (not zero) so every gradient is non-trivial."""
    torch.manual_seed(0)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["up", "down"], init_lora_weights=False)
    block = inject_adapter_in_model(config, Block(bias)).to(dtype)
    for name, param in block.named_parameters():
        param.requires_grad_("lora_" in name)
    return block


def outputs_and_gradients(block, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x = x.detach().clone().requires_grad_(x.requires_grad)
    y = block(x)
    y.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}
    if x.requires_grad:
        grads["input"] = x.grad.clone()
    block.zero_grad(set_to_none=True)
    return y.detach(), grads


@pytest.fixture
def counted(monkeypatch) -> list[int]:
    """How many layer calls went through the fused products."""
    calls = [0]

    class Counted(LoraProduct):
        @staticmethod
        def forward(ctx, *args):
            calls[0] += 1
            return LoraProduct.forward(ctx, *args)

    monkeypatch.setattr(fused_lora, "LoraProduct", Counted)
    return calls


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("input_grad", [True, False])
@pytest.mark.parametrize("rank", [4, 8])
def test_fused_layers_give_peft_outputs_and_gradients(bias, input_grad, rank, counted):
    """Output, both factors' gradients and the input's, in float64: what peft gives, to rounding. The
    input without a gradient (the first adapted layer) takes the backward's other branch."""
    block = lora_block(bias, rank)
    x = torch.randn(3, 100, 24, dtype=torch.float64).requires_grad_(input_grad)
    assert fusion_pays(300, 24, 40) and fusion_pays(300, 40, 24)
    reference, reference_grads = outputs_and_gradients(block, x)
    assert configure_fused_lora(block, True) == 2
    fused, fused_grads = outputs_and_gradients(block, x)
    assert counted[0] == 2
    torch.testing.assert_close(fused, reference, rtol=1e-12, atol=1e-12)
    assert fused_grads.keys() == reference_grads.keys() and len(fused_grads) == 4 + input_grad
    for name in reference_grads:
        torch.testing.assert_close(fused_grads[name], reference_grads[name], rtol=1e-12, atol=1e-10, msg=name)


def test_undo_and_layers_that_are_not_plain_lora_run_peft(counted):
    """Switched off (a worker's next trial), adapters disabled, or a hook on lora_down (kohya's rank
    dropout): peft's own forward runs, hooks and all."""
    block = lora_block(bias=True)
    x = torch.randn(2, 100, 24, dtype=torch.float64)
    reference = block(x)
    configure_fused_lora(block, True)
    assert configure_fused_lora(block, False) == 0
    assert "forward" not in vars(block.up)
    torch.testing.assert_close(block(x), reference)
    assert counted[0] == 0

    configure_fused_lora(block, True)
    for layer in (block.up, block.down):
        layer.enable_adapters(False)
    base_only = block(x)
    assert counted[0] == 0 and not torch.allclose(base_only, reference)
    for layer in (block.up, block.down):
        layer.enable_adapters(True)
    seen = []
    hook = block.up.lora_A["default"].register_forward_hook(lambda *args: seen.append(1))
    torch.testing.assert_close(block(x), reference)
    assert seen == [1] and counted[0] == 1  # block.down still fused
    hook.remove()


def test_small_activations_keep_peft_products(counted):
    """A layer whose activation is smaller than the weight the stacking copies (the text's keys and values,
    low resolutions) runs peft's three products."""
    assert not fusion_pays(rows=154, in_features=768, out_features=1280)
    assert fusion_pays(rows=16384, in_features=320, out_features=320)
    block = lora_block(bias=False)
    configure_fused_lora(block, True)
    block(torch.randn(1, 4, 24, dtype=torch.float64))  # 4 rows: 4 * 64 < 4 * 24 * 40
    assert counted[0] == 0


def test_under_autocast_the_layer_computes_in_the_autocast_dtype():
    """As peft's layers under autocast: bf16 products of fp32 LoRA factors on a bf16 base, fp32 gradients
    for the factors; the fused sum rounds once where peft rounds three times, so close, not equal."""
    block = lora_block(bias=True, dtype=torch.float32)
    block.up.base_layer.to(torch.bfloat16)
    block.down.base_layer.to(torch.bfloat16)
    x = torch.randn(2, 200, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference, reference_grads = outputs_and_gradients(block, x)
        configure_fused_lora(block, True)
        fused, fused_grads = outputs_and_gradients(block, x)
    assert fused.dtype == reference.dtype == torch.bfloat16
    torch.testing.assert_close(fused, reference, rtol=2e-2, atol=2e-2)
    for name, grad in reference_grads.items():
        assert fused_grads[name].dtype == torch.float32
        torch.testing.assert_close(fused_grads[name], grad, rtol=5e-2, atol=5e-2 * grad.abs().max().item())


def test_the_reference_path_is_the_lora_formula():
    """``fuse=False`` is Hu et al.'s eq. 3 written out; the fused path equals it for a 2-D input too."""
    torch.manual_seed(1)
    x, weight, bias = torch.randn(50, 16, dtype=torch.float64), torch.randn(8, 16, dtype=torch.float64), None
    down, up = torch.randn(3, 16, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    formula = x @ weight.T + 0.5 * (x @ down.T) @ up.T
    torch.testing.assert_close(lora_linear(x, weight, bias, down, up, 0.5, fuse=False), formula)
    torch.testing.assert_close(lora_linear(x, weight, bias, down, up, 0.5, fuse=True), formula)


def test_tiny_unet_gradients_equal_eager(make_cfg, counted):
    """The tiny SD1 UNet's every LoRA gradient, fused against peft's layers (fp32)."""
    unet = tiny_lora_unet(make_cfg)
    eager = lora_gradients(unet, "cpu")
    assert configure_fused_lora(unet, True) > 0
    fused = lora_gradients(unet, "cpu")
    configure_fused_lora(unet, False)
    assert counted[0] > 0 and fused.keys() == eager.keys()
    for name in eager:
        torch.testing.assert_close(fused[name], eager[name], rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_fused_layers_give_peft_gradients(counted):
    """torch.compile traces the autograd function (no graph break) and Inductor's kernels give peft's
    eager numbers (fp32: the CPU's Inductor reassociates sums)."""
    block = lora_block(bias=True, dtype=torch.float32)
    x = torch.randn(2, 100, 24).requires_grad_(True)
    reference, reference_grads = outputs_and_gradients(block, x)
    configure_fused_lora(block, True)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)  # fullgraph: a graph break is an error
    fused, fused_grads = outputs_and_gradients(compiled, x)
    assert counted[0] == 2  # traced once per layer
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-5)
    for name in reference_grads:
        key = name if name == "input" else f"_orig_mod.{name}"
        torch.testing.assert_close(fused_grads[key], reference_grads[name], rtol=1e-4, atol=1e-4, msg=name)


def assert_training_gives_the_same_lora(make_cfg, key: str, switched: str, steps: int = 6) -> None:
    """Train the tiny model with ``key`` off and on (same seed): the same losses and LoRA, the trainer's
    ``switched`` count of layers on the speed path non-zero only with it on, and nothing of it left on the
    base model for the next trial."""
    options = [f"train.max_steps={steps}", "train.batch_size=2", "optimizer.lr=1e-2"]
    results = {}
    for on in (False, True):
        cfg = make_cfg(*options, f"{key}={str(on).lower()}")
        base = load_base_model(cfg.model)
        trainer = Trainer(cfg, base, scan_dataset(cfg.data.train_dir).records, NullTracker())
        assert (getattr(trainer, switched) > 0) == on
        losses = trainer.fit(show_progress=False).losses
        results[on] = losses, {name: p.detach().clone() for name, p in adapter_parameters(base.denoiser)}
        remove_lora(trainer.network)
        trainer.release()
        assert not any("forward" in vars(m) for m in base.denoiser.modules())
    (plain_losses, plain), (losses, lora) = results[False], results[True]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(plain_losses), rtol=1e-4, atol=1e-6)
    assert lora.keys() == plain.keys()
    for name in plain:
        torch.testing.assert_close(lora[name], plain[name], rtol=1e-3, atol=1e-5, msg=name)


def test_training_with_fused_products_gives_the_same_lora(make_cfg):
    """The loop sets it up: the same seed's losses and LoRA as without, and the next trial's base
    model has no fused layer left."""
    assert_training_gives_the_same_lora(make_cfg, "train.fuse_lora_products", "fused_lora_layers")


def test_settings_it_cannot_fuse_are_refused_at_startup_naming_the_key(make_cfg):
    assert fused_lora_problems(False, "loha", 0.5, "all") == []
    assert fused_lora_problems(True, "locon", 0.0, "none") == []
    with pytest.raises(ConfigError) as error:
        validate(make_cfg("train.fuse_lora_products=true", "network.type=dora", "network.dropout=0.1"))
    message = str(error.value)
    assert "network.type=dora has none: set train.fuse_lora_products=false" in message
    assert "set network.dropout=0 or train.fuse_lora_products=false" in message
    problems = fused_lora_problems(True, "lora", 0.0, "large")
    assert len(problems) == 1 and "precision.fp8_matmul=large" in problems[0]


def test_the_meta_count_sees_fewer_products_and_more_copies():
    """``benchmarks/lora_products.py`` at SD1.5 size on the meta device: the fused step dispatches fewer
    products (one or two fewer per fused layer) and copies more (the stacked weights)."""
    from benchmarks.lora_products import count

    plain, fused = count("sd15", 4, fuse=False), count("sd15", 4, fuse=True)
    assert plain["lora_linear_layers"] == 0 and fused["lora_linear_layers"] > 0
    fewer = plain["products"] - fused["products"]
    assert 0 < fewer <= 2 * fused["lora_linear_layers"]
    assert plain["products"] - plain["thin_products"] == fused["products"] - fused["thin_products"]
    assert fused["copy_gb"] > plain["copy_gb"]
