"""What every training objective gives the loop: latents from the VAE, a draw of (noisy input,
timestep, target, loss weight), the same at fixed points for the held-out loss, and the loss.

The loop and the held-out loss (``training/data/validation.py``) call only this, so the objective
is written once; a model family says which one it trains with (``ModelFamily.objective``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class Draw:
    """One micro-batch's denoising problem: ``noisy`` and ``timesteps`` go to the denoiser, whose
    prediction is compared with ``target``; ``weights`` scale each sample's loss."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    weights: torch.Tensor


class Objective(ABC):
    """Latent scaling from the VAE config (``scaling_factor``, and ``shift_factor`` where the family's
    VAE has one, as SD3's and FLUX's do); a subclass says how noise, timesteps and targets are drawn."""

    samplers: tuple[str, ...] = ()  # the eval.sampler names that sample this objective's models

    def __init__(self, vae_config: Any) -> None:
        self.scaling_factor = float(vae_config.scaling_factor)
        shift = getattr(vae_config, "shift_factor", None)
        self.shift_factor = float(shift) if shift else None

    def latents(self, distribution: Any, generator: torch.Generator | None = None) -> torch.Tensor:
        """The denoiser's clean latents: a sample of the VAE's posterior drawn with ``generator`` (its
        mean without one, for the held-out loss), shifted and scaled."""
        raw = distribution.sample(generator=generator) if generator is not None else distribution.mean
        if self.shift_factor is not None:
            raw = raw - self.shift_factor
        return raw * self.scaling_factor

    @abstractmethod
    def draw(self, latents: torch.Tensor, generator: torch.Generator) -> Draw:
        """A random problem per latent: noise and timestep from ``generator`` (the run's noise stream)."""

    @abstractmethod
    def at(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> Draw:
        """The problem at given noise and timesteps, unweighted: the held-out loss's fixed points."""

    @abstractmethod
    def held_out_timesteps(self, count: int, device: torch.device | str) -> torch.Tensor:
        """``count`` timesteps spread evenly over the whole schedule (the held-out loss's)."""

    @staticmethod
    def loss(prediction: torch.Tensor, draw: Draw) -> torch.Tensor:
        """Per-sample weighted MSE (float32), one value per latent."""
        per_sample = F.mse_loss(prediction.float(), draw.target.float(), reduction="none")
        return per_sample.mean(dim=tuple(range(1, per_sample.dim()))) * draw.weights
