"""Pretrain the toy world's base model: a tiny SD-architecture pipeline that never saw a held-out shape.

``python -m toy_world.pretrain_base --clip CLIP_DIR --out DIR``

Stages, as SD1.x was built, only small: the text encoder is the toy CLIP's text tower, frozen; an
``AutoencoderKL`` (64 px -> 16x16x4 latents) is trained on world images, and its latent scale set
to 1/std; a ``UNet2DConditionModel`` learns DDPM epsilon prediction on those latents, conditioned
on the frozen encoder's last hidden state, with 10 % empty captions for classifier-free guidance.
The result is a plain diffusers ``StableDiffusionPipeline`` folder, so LoRA training loads it like
any real model, and learning the held-out shape is a real task for a LoRA.

``DIR/metrics.json`` records the losses, timings and ``prompt_alignment``: CLIP scores of generated
images against their own prompts versus shuffled prompts (matched must be clearly higher).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing
import os
import platform
import random
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from tqdm.auto import tqdm
from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

from evaluation.clip_score import ClipScorer
from evaluation.sampling import generate_samples, sampling_scheduler
from toy_world.pretrain_clip import resolve_device
from toy_world.world import HELD_OUT_SHAPES, SHAPES, Scene, render, scenes, sentence_caption, tag_caption
from training.families.pipeline import sd_pipeline
from training.families.tiny_sd import sd1_noise_scheduler
from training.objective.ddpm import min_snr_weights
from training.text.encoding import encode_prompts

RESOLUTION = 64
LATENT_SIZE = RESOLUTION // 4  # three VAE blocks downsample twice
TRAIN_SHAPES: tuple[str, ...] = tuple(s for s in SHAPES if s not in HELD_OUT_SHAPES)
EVAL_SEED_OFFSET = 10_000  # evaluation scenes come from seed + this, never from the training stream
EMPTY_CAPTION = 0  # row of the caption table holding "" (the unconditional prompt)
METRICS_FILE = "metrics.json"
SAMPLES_FILE = "samples.png"
EVAL_SAMPLER = "ddim"  # conf/eval/default.yaml's sampler: the base model is judged as sweeps will sample it


# --- config


@dataclass
class PretrainConfig:
    """Every knob of one pretraining run; written whole into metrics.json so a run can be repeated."""

    clip: Path
    out: Path
    seed: int = 0
    device: str = "auto"
    # 1024 images a UNet step: this small UNet is launch-bound on a GPU (14 steps/s at 256 on an H100),
    # so a larger batch costs little time per step and gives a less noisy gradient.
    batch_size: int = 1024
    vae_batch_size: int = 256  # the VAE works at 64 px and is compute-bound: 256 a step
    pool_size: int = 60_000  # pre-rendered training scenes: rendering on the fly would starve a GPU
    workers: int = field(default_factory=lambda: min(16, os.cpu_count() or 1))
    # VAE: L1 + MSE reconstruction; the small KL term only keeps the latent space smooth.
    vae_steps: int = 1500
    vae_lr: float = 2e-3
    vae_channels: tuple[int, ...] = (32, 48, 48)
    kl_weight: float = 1e-5
    # UNet: DDPM epsilon loss with min-SNR-5 weighting, EMA weights are the ones saved.
    unet_steps: int = 6000
    unet_lr: float = 1.5e-3
    unet_channels: tuple[int, ...] = (48, 96)
    warmup_fraction: float = 0.03
    empty_caption_prob: float = 0.1
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    # Stops both stages early (VAE at 30 % of it) and anneals the LR to the cut, so one GPU call ends in time.
    max_train_seconds: float | None = None
    size_budget_mb: float = 14.0  # VAE + UNet + text encoder as fp32 safetensors (the world ships in 20 MB)
    # Evaluation
    eval_prompts: int = 32
    eval_steps: int = 20
    eval_guidance: float = 7.5
    overwrite: bool = False


def config_problems(cfg: PretrainConfig) -> list[str]:
    """Everything wrong with ``cfg`` that can be known before loading anything, all at once."""
    problems = []
    clip = Path(cfg.clip)
    if not (clip / "config.json").is_file():
        problems.append(f"--clip {clip}: no config.json there; pass a folder written by CLIPModel.save_pretrained")
    if Path(cfg.out).exists() and not cfg.overwrite:
        problems.append(f"--out {cfg.out} exists; pass --overwrite to replace it")
    for name in ("batch_size", "vae_batch_size", "vae_steps", "unet_steps", "workers", "eval_steps"):
        if getattr(cfg, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(cfg, name)})")
    if cfg.pool_size < max(2, cfg.batch_size, cfg.vae_batch_size):
        problems.append(
            f"--pool-size ({cfg.pool_size}) must be >= --batch-size ({cfg.batch_size}), "
            f"--vae-batch-size ({cfg.vae_batch_size}) and 2"
        )
    if cfg.eval_prompts < 2:
        problems.append(f"--eval-prompts must be >= 2 to shuffle prompts (got {cfg.eval_prompts})")
    if not 0 <= cfg.empty_caption_prob < 1:
        problems.append(f"empty_caption_prob must be in [0, 1) (got {cfg.empty_caption_prob})")
    if len(cfg.vae_channels) != 3:
        problems.append(f"--vae-channels needs 3 widths (3 blocks: 64 px -> 16x16 latents), got {cfg.vae_channels}")
    if len(cfg.unet_channels) < 2:
        problems.append(f"--unet-channels needs >= 2 widths, got {cfg.unet_channels}")
    for name in ("vae_channels", "unet_channels"):
        odd = [c for c in getattr(cfg, name) if c % 8]
        if odd:
            problems.append(f"--{name.replace('_', '-')}: widths must be multiples of 8 (GroupNorm), got {odd}")
    if cfg.max_train_seconds is not None and cfg.max_train_seconds <= 0:
        problems.append(f"--max-train-seconds must be > 0 (got {cfg.max_train_seconds})")
    if cfg.device not in ("auto", "cpu", "cuda") and not cfg.device.startswith("cuda:"):
        problems.append(f"--device must be auto, cpu or cuda (got {cfg.device!r})")
    elif cfg.device.startswith("cuda") and not torch.cuda.is_available():
        problems.append(f"--device {cfg.device}: CUDA is not available here")
    return problems


def autocast(device: torch.device) -> AbstractContextManager:
    """bf16 autocast on CUDA (no loss scaling needed); plain fp32 on the CPU, where bf16 is slow."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


# --- data


def training_scenes(seed: int, count: int) -> list[Scene]:
    """The scenes the VAE and UNet learn from: every shape but HELD_OUT_SHAPES, which LoRAs must teach."""
    return scenes(seed, count, shapes=TRAIN_SHAPES)


def _render_chunk(chunk: Sequence[Scene]) -> np.ndarray:
    """(n, 3, H, W) uint8 renders; module-level so worker processes can run it."""
    return np.stack([np.asarray(render(s, RESOLUTION), dtype=np.uint8).transpose(2, 0, 1) for s in chunk])


def render_pool(pool: Sequence[Scene], workers: int = 1, chunk: int = 256) -> torch.Tensor:
    """All scenes rendered into one (N, 3, 64, 64) uint8 tensor (12 KB an image), over ``workers`` processes."""
    chunks = [pool[i : i + chunk] for i in range(0, len(pool), chunk)]
    bar = tqdm(total=len(pool), desc="render", unit="img", mininterval=1.0)
    parts = []
    if workers > 1 and len(chunks) > 1:
        # fork: workers inherit the imported world module instead of re-importing torch; they only draw with PIL.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as executor:
            for part in executor.map(_render_chunk, chunks):
                parts.append(part)
                bar.update(len(part))
    else:
        for piece in chunks:
            parts.append(_render_chunk(piece))
            bar.update(len(piece))
    bar.close()
    return torch.from_numpy(np.concatenate(parts))


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], the VAE's input range."""
    return images.float().div(127.5).sub(1.0)


def caption_table(pool: Sequence[Scene]) -> tuple[list[str], torch.Tensor]:
    """Distinct captions (row 0 is ``""``) and, per scene, the rows of its sentence and tag captions.

    The world has only a few thousand distinct captions, so each is encoded once by the frozen text
    encoder instead of once per step.
    """
    captions = [""]
    rows: dict[str, int] = {"": EMPTY_CAPTION}
    index = []
    for scene in pool:
        pair = []
        for caption in (sentence_caption(scene), tag_caption(scene)):
            if caption not in rows:
                rows[caption] = len(captions)
                captions.append(caption)
            pair.append(rows[caption])
        index.append(pair)
    return captions, torch.tensor(index, dtype=torch.long).view(-1, 2)


def choose_captions(
    pair_rows: torch.Tensor, empty_prob: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Per sample, its sentence or tag caption (even odds), or the empty one with ``empty_prob``.

    Mixing caption styles makes both prompt styles work; dropping the caption trains the
    unconditional model of classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598), whose
    paper found 10-20 % dropout best.
    """
    device = pair_rows.device
    style = torch.randint(0, 2, (len(pair_rows),), generator=generator, device=device)
    chosen = pair_rows.gather(1, style[:, None]).squeeze(1)
    drop = torch.rand(len(pair_rows), generator=generator, device=device) < empty_prob
    return torch.where(drop, torch.full_like(chosen, EMPTY_CAPTION), chosen)


# --- models


def seeded(seed: int, build: Callable[[], Any]) -> Any:
    """``build()`` under ``torch.manual_seed(seed)``, leaving the caller's RNG state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def load_text_encoder(clip_dir: Path) -> tuple[CLIPTextModel, CLIPTokenizer]:
    """The CLIP's text tower as a standalone ``CLIPTextModel`` (as SD uses OpenAI CLIP's), and its tokenizer."""
    clip = CLIPModel.from_pretrained(clip_dir)
    text_encoder = CLIPTextModel(clip.config.text_config)
    # transformers < 5.6 nests the transformer under .text_model; later versions flattened CLIPTextModel.
    target = getattr(text_encoder, "text_model", text_encoder)
    target.load_state_dict(clip.text_model.state_dict(), strict=True)
    text_encoder.requires_grad_(False).eval()
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir)
    return text_encoder, tokenizer


def build_vae(channels: Sequence[int] = (32, 48, 48), seed: int = 0) -> AutoencoderKL:
    """SD's AutoencoderKL with 3 blocks: 64 px -> 16x16x4 latents, like training/families/tiny_sd.py."""
    return seeded(
        seed,
        lambda: AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=tuple(channels),
            down_block_types=("DownEncoderBlock2D",) * len(channels),
            up_block_types=("UpDecoderBlock2D",) * len(channels),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=RESOLUTION,
        ),
    )


def build_unet(cross_attention_dim: int, channels: Sequence[int] = (48, 96), seed: int = 0) -> UNet2DConditionModel:
    """An SD1.x-layout UNet, narrow: cross-attention (to_q/to_k/to_v/to_out.0, LoRA's targets) at every level."""
    levels = len(channels)
    return seeded(
        seed,
        lambda: UNet2DConditionModel(
            sample_size=LATENT_SIZE,
            in_channels=4,
            out_channels=4,
            block_out_channels=tuple(channels),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D",) * levels,
            up_block_types=("CrossAttnUpBlock2D",) * levels,
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=4,  # diffusers reads this as the number of heads (SD1.x naming)
            norm_num_groups=8,
        ),
    )


def build_scheduler() -> DDPMScheduler:
    """The SD1.x noise schedule the toy base model trains with (the tiny model's too)."""
    return sd1_noise_scheduler()


def fp32_megabytes(*modules: torch.nn.Module) -> float:
    """Size of the modules' parameters and buffers as fp32 safetensors, in MB (1e6 bytes), headers aside."""
    count = sum(t.numel() for m in modules for t in (*m.parameters(), *m.buffers()))
    return 4 * count / 1e6


# --- training helpers


def lr_factor(progress: float, warmup_fraction: float) -> float:
    """Linear warm-up, then cosine decay to zero, as a function of progress in [0, 1]."""
    if progress < warmup_fraction:
        return max(progress / warmup_fraction, 1e-3)
    span = max(1.0 - warmup_fraction, 1e-8)
    return 0.5 * (1.0 + math.cos(math.pi * min((progress - warmup_fraction) / span, 1.0)))


class Progress:
    """Fraction of a stage done: by steps, or by wall time when a time budget runs out first.

    Tying the LR schedule to this keeps the cosine annealing complete when a time limit cuts a run.
    """

    def __init__(self, steps: int, seconds: float | None) -> None:
        self.steps, self.seconds = steps, seconds
        self.started = time.perf_counter()

    def __call__(self, step: int) -> float:
        done = step / self.steps
        if self.seconds is not None:
            done = max(done, (time.perf_counter() - self.started) / self.seconds)
        return min(done, 1.0)


class EMA:
    """Exponential moving average of parameters; the averaged UNet samples more cleanly than the last step's.

    The decay ramps up as (1 + n) / (10 + n), so early, still-random weights are forgotten quickly.
    """

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.shadow = [p.detach().clone() for p in self.params]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        """Write the averages into ``module`` (a copy of the trained one, same parameter order)."""
        targets = [p for p in module.parameters() if p.requires_grad]
        for target, average in zip(targets, self.shadow, strict=True):
            target.copy_(average)


class LossLog:
    """Loss kept on the device and read back every ``every`` steps (a .item() per step would sync the GPU)."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.pending: list[torch.Tensor] = []
        self.curve: list[tuple[int, float]] = []  # (step, mean loss over the window ending there)

    def add(self, step: int, loss: torch.Tensor, force: bool = False) -> float | None:
        self.pending.append(loss.detach())
        if len(self.pending) < self.every and not force:
            return None
        mean = torch.stack(self.pending).float().mean().item()
        self.pending = []
        self.curve.append((step, round(mean, 6)))
        return mean

    def flush(self, step: int) -> None:
        """Record the last, partial window (a time limit can stop a stage between windows)."""
        if self.pending:
            last = self.pending.pop()
            self.add(step, last, force=True)


def make_optimizer(module: torch.nn.Module, lr: float, device: torch.device) -> torch.optim.Optimizer:
    # fused AdamW: one kernel for all parameters, which matters for many small tensors on a GPU.
    return torch.optim.AdamW(
        [p for p in module.parameters() if p.requires_grad], lr=lr, weight_decay=1e-2, fused=device.type == "cuda"
    )


class SpeedReport:
    """Prints a stage's time estimate, timed over steps 10-30 so start-up (cuDNN autotuning, allocation) is left out."""

    START, STOP = 10, 30

    def __init__(self, stage: str, total: int, budget: float | None, device: torch.device) -> None:
        self.stage, self.total, self.budget, self.device = stage, total, budget, device
        self.started: float | None = None
        self.first = 0

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the queue of launched kernels must not hide GPU time
        return time.perf_counter()

    def __call__(self, step: int) -> None:
        if step == min(self.START, self.total // 4):
            self.started, self.first = self._now(), step
        elif step == min(self.STOP, self.total // 2) and self.started is not None and step > self.first:
            rate = (step - self.first) / max(self._now() - self.started, 1e-9)
            estimate = self.total / rate
            capped = f", capped at {self.budget:.0f} s" if self.budget is not None and self.budget < estimate else ""
            tqdm.write(f"{self.stage}: {rate:.1f} it/s -> ~{estimate:.0f} s for {self.total} steps{capped}")


# --- stage: VAE


def vae_loss(
    vae: AutoencoderKL, pixels: torch.Tensor, kl_weight: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(total, reconstruction) loss: L1 + MSE per pixel plus ``kl_weight`` x KL per latent element.

    SD's VAE (Rombach et al. 2022, arXiv:2112.10752, sec. 3) adds perceptual and GAN losses for
    photographs; flat shapes on flat or periodic backgrounds reconstruct well without them.
    """
    posterior = vae.encode(pixels).latent_dist
    latents = posterior.sample(generator=generator)
    decoded = vae.decode(latents).sample
    reconstruction = F.l1_loss(decoded.float(), pixels) + F.mse_loss(decoded.float(), pixels)
    mean, logvar = posterior.mean.float(), posterior.logvar.float()
    kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()  # KL to N(0, I), per latent element
    return reconstruction + kl_weight * kl, reconstruction


def train_vae(
    vae: AutoencoderKL,
    images: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    kl_weight: float,
    warmup_fraction: float,
    device: torch.device,
    seed: int,
    max_seconds: float | None = None,
) -> dict[str, Any]:
    """Train ``vae`` on random batches of ``images`` (uint8, on ``device``); returns the stage's record."""
    vae.to(device).train()
    optimizer = make_optimizer(vae, lr, device)
    generator = torch.Generator(device).manual_seed(seed)
    progress, log = Progress(steps, max_seconds), LossLog(every=max(1, min(50, steps // 10)))
    bar, speed = tqdm(total=steps, desc="vae", mininterval=1.0), SpeedReport("vae", steps, max_seconds, device)
    started, step = time.perf_counter(), 0
    while step < steps and progress(step) < 1.0:
        rows = torch.randint(0, len(images), (batch_size,), generator=generator, device=device)
        pixels = to_pixels(images[rows])
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_factor(progress(step), warmup_fraction)
        with autocast(device):
            loss, reconstruction = vae_loss(vae, pixels, kl_weight, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        bar.update()
        mean = log.add(step, reconstruction, force=step == steps)
        if mean is not None:
            bar.set_postfix(rec=f"{mean:.4f}")
        speed(step)
    bar.close()
    log.flush(step)
    vae.eval()
    return {"steps_done": step, "seconds": round(time.perf_counter() - started, 2), "reconstruction_curve": log.curve}


@torch.no_grad()
def encode_pool(
    vae: AutoencoderKL, images: torch.Tensor, device: torch.device, batch_size: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image: the UNet stage samples latents from them without the encoder."""
    vae.eval()
    means, stds = [], []
    for start in range(0, len(images), batch_size):
        with autocast(device):
            posterior = vae.encode(to_pixels(images[start : start + batch_size].to(device))).latent_dist
        means.append(posterior.mean.float())
        stds.append(posterior.std.float())
    return torch.cat(means), torch.cat(stds)


def latent_scaling_factor(means: torch.Tensor, stds: torch.Tensor, seed: int) -> float:
    """1 / std of sampled latents, so the diffusion model sees unit-variance data.

    As SD did (Rombach et al. 2022, arXiv:2112.10752, appendix G: "rescale the latents by the
    component-wise variance"); SD1.x's 0.18215 came from one batch of its VAE's latents.
    """
    generator = torch.Generator(means.device).manual_seed(seed)
    latents = means + stds * torch.randn(means.shape, generator=generator, device=means.device)
    return 1.0 / latents.float().std().item()


@torch.no_grad()
def reconstruction_error(vae: AutoencoderKL, images: torch.Tensor, device: torch.device) -> float:
    """Mean absolute pixel error of decode(mean latent), in [0, 255] units: the VAE's fidelity at a glance."""
    vae.eval()
    pixels = to_pixels(images.to(device))
    with autocast(device):
        decoded = vae.decode(vae.encode(pixels).latent_dist.mean).sample
    return (decoded.float().clamp(-1, 1) - pixels).abs().mean().item() * 127.5


# --- stage: UNet


@torch.no_grad()
def encode_captions(
    captions: list[str],
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModel,
    device: torch.device,
    batch_size: int = 512,
) -> torch.Tensor:
    """(len(captions), 77, hidden) last hidden states, exactly what StableDiffusionPipeline conditions on."""
    text_encoder.to(device)
    parts = [
        encode_prompts(tokenizer, text_encoder, captions[i : i + batch_size], device).float()
        for i in range(0, len(captions), batch_size)
    ]
    return torch.cat(parts)


def diffusion_loss(
    unet: UNet2DConditionModel,
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    hidden: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    min_snr_gamma: float | None,
) -> torch.Tensor:
    """DDPM epsilon loss (Ho et al. 2020, arXiv:2006.11239, eq. 14), optionally min-SNR weighted per sample."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction = unet(noisy, timesteps, encoder_hidden_states=hidden).sample
    per_sample = F.mse_loss(prediction.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma:
        # Min-SNR-γ (Hang et al. 2023, arXiv:2303.09556): caps the weight of the easy low-noise steps, ~3x faster.
        alphas = scheduler.alphas_cumprod.to(latents.device)
        per_sample = per_sample * min_snr_weights(timesteps, alphas, min_snr_gamma, "epsilon")
    return per_sample.mean()


def train_unet(
    unet: UNet2DConditionModel,
    scheduler: DDPMScheduler,
    latent_mean: torch.Tensor,
    latent_std: torch.Tensor,
    scaling_factor: float,
    caption_embeddings: torch.Tensor,
    pair_rows: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    warmup_fraction: float,
    empty_caption_prob: float,
    min_snr_gamma: float | None,
    ema_decay: float,
    grad_clip: float,
    device: torch.device,
    seed: int,
    max_seconds: float | None = None,
) -> tuple[UNet2DConditionModel, dict[str, Any]]:
    """Train ``unet`` on latents sampled from the pool's posteriors; returns its EMA copy and the stage's record."""
    unet.to(device).train()
    optimizer = make_optimizer(unet, lr, device)
    ema = EMA(unet, ema_decay)
    generator = torch.Generator(device).manual_seed(seed)
    timesteps_total = scheduler.config.num_train_timesteps
    progress, log = Progress(steps, max_seconds), LossLog(every=max(1, min(100, steps // 10)))
    bar, speed = tqdm(total=steps, desc="unet", mininterval=1.0), SpeedReport("unet", steps, max_seconds, device)
    started, step = time.perf_counter(), 0
    while step < steps and progress(step) < 1.0:
        rows = torch.randint(0, len(latent_mean), (batch_size,), generator=generator, device=device)
        centre = latent_mean[rows]  # a fresh posterior sample each time, as SD's latent_dist.sample()
        eps = torch.randn(centre.shape, generator=generator, device=device)
        latents = (centre + latent_std[rows] * eps) * scaling_factor
        hidden = caption_embeddings[choose_captions(pair_rows[rows], empty_caption_prob, generator)]
        noise = torch.randn(latents.shape, generator=generator, device=device)
        timesteps = torch.randint(0, timesteps_total, (batch_size,), generator=generator, device=device)
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_factor(progress(step), warmup_fraction)
        with autocast(device):
            loss = diffusion_loss(unet, scheduler, latents, hidden, noise, timesteps, min_snr_gamma)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), grad_clip)
        optimizer.step()
        ema.update()
        step += 1
        bar.update()
        mean = log.add(step, loss, force=step == steps)
        if mean is not None:
            bar.set_postfix(loss=f"{mean:.4f}")
        speed(step)
    bar.close()
    log.flush(step)
    averaged = copy.deepcopy(unet)
    ema.copy_to(averaged)
    averaged.eval()
    record = {
        "steps_done": step,
        "seconds": round(time.perf_counter() - started, 2),
        "loss": f"epsilon MSE, min-SNR-{min_snr_gamma} weighted" if min_snr_gamma else "epsilon MSE",
        "loss_curve": log.curve,
    }
    return averaged, record


# --- evaluation


def alignment_scenes(seed: int, count: int) -> list[Scene]:
    """``count`` unseen in-world scenes with distinct sentence captions (held-out shape excluded)."""
    chosen: dict[str, Scene] = {}
    for scene in scenes(seed + EVAL_SEED_OFFSET, 50 * count, shapes=TRAIN_SHAPES):
        chosen.setdefault(sentence_caption(scene), scene)
        if len(chosen) == count:
            break
    return list(chosen.values())


def alignment_prompts(seed: int, count: int) -> list[str]:
    """The prompts of ``alignment_scenes``: what ``prompt_alignment`` is run on by default."""
    return [sentence_caption(scene) for scene in alignment_scenes(seed, count)]


def derangement(count: int, seed: int) -> list[int]:
    """A permutation with no fixed point: a random cyclic order, each position taking its successor's item."""
    if count < 2:
        raise ValueError(f"a derangement needs at least 2 items (got {count})")
    order = list(range(count))
    random.Random(seed).shuffle(order)
    result = [0] * count
    for i, position in enumerate(order):
        result[position] = order[(i + 1) % count]
    return result


def clip_alignment(scorer: Any, images: list[Image.Image], prompts: list[str], seed: int) -> dict[str, float]:
    """CLIP score of each image with its own prompt and with a deranged one (Hessel et al. 2021, arXiv:2104.08718).

    The shuffled score is the baseline an image gets from a wrong in-world prompt, so the gap is what
    the prompt itself controls; ``win_rate`` is the fraction of images closer to their own prompt.
    """
    shuffled = [prompts[j] for j in derangement(len(prompts), seed)]
    matched_scores = scorer.score(images, prompts)
    shuffled_scores = scorer.score(images, shuffled)
    return {
        "matched_clip_score": round(matched_scores.mean().item(), 4),
        "shuffled_clip_score": round(shuffled_scores.mean().item(), 4),
        "margin": round((matched_scores - shuffled_scores).mean().item(), 4),
        "win_rate": round((matched_scores > shuffled_scores).float().mean().item(), 4),
        "count": len(prompts),
    }


def generate(
    pipeline: StableDiffusionPipeline,
    prompts: list[str],
    seed: int,
    steps: int,
    guidance: float,
    sampler: str = EVAL_SAMPLER,
) -> list[Image.Image]:
    """One 64 px image per prompt; prompt ``i`` has its own generator seeded ``seed + i``, whatever the others.

    ``sampler`` replaces the pipeline's scheduler for the call only (the folder keeps its DDPM training schedule).
    """
    original = pipeline.scheduler
    pipeline.scheduler = sampling_scheduler(original.config, sampler)
    try:
        rows = generate_samples(
            pipeline,
            prompts,
            test_seed=seed,
            images_per_prompt=1,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=RESOLUTION,
            width=RESOLUTION,
        )
    finally:
        pipeline.scheduler = original
    return [row[0] for row in rows]


def prompt_alignment(
    pipeline: StableDiffusionPipeline,
    clip_dir: str | Path,
    prompts: list[str],
    seed: int,
    steps: int = 20,
    guidance: float = 7.5,
    device: str | torch.device = "cpu",
    images: list[Image.Image] | None = None,
    sampler: str = EVAL_SAMPLER,
) -> dict[str, Any]:
    """Does the base model follow prompts? Generated images scored against their own vs shuffled prompts.

    ``prompts`` must be in-world and free of HELD_OUT_SHAPES (the base model never saw them, so they say
    nothing about alignment). Pass ``images`` to score images already generated from these prompts.
    """
    held_out = [p for p in prompts if set(HELD_OUT_SHAPES) & set(p.lower().replace(",", " ").split())]
    if held_out:
        raise ValueError(f"prompt_alignment: prompts name a held-out shape {HELD_OUT_SHAPES}: {held_out[:3]}")
    if len(prompts) < 2:
        raise ValueError(f"prompt_alignment needs >= 2 prompts to shuffle (got {len(prompts)})")
    if images is None:
        pipeline.to(device)
        images = generate(pipeline, prompts, seed, steps, guidance, sampler)
    scorer = ClipScorer(str(clip_dir), device=device)
    result: dict[str, Any] = clip_alignment(scorer, images, prompts, seed)
    return {**result, "seed": seed, "steps": steps, "guidance": guidance, "sampler": sampler}


@torch.no_grad()
def conditioning_losses(
    unet: UNet2DConditionModel,
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    embeddings: torch.Tensor,
    seed: int,
    repeats: int = 4,
) -> dict[str, float]:
    """Plain epsilon MSE of ``latents`` (scaled) given their own captions, deranged captions and the empty one.

    ``embeddings`` holds one row per latent, then the empty caption's. The same noise and timesteps
    serve all three, so the differences are the prompt's effect alone: matched below shuffled means
    the UNet reads its prompt, independently of any CLIP scorer.
    """
    unet.eval()
    count = len(latents)
    device = latents.device
    variants = {
        "matched": embeddings[:count],
        "shuffled": embeddings[:count][derangement(count, seed)],
        "empty": embeddings[count:].expand(count, -1, -1),
    }
    generator = torch.Generator(device).manual_seed(seed)
    totals = dict.fromkeys(variants, 0.0)
    for _ in range(repeats):
        noise = torch.randn(latents.shape, generator=generator, device=device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (count,), generator=generator, device=device)
        for name, hidden in variants.items():
            with autocast(device):
                loss = diffusion_loss(unet, scheduler, latents, hidden.to(device), noise, timesteps, None)
            totals[name] += loss.item() / repeats
    result = {name: round(value, 6) for name, value in totals.items()}
    result["shuffled_minus_matched"] = round(totals["shuffled"] - totals["matched"], 6)
    return result


def tile(images: Sequence[Image.Image], columns: int) -> Image.Image:
    """Images in a grid, row-major: the samples sheet a person looks at."""
    width, height = images[0].size
    rows = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        sheet.paste(image.convert("RGB"), ((i % columns) * width, (i // columns) * height))
    return sheet


# --- save


def assemble_pipeline(
    vae: AutoencoderKL, unet: UNet2DConditionModel, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer
) -> StableDiffusionPipeline:
    return sd_pipeline(
        vae=vae.cpu().eval(),
        text_encoder=text_encoder.cpu().eval(),
        tokenizer=tokenizer,
        unet=unet.cpu().eval(),
        scheduler=build_scheduler(),
    )


def finish_folder(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` folder to ``out``: a half-written model never sits at ``out``."""
    if out.exists() and overwrite:
        shutil.rmtree(out)
    tmp.rename(out)


def safetensors_megabytes(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors")) / 1e6


# --- main


def parse_args(argv: Sequence[str] | None = None) -> PretrainConfig:
    defaults = PretrainConfig(clip=Path(), out=Path())
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clip", type=Path, required=True, help="toy CLIP folder (CLIPModel + CLIPProcessor)")
    parser.add_argument("--out", type=Path, required=True, help="pipeline folder to write")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--vae-steps", type=int, default=defaults.vae_steps)
    parser.add_argument("--unet-steps", type=int, default=defaults.unet_steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="UNet batch")
    parser.add_argument("--vae-batch-size", type=int, default=defaults.vae_batch_size)
    parser.add_argument("--device", default=defaults.device, help="auto, cpu or cuda")
    parser.add_argument("--pool-size", type=int, default=defaults.pool_size, help="pre-rendered training scenes")
    parser.add_argument("--workers", type=int, default=defaults.workers, help="rendering processes")
    parser.add_argument("--vae-lr", type=float, default=defaults.vae_lr)
    parser.add_argument("--unet-lr", type=float, default=defaults.unet_lr)
    parser.add_argument("--vae-channels", default=",".join(map(str, defaults.vae_channels)))
    parser.add_argument("--unet-channels", default=",".join(map(str, defaults.unet_channels)))
    parser.add_argument("--max-train-seconds", type=float, default=None, help="wall-time cap of the VAE + UNet stages")
    parser.add_argument("--size-budget-mb", type=float, default=defaults.size_budget_mb)
    parser.add_argument("--eval-prompts", type=int, default=defaults.eval_prompts)
    parser.add_argument("--eval-steps", type=int, default=defaults.eval_steps)
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)

    def widths(text: str, flag: str) -> tuple[int, ...]:
        try:
            return tuple(int(w) for w in text.split(","))
        except ValueError:
            parser.error(f"{flag} takes comma-separated integers, e.g. 32,48,48 (got {text!r})")

    return PretrainConfig(
        clip=args.clip,
        out=args.out,
        seed=args.seed,
        device=args.device,
        batch_size=args.batch_size,
        vae_batch_size=args.vae_batch_size,
        pool_size=args.pool_size,
        workers=args.workers,
        vae_steps=args.vae_steps,
        vae_lr=args.vae_lr,
        vae_channels=widths(args.vae_channels, "--vae-channels"),
        unet_steps=args.unet_steps,
        unet_lr=args.unet_lr,
        unet_channels=widths(args.unet_channels, "--unet-channels"),
        max_train_seconds=args.max_train_seconds,
        size_budget_mb=args.size_budget_mb,
        eval_prompts=args.eval_prompts,
        eval_steps=args.eval_steps,
        overwrite=args.overwrite,
    )


def pretrain(cfg: PretrainConfig, command: Sequence[str] = ()) -> dict[str, Any]:
    """Every stage of one run (setup, VAE, latents, UNet, save, evaluate); returns the metrics it wrote."""
    if problems := config_problems(cfg):
        raise ValueError("pretrain_base: fix these first:\n  - " + "\n  - ".join(problems))
    started = time.perf_counter()
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed shapes: autotune each convolution once
    stage_seconds: dict[str, float] = {}

    def lap(stage: str, since: float) -> float:
        stage_seconds[stage] = round(time.perf_counter() - since, 2)
        tqdm.write(f"[{stage}] {stage_seconds[stage]:.1f} s")
        return time.perf_counter()

    # --- setup: models first, so a size or tokenizer problem stops the run before any training
    clock = time.perf_counter()
    text_encoder, tokenizer = load_text_encoder(cfg.clip)
    text_config = text_encoder.config
    vae = build_vae(cfg.vae_channels, seed=cfg.seed)
    unet = build_unet(text_config.hidden_size, cfg.unet_channels, seed=cfg.seed + 1)
    scheduler = build_scheduler()
    sizes = {
        "vae_mb": round(fp32_megabytes(vae), 3),
        "unet_mb": round(fp32_megabytes(unet), 3),
        "text_encoder_mb": round(fp32_megabytes(text_encoder), 3),
    }
    total_mb = sum(sizes.values())
    problems = []
    if total_mb > cfg.size_budget_mb:
        problems.append(
            f"VAE + UNet + text encoder = {total_mb:.2f} MB fp32 > --size-budget-mb {cfg.size_budget_mb} ({sizes}); "
            "narrow --unet-channels / --vae-channels"
        )
    if tokenizer.model_max_length > text_config.max_position_embeddings:
        problems.append(
            f"tokenizer pads to {tokenizer.model_max_length} tokens but the text encoder has only "
            f"{text_config.max_position_embeddings} positions"
        )
    if problems:
        raise ValueError("pretrain_base: fix these first:\n  - " + "\n  - ".join(problems))
    tqdm.write(f"device {device}; model sizes {sizes} = {total_mb:.2f} MB (budget {cfg.size_budget_mb} MB)")
    clock = lap("setup", clock)

    # --- data: one pre-rendered pool; its scenes never include the held-out shape
    pool = training_scenes(cfg.seed, cfg.pool_size)
    images = render_pool(pool, cfg.workers)
    captions, pair_rows = caption_table(pool)
    images, pair_rows = images.to(device), pair_rows.to(device)
    clock = lap("render", clock)

    # --- stage: VAE
    vae_budget = None if cfg.max_train_seconds is None else 0.3 * cfg.max_train_seconds
    vae_record = train_vae(
        vae,
        images,
        steps=cfg.vae_steps,
        batch_size=cfg.vae_batch_size,
        lr=cfg.vae_lr,
        kl_weight=cfg.kl_weight,
        warmup_fraction=cfg.warmup_fraction,
        device=device,
        seed=cfg.seed,
        max_seconds=vae_budget,
    )
    clock = lap("vae", clock)

    # --- latents: encode the pool once; the scale makes them unit-variance, as SD's 0.18215 did
    latent_mean, latent_std = encode_pool(vae, images, device)
    scaling_factor = latent_scaling_factor(latent_mean, latent_std, cfg.seed)
    vae.register_to_config(scaling_factor=scaling_factor)
    vae_record["scaling_factor"] = round(scaling_factor, 6)
    vae_record["mean_abs_error_255"] = round(reconstruction_error(vae, images[:256], device), 3)
    del images  # the UNet stage needs only latents
    caption_embeddings = encode_captions(captions, tokenizer, text_encoder, device)
    clock = lap("latents", clock)

    # --- stage: UNet
    unet_budget = None
    if cfg.max_train_seconds is not None:
        unet_budget = max(cfg.max_train_seconds - vae_record["seconds"], 1.0)
    ema_unet, unet_record = train_unet(
        unet,
        scheduler,
        latent_mean,
        latent_std,
        scaling_factor,
        caption_embeddings,
        pair_rows,
        steps=cfg.unet_steps,
        batch_size=cfg.batch_size,
        lr=cfg.unet_lr,
        warmup_fraction=cfg.warmup_fraction,
        empty_caption_prob=cfg.empty_caption_prob,
        min_snr_gamma=cfg.min_snr_gamma,
        ema_decay=cfg.ema_decay,
        grad_clip=cfg.grad_clip,
        device=device,
        seed=cfg.seed + 2,
        max_seconds=unet_budget,
    )
    del latent_mean, latent_std, caption_embeddings
    clock = lap("unet", clock)

    # --- does the UNet use its prompt? Denoising loss on unseen scenes with right, wrong and empty captions
    eval_scenes = alignment_scenes(cfg.seed, cfg.eval_prompts)
    prompts = [sentence_caption(scene) for scene in eval_scenes]
    real = [render(scene, RESOLUTION) for scene in eval_scenes]
    eval_latents = encode_pool(vae, render_pool(eval_scenes), device)[0] * scaling_factor
    conditioning = conditioning_losses(
        ema_unet, scheduler, eval_latents, encode_captions([*prompts, ""], tokenizer, text_encoder, device), cfg.seed
    )
    tqdm.write(f"conditioning losses (lower = better denoising): {conditioning}")
    clock = lap("conditioning", clock)

    # --- save to a temporary sibling, reload it (proves the folder is complete), evaluate, then rename
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        assemble_pipeline(vae, ema_unet, text_encoder, tokenizer).save_pretrained(tmp, safe_serialization=True)
        clock = lap("save", clock)

        pipeline = StableDiffusionPipeline.from_pretrained(tmp).to(device)
        eval_seed = cfg.seed + EVAL_SEED_OFFSET
        generated = generate(pipeline, prompts, eval_seed, cfg.eval_steps, cfg.eval_guidance)
        alignment = prompt_alignment(
            pipeline, cfg.clip, prompts, eval_seed, cfg.eval_steps, cfg.eval_guidance, device, images=generated
        )
        # The ceiling: the same scores for the true renders of the prompts' scenes (same derangement).
        reference = clip_alignment(ClipScorer(str(cfg.clip), device=device), real, prompts, eval_seed)
        columns = min(8, len(prompts))
        tile(generated + real, columns).save(tmp / SAMPLES_FILE)
        clock = lap("evaluate", clock)

        metrics = {
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
            "command": shlex.join(["python", "-m", "toy_world.pretrain_base", *command]),
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "torch_version": torch.__version__,
            "seed": cfg.seed,
            "held_out_shapes": list(HELD_OUT_SHAPES),
            "train_shapes": list(TRAIN_SHAPES),
            "distinct_captions": len(captions) - 1,
            "model_mb_fp32": sizes,
            "safetensors_mb": round(safetensors_megabytes(tmp), 3),
            "vae": vae_record,
            "unet": unet_record,
            "prompt_alignment": alignment,
            "conditioning_loss": conditioning,
            "reference_alignment_real_renders": reference,
            "eval_prompts": prompts,
            "samples_png": f"{SAMPLES_FILE}: top {len(prompts)} generated, bottom the true renders, {columns} a row",
            "stage_seconds": stage_seconds,
            "wall_seconds": round(time.perf_counter() - started, 2),
        }
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
        finish_folder(tmp, out, cfg.overwrite)
    except BaseException:
        tqdm.write(f"pretrain_base: failed after training; the partial folder is kept at {tmp}")
        raise
    return metrics


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    arguments = list(sys.argv[1:] if argv is None else argv)
    metrics = pretrain(parse_args(arguments), command=arguments)
    summary = {key: metrics[key] for key in ("wall_seconds", "stage_seconds", "prompt_alignment", "safetensors_mb")}
    summary["reference_alignment_real_renders"] = metrics["reference_alignment_real_renders"]
    summary["conditioning_loss"] = metrics["conditioning_loss"]
    summary["vae_reconstruction_last"] = metrics["vae"]["reconstruction_curve"][-1]
    summary["unet_loss_last"] = metrics["unet"]["loss_curve"][-1]
    print(json.dumps(summary, indent=2))
    return metrics


if __name__ == "__main__":
    main()
