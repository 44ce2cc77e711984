"""``train.lora_1x1_conv_as_matmul``: a LoRA's 1x1 convolution factors run as matrix products, and every
number stays peft's (float64 on the CPU: equal to rounding; compiled, channels-last and in the loop too)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model

from sweeper.config.validate import ConfigError, validate
from tests.test_fused_lora import assert_training_gives_the_same_lora, outputs_and_gradients
from training.speed import pointwise_conv_lora
from training.speed.pointwise_conv_lora import configure_lora_1x1_conv_as_matmul, pointwise_products


class Projections(torch.nn.Module):
    """SD1's transformer-block projections (1x1, with bias) beside a 3x3 convolution that must stay peft's."""

    def __init__(self):
        super().__init__()
        self.proj_in = torch.nn.Conv2d(12, 20, 1)
        self.conv = torch.nn.Conv2d(20, 20, 3, padding=1)
        self.proj_out = torch.nn.Conv2d(20, 12, 1)

    def forward(self, x):
        return self.proj_out(torch.nn.functional.silu(self.conv(self.proj_in(x))))


def lora_projections(dropout: float = 0.0) -> torch.nn.Module:
    """All three adapted, lora_B drawn (not zero) so every gradient is non-trivial."""
    torch.manual_seed(0)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["proj_in", "conv", "proj_out"], init_lora_weights=False, lora_dropout=dropout
    )
    model = inject_adapter_in_model(config, Projections()).to(torch.float64)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    return model


@pytest.fixture
def counted(monkeypatch) -> list[int]:
    """How many layer calls went through the products."""
    calls = [0]

    def counting(*args):
        calls[0] += 1
        return pointwise_products(*args)

    monkeypatch.setattr(pointwise_conv_lora, "pointwise_products", counting)
    return calls


@pytest.mark.parametrize("channels_last", [False, True])
def test_1x1_factors_as_products_give_peft_outputs_and_gradients(channels_last, counted):
    """Output, both factors' gradients and the input's, in float64: peft's, to rounding; the 3x3 layer
    keeps peft's convolutions, and undoing the switch gives peft's forward back."""
    model = lora_projections()
    x = torch.randn(2, 12, 9, 7, dtype=torch.float64, requires_grad=True)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    reference, reference_grads = outputs_and_gradients(model, x)
    assert configure_lora_1x1_conv_as_matmul(model, True) == 2  # proj_in and proj_out, not the 3x3
    products, grads = outputs_and_gradients(model, x)
    assert counted[0] == 2
    if channels_last:  # the products' update lands in the convolution's own layout
        assert products.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(products, reference, rtol=1e-12, atol=1e-12)
    assert grads.keys() == reference_grads.keys() and len(grads) == 7  # 3 layers x 2 factors + the input
    for name, grad in reference_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-10, atol=1e-12, msg=name)
    assert configure_lora_1x1_conv_as_matmul(model, False) == 0
    assert not any("forward" in vars(m) for m in model.modules())
    outputs_and_gradients(model, x)
    assert counted[0] == 2  # peft's forward again


def test_compiled_products_give_peft_gradients():
    model = lora_projections().float()
    x = torch.randn(2, 12, 8, 8, requires_grad=True)
    reference, reference_grads = outputs_and_gradients(model, x)
    configure_lora_1x1_conv_as_matmul(model, True)
    torch._dynamo.reset()
    compiled, grads = outputs_and_gradients(torch.compile(model, fullgraph=True), x)  # a graph break fails
    torch.testing.assert_close(compiled, reference, rtol=1e-4, atol=1e-5)
    for name, grad in reference_grads.items():
        key = name if name == "input" else f"_orig_mod.{name}"
        torch.testing.assert_close(grads[key], grad, rtol=1e-4, atol=1e-4, msg=name)


def test_dropout_hooks_and_disabled_adapters_keep_or_fall_back_to_peft(counted):
    """Dropout runs before the products as in peft (same seed, same mask); a hook on a factor or disabled
    adapters send the layer to peft's own forward."""
    model = lora_projections(dropout=0.5)
    x = torch.randn(2, 12, 6, 6, dtype=torch.float64)
    torch.manual_seed(1)
    reference, _ = outputs_and_gradients(model, x)
    configure_lora_1x1_conv_as_matmul(model, True)
    torch.manual_seed(1)
    products, _ = outputs_and_gradients(model, x)
    torch.testing.assert_close(products, reference, rtol=1e-12, atol=1e-12)
    assert counted[0] == 2
    model.proj_in.lora_A["default"].register_forward_hook(lambda *_: None)
    model.eval()  # dropout off, so the next two calls compare
    hooked, _ = outputs_and_gradients(model, x)
    assert counted[0] == 3  # proj_out only
    for layer in (model.proj_in, model.proj_out):
        layer.enable_adapters(False)
    disabled, _ = outputs_and_gradients(model, x)
    assert counted[0] == 3
    assert not torch.equal(disabled, hooked)


def test_training_with_products_gives_the_same_lora_and_leaves_no_switched_layer(make_cfg):
    """Through the loop on the tiny SD1 UNet (1x1 projections): the same seed's losses and LoRA."""
    assert_training_gives_the_same_lora(make_cfg, "train.lora_1x1_conv_as_matmul", "matmul_conv_layers", steps=4)


def test_a_network_type_without_plain_lora_layers_is_refused_at_startup(make_cfg):
    with pytest.raises(ConfigError) as error:
        validate(make_cfg("network.type=loha", "train.lora_1x1_conv_as_matmul=true"))
    assert "train.lora_1x1_conv_as_matmul=true acts on plain LoRA layers" in str(error.value)
    assert "set train.lora_1x1_conv_as_matmul=false" in str(error.value)
    validate(make_cfg("network.type=locon", "train.lora_1x1_conv_as_matmul=true"))  # LoCon: allowed
