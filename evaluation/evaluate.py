"""One evaluation of a pipeline: seeded samples, their CLIP scores and a labelled grid.

The training loop calls this at each validation step and the sweep objective reads
``EvalResult.clip_score``; sampling, scoring and drawing live in their own modules.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffusers import StableDiffusionPipeline
from PIL import Image

from evaluation.clip_score import ClipScorer
from evaluation.grid import image_grid
from evaluation.sampling import PromptEncoder, generate_samples


@dataclass
class EvalResult:
    """What one evaluation produced; ``clip_score`` is the number a trial is ranked by."""

    clip_score: float  # mean over all images of all prompts
    per_prompt: dict[str, float]  # mean over that prompt's images (over all its occurrences)
    images: list[list[Image.Image]]  # images[i] are the samples of prompts[i]
    grid: Image.Image


def evaluate(
    pipeline: StableDiffusionPipeline,
    scorer: ClipScorer,
    prompts: list[str],
    *,
    test_seed: int,
    images_per_prompt: int,
    num_inference_steps: int,
    guidance_scale: float,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | None = None,
    encode_prompt: PromptEncoder | None = None,
    generation_prompts: list[str] | None = None,
    batch_size: int = 16,
) -> EvalResult:
    """Sample ``images_per_prompt`` images per prompt with ``test_seed`` and score each against its prompt.

    ``generation_prompts`` (same length) are what the pipeline sees when it differs from what CLIP
    should score against, e.g. a trigger word written as its textual-inversion tokens.
    """
    if not prompts:
        raise ValueError("evaluate needs at least one prompt (eval.prompts is empty)")
    if images_per_prompt < 1:
        raise ValueError(f"eval.images_per_prompt must be >= 1, got {images_per_prompt}")
    images = generate_samples(
        pipeline,
        generation_prompts or prompts,
        test_seed=test_seed,
        images_per_prompt=images_per_prompt,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        height=height,
        width=width,
        negative_prompt=negative_prompt,
        encode_prompt=encode_prompt,
        batch_size=batch_size,
    )
    flat_images = [image for row in images for image in row]
    flat_prompts = [prompt for prompt, row in zip(prompts, images, strict=True) for _ in row]
    scores = scorer.score(flat_images, flat_prompts)

    by_prompt: dict[str, list[float]] = {}
    for prompt, score in zip(flat_prompts, scores.tolist(), strict=True):
        by_prompt.setdefault(prompt, []).append(score)
    return EvalResult(
        clip_score=float(scores.mean()),
        per_prompt={prompt: sum(values) / len(values) for prompt, values in by_prompt.items()},
        images=images,
        grid=image_grid(images, prompts),
    )
