"""The GPU speed paths change time, not results: the text-embedding cache and compiled blocks."""

from __future__ import annotations

import pytest
import torch

from sweeper.config.validate import ConfigError, validate
from sweeper.tracking.tracker import NullTracker
from training.cache.text import TextEmbeddingCache, clear_text_caches
from training.data.scan import scan_dataset
from training.families.loading import BaseModel, load_base_model
from training.families.tiny_sd import build_tiny_pipeline
from training.loop import Trainer
from training.network.lora import add_lora, remove_lora
from training.speed.attention import configure_memory_format
from training.speed.compile import compile_arguments, configure_compile, repeated_blocks


def losses_of(cfg) -> tuple[list[float], Trainer]:
    base = load_base_model(cfg.model)
    trainer = Trainer(cfg, base, scan_dataset(cfg.data.train_dir).records, NullTracker())
    try:
        return trainer.fit(show_progress=False).losses, trainer
    finally:
        remove_lora(trainer.network)


# --- text-embedding cache
def test_cache_encodes_each_distinct_caption_once_and_keeps_order():
    calls: list[list[str]] = []

    def encoder(texts: list[str]) -> dict[str, torch.Tensor]:
        calls.append(list(texts))
        hidden = torch.stack([torch.full((3, 2), float(len(t))) for t in texts])
        return {"hidden": hidden, "text_embeds": -hidden[:, 0]}  # every named tensor is cached per caption

    cache = TextEmbeddingCache(max_entries=10)
    first = cache.encode(["aa", "b", "aa"], encoder)
    second = cache.encode(["b", "cccc"], encoder)
    assert calls == [["aa", "b"], ["cccc"]]
    assert first["hidden"][:, 0, 0].tolist() == [2.0, 1.0, 2.0] and second["hidden"][:, 0, 0].tolist() == [1.0, 4.0]
    assert second["text_embeds"][:, 0].tolist() == [-1.0, -4.0]
    assert (cache.hits, cache.misses) == (2, 3)


def test_cache_evicts_least_recently_used_first():
    cache = TextEmbeddingCache(max_entries=2)

    def encoder(texts):
        return {"hidden": torch.zeros(len(texts), 1, 1)}

    cache.encode(["a"], encoder)
    cache.encode(["b"], encoder)
    cache.encode(["a"], encoder)  # a is now the most recent
    cache.encode(["c"], encoder)  # evicts b
    assert len(cache) == 2
    cache.encode(["a"], encoder)
    assert cache.misses == 3  # a was still cached; b and c were not asked for again


def test_cached_text_embeddings_give_the_same_losses(make_cfg):
    clear_text_caches()
    common = ("train.max_steps=12", "data.shuffle_tags=true", "dropout.caption_rate=0.2")
    cached, trainer = losses_of(make_cfg(*common, "data.cache_text_embeddings=true"))
    assert trainer.text_cache is not None and trainer.text_cache.hits > 0
    plain, trainer = losses_of(make_cfg(*common, "data.cache_text_embeddings=false"))
    assert trainer.text_cache is None
    torch.testing.assert_close(torch.tensor(cached), torch.tensor(plain), rtol=1e-5, atol=1e-6)


def test_text_cache_is_off_while_the_text_encoder_trains(make_cfg):
    _, trainer = losses_of(make_cfg("train.max_steps=1", "network.train_text_encoder=true"))
    assert trainer.text_cache is None


# --- compiled blocks
def lora_gradients(unet: torch.nn.Module, call: torch.nn.Module) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 16, 16, generator=generator)
    context = torch.randn(2, 77, 32, generator=generator)
    unet.zero_grad(set_to_none=True)
    call(sample, torch.tensor([10, 600]), context).sample.pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["default", "max-autotune-gemm"])
def test_compiled_blocks_give_the_eager_gradients(make_cfg, mode):
    """Compile time on 2 CPU cores is the slow part; the check itself is one forward + backward.
    ``max-autotune-gemm`` (Inductor's GEMM templates timed per shape) must not change the gradients."""
    pipe = build_tiny_pipeline()
    unet = pipe.unet.requires_grad_(False)
    base = BaseModel(unet, pipe.vae, [pipe.text_encoder], [pipe.tokenizer], pipe.scheduler, "in-memory")
    add_lora(base, make_cfg().network, 1e-3)
    with torch.no_grad():  # lora_B starts at zero: give every LoRA tensor a gradient to compare
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    eager = lora_gradients(unet, unet)

    assert configure_compile(unet, "blocks", mode) == len(repeated_blocks(unet)) > 0
    compiled = lora_gradients(unet, unet)
    assert all(block._compiled_call_impl is not None for block in repeated_blocks(unet))
    assert eager.keys() == compiled.keys() and len(eager) > 0
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-4, atol=1e-6, msg=name)

    configure_compile(unet, "none", "default")  # the next trial of a worker runs eagerly again
    assert all(block._compiled_call_impl is None for block in repeated_blocks(unet))


def test_padded_products_need_compilation_and_keep_the_modes_own_settings(make_cfg):
    with pytest.raises(ConfigError) as error:
        validate(make_cfg("train.compile_pad_products=true"))
    assert "train.compile_pad_products=true" in str(error.value) and "train.compile=blocks or denoiser" in str(
        error.value
    )
    assert compile_arguments("default") == {"mode": "default"}
    assert compile_arguments("default", pad_products=True) == {"options": {"force_shape_pad": True}}
    graphs = compile_arguments("reduce-overhead", pad_products=True)["options"]
    assert graphs["force_shape_pad"] and graphs["triton.cudagraphs"]  # the mode's own setting kept
    tuned = compile_arguments("max-autotune-gemm", pad_products=True)["options"]
    assert tuned == {"max_autotune_gemm": True, "force_shape_pad": True}
    # torch.compile refuses options Inductor does not know: these are real settings, and the result is unchanged
    layer = torch.nn.Linear(3, 5)
    compiled = torch.compile(layer, **compile_arguments("default", pad_products=True))
    inputs = torch.randn(7, 3)
    torch.testing.assert_close(compiled(inputs), layer(inputs))


def test_unknown_compile_settings_fail_validation(make_cfg):
    with pytest.raises(ConfigError) as error:
        validate(make_cfg("train.compile=whole", "train.compile_mode=fast"))
    assert "train.compile must be one of none, blocks" in str(error.value)
    assert "train.compile_mode must be one of" in str(error.value)


# --- CUDA graphs and the channels-last layout
@pytest.mark.parametrize(
    ("overrides", "keys"),
    [
        (["train.grad_accum_steps=2"], ["train.grad_accum_steps"]),
        (["train.compile=blocks", "train.compile_mode=reduce-overhead"], ["train.compile_mode=reduce-overhead"]),
        (["train.compile=blocks", "train.compile_mode=max-autotune"], ["train.compile_mode=max-autotune "]),
        (["model.gradient_checkpointing=true"], ["model.gradient_checkpointing"]),
    ],
)
def test_cuda_graphs_refuse_settings_they_cannot_replay(make_cfg, overrides, keys):
    with pytest.raises(ConfigError) as error:
        validate(make_cfg("train.cuda_graphs=true", *overrides))
    message = str(error.value)
    assert "train.cuda_graphs=true" in message and all(key in message for key in keys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a CPU-only machine gives")
def test_cuda_graphs_on_a_cpu_fail_before_training_naming_the_key(make_cfg):
    cfg = make_cfg("train.cuda_graphs=true", "train.max_steps=1")
    base = load_base_model(cfg.model)
    with pytest.raises(RuntimeError, match=r"train\.cuda_graphs=false"):
        Trainer(cfg, base, scan_dataset(cfg.data.train_dir).records, NullTracker())


def test_channels_last_is_undone_for_the_next_trial():
    unet = build_tiny_pipeline().unet
    conv = unet.conv_in.weight
    configure_memory_format(unet, True)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    configure_memory_format(unet, False)
    assert conv.is_contiguous()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("kind", ["sd1", "sdxl"])  # SDXL's graph also takes text_embeds and time_ids
def test_cuda_graph_steps_give_the_eager_losses_and_lora(make_cfg, kind):
    """Replayed graphs run the eager kernels: the same losses, and the same LoRA after training.

    At the default precision (bf16 on a GPU; accelerate allows one precision per process). Adam
    amplifies rounding differences in near-zero gradients, so the LoRA is compared by norm.
    """
    results = {}
    for graphs in (False, True):
        clear_text_caches()
        cfg = make_cfg("train.max_steps=6", f"train.cuda_graphs={graphs}", f"model.kind={kind}")
        trainer = Trainer(cfg, load_base_model(cfg.model), scan_dataset(cfg.data.train_dir).records, NullTracker())
        try:
            assert (trainer.graphed_denoiser is not None) == graphs
            results[graphs] = trainer.fit(show_progress=False).losses, trainer.network.kohya_state_dict()
        finally:
            remove_lora(trainer.network)
    (eager_losses, eager_lora), (graph_losses, graph_lora) = results[False], results[True]
    torch.testing.assert_close(torch.tensor(graph_losses), torch.tensor(eager_losses), rtol=2e-2, atol=1e-3)
    assert eager_lora.keys() == graph_lora.keys()
    for name, eager in eager_lora.items():
        difference = (graph_lora[name].float() - eager.float()).norm() / eager.float().norm().clamp_min(1e-12)
        assert difference < 5e-2, (name, float(difference))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU memory across trials needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_a_trial_gives_back_its_gpu_memory_and_three_trials_do_not_grow_it(make_cfg, kind):
    """Each trial's CUDA graphs (private pools), optimizer state and caches go when it ends: reserved
    memory after a trial is back near its level before, and 3 trials in one worker do not grow it."""
    from sweeper.run.setting import run
    from training.speed.memory import release_accelerator_memory

    reserved = []
    for trial in range(3):
        cfg = make_cfg(
            "train.max_steps=4", "train.cuda_graphs=true", f"model.kind={kind}", f"network.dim={4 * (trial + 1)}"
        )
        before = torch.cuda.memory_reserved()
        run(cfg, show_progress=False)
        release_accelerator_memory()  # what the sweep does after every trial
        after = torch.cuda.memory_reserved()
        reserved.append(after)
        print(f"{kind} trial {trial}: reserved {before / 2**20:.0f} MiB before, {after / 2**20:.0f} MiB after")
        if trial:  # the first trial also loads the model and its caches onto the GPU
            assert after - before < 64 * 2**20, (trial, before, after)
    assert reserved[2] - reserved[0] < 64 * 2**20, reserved
