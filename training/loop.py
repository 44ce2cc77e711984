"""The one shared training loop: every run and every sweep trial trains through ``Trainer.fit``.

Stages: setup (devices, precision, LoRA, embedding, data, optimizer, resume), train (noise ->
denoise -> weighted loss -> step, with periodic evaluation and saving), and hand-over (a sampling
pipeline, the LoRA tensors, the training state).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from diffusers import DiffusionPipeline
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from peft.helpers import disable_input_dtype_casting
from tqdm.auto import tqdm

from training.cache.folders import default_cache_root
from training.cache.latents import (
    LatentStore,
    fill_latent_cache,
    latent_cache_key,
    model_fingerprint,
    stacked_latent_params,
)
from training.cache.text import TextEmbeddingCache, shared_text_cache, text_cache_key
from training.checkpoint import TrainingState, load_training_state
from training.data.bucket_sampler import BucketBatchSampler
from training.data.buckets import generate_buckets, resolve_bucket_settings
from training.data.dataset import CaptionedImageDataset, collate_captioned
from training.data.scan import ImageRecord, match_reg_records
from training.data.validation import ValidationLoss
from training.families import Conditioning, ImageGeometry, batch_geometry
from training.families.loading import BaseModel
from training.families.vae_precision import run_in_own_precision, vae_dtype
from training.fault_hold import hold_if_asked
from training.network.adapters import adapter_parameters
from training.network.file import apply_init_weights
from training.network.lora import LoraNetwork, add_lora
from training.optim import build_lr_scheduler, build_optimizer
from training.speed.attention import configure_gradient_checkpointing, configure_memory_format
from training.speed.compile import configure_compile
from training.speed.cuda_graph import GraphedDenoiser, cuda_graph_problems
from training.speed.cudnn import configure_cudnn_benchmark
from training.speed.fp8 import configure_fp8_matmul
from training.speed.fused_lora import configure_fused_lora
from training.speed.memory import release_accelerator_memory
from training.speed.pointwise_conv_lora import configure_lora_1x1_conv_as_matmul
from training.speed.sdpa_backend import configure_sdpa_backend
from training.text.captions import transform_caption, with_trigger
from training.text.embedding import TrainedEmbedding, add_embedding


def stage(name: str) -> torch.profiler.record_function:
    """A named range of the step (``loop/<name>``) that torch.profiler reports; no cost when not profiling."""
    return torch.profiler.record_function(f"loop/{name}")


class MetricSink(Protocol):
    """Where the loop reports step metrics (an MLflow run, or the null tracker)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf: the run cannot recover, so it stops with the step named."""


# evaluation during training: step -> (metric, stop?); the metric also drives the plateau schedule
EvalHook = Callable[[int], tuple[float, bool]]
# saving during training: (step, epoch) -> None
SaveHook = Callable[[int, int], None]


@dataclass
class TrainResult:
    steps: int  # optimizer steps actually taken
    epochs: int = 0  # epochs started
    losses: list[float] = field(default_factory=list)  # per logged step
    stopped_early: bool = False  # an evaluation callback asked to stop (e.g. a pruner)
    train_seconds: float = 0.0


def resolve_mixed_precision(name: str, cuda: bool | None = None) -> str:
    """accelerate's mixed_precision value for ``precision.mixed`` (auto: bf16 on capable GPUs)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if name == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    return {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}[name]


def total_steps(max_steps: int | None, epochs: int | None, batches_per_epoch: int, grad_accum: int) -> int:
    """Optimizer steps of the run: ``max_steps`` or ``epochs``, whichever ends first."""
    limits = [max_steps] if max_steps is not None else []
    if epochs is not None:
        limits.append(max(1, math.ceil(epochs * batches_per_epoch / grad_accum)))
    return min(limits)


@dataclass
class _Position:
    """Where the loop is: what a saved state needs to continue exactly."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches consumed in the current epoch
    epoch_start_order: torch.Tensor | None = None  # the data order's RNG state when this epoch began


class _SkippableBatches(torch.utils.data.Sampler[list[int]]):
    """The batch order, able to skip the batches a resumed epoch already consumed (without loading them)."""

    def __init__(self, batches: BucketBatchSampler) -> None:
        self.batches, self.skip = batches, 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.skip = self.skip, 0
        return itertools.islice(iter(self.batches), skip, None)


class _LossReader:
    """Loss values read back from the GPU without stalling it.

    ``.item()`` would wait for the GPU to finish the step, and the host would then dispatch the
    next step to an idle GPU. Instead each logged loss is copied into pinned host memory behind
    the step's kernels and read once its event has passed, usually one step later.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.pending: list[tuple[int, torch.Tensor, Any, dict[str, float]]] = []

    def push(self, loss: torch.Tensor, step: int, extra: dict[str, float]) -> None:
        """Queue ``loss`` (a 0-d tensor the caller may overwrite afterwards) as the value of ``step``."""
        host = torch.empty((), dtype=loss.dtype, pin_memory=self.cuda)
        host.copy_(loss, non_blocking=self.cuda)
        event = torch.cuda.Event() if self.cuda else None
        if event is not None:
            event.record()
        self.pending.append((step, host, event, extra))

    def ready(self, wait: bool = False) -> list[tuple[int, float, dict[str, float]]]:
        """``(step, loss, extra)`` of every queued loss whose copy has finished (all of them with ``wait``)."""
        done = []
        while self.pending:
            step, host, event, extra = self.pending[0]
            if event is not None and not event.query():
                if not wait:
                    break
                event.synchronize()
            done.append((step, host.item(), extra))
            self.pending.pop(0)
        return done


class Trainer:
    """Owns one run's trainable state; the base model it is given can be reused afterwards."""

    def __init__(
        self,
        cfg: Any,
        base: BaseModel,
        records: list[ImageRecord],
        sink: MetricSink,
        reg_records: list[ImageRecord] | None = None,
    ) -> None:
        self.cfg, self.base, self.sink = cfg, base, sink
        self._setup_precision()
        self._setup_denoiser()
        self._setup_network()
        self._setup_data(records, reg_records)
        self._setup_optimizer()
        self._setup_objective()
        self._setup_rngs()

    def _setup_precision(self) -> None:
        """The accelerator, device and dtypes; the frozen parts moved there in their own precision."""
        cfg, base, train = self.cfg, self.base, self.cfg.train
        self.accelerator = Accelerator(
            mixed_precision=resolve_mixed_precision(cfg.precision.mixed),
            gradient_accumulation_steps=train.grad_accum_steps,
        )
        self.device = self.accelerator.device
        half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.accelerator.mixed_precision)
        self.weight_dtype = half or torch.float32  # frozen weights; LoRA stays fp32
        self.autocast_dtype = half  # the dtype autocast computes in; None without mixed precision
        self.family = base.family
        self.vae_dtype = vae_dtype(cfg.model.vae_precision, self.family.vae_overflows_in_fp16, self.weight_dtype)
        # T5 overflows in fp16 (its feed-forward activations exceed 65504): it stays fp32 under fp16
        t5_dtype = torch.float32 if self.weight_dtype == torch.float16 else self.weight_dtype
        for module, dtype in (
            (base.denoiser, self.weight_dtype),
            (base.vae, self.vae_dtype),
            *((encoder, self.weight_dtype) for encoder in base.text_encoders),
            *(((base.t5, t5_dtype),) if base.t5 is not None else ()),
        ):
            module.to(self.device)
            if next(module.parameters()).dtype != dtype:
                module.to(dtype=dtype)
        run_in_own_precision(base.vae)

    def _setup_denoiser(self) -> None:
        """The denoiser's attention kernel, and what CUDA graphs need, checked before LoRA layers exist."""
        cfg, base, train = self.cfg, self.base, self.cfg.train
        self.family.configure_attention(base.denoiser, cfg.model.attention, self.device)
        configure_sdpa_backend(cfg.model.sdpa_backend, cfg.model.attention, self.device)
        configure_cudnn_benchmark(train.cudnn_benchmark, self.device)
        if problems := cuda_graph_problems(  # before LoRA layers are added to the shared base model
            train.cuda_graphs,
            grad_accum_steps=train.grad_accum_steps,
            compile_mode=train.compile_mode,
            checkpointing=cfg.model.gradient_checkpointing,
            device=self.device,
        ):
            raise RuntimeError("; ".join(problems))

    def _setup_network(self) -> None:
        """The LoRA layers (seeded: the initial weights depend only on train.seed), the speed paths
        that wrap them, and the optional embedding."""
        cfg, base, train = self.cfg, self.base, self.cfg.train
        torch.manual_seed(train.seed)
        self.network: LoraNetwork = add_lora(base, cfg.network, cfg.optimizer.lr)
        configure_gradient_checkpointing(  # set every run: the base model is shared across trials
            base.denoiser,
            base.text_encoders,
            enabled=cfg.model.gradient_checkpointing,
            train_text_encoder=self.network.trains_text_encoder,
        )
        # after the LoRA layers exist (they stay in the mixed precision), before compiling (the casts compile too)
        self.fp8_layers = configure_fp8_matmul(base.denoiser, cfg.precision.fp8_matmul)
        self.fused_lora_layers = configure_fused_lora(base.denoiser, train.fuse_lora_products)
        self.matmul_conv_layers = configure_lora_1x1_conv_as_matmul(base.denoiser, train.lora_1x1_conv_as_matmul)
        # after the LoRA layers exist, so the compiled blocks contain them
        configure_compile(base.denoiser, train.compile, train.compile_mode, train.compile_pad_products)
        configure_memory_format(base.denoiser, cfg.model.channels_last and self.device.type == "cuda")
        graphs = train.cuda_graphs
        self.graphed_denoiser = GraphedDenoiser(base.denoiser, self.family, self.autocast_dtype) if graphs else None
        if cfg.network.init_weights:
            self.init_report = apply_init_weights(
                self.network, cfg.network.init_weights, allow_pickle=cfg.output.allow_pickle
            )
        self.embedding: TrainedEmbedding | None = None
        if cfg.network.embedding.enabled:
            self.embedding = add_embedding(
                base.tokenizer, base.text_encoder, cfg.network.embedding, cfg.data.trigger_word
            )

    def _setup_data(self, records: list[ImageRecord], reg_records: list[ImageRecord] | None) -> None:
        """Training images (+ regularisation images matched to their count), one bucket per batch;
        the latent and text caches."""
        cfg, base, train = self.cfg, self.base, self.cfg.train
        native = base.native_resolution
        self.resolution = cfg.bucket.resolution or native
        if reg_records:
            records = list(records) + match_reg_records(reg_records, sum(r.repeats for r in records))
        resolution, min_side, max_side, step = resolve_bucket_settings(cfg.bucket, native)  # step: null = auto
        buckets = generate_buckets(resolution, min_side, max_side, step) if cfg.bucket.enabled else None
        self.dataset = CaptionedImageDataset(
            records,
            self.resolution,
            random_crop=cfg.data.random_crop,
            flip_aug=cfg.data.flip_aug,
            color_aug=cfg.data.color_aug,
            buckets=buckets,
            no_upscale=cfg.bucket.no_upscale,
            step=step,
        )
        self.latent_store: LatentStore | None = None
        self._latent_keys: dict[tuple[int, bool], str] | None = None
        if cfg.data.cache_latents != "none":
            # "memory" names an in-process store, so the trials of a sweep in one worker share it
            self.latent_store = LatentStore(cfg.data.cache_latents, default_cache_root() / "latents")
            self.latent_fingerprint = model_fingerprint(base.identity, self.vae_dtype)
        self.text_cache: TextEmbeddingCache | None = None
        # exact only while the text encoder is the base model's own: no text-encoder LoRA, no new embedding
        if cfg.data.cache_text_embeddings and self.embedding is None and not self.network.trains_text_encoder:
            self.text_cache = shared_text_cache(
                text_cache_key(
                    base.identity,  # holds the family (kind)
                    dtype=self.weight_dtype,
                    mixed=self.accelerator.mixed_precision,
                    device=self.device,
                    clip_skip=cfg.model.clip_skip,
                    max_token_length=cfg.data.max_token_length,
                    t5_max_length=cfg.model.t5_max_length,
                )
            )
        self.order_rng = torch.Generator().manual_seed(train.seed)
        self.batches = BucketBatchSampler(
            self.dataset.sample_buckets(), train.batch_size, generator=self.order_rng, drop_last=True
        )
        if len(self.batches) == 0:  # else the epoch loop would spin on empty epochs for ever
            raise ValueError(
                f"no training images: the records given to the trainer from data.train_dir={cfg.data.train_dir!r} "
                "are empty; scan it with training.data.scan.scan_dataset (which names what it skipped)"
            )
        self.batch_plan = _SkippableBatches(self.batches)
        self.loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=self.batch_plan,
            collate_fn=collate_captioned,
            num_workers=cfg.data.num_workers,
            persistent_workers=cfg.data.persistent_workers and cfg.data.num_workers > 0,
            pin_memory=self.device.type == "cuda",
        )
        self.total_steps = total_steps(train.max_steps, train.epochs, len(self.batches), train.grad_accum_steps)

    def _setup_optimizer(self) -> None:
        """The optimizer over the LoRA's (and embedding's) parameter groups, and its schedule."""
        cfg, train = self.cfg, self.cfg.train
        groups = list(self.network.param_groups)
        if self.embedding is not None:
            groups.append(
                {
                    "params": [self.embedding.weight],
                    "lr": cfg.network.embedding.lr,
                    "weight_decay": 0.0,
                    "name": "embedding",
                }
            )
        optimizer = build_optimizer(groups, cfg.optimizer, train.grad_accum_steps)
        self.lr_schedule = build_lr_scheduler(optimizer, cfg.scheduler, self.total_steps)
        self.optimizer = self.accelerator.prepare(optimizer)  # the schedule counts real optimizer steps itself

    def _setup_objective(self) -> None:
        """What each step learns: the family's objective (training/objective/)."""
        base, train = self.base, self.cfg.train
        self.objective = self.family.objective(base.noise_scheduler, base.vae.config, train, self.device)

    def _setup_rngs(self) -> None:
        """The RNGs the loop draws from (all saved in a training state), and a resumed run's state."""
        train = self.cfg.train
        self.noise_rng = torch.Generator(self.device).manual_seed(train.seed)
        self.caption_rng = random.Random(train.seed)
        self.position = _Position()
        self._resume_torch_rng: torch.Tensor | None = None
        if train.resume:
            self._restore(load_training_state(train.resume))

    # --- train
    def fit(
        self, on_eval: EvalHook | None = None, on_save: SaveHook | None = None, show_progress: bool = True
    ) -> TrainResult:
        """Train until ``total_steps``; ``on_eval`` may stop early, ``on_save`` writes intermediate files."""
        cfg, train = self.cfg, self.cfg.train
        trained = self._trained_models()
        for model in trained:
            model.train()
        if self._resume_torch_rng is None:
            # augmentation draws from torch's global RNG: seed it here, after everything that may
            # have drawn from it since setup (a CLIP model being built, another run in this process)
            torch.manual_seed(train.seed)
        if self.latent_store is not None:
            self.latent_keys(show_progress)  # fills the latent cache (outside train_seconds) before any batch loads
        hold_if_asked()  # fault tests only (LORA_SWEEPER_HOLD_RUN): a trial held alive mid-training
        position = self.position
        result = TrainResult(steps=position.step, epochs=position.epoch)
        progress = tqdm(
            total=self.total_steps,
            initial=position.step,
            desc="train",
            unit="step",
            disable=not show_progress,
            dynamic_ncols=True,
        )
        pending_loss = torch.zeros((), device=self.device)
        losses = _LossReader(self.device)

        def log_losses(ready: list[tuple[int, float, dict[str, float]]]) -> None:
            for logged_step, step_loss, extra in ready:
                if not math.isfinite(step_loss):
                    raise NonFiniteLossError(f"loss became {step_loss} at step {logged_step}; lower optimizer.lr")
                result.losses.append(step_loss)
                self.sink.log_metrics({"train/loss": step_loss, **extra}, logged_step)
                progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{extra['train/lr']:.2e}", refresh=False)

        started = time.perf_counter()

        def epoch_end(epoch: int) -> None:
            if on_save and train.save_every_n_epochs and epoch % train.save_every_n_epochs == 0:
                on_save(position.step, epoch)

        batches = self._batches(epoch_end)
        try:
            while True:
                with stage("data"):
                    batch = next(batches, None)
                if batch is None:
                    break
                with self.accelerator.accumulate(*trained):
                    loss = self._loss(batch)
                    with stage("backward"):
                        self.accelerator.backward(loss)
                    pending_loss += loss.detach() / train.grad_accum_steps
                    with stage("optimizer"):
                        if self.accelerator.sync_gradients and train.max_grad_norm > 0:
                            self.accelerator.clip_grad_norm_(self._trainable(), train.max_grad_norm)
                        self.optimizer.step()
                        self.lr_schedule.step_per_optimizer_step()
                        self.optimizer.zero_grad(set_to_none=True)
                if not self.accelerator.sync_gradients:
                    continue

                # --- one optimizer step done
                position.step += 1
                step = result.steps = position.step
                metrics: dict[str, float] = {}
                if self.embedding is not None:
                    self.embedding.after_optimizer_step(step)
                if cfg.network.max_norm is not None:
                    metrics.update(self.network.apply_max_norm(cfg.network.max_norm))
                if step % train.log_every_n_steps == 0 or step == self.total_steps:
                    lr = self.lr_schedule.last_lr()
                    losses.push(pending_loss, step, {"train/lr": lr, "train/epoch": position.epoch})
                if metrics:
                    self.sink.log_metrics(metrics, step)
                log_losses(losses.ready())
                pending_loss.zero_()
                progress.update(1)
                if on_save and train.save_every_n_steps and step % train.save_every_n_steps == 0:
                    on_save(step, position.epoch)
                every = cfg.eval.every_n_steps
                if on_eval and every > 0 and step % every == 0 and step < self.total_steps:
                    log_losses(losses.ready(wait=True))
                    value, stop = self._evaluate(on_eval, step, trained)
                    self.lr_schedule.step_on_metric(value)
                    if stop:
                        result.stopped_early = True
                        break
                if step >= self.total_steps:
                    break
            log_losses(losses.ready(wait=True))
        finally:
            progress.close()
            for model in trained:
                model.eval()
        result.epochs = position.epoch
        result.train_seconds = time.perf_counter() - started
        return result

    def _evaluate(self, on_eval: EvalHook, step: int, trained: list[torch.nn.Module]) -> tuple[float, bool]:
        for model in trained:
            model.eval()
        try:
            return on_eval(step)
        finally:
            for model in trained:
                model.train()

    def _batches(self, on_epoch_end: Callable[[int], None]) -> Iterator[dict[str, Any]]:
        """Micro-batches across epochs (counted from 1), tracking the position a saved state needs.

        A resumed run replays the interrupted epoch's order from its saved RNG state, skips the
        batches already consumed without loading them, and restores the augmentation RNG before
        the next image is drawn: with ``data.num_workers=0`` it continues exactly.
        """
        position, train = self.position, self.cfg.train
        while True:
            resuming = self._resume_torch_rng is not None
            if resuming:
                self.order_rng.set_state(position.epoch_start_order)
                self.batch_plan.skip = position.batches_in_epoch
            else:
                position.epoch += 1
                if train.epochs is not None and position.epoch > train.epochs:
                    return
                position.epoch_start_order = self.order_rng.get_state()
                position.batches_in_epoch = 0
            batches = iter(self.loader)
            if resuming:
                torch.random.set_rng_state(self._resume_torch_rng)
                self._resume_torch_rng = None
            for batch in batches:
                position.batches_in_epoch += 1
                yield batch
            on_epoch_end(position.epoch)

    def _loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """Denoising loss of one micro-batch: latents, noise, timesteps, target and weights from the objective."""
        base, cfg, rng = self.base, self.cfg, self.noise_rng
        records = self.dataset.records  # a data.subsets folder may keep its own number of tags in place
        captions = [
            self._caption(c, records[i].keep_tokens) for c, i in zip(batch["caption"], batch["index"], strict=True)
        ]
        with torch.no_grad(), stage("vae"):
            if self.latent_store is None:
                pixels = batch["pixel_values"].to(self.device, dtype=self.vae_dtype, non_blocking=True)
                distribution = base.vae.encode(pixels).latent_dist
            else:  # encoded once per image (and flip) before training: the same distribution either way
                key_of = self.latent_keys()
                keys = [key_of[crop] for crop in zip(batch["index"], batch["flipped"], strict=True)]
                distribution = DiagonalGaussianDistribution(stacked_latent_params(self.latent_store, keys, self.device))
            latents = self.objective.latents(distribution, rng)
        with torch.set_grad_enabled(self._text_encoder_trains()), self.accelerator.autocast(), stage("text_encoder"):
            cond = self._encode_captions(captions)
        # per-image conditioning beyond the text (SDXL's size/crop time ids): with cached latents from
        # the geometry stored with each entry, the crop the latent was encoded from
        geometry = batch_geometry(batch)
        if self.latent_store is not None:
            geometry = [
                ImageGeometry(*self._latent_geometry[crop], g.target_size)
                for crop, g in zip(zip(batch["index"], batch["flipped"], strict=True), geometry, strict=True)
            ]
        cond.update(self.family.batch_extras(geometry, self.device, self.cfg.train))
        draw = self.objective.draw(latents, rng)
        with self.accelerator.autocast(), stage("unet_forward"):
            if self.graphed_denoiser is not None:
                prediction = self.graphed_denoiser(draw.noisy, draw.timesteps, cond)
            else:
                with self.lora_without_input_casts(base.denoiser):
                    prediction = self.family.predict(base.denoiser, draw.noisy, draw.timesteps, cond)
        if "is_reg" in batch and any(batch["is_reg"]):
            is_reg = torch.tensor(batch["is_reg"], device=self.device)
            draw.weights = torch.where(is_reg, draw.weights * cfg.data.prior_loss_weight, draw.weights)
        return self.objective.loss(prediction, draw).mean()

    @contextlib.contextmanager
    def lora_without_input_casts(self, *models: torch.nn.Module) -> Iterator[None]:
        """Under autocast, skip peft's cast of each LoRA layer's input to the fp32 LoRA weights.

        The next matmul casts it straight back to the autocast dtype, so the cast only costs two
        copies of every adapted activation: the numbers are the same without it.
        """
        with contextlib.ExitStack() as stack:
            for model in models:
                stack.enter_context(disable_input_dtype_casting(model, active=self.autocast_dtype is not None))
            yield

    def latent_keys(self, show_progress: bool = False) -> dict[tuple[int, bool], str]:
        """Latent-cache key of each ``(record, flipped)`` crop; the first call fills the cache.

        Every crop training can draw (both flips with ``flip_aug``) is encoded here, before the
        first batch is loaded, so the dataset can stop decoding images: batches then carry only
        what the keys need.
        """
        if self._latent_keys is not None:
            return self._latent_keys
        assert self.latent_store is not None
        dataset, vae = self.dataset, self.base.vae
        flips = (False, True) if dataset.flip_aug else (False,)
        keys, crops = {}, []
        for index, record in enumerate(dataset.records):
            if record.repeats <= 0:
                continue
            bucket = dataset.record_buckets[index]
            for flipped in flips:
                key = latent_cache_key(self.latent_fingerprint, record, bucket, flipped, crop_mode=dataset.crop_mode)
                keys[(index, flipped)] = key
                crops.append((key, bucket, functools.partial(dataset.fixed_crop, index, flipped)))

        @torch.no_grad()
        def encode(pixels: torch.Tensor) -> torch.Tensor:
            return vae.encode(pixels.to(self.device, dtype=self.vae_dtype)).latent_dist.parameters

        geometry = {key: dataset.fixed_crop_geometry(*crop) for crop, key in keys.items()}
        # the VAE's activations at 512 px are large: encode at most 8 crops at a time
        fill_latent_cache(
            self.latent_store, crops, encode, min(self.cfg.train.batch_size, 8), show_progress, geometry.get
        )
        self._latent_geometry = {crop: self.latent_store.geometry(key) for crop, key in keys.items()}
        dataset.load_pixels = False  # before the DataLoader's workers copy the dataset
        self._latent_keys = keys
        return keys

    def _encode_captions(self, captions: list[str]) -> Conditioning:
        """The family's text conditioning for ``captions``, from the text-embedding cache when it is on."""
        cfg, base = self.cfg, self.base

        def encode(texts: list[str]) -> Conditioning:
            return self.family.encode_text(
                base,
                texts,
                self.device,
                clip_skip=cfg.model.clip_skip,
                max_token_length=cfg.data.max_token_length,
                t5_max_length=cfg.model.t5_max_length,
            )

        return encode(captions) if self.text_cache is None else self.text_cache.encode(captions, encode)

    def _caption(self, caption: str, keep_tokens: int | None = None) -> str:
        """The caption to train on this time; ``keep_tokens`` is its folder's own (None: data.keep_tokens)."""
        data, dropout = self.cfg.data, self.cfg.dropout
        text = transform_caption(
            caption,
            self.caption_rng,
            self.position.epoch,
            caption_rate=dropout.caption_rate,
            caption_every_n_epochs=dropout.caption_every_n_epochs,
            tag_rate=dropout.tag_rate,
            keep_tokens=data.keep_tokens if keep_tokens is None else keep_tokens,
            shuffle_tags=data.shuffle_tags,
            trigger_word=data.trigger_word,
        )
        return self.prompt(text)

    def validation_loss(self, records: list[ImageRecord]) -> ValidationLoss:
        """The held-out images encoded once (``training.data.validation``), captioned as evaluation prompts are."""
        return ValidationLoss(
            records,
            vae=self.base.vae,
            objective=self.objective,  # the training steps' own latents, noising and target
            resolution=self.resolution,
            device=self.device,
            dtype=self.vae_dtype,
            caption=self.prompt,
        )

    def held_out_loss(self, validation: ValidationLoss) -> list[float]:
        """Per held-out image, the denoising loss of the model as it is now (LoRA on or off)."""
        base = self.base

        def predict(noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
            return self.family.predict(base.denoiser, noisy, timesteps, cond)

        def extras(geometry: list[ImageGeometry]) -> Conditioning:
            return self.family.batch_extras(geometry, self.device, self.cfg.train)

        with self.accelerator.autocast(), self.lora_without_input_casts(base.denoiser, *base.text_encoders):
            return validation.per_image(self._encode_captions, predict, extras)

    def encode_prompt(self, prompt: str, negative_prompt: str | None) -> dict[str, torch.Tensor]:
        """The sampling pipeline's embedding arguments, encoded exactly as training encodes captions
        (clip skip, long prompts); the negative prompt (``""`` when None) goes through the same path."""
        cfg, base = self.cfg, self.base
        cond = self.family.encode_text(
            base,
            [prompt, negative_prompt or ""],
            self.device,
            clip_skip=cfg.model.clip_skip,
            max_token_length=cfg.data.max_token_length,
            t5_max_length=cfg.model.t5_max_length,
        )
        return self.family.pipeline_inputs(cond)

    def prompt(self, text: str) -> str:
        """An evaluation prompt as the text encoder must see it: with the trigger word (as training
        captions had it) and multi-vector trigger words expanded. CLIP scores the prompt as written."""
        text = with_trigger(text, self.cfg.data.trigger_word)
        return self.embedding.expand(text) if self.embedding is not None else text

    def _text_encoder_trains(self) -> bool:
        return self.network.trains_text_encoder or (self.embedding is not None and self.embedding.weight.requires_grad)

    def _trained_models(self) -> list[torch.nn.Module]:
        models = [part.model for part in self.network.adapted()]
        if self.embedding is not None and self.base.text_encoder not in models:
            models.append(self.base.text_encoder)
        return models

    def _trainable(self) -> list[torch.nn.Parameter]:
        params = self.network.parameters()
        if self.embedding is not None and self.embedding.weight.requires_grad:
            params.append(self.embedding.weight)
        return params

    # --- training state (save_state / resume)
    def trainable_tensors(self) -> dict[str, torch.Tensor]:
        """Named LoRA weights (and embedding rows): what a training state stores."""
        tensors = {}
        for part in self.network.parts:
            for name, param in adapter_parameters(part.model):
                tensors[f"{part.label}.{name}"] = param.detach()
        if self.embedding is not None:
            tensors["embedding.rows"] = self.embedding.vectors
        return tensors

    def training_state(self) -> TrainingState:
        position = self.position
        return TrainingState(
            trainable=self.trainable_tensors(),
            optimizer=self.optimizer.state_dict(),
            lr_schedule=self.lr_schedule.state_dict(),
            rng={
                "torch": torch.random.get_rng_state(),
                "noise": self.noise_rng.get_state(),
                "caption": self.caption_rng.getstate(),
                "epoch_start_order": position.epoch_start_order,
            },
            progress={"step": position.step, "epoch": position.epoch, "batches_in_epoch": position.batches_in_epoch},
        )

    def _restore(self, state: TrainingState) -> None:
        live = self.trainable_tensors()
        missing = sorted(set(live) ^ set(state.trainable))
        if missing:
            raise ValueError(
                f"train.resume: the saved state does not match this run's LoRA ({len(missing)} tensors differ, "
                f"e.g. {missing[0]}); resume with the same network settings"
            )
        with torch.no_grad():
            for part in self.network.parts:
                for name, param in part.model.named_parameters():
                    if f"{part.label}.{name}" in state.trainable:
                        param.copy_(state.trainable[f"{part.label}.{name}"])
            if self.embedding is not None:
                self.embedding.weight[self.embedding.token_ids] = state.trainable["embedding.rows"].to(
                    self.embedding.weight.dtype
                )
        self.optimizer.load_state_dict(state.optimizer)
        self.lr_schedule.load_state_dict(state.lr_schedule)
        self.noise_rng.set_state(state.rng["noise"])
        self.caption_rng.setstate(state.rng["caption"])
        self._resume_torch_rng = state.rng["torch"]
        progress = state.progress
        self.position = _Position(
            step=progress["step"],
            epoch=progress["epoch"],
            batches_in_epoch=progress["batches_in_epoch"],
            epoch_start_order=state.rng["epoch_start_order"],
        )

    # --- cleanup
    def drop_graphs(self) -> None:
        """Training is over: its CUDA graphs' private pools need not sit under the evaluation's memory."""
        if self.graphed_denoiser is not None:
            self.graphed_denoiser.graphs.clear()
            self.graphed_denoiser = None
            release_accelerator_memory()

    def release(self) -> None:
        """Give back what this run alone holds on the accelerator, so the next trial of the worker starts
        from the same memory: CUDA graphs and their private pools, optimizer state, compiled code for
        this run's LoRA layers. The base model and the shared caches stay."""
        self.drop_graphs()
        self.optimizer = None
        self.lr_schedule = None
        self.accelerator.free_memory()  # drops accelerate's references, collects garbage, empties the cache
        configure_fp8_matmul(self.base.denoiser, "none")  # the base model goes back to plain Linear layers
        if self.cfg.train.compile != "none":
            torch._dynamo.reset()  # guards and graphs of this run's LoRA layers; the next run recompiles anyway
        release_accelerator_memory()

    # --- hand-over
    def sampling_pipeline(self, scheduler: Any) -> DiffusionPipeline:
        """The family's pipeline over the live (LoRA-adapted) models, for evaluation."""
        return self.family.pipeline(self.base, scheduler).to(self.device)
