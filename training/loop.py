"""The one shared training loop: every run and every sweep trial trains through ``Trainer.fit``.

Stages: setup (devices, precision, LoRA, data, optimizer), train (noise -> denoise -> loss ->
step, with periodic evaluation), and hand-over (a sampling pipeline and the LoRA tensors).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import StableDiffusionPipeline
from tqdm.auto import tqdm

from training.captions import transform_caption
from training.data import CaptionedImageDataset, ImageRecord, collate_captioned
from training.models import BaseModel
from training.network import LoraNetwork, add_lora
from training.optim import build_lr_scheduler, build_optimizer


class MetricSink(Protocol):
    """Where the loop reports step metrics (an MLflow run, or the null tracker)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf: the run cannot recover, so it stops with the step named."""


@dataclass
class TrainResult:
    steps: int  # optimizer steps actually taken
    losses: list[float] = field(default_factory=list)  # per logged step
    stopped_early: bool = False  # an evaluation callback asked to stop (e.g. a pruner)
    train_seconds: float = 0.0


def resolve_mixed_precision(name: str, cuda: bool | None = None) -> str:
    """accelerate's mixed_precision value for ``precision.mixed`` (auto: bf16 on capable GPUs)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if name == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    return {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}[name]


def encode_captions(
    tokenizer: Any, text_encoder: torch.nn.Module, captions: list[str], device: torch.device
) -> torch.Tensor:
    """The text encoder's last hidden state, as StableDiffusionPipeline conditions the UNet."""
    ids = tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return text_encoder(ids.to(device))[0]


class Trainer:
    """Owns one run's trainable state; the base model it is given can be reused afterwards."""

    def __init__(self, cfg: Any, base: BaseModel, records: list[ImageRecord], sink: MetricSink) -> None:
        # --- setup: devices and precision
        self.cfg, self.base, self.sink = cfg, base, sink
        train = cfg.train
        self.accelerator = Accelerator(
            mixed_precision=resolve_mixed_precision(cfg.precision.mixed),
            gradient_accumulation_steps=train.grad_accum_steps,
        )
        self.device = self.accelerator.device
        half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.accelerator.mixed_precision)
        self.weight_dtype = half or torch.float32  # frozen weights; LoRA stays fp32
        for module in (base.unet, base.vae, base.text_encoder):
            module.to(self.device)
            if self.weight_dtype != torch.float32:
                module.to(dtype=self.weight_dtype)

        # --- LoRA, seeded so the initial weights depend only on train.seed
        torch.manual_seed(train.seed)
        self.network: LoraNetwork = add_lora(base.unet, base.text_encoder, cfg.network, cfg.optimizer.lr)

        # --- data
        self.resolution = cfg.bucket.resolution or base.native_resolution
        self.dataset = CaptionedImageDataset(records, self.resolution, random_crop=cfg.data.random_crop)
        self.loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=train.batch_size,
            shuffle=True,
            drop_last=len(self.dataset) >= train.batch_size,
            collate_fn=collate_captioned,
            num_workers=cfg.data.num_workers,
            generator=torch.Generator().manual_seed(train.seed),
            pin_memory=self.device.type == "cuda",
        )

        # --- optimizer and schedule
        optimizer = build_optimizer(self.network.param_groups, cfg.optimizer)
        lr_scheduler = build_lr_scheduler(optimizer, cfg.scheduler, train.max_steps)
        self.optimizer, self.lr_scheduler = self.accelerator.prepare(optimizer, lr_scheduler)

    # --- train
    def fit(self, on_eval: Callable[[int], bool] | None = None, show_progress: bool = True) -> TrainResult:
        """Train ``train.max_steps`` optimizer steps; ``on_eval(step)`` returning True stops early."""
        cfg, base, train = self.cfg, self.base, self.cfg.train
        torch.manual_seed(train.seed)  # random crops in the main process
        noise_rng = torch.Generator(self.device).manual_seed(train.seed)
        caption_rng = random.Random(train.seed)
        scheduler_config = base.noise_scheduler.config
        trained_models = [
            m
            for m, on in ((base.unet, self.network.trains_unet), (base.text_encoder, self.network.trains_text_encoder))
            if on
        ]
        for model in trained_models:
            model.train()

        result = TrainResult(steps=0)
        progress = tqdm(total=train.max_steps, desc="train", unit="step", disable=not show_progress, dynamic_ncols=True)
        pending_loss = torch.zeros((), device=self.device)
        started = time.perf_counter()
        batches = self._epochs()
        try:
            while result.steps < train.max_steps:
                epoch, batch = next(batches)
                with self.accelerator.accumulate(*trained_models):
                    captions = [
                        transform_caption(
                            c,
                            caption_rng,
                            epoch,
                            caption_rate=cfg.dropout.caption_rate,
                            caption_every_n_epochs=cfg.dropout.caption_every_n_epochs,
                            tag_rate=cfg.dropout.tag_rate,
                        )
                        for c in batch["caption"]
                    ]
                    loss = self._loss(batch["pixel_values"], captions, noise_rng, scheduler_config)
                    self.accelerator.backward(loss)
                    pending_loss += loss.detach() / train.grad_accum_steps
                    if self.accelerator.sync_gradients and train.max_grad_norm > 0:
                        self.accelerator.clip_grad_norm_(self.network.parameters(), train.max_grad_norm)
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                if not self.accelerator.sync_gradients:
                    continue

                # --- one optimizer step done
                result.steps += 1
                step = result.steps
                if step % train.log_every_n_steps == 0 or step == train.max_steps:
                    step_loss = pending_loss.item()  # the only host sync: at log intervals
                    if not math.isfinite(step_loss):
                        raise NonFiniteLossError(f"loss became {step_loss} at step {step}; lower optimizer.lr")
                    lr = self.lr_scheduler.get_last_lr()[0]
                    result.losses.append(step_loss)
                    self.sink.log_metrics({"train/loss": step_loss, "train/lr": lr, "train/epoch": epoch}, step)
                    progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", refresh=False)
                pending_loss.zero_()
                progress.update(1)
                every = cfg.eval.every_n_steps
                if on_eval and every > 0 and step % every == 0 and step < train.max_steps:
                    for model in trained_models:
                        model.eval()
                    stop = on_eval(step)
                    for model in trained_models:
                        model.train()
                    if stop:
                        result.stopped_early = True
                        break
        finally:
            progress.close()
            for model in trained_models:
                model.eval()
        result.train_seconds = time.perf_counter() - started
        return result

    def _epochs(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """Batches forever, with the epoch number (from 1) that caption dropout needs."""
        epoch = 0
        while True:
            epoch += 1
            for batch in self.loader:
                yield epoch, batch

    def _loss(
        self, pixels: torch.Tensor, captions: list[str], rng: torch.Generator, scheduler_config: Any
    ) -> torch.Tensor:
        """Denoising loss of one micro-batch: noise, timesteps and target follow the scheduler config."""
        base = self.base
        pixels = pixels.to(self.device, dtype=self.weight_dtype, non_blocking=True)
        with torch.no_grad():
            latents = base.vae.encode(pixels).latent_dist.sample(generator=rng) * base.vae.config.scaling_factor
        with torch.set_grad_enabled(self.network.trains_text_encoder), self.accelerator.autocast():
            hidden = encode_captions(base.tokenizer, base.text_encoder, captions, self.device)
        noise = torch.randn(latents.shape, generator=rng, device=self.device, dtype=latents.dtype)
        timesteps = torch.randint(
            0, scheduler_config.num_train_timesteps, (latents.shape[0],), generator=rng, device=self.device
        )
        noisy = base.noise_scheduler.add_noise(latents, noise, timesteps)
        if scheduler_config.prediction_type == "v_prediction":
            # v-prediction (Salimans & Ho 2022, "Progressive Distillation", arXiv:2202.00512)
            target = base.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        with self.accelerator.autocast():
            prediction = base.unet(noisy, timesteps, hidden).sample
        return F.mse_loss(prediction.float(), target.float())

    # --- hand-over
    def sampling_pipeline(self, scheduler: Any) -> StableDiffusionPipeline:
        """A pipeline over the live (LoRA-adapted) models, for evaluation."""
        base = self.base
        pipeline = StableDiffusionPipeline(
            vae=base.vae,
            text_encoder=base.text_encoder,
            tokenizer=base.tokenizer,
            unet=base.unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        return pipeline.to(self.device)
