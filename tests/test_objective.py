"""The objectives against their definitions: DDPM (the loop's draw, Min-SNR, v-prediction) and flow
matching (SD3's interpolation and velocity, its densities and weights, the fixed and FLUX shifts)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.training_utils import compute_density_for_timestep_sampling
from omegaconf import OmegaConf

from sweeper.config.schema import FlowConfig, TrainConfig
from training.objective.base import Objective
from training.objective.ddpm import NoisePrediction, min_snr_weights
from training.objective.flow import RectifiedFlow
from training.objective.flow_options import flow_problems

SD_VAE = SimpleNamespace(scaling_factor=0.18215)
SD3_VAE = SimpleNamespace(scaling_factor=1.5305, shift_factor=0.0609)  # SD3.5's VAE config


def train_cfg(**values: object) -> TrainConfig:
    flow = values.pop("flow", {})
    return OmegaConf.merge(OmegaConf.structured(TrainConfig), {**values, "flow": flow})


def latents(batch: int = 4, side: int = 8) -> torch.Tensor:
    return torch.randn(batch, 4, side, side, generator=torch.Generator().manual_seed(1))


def test_ddpm_draws_noise_then_timesteps_and_noises_with_the_scheduler():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    objective = NoisePrediction(scheduler, SD_VAE, train_cfg(timestep_range=[100, 400]), "cpu")
    x0 = latents()
    draw = objective.draw(x0, torch.Generator().manual_seed(7))

    expected = torch.Generator().manual_seed(7)
    noise = torch.randn(x0.shape, generator=expected)
    timesteps = torch.randint(100, 400, (4,), generator=expected)
    assert torch.equal(draw.timesteps, timesteps) and torch.equal(draw.target, noise)
    assert torch.equal(draw.noisy, scheduler.add_noise(x0, noise, timesteps))
    assert torch.equal(draw.weights, torch.ones(4))


def test_ddpm_v_prediction_and_min_snr_weights():
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    objective = NoisePrediction(scheduler, SD_VAE, train_cfg(min_snr_gamma=5.0), "cpu")
    x0 = latents()
    draw = objective.draw(x0, torch.Generator().manual_seed(3))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    assert torch.equal(draw.target, scheduler.get_velocity(x0, noise, draw.timesteps))
    snr_weights = min_snr_weights(draw.timesteps, scheduler.alphas_cumprod, 5.0, "v_prediction")
    assert torch.equal(draw.weights, snr_weights)
    prediction = torch.zeros_like(x0)
    mse = (draw.target.float() ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(Objective.loss(prediction, draw), mse * snr_weights)


def test_latents_are_shifted_then_scaled_where_the_vae_says_so():
    parameters = torch.cat([torch.full((1, 4, 2, 2), 0.5), torch.full((1, 4, 2, 2), -30.0)], dim=1)
    distribution = DiagonalGaussianDistribution(parameters)
    flow = RectifiedFlow(FlowMatchEulerDiscreteScheduler(shift=3.0), SD3_VAE, train_cfg(), "cpu")
    assert torch.allclose(flow.latents(distribution), torch.full((1, 4, 2, 2), (0.5 - 0.0609) * 1.5305))
    ddpm = NoisePrediction(DDPMScheduler(), SD_VAE, train_cfg(), "cpu")
    assert torch.equal(ddpm.latents(distribution), distribution.mean * 0.18215)


def test_flow_interpolates_towards_noise_and_its_target_is_the_velocity():
    flow = RectifiedFlow(FlowMatchEulerDiscreteScheduler(shift=1.0), SD3_VAE, train_cfg(), "cpu")
    x0, noise = latents(), torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    sigmas = torch.tensor([0.0, 0.25, 0.5, 1.0])
    draw = flow.at(x0, noise, sigmas * 1000)
    assert torch.allclose(draw.noisy[0], x0[0]) and torch.allclose(draw.noisy[3], noise[3])
    assert torch.allclose(draw.noisy[1], 0.75 * x0[1] + 0.25 * noise[1])
    assert torch.equal(draw.target, noise - x0)
    # one Euler step along the velocity from σ goes back to the clean latent (a straight path)
    assert torch.allclose(draw.noisy - sigmas.view(-1, 1, 1, 1) * draw.target, x0, atol=1e-6)


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "none"])
def test_flow_draws_sigma_from_diffusers_density_then_applies_the_fixed_shift(scheme):
    flow_cfg = {"weighting_scheme": scheme, "logit_mean": 0.3, "logit_std": 0.8, "mode_scale": 1.29}
    flow = RectifiedFlow(FlowMatchEulerDiscreteScheduler(shift=3.0), SD3_VAE, train_cfg(flow=flow_cfg), "cpu")
    x0 = latents(batch=6)
    draw = flow.draw(x0, torch.Generator().manual_seed(5))

    expected = torch.Generator().manual_seed(5)
    noise = torch.randn(x0.shape, generator=expected)
    u = compute_density_for_timestep_sampling(scheme, 6, 0.3, 0.8, 1.29, "cpu", expected)
    sigmas = 3.0 * u / (1 + 2.0 * u)
    assert torch.allclose(draw.timesteps, sigmas * 1000)
    assert torch.allclose(draw.noisy, (1 - sigmas.view(-1, 1, 1, 1)) * x0 + sigmas.view(-1, 1, 1, 1) * noise, atol=1e-6)
    assert torch.equal(draw.weights, torch.ones(6))  # these schemes shape the density, not the weights


def test_sigma_sqrt_weights_the_loss_by_one_over_sigma_squared():
    flow = RectifiedFlow(
        FlowMatchEulerDiscreteScheduler(shift=1.0), SD3_VAE, train_cfg(flow={"weighting_scheme": "sigma_sqrt"}), "cpu"
    )
    draw = flow.draw(latents(), torch.Generator().manual_seed(0))
    sigmas = draw.timesteps / 1000
    assert torch.allclose(draw.weights, sigmas**-2)


def test_flux_shift_grows_with_the_image_token_count():
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    )
    flow = RectifiedFlow(scheduler, SD3_VAE, train_cfg(flow={"weighting_scheme": "none"}), "cpu")
    sigmas = torch.tensor([0.1, 0.5, 0.9])
    for side in (32, 128):  # 256 and 4096 tokens of 2x2 latent patches
        mu = calculate_shift((side // 2) ** 2, 256, 4096, 0.5, 1.15)  # the FLUX pipeline's own rule
        shifted = flow.shifted(sigmas, torch.zeros(1, 16, side, side))
        assert torch.allclose(shifted, math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1)))
    small = flow.shifted(sigmas, torch.zeros(1, 16, 32, 32))
    large = flow.shifted(sigmas, torch.zeros(1, 16, 128, 128))
    assert torch.all(large > small)  # larger images train at higher noise


def test_held_out_timesteps_cover_the_schedule_evenly():
    flow = RectifiedFlow(FlowMatchEulerDiscreteScheduler(), SD3_VAE, train_cfg(), "cpu")
    assert flow.held_out_timesteps(4, "cpu").tolist() == [125.0, 375.0, 625.0, 875.0]
    ddpm = NoisePrediction(DDPMScheduler(num_train_timesteps=1000), SD_VAE, train_cfg(), "cpu")
    assert ddpm.held_out_timesteps(4, "cpu").tolist() == [125, 375, 625, 875]


def test_bad_flow_options_are_named():
    bad = OmegaConf.merge(
        OmegaConf.structured(FlowConfig), {"weighting_scheme": "lognorm", "logit_std": 0, "shift": -1}
    )
    problems = flow_problems(bad)
    assert len(problems) == 3
    assert "train.flow.weighting_scheme: unknown 'lognorm'" in problems[0] and "logit_normal" in problems[0]
    with pytest.raises(ValueError, match=r"train\.flow\.logit_std"):
        RectifiedFlow(FlowMatchEulerDiscreteScheduler(), SD3_VAE, train_cfg(flow={"logit_std": -1.0}), "cpu")
