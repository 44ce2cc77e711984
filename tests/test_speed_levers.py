"""Issue 27's speed levers are options beside the paths without them: whole-denoiser compilation
(``train.compile=denoiser``, CUDA only: on the CPU its LoRA gradients were wrong), the SDPA kernel
choice (``model.sdpa_backend``) and float8 products of the frozen layers (``precision.fp8_matmul``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sweeper.config.validate import ConfigError, validate
from sweeper.tracking.tracker import NullTracker
from training.data.scan import scan_dataset
from training.families.loading import BaseModel, load_base_model
from training.families.tiny_sd import build_tiny_pipeline
from training.loop import Trainer
from training.network.adapters import adapter_parameters
from training.network.lora import add_lora, remove_lora
from training.speed.attention_options import SDPA_BACKENDS, sdpa_backend_problem
from training.speed.compile import configure_compile, repeated_blocks
from training.speed.compile_options import compile_problems
from training.speed.cudnn import configure_cudnn_benchmark
from training.speed.fp8 import configure_fp8_matmul, fp8_layer_count, gains_on_h100
from training.speed.fp8_options import fp8_matmul_problems
from training.speed.sdpa_backend import TORCH_DEFAULTS, configure_sdpa_backend, sdpa_switches, set_sdpa_backend


def tiny_lora_unet(make_cfg, device: str = "cpu", *overrides: str) -> torch.nn.Module:
    """The tiny SD1 UNet with a LoRA whose every tensor gets a gradient (lora_B is not left at zero)."""
    pipe = build_tiny_pipeline()
    unet = pipe.unet.requires_grad_(False).to(device)
    base = BaseModel(unet, pipe.vae, [pipe.text_encoder], [pipe.tokenizer], pipe.scheduler, "in-memory")
    add_lora(base, make_cfg(*overrides).network, 1e-3)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1, generator=torch.Generator(device).manual_seed(1))
    return unet


def lora_gradients(unet: torch.nn.Module, device: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 16, 16, generator=generator).to(device)
    context = torch.randn(2, 77, 32, generator=generator).to(device)
    unet.zero_grad(set_to_none=True)
    unet(sample, torch.tensor([10, 600], device=device), context).sample.pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}


# --- train.compile=denoiser
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal a CPU-only machine gives")
def test_denoiser_compile_is_refused_on_a_cpu_naming_the_key_and_the_fix(make_cfg):
    """On the CPU (torch 2.13) the compiled whole UNet's forward matched eager but half of the tiny
    model's LoRA gradients differed (all of down_blocks.0 and the mid block): refused, not hidden."""
    with pytest.raises(ConfigError) as error:
        validate(make_cfg("train.compile=denoiser"))
    assert "train.compile=denoiser needs a CUDA GPU" in str(error.value)
    assert "use train.compile=blocks" in str(error.value)
    unet = build_tiny_pipeline().unet
    with pytest.raises(ValueError, match=r"train\.compile=denoiser needs a CUDA GPU.*train\.compile=blocks"):
        configure_compile(unet, "denoiser", "default")
    assert unet._compiled_call_impl is None


def test_denoiser_compile_passes_the_light_check_where_cuda_is():
    assert compile_problems("denoiser", "default", cuda=True) == []
    assert compile_problems("denoiser", "default", cuda=False) != []
    assert "none, blocks, denoiser" in compile_problems("whole", "default", cuda=True)[0]


def test_compile_none_undoes_a_compiled_denoiser_and_blocks():
    """A worker's next trial runs eagerly: ``none`` clears what ``denoiser`` or ``blocks`` set
    (torch.compile is lazy: nothing compiles until a call, so this is quick on the CPU)."""
    unet = build_tiny_pipeline().unet
    unet.compile()
    for block in repeated_blocks(unet):
        block.compile()
    assert unet._compiled_call_impl is not None
    assert configure_compile(unet, "none", "default") == 0
    assert unet._compiled_call_impl is None
    assert all(block._compiled_call_impl is None for block in repeated_blocks(unet))


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="train.compile=denoiser is CUDA only (wrong on the CPU)")
@pytest.mark.parametrize("lever", ["none", "pad_products", "fuse_lora_products", "lora_1x1_conv_as_matmul"])
def test_compiled_denoiser_gives_the_eager_gradients_on_cuda(make_cfg, lever):
    """The check the CPU failed, on the GPU: fp32 and TF32 off, so eager and Inductor differ only by
    reassociation; the CPU failure was of the order of the gradients themselves. With
    ``train.compile_pad_products`` the rank is 3, so in fp32 (aligned at 4) Inductor pads the LoRA products;
    with ``train.fuse_lora_products`` the compiled fused layers are checked against peft's eager ones, and
    with ``train.lora_1x1_conv_as_matmul`` the compiled products of the 1x1 projections' factors."""
    from training.speed.fused_lora import configure_fused_lora
    from training.speed.pointwise_conv_lora import configure_lora_1x1_conv_as_matmul

    pad_products = lever == "pad_products"
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        ranks = ("network.dim=3", "network.alpha=3") if pad_products else ()
        unet = tiny_lora_unet(make_cfg, "cuda", *ranks)
        eager = lora_gradients(unet, "cuda")
        assert (configure_fused_lora(unet, lever == "fuse_lora_products") > 0) == (lever == "fuse_lora_products")
        as_matmul = lever == "lora_1x1_conv_as_matmul"
        assert (configure_lora_1x1_conv_as_matmul(unet, as_matmul) > 0) == as_matmul
        assert configure_compile(unet, "denoiser", "default", pad_products) == 1
        assert unet._compiled_call_impl is not None
        compiled = lora_gradients(unet, "cuda")
        assert eager.keys() == compiled.keys() and len(eager) > 0
        for name in eager:
            torch.testing.assert_close(compiled[name], eager[name], rtol=1e-3, atol=1e-5, msg=name)
        configure_compile(unet, "none", "default")
        configure_fused_lora(unet, False)
        configure_lora_1x1_conv_as_matmul(unet, False)
        assert unet._compiled_call_impl is None
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


# --- model.sdpa_backend
def test_sdpa_backend_switches_are_set_and_restored_by_auto():
    try:
        assert configure_sdpa_backend("flash", "sdpa", "cpu") == {
            "flash": True,
            "efficient": False,
            "cudnn": False,
            "math": True,  # the fallback for attention the chosen kernel cannot run
        }
        assert torch.backends.cuda.flash_sdp_enabled() and not torch.backends.cuda.mem_efficient_sdp_enabled()
        assert not torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
        configure_sdpa_backend("math", "sdpa", "cpu")
        assert sdpa_switches() == {"flash": False, "efficient": False, "cudnn": False, "math": True}
        set_sdpa_backend("cudnn")  # a CUDA-only choice: the switches alone, without the device check
        assert torch.backends.cuda.cudnn_sdp_enabled() and not torch.backends.cuda.flash_sdp_enabled()
        configure_sdpa_backend("auto", "sdpa", "cpu")
        assert sdpa_switches() == TORCH_DEFAULTS
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    finally:
        set_sdpa_backend("auto")


def test_cudnn_benchmark_is_set_per_run_never_on_the_cpu_and_a_change_in_one_process_is_warned(monkeypatch):
    import training.speed.cudnn as cudnn

    monkeypatch.setattr(cudnn, "_first_setting", None)  # a fresh process
    try:
        assert configure_cudnn_benchmark(False, torch.device("cpu")) is False
        assert cudnn.first_cudnn_benchmark_setting() is None  # the CPU has no cuDNN plans to keep
        assert configure_cudnn_benchmark(True, torch.device("cuda")) is True  # a flag: no GPU needed to set it
        assert torch.backends.cudnn.benchmark and cudnn.first_cudnn_benchmark_setting() is True
        assert configure_cudnn_benchmark(True, torch.device("cuda")) is True  # the same setting: no warning
        with pytest.warns(UserWarning, match=r"train.cudnn_benchmark=false in a process whose first run had true"):
            assert configure_cudnn_benchmark(False, torch.device("cuda")) is False  # set, and warned
        assert not torch.backends.cudnn.benchmark
        assert configure_cudnn_benchmark(True, torch.device("cpu")) is False
        assert not torch.backends.cudnn.benchmark
    finally:
        torch.backends.cudnn.benchmark = False


def test_sdpa_backend_runs_attention_on_the_cpu_with_flash_and_math():
    q = torch.randn(1, 2, 8, 16)
    reference = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    try:
        for backend in ("flash", "math"):
            configure_sdpa_backend(backend, "sdpa", "cpu")
            out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
            torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    finally:
        set_sdpa_backend("auto")


@pytest.mark.parametrize(
    ("backend", "attention", "cuda", "expected"),
    [
        ("fast", "sdpa", True, "model.sdpa_backend: unknown backend 'fast'; use one of auto, flash"),
        ("flash", "eager", True, "model.attention=eager does not use; set model.attention=sdpa"),
        ("cudnn", "xformers", True, "set model.attention=sdpa or model.sdpa_backend=auto"),
        ("cudnn", "sdpa", False, "model.sdpa_backend=cudnn needs a CUDA GPU"),
        ("efficient", "sdpa", False, "model.sdpa_backend=efficient needs a CUDA GPU"),
    ],
)
def test_sdpa_backend_problems_name_the_key_and_the_fix(backend, attention, cuda, expected):
    problem = sdpa_backend_problem(backend, attention, cuda)
    assert problem is not None and expected in problem


def test_sdpa_backends_that_run_here_pass():
    assert all(sdpa_backend_problem(b, "sdpa", True) is None for b in SDPA_BACKENDS)
    assert sdpa_backend_problem("auto", "eager", False) is None  # auto is every attention kind's default
    assert sdpa_backend_problem("flash", "sdpa", False) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal a CPU-only machine gives")
def test_configure_sdpa_backend_refuses_a_cuda_only_kernel_on_the_cpu():
    before = sdpa_switches()
    with pytest.raises(RuntimeError, match=r"model\.sdpa_backend=cudnn needs a CUDA GPU"):
        configure_sdpa_backend("cudnn", "sdpa", "cpu")
    assert sdpa_switches() == before  # nothing was switched


def test_unknown_sdpa_backend_fails_startup_validation(make_cfg):
    with pytest.raises(ConfigError, match=r"model\.sdpa_backend"):
        validate(make_cfg("model.sdpa_backend=fast"))


# --- precision.fp8_matmul
def _probe_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    sample, context = torch.randn(2, 4, 16, 16, generator=generator), torch.randn(2, 77, 32, generator=generator)
    return sample, torch.tensor([10, 600]), context


def test_fp8_matmul_swaps_the_frozen_linears_in_place_and_none_swaps_them_back(make_cfg):
    """``all`` turns every frozen Linear of the denoiser into torchao's float8 layer over the very same
    weight tensors; the LoRA factors stay as they are; ``none`` gives plain layers back, bit-exact."""
    from torchao.float8.float8_linear import Float8Linear

    unet = tiny_lora_unet(make_cfg)
    sample, timesteps, context = _probe_inputs()
    with torch.no_grad():
        before = unet(sample, timesteps, context).sample
    weights = {name: p.data_ptr() for name, p in unet.named_parameters()}
    frozen = [m for m in unet.modules() if type(m) is torch.nn.Linear and not m.weight.requires_grad]
    trainable = [m for m in unet.modules() if type(m) is torch.nn.Linear and m.weight.requires_grad]
    assert frozen and trainable  # the base layers and the LoRA factors

    assert configure_fp8_matmul(unet, "all") == len(frozen) == fp8_layer_count(unet)
    converted = [m for m in unet.modules() if isinstance(m, Float8Linear)]
    assert all(not m.weight.requires_grad for m in converted)
    assert all(type(m) is torch.nn.Linear for m in trainable)  # untouched
    assert {name: p.data_ptr() for name, p in unet.named_parameters()} == weights  # nothing copied
    with torch.no_grad():
        float8 = unet(sample, timesteps, context).sample
    assert not torch.equal(float8, before)  # the products did run in float8
    assert ((float8 - before).norm() / before.norm()).item() < 0.05

    assert configure_fp8_matmul(unet, "all") == len(frozen)  # again: no layer converted twice
    assert configure_fp8_matmul(unet, "none") == 0 == fp8_layer_count(unet)
    assert {name: p.data_ptr() for name, p in unet.named_parameters()} == weights
    with torch.no_grad():
        assert torch.equal(unet(sample, timesteps, context).sample, before)


def test_fp8_matmul_large_takes_only_the_layers_torchao_measured_faster():
    """torchao's H100 table: K <= 4096 with N <= 1024 ran slower in float8; the tiny model has only such."""
    assert gains_on_h100(torch.nn.Linear(1280, 10240)) and gains_on_h100(torch.nn.Linear(5120, 1280))
    assert not gains_on_h100(torch.nn.Linear(320, 320)) and not gains_on_h100(torch.nn.Linear(4096, 1024))
    assert gains_on_h100(torch.nn.Linear(8192, 1024))
    unet = build_tiny_pipeline().unet.requires_grad_(False)
    assert configure_fp8_matmul(unet, "large") == 0


def test_fp8_matmul_gives_lora_gradients_close_to_the_full_precision_ones(make_cfg):
    """e4m3 keeps 3 mantissa bits: each product is off by a few percent, the LoRA gradients as a whole
    by about 5% (measured on the tiny UNet: 2% on the output), never by their own size."""
    unet = tiny_lora_unet(make_cfg)
    exact = lora_gradients(unet, "cpu")
    configure_fp8_matmul(unet, "all")
    float8 = lora_gradients(unet, "cpu")
    configure_fp8_matmul(unet, "none")
    assert exact.keys() == float8.keys()
    flat_exact = torch.cat([g.flatten() for g in exact.values()])
    flat_float8 = torch.cat([float8[name].flatten() for name in exact])
    assert ((flat_float8 - flat_exact).norm() / flat_exact.norm()).item() < 0.15
    assert F.cosine_similarity(flat_float8, flat_exact, dim=0).item() > 0.99


@pytest.mark.slow
def test_a_run_with_fp8_matmul_trains_and_leaves_the_base_model_plain(make_cfg):
    """Through the shared loop: the loss falls as it does without float8, the frozen weights are
    untouched, and after the run (a worker's next trial) no float8 layer is left in the base model."""
    # few, small steps: torch's CPU float8 matmul is a slow reference (30 steps at batch 4 took 6 minutes)
    options = ["train.max_steps=12", "train.batch_size=2", "optimizer.lr=1e-2"]
    losses = {}
    for kind in ("none", "all"):
        cfg = make_cfg(*options, f"precision.fp8_matmul={kind}")
        base = load_base_model(cfg.model)
        frozen = {k: v.clone() for k, v in base.denoiser.state_dict().items()}
        trainer = Trainer(cfg, base, scan_dataset(cfg.data.train_dir).records, NullTracker())
        assert trainer.fp8_layers == (0 if kind == "none" else fp8_layer_count(base.denoiser)) and (
            kind == "none" or trainer.fp8_layers > 0
        )
        losses[kind] = trainer.fit(show_progress=False).losses
        own = {name for name, _ in adapter_parameters(base.denoiser)}
        after = {k.replace(".base_layer", ""): v for k, v in base.denoiser.state_dict().items() if k not in own}
        assert after.keys() == frozen.keys() and all(torch.equal(frozen[k], after[k]) for k in frozen)
        remove_lora(trainer.network)
        trainer.release()
        assert fp8_layer_count(base.denoiser) == 0
    first, last = losses["all"][:4], losses["all"][-4:]
    assert sum(last) / len(last) < 0.95 * sum(first) / len(first)
    gap = [abs(a - b) / b for a, b in zip(losses["all"], losses["none"], strict=True)]
    assert max(gap[:5]) < 0.1  # the same run, seen through float8 products


@pytest.mark.parametrize(
    ("kind", "installed", "cuda", "capability", "expected"),
    [
        ("half", True, False, None, "precision.fp8_matmul must be one of none, large, all (got 'half')"),
        ("all", False, False, None, "needs torchao (float8 training layers): pip install -c requirements.lock"),
        ("large", True, True, (8, 0), "compute capability 8.9 or later: Ada, Hopper, Blackwell); this A100 is 8.0"),
    ],
)
def test_fp8_matmul_problems_name_the_key_and_the_fix(monkeypatch, kind, installed, cuda, capability, expected):
    import training.speed.fp8_options as options

    monkeypatch.setattr(options, "torchao_installed", lambda: installed)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "A100")
    problems = fp8_matmul_problems(kind, cuda)
    assert len(problems) == 1 and expected in problems[0]
    assert "none" in problems[0]  # the way out


def test_fp8_matmul_passes_startup_where_it_runs_and_an_unknown_kind_fails_it(make_cfg):
    assert fp8_matmul_problems("none", cuda=False) == []
    if not torch.cuda.is_available():
        assert fp8_matmul_problems("all", cuda=False) == []  # torch's CPU float8 matmul: slow, but it runs
    with pytest.raises(ConfigError, match=r"precision\.fp8_matmul must be one of"):
        validate(make_cfg("precision.fp8_matmul=yes"))


def test_importing_the_project_and_diffusers_prints_no_torchao_notices(tmp_path):
    """torchao, once installed for float8, announces at import what it could not load (C++ kernels built
    for CUDA torch), a torch deprecation and diffusers' checkpoint support: none of it used here, and
    five lines before every run. A fresh interpreter: these print once per process."""
    import subprocess
    import sys

    script = "import sweeper.run.setting\nfrom diffusers import StableDiffusionPipeline, UNet2DConditionModel\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    noise = [line for line in done.stderr.splitlines() if "torchao" in line or "register_constant" in line]
    assert noise == []
