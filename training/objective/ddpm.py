"""The DDPM objective of SD1/SD2/SDXL (Ho et al. 2020, arXiv:2006.11239): Gaussian noise added at a
discrete timestep, the noise (or v) as the target; timestep ranges, offset noise and Min-SNR weights.

Randomness comes only from the ``torch.Generator`` passed in, so a run is reproducible from
``train.seed`` alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from training.objective.base import Draw, Objective


def timestep_problems(
    num_train_timesteps: int,
    denoise_range: Sequence[float] | None = None,
    timestep_range: Sequence[int] | None = None,
) -> list[str]:
    """Every problem of ``train.denoise_range`` / ``train.timestep_range``, naming the key and the fix."""
    if denoise_range is not None and timestep_range is not None:
        return [
            "train.denoise_range and train.timestep_range both set: they say the same thing (0..1 of the "
            "denoising process vs raw timesteps); give one and set the other to null"
        ]
    problems = []
    if denoise_range is not None:
        values = list(denoise_range)
        if len(values) != 2:
            problems.append(f"train.denoise_range needs [start, end] (got {values}), e.g. [0.7, 1.0]")
        elif not 0 <= values[0] < values[1] <= 1:
            problems.append(
                f"train.denoise_range must satisfy 0 <= start < end <= 1 (got {values}); "
                "0 = pure noise, 1 = clean image"
            )
        else:
            low, high = _denoise_bounds(num_train_timesteps, values)
            if low >= high:
                problems.append(f"train.denoise_range {values} holds no whole timestep of {num_train_timesteps}")
    if timestep_range is not None:
        values = list(timestep_range)
        if len(values) != 2:
            problems.append(f"train.timestep_range needs [min, max) (got {values}), e.g. [0, 300]")
        elif not 0 <= values[0] < values[1] <= num_train_timesteps:
            problems.append(
                f"train.timestep_range must satisfy 0 <= min < max <= {num_train_timesteps} (got {values}); "
                "max is exclusive"
            )
    return problems


def _denoise_bounds(num_train_timesteps: int, denoise_range: Sequence[float]) -> tuple[int, int]:
    start, end = denoise_range
    return round((1 - end) * num_train_timesteps), round((1 - start) * num_train_timesteps)


def timestep_bounds(
    num_train_timesteps: int,
    denoise_range: Sequence[float] | None = None,
    timestep_range: Sequence[int] | None = None,
) -> tuple[int, int]:
    """``(low, high)``: train on timesteps ``low <= t < high``.

    ``denoise_range=[start, end]`` is a part of the denoising process, 0 = pure noise and
    1 = clean, so it maps to t in [(1-end)·T, (1-start)·T): [0.7, 1.0] (detail) is [0, 0.3·T),
    [0, 0.5] (composition) is [0.5·T, T). The upper end is open so that adjacent ranges split the
    timesteps without overlap. ``timestep_range=[min, max)`` is the same in raw timesteps
    (kohya's min/max_timestep). Giving both is an error; neither is [0, T).
    """
    problems = timestep_problems(num_train_timesteps, denoise_range, timestep_range)
    if problems:
        raise ValueError("; ".join(problems))
    if denoise_range is not None:
        return _denoise_bounds(num_train_timesteps, list(denoise_range))
    if timestep_range is not None:
        low, high = timestep_range
        return int(low), int(high)
    return 0, num_train_timesteps


def sample_timesteps(
    batch: int, low: int, high: int, generator: torch.Generator, device: torch.device | str
) -> torch.LongTensor:
    """One timestep per image, uniform in ``[low, high)``."""
    return torch.randint(low, high, (batch,), generator=generator, device=device, dtype=torch.long)


def offset_noise(
    latents_shape: Sequence[int],
    offset: float,
    generator: torch.Generator,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Gaussian noise plus ``offset`` · N(0,1) per image and channel, constant over H and W.

    With offset 0 this draws exactly ``torch.randn(latents_shape)`` and nothing more, so runs
    without offset keep the same random stream.
    """
    noise = torch.randn(tuple(latents_shape), generator=generator, device=device, dtype=dtype)
    if offset:
        # Offset noise (Guttenberg 2023, "Diffusion with Offset Noise", crosslabs.org/blog/diffusion-with-offset-noise):
        # a per-channel shift lets the model change an image's mean brightness, so it can learn very dark or
        # very bright images that zero-mean noise never lets it reach.
        batch, channels = latents_shape[0], latents_shape[1]
        shift_shape = (batch, channels) + (1,) * (len(latents_shape) - 2)
        noise = noise + offset * torch.randn(shift_shape, generator=generator, device=device, dtype=dtype)
    return noise


def compute_snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ᾱ_t / (1 - ᾱ_t) at each timestep (float32, on ``timesteps``' device)."""
    alpha_bar = alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return alpha_bar / (1 - alpha_bar)


def min_snr_weights(
    timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float, prediction_type: str
) -> torch.Tensor:
    """Per-sample loss weights of Min-SNR-γ, to multiply the per-sample MSE with.

    Min-SNR weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
    Strategy", arXiv:2303.09556): the x0-loss weight is min(SNR, γ); expressed for the network's
    target it is min(SNR, γ)/SNR for epsilon and min(SNR, γ)/(SNR+1) for v-prediction.
    """
    if gamma <= 0:
        raise ValueError(f"train.min_snr_gamma must be > 0 (got {gamma}); 5 is the paper's choice")
    snr = compute_snr(alphas_cumprod, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        # min(snr, γ)/snr -> 1 as snr -> 0; a zero-terminal-SNR schedule has snr = 0 at t = T-1.
        return torch.where(snr > 0, clipped / snr.clamp(min=torch.finfo(snr.dtype).tiny), torch.ones_like(snr))
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    if prediction_type == "sample":
        return clipped
    raise ValueError(f"min-SNR weighting: unknown prediction_type '{prediction_type}'; use epsilon or v_prediction")


class NoisePrediction(Objective):
    """DDPM training as SD1/SD2/SDXL were trained: ``scheduler.add_noise`` at a uniform timestep in the
    configured range, epsilon or v-prediction by the scheduler's ``prediction_type``."""

    samplers = ("ddim", "euler", "dpm++", "ddpm")

    def __init__(self, scheduler: Any, vae_config: Any, train_cfg: Any, device: torch.device | str) -> None:
        super().__init__(vae_config)
        self.scheduler = scheduler
        config = scheduler.config
        self.prediction_type = config.prediction_type
        self.bounds = timestep_bounds(
            config.num_train_timesteps,
            list(train_cfg.denoise_range) if train_cfg.denoise_range is not None else None,
            list(train_cfg.timestep_range) if train_cfg.timestep_range is not None else None,
        )
        self.noise_offset = train_cfg.noise_offset
        self.min_snr_gamma = train_cfg.min_snr_gamma
        self.alphas_cumprod = scheduler.alphas_cumprod.to(device)  # for min-SNR, moved once

    def draw(self, latents: torch.Tensor, generator: torch.Generator) -> Draw:
        # offset noise (Guttenberg 2023, "Diffusion with Offset Noise"); noise first, then timesteps:
        # the order of the run's noise stream, which a resumed run continues
        noise = offset_noise(latents.shape, self.noise_offset, generator, latents.device, latents.dtype)
        timesteps = sample_timesteps(latents.shape[0], *self.bounds, generator, latents.device)
        draw = self.at(latents, noise, timesteps)
        if self.min_snr_gamma is not None:
            # Min-SNR weighting (Hang et al. 2023, arXiv:2303.09556)
            draw.weights = draw.weights * min_snr_weights(
                timesteps, self.alphas_cumprod, self.min_snr_gamma, self.prediction_type
            )
        return draw

    def at(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> Draw:
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type == "v_prediction":
            # v-prediction (Salimans & Ho 2022, "Progressive Distillation", arXiv:2202.00512)
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        weights = torch.ones(latents.shape[0], device=latents.device, dtype=torch.float32)
        return Draw(noisy, timesteps, target, weights)

    def held_out_timesteps(self, count: int, device: torch.device | str) -> torch.Tensor:
        """The centres of ``count`` equal parts of [0, T)."""
        total = self.scheduler.config.num_train_timesteps
        return torch.tensor([int((k + 0.5) * total / count) for k in range(count)], device=device)
