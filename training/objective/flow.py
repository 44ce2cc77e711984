"""The flow-matching objective of SD3/SD3.5 and FLUX.1: a straight path from the clean latent to noise.

Rectified flow (Liu et al. 2022, arXiv:2209.03003) as SD3 trains it (Esser et al. 2024, "Scaling
Rectified Flow Transformers", arXiv:2403.03206): at noise level σ in (0, 1) the input is
(1 - σ)·x0 + σ·ε and the target the velocity ε - x0; σ is drawn from a density (uniform, logit-normal,
mode; Sec. 3.1 of the paper), then shifted towards noise, by a fixed factor (SD3's ``shift`` of 3.0)
or by the image's token count (FLUX's resolution-dependent shift, ``use_dynamic_shifting``).
The density and the loss weights are diffusers' own (``diffusers.training_utils``).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from training.objective.base import Draw, Objective
from training.objective.ddpm import offset_noise
from training.objective.flow_options import flow_problems


def resolution_shift_mu(image_seq_len: int, config: Any) -> float:
    """FLUX's shift exponent for an image of ``image_seq_len`` tokens: linear between the scheduler's
    (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift)."""
    slope = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
    return config.base_shift + slope * (image_seq_len - config.base_image_seq_len)


class RectifiedFlow(Objective):
    """Flow matching against a ``FlowMatchEulerDiscreteScheduler``'s config; ``patch_size`` is the
    denoiser's (latent pixels per token side), which sets the token count of the dynamic shift."""

    samplers = ("flow_euler",)

    def __init__(
        self, scheduler: Any, vae_config: Any, train_cfg: Any, device: torch.device | str, patch_size: int = 2
    ) -> None:
        super().__init__(vae_config)
        if problems := flow_problems(train_cfg.flow):
            raise ValueError("; ".join(problems))
        self.scheduler = scheduler
        self.flow = train_cfg.flow
        self.noise_offset = train_cfg.noise_offset
        self.patch_size = patch_size
        self.num_train_timesteps = scheduler.config.num_train_timesteps

    def shifted(self, sigmas: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """σ moved towards noise: ``train.flow.shift`` or the scheduler's static ``shift``, or with
        ``use_dynamic_shifting`` (FLUX) exp(mu) for this latent size (``time_shift``)."""
        config = self.scheduler.config
        if self.flow.shift is None and getattr(config, "use_dynamic_shifting", False):
            tokens = (latents.shape[-2] // self.patch_size) * (latents.shape[-1] // self.patch_size)
            return self.scheduler.time_shift(resolution_shift_mu(tokens, config), 1.0, sigmas)
        shift = self.flow.shift if self.flow.shift is not None else float(config.shift)
        return shift * sigmas / (1 + (shift - 1) * sigmas)

    def draw(self, latents: torch.Tensor, generator: torch.Generator) -> Draw:
        noise = offset_noise(latents.shape, self.noise_offset, generator, latents.device, latents.dtype)
        density = compute_density_for_timestep_sampling(
            self.flow.weighting_scheme,
            latents.shape[0],
            logit_mean=self.flow.logit_mean,
            logit_std=self.flow.logit_std,
            mode_scale=self.flow.mode_scale,
            device=latents.device,
            generator=generator,
        )
        sigmas = self.shifted(density.float(), latents)
        draw = self.at(latents, noise, sigmas * self.num_train_timesteps)
        draw.weights = compute_loss_weighting_for_sd3(self.flow.weighting_scheme, sigmas).float()
        return draw

    def at(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> Draw:
        sigmas = (timesteps.float() / self.num_train_timesteps).view(-1, *([1] * (latents.dim() - 1)))
        noisy = ((1 - sigmas) * latents.float() + sigmas * noise.float()).to(latents.dtype)
        target = noise - latents
        weights = torch.ones(latents.shape[0], device=latents.device, dtype=torch.float32)
        return Draw(noisy, timesteps, target, weights)

    def held_out_timesteps(self, count: int, device: torch.device | str) -> torch.Tensor:
        """The centres of ``count`` equal parts of σ in (0, 1), as timesteps (σ · T)."""
        return torch.tensor([(k + 0.5) / count * self.num_train_timesteps for k in range(count)], device=device)
