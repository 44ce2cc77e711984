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
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from PIL import Image

# (prompt, negative prompt) -> (prompt embeddings, negative prompt embeddings)
PromptEncoder = Callable[[str, str | None], tuple[torch.Tensor, torch.Tensor]]

SAMPLERS: dict[str, type[SchedulerMixin]] = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "dpm++": DPMSolverMultistepScheduler,  # DPM-Solver++(2M), algorithm_type "dpmsolver++" by default
    "ddpm": DDPMScheduler,
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


def generate_samples(
    pipeline: StableDiffusionPipeline,
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
) -> list[list[Image.Image]]:
    """``images_per_prompt`` images for each prompt, one list per prompt, in order.

    Prompt ``i`` gets its own generator seeded ``test_seed + i`` and its own pipeline call, so its
    images depend only on (seed, position, prompt): editing or dropping another prompt leaves them
    unchanged, and the same call twice gives the same images.

    ``encode_prompt(prompt, negative_prompt) -> (embeds, negative_embeds)`` replaces the pipeline's
    own text encoding, for what it cannot do itself (clip skip, 150/225-token prompts, the training
    loop's exact conditioning).
    """
    pipeline.set_progress_bar_config(disable=not show_progress)
    # The execution device differs from pipeline.device under CPU offload; the latents are drawn there.
    device = getattr(pipeline, "_execution_device", None) or pipeline.device
    samples = []
    for index, prompt in enumerate(prompts):
        generator = torch.Generator(device=device).manual_seed(test_seed + index)
        if encode_prompt is not None:
            with torch.no_grad():
                embeds, negative_embeds = encode_prompt(prompt, negative_prompt)
            text: dict[str, Any] = {"prompt_embeds": embeds, "negative_prompt_embeds": negative_embeds}
        else:
            text = {"prompt": prompt, "negative_prompt": negative_prompt}
        output = pipeline(
            **text,
            num_images_per_prompt=images_per_prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            generator=generator,
            output_type="pil",
        )
        samples.append(list(output.images))
    return samples
