"""Seeded sample generation for evaluation, and the sampler a config names.

Trials of a sweep are compared on images they generate, so those images must depend only on the
adapter, the prompt, its position and ``test_seed``: never on global RNG state left by training,
nor on which other prompts were sampled in the same call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

# (prompt, negative prompt) -> the pipeline's embedding arguments (prompt_embeds, negative_prompt_embeds,
# and for SDXL the pooled ones), each with a batch of one
PromptEncoder = Callable[[str, str | None], dict[str, torch.Tensor]]
# (count, channels, latent height, latent width, generator, device, dtype) -> the pipeline's ``latents``
LatentDraw = Callable[[int, int, int, int, torch.Generator, Any, torch.dtype], torch.Tensor]

SAMPLERS: dict[str, type[SchedulerMixin]] = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "dpm++": DPMSolverMultistepScheduler,  # DPM-Solver++(2M), algorithm_type "dpmsolver++" by default
    "ddpm": DDPMScheduler,
    "flow_euler": FlowMatchEulerDiscreteScheduler,  # SD3 / FLUX: Euler steps along the learned velocity
}


def sampling_scheduler(train_scheduler_config: Mapping[str, Any] | SchedulerMixin, name: str) -> SchedulerMixin:
    """A fresh ``name`` scheduler built from the model's own scheduler config.

    Building ``from_config`` keeps the betas, timestep spacing and prediction type the model was
    trained with; only the solver changes.
    """
    key = name.strip().lower()
    if key not in SAMPLERS:
        raise ValueError(f"eval.sampler={name!r} is not a known sampler; choose one of {sorted(SAMPLERS)}")
    config = getattr(train_scheduler_config, "config", train_scheduler_config)
    return SAMPLERS[key].from_config(config)


# samplers whose steps draw no noise that matters (DDIM at eta 0, Euler without churn, DPM-Solver++ 2M):
# their images are decided by the initial latents alone, so prompts can share one batched call
DETERMINISTIC_SAMPLERS = (
    DDIMScheduler,
    EulerDiscreteScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
)


def pipeline_denoiser(pipeline: DiffusionPipeline) -> torch.nn.Module:
    """The pipeline's denoising network, whatever its class: ``unet`` (SD1/SD2/SDXL) or ``transformer`` (SD3, FLUX)."""
    denoiser = getattr(pipeline, "unet", None) or getattr(pipeline, "transformer", None)
    if denoiser is None:
        raise ValueError(f"{type(pipeline).__name__} has neither a unet nor a transformer to sample with")
    return denoiser


def generate_samples(
    pipeline: DiffusionPipeline,
    prompts: list[str],
    *,
    test_seed: int,
    images_per_prompt: int,
    num_inference_steps: int,
    guidance_scale: float,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | None = None,
    show_progress: bool = False,
    encode_prompt: PromptEncoder | None = None,
    batch_size: int = 16,
    on_progress: Callable[[float], None] | None = None,
    initial_latents: LatentDraw | None = None,
) -> list[list[Image.Image]]:
    """``images_per_prompt`` images for each prompt, one list per prompt, in order.

    Prompt ``i``'s starting latents come from its own generator seeded ``test_seed + i``, so its
    images depend only on (seed, position, prompt): editing or dropping another prompt leaves
    them unchanged (up to floating-point rounding of a different batch size), and the same call
    twice gives the same images. With a deterministic sampler the prompts are generated together,
    up to ``batch_size`` images per pipeline call (a few calls instead of one per prompt: on a GPU
    the sampling of a trial is bound by the host at small batches); DDPM draws noise at every
    step, so it keeps one call per prompt.

    ``encode_prompt(prompt, negative_prompt) -> {pipeline embedding argument: tensor}`` replaces the
    pipeline's own text encoding, for what it cannot do itself (clip skip, 150/225-token prompts, the
    training loop's exact conditioning); the model family decides which arguments its pipeline takes.

    ``on_progress(images)`` is told the (fractional) images finished after every denoising step.
    ``initial_latents`` draws the starting noise in the layout the pipeline takes (the model family's:
    FLUX packs it into 2x2 patches); by default (count, channels, h, w) from ``randn_tensor``.
    """
    pipeline.set_progress_bar_config(disable=not show_progress)
    # The execution device differs from pipeline.device under CPU offload; the latents are drawn there.
    device = getattr(pipeline, "_execution_device", None) or pipeline.device
    denoiser = pipeline_denoiser(pipeline)
    height = height or denoiser.config.sample_size * pipeline.vae_scale_factor
    width = width or denoiser.config.sample_size * pipeline.vae_scale_factor
    texts = [_prompt_inputs(prompt, negative_prompt, encode_prompt) for prompt in prompts]
    draw = initial_latents or _plain_noise
    latents = [
        draw(
            images_per_prompt,
            denoiser.config.in_channels,
            height // pipeline.vae_scale_factor,
            width // pipeline.vae_scale_factor,
            torch.Generator(device=device).manual_seed(test_seed + index),
            device,
            _dtype(text, pipeline),
        )
        for index, text in enumerate(texts)
    ]
    together = isinstance(pipeline.scheduler, DETERMINISTIC_SAMPLERS)
    samples: list[list[Image.Image]] = []
    for group in _groups(texts, images_per_prompt, batch_size if together else images_per_prompt):
        tracker = _StepProgress(len(group) * images_per_prompt, num_inference_steps, on_progress)
        output = pipeline(
            **_batched(group, texts, images_per_prompt),
            latents=torch.cat([latents[i] for i in group]),
            num_images_per_prompt=1,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            # the deterministic samplers' noise draws have zero weight; DDPM (one prompt per call) uses it
            generator=[torch.Generator(device=device).manual_seed(test_seed + group[0]) for _ in group]
            * images_per_prompt
            if together
            else torch.Generator(device=device).manual_seed(test_seed + group[0]),
            output_type="pil",
            **tracker.pipeline_arguments(),
        )
        tracker.finish()
        images = list(output.images)
        samples += [images[k * images_per_prompt : (k + 1) * images_per_prompt] for k in range(len(group))]
    return samples


def _plain_noise(
    count: int, channels: int, height: int, width: int, generator: torch.Generator, device: Any, dtype: torch.dtype
) -> torch.Tensor:
    return randn_tensor((count, channels, height, width), generator=generator, device=device, dtype=dtype)


class _StepProgress:
    """Reports a pipeline call's images a step at a time (``callback_on_step_end``), so a long
    evaluation moves on screen; the call's remainder is reported when it returns."""

    def __init__(self, images: int, steps: int, report: Callable[[float], None] | None) -> None:
        self.images, self.per_step, self.report, self.done = images, images / max(steps, 1), report, 0.0

    def pipeline_arguments(self) -> dict[str, Any]:
        return {} if self.report is None else {"callback_on_step_end": self._step}

    def _step(self, _pipeline: Any, _index: int, _timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        increment = min(self.per_step, self.images - self.done)
        if increment > 0 and self.report is not None:
            self.done += increment
            self.report(increment)
        return tensors

    def finish(self) -> None:
        if self.report is not None and self.images - self.done > 0:
            self.report(self.images - self.done)
        self.done = self.images


def _prompt_inputs(prompt: str, negative_prompt: str | None, encode_prompt: PromptEncoder | None) -> dict[str, Any]:
    if encode_prompt is None:
        return {"prompt": prompt, "negative_prompt": negative_prompt or ""}
    with torch.no_grad():
        return dict(encode_prompt(prompt, negative_prompt))


def _dtype(text: dict[str, Any], pipeline: DiffusionPipeline) -> torch.dtype:
    """The dtype the pipeline draws its latents in (that of the prompt embeddings)."""
    embeds = text.get("prompt_embeds")
    return embeds.dtype if embeds is not None else pipeline.text_encoder.dtype


def _groups(texts: list[dict[str, Any]], images_per_prompt: int, batch_size: int) -> list[list[int]]:
    """Consecutive prompts per pipeline call: at most ``batch_size`` images (at least one prompt),
    and one embedding shape (long prompts may encode to more tokens than short ones)."""
    groups: list[list[int]] = []
    for index, text in enumerate(texts):
        shape = text["prompt_embeds"].shape if "prompt_embeds" in text else None
        last = groups[-1] if groups else None
        if (
            last is not None
            and (len(last) + 1) * images_per_prompt <= batch_size
            and (shape is None or texts[last[0]]["prompt_embeds"].shape == shape)
        ):
            last.append(index)
        else:
            groups.append([index])
    return groups


def _batched(group: list[int], texts: list[dict[str, Any]], images_per_prompt: int) -> dict[str, Any]:
    """The pipeline's text inputs for ``group``: each prompt repeated for its images, in order."""
    if "prompt" in texts[group[0]]:
        return {
            key: [texts[i][key] for i in group for _ in range(images_per_prompt)]
            for key in ("prompt", "negative_prompt")
        }
    return {
        key: torch.cat([texts[i][key] for i in group]).repeat_interleave(images_per_prompt, dim=0)
        for key in texts[group[0]]
    }
