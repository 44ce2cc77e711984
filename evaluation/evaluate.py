"""One evaluation of a pipeline: seeded samples, their per-image metrics and a labelled grid.

The run calls this at every evaluation step and for the base model; the sweep objective reads one of
``EvalResult.values``. Sampling, scoring and drawing live in their own modules; the metrics are
defined in ``evaluation.metrics`` and their intervals in ``evaluation.stats``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from diffusers import DiffusionPipeline
from PIL import Image
from tqdm.auto import tqdm

from evaluation.clip_score import ClipScorer, clip_score_from_embeddings
from evaluation.dino import DinoEmbedder
from evaluation.grid import image_grid
from evaluation.metric_names import DIRECTIONS, metric_name, shown_name
from evaluation.metrics import concept_hits, copy_risk, diversity, fidelity
from evaluation.sampling import LatentDraw, PromptEncoder, generate_samples
from evaluation.stats import THIS_FILE, Estimate, mean_interval, paired_gain


@dataclass
class References:
    """Embeddings of the training images (computed once per dataset): what fidelity compares with."""

    clip: torch.Tensor
    dino: torch.Tensor | None = None


@dataclass
class Concept:
    """Zero-shot labels (CLIP text embeddings) and the index of the concept the LoRA should produce."""

    labels: list[str]
    embeds: torch.Tensor
    target: int


@dataclass
class Scorers:
    """Everything that turns sample images into metrics; optional parts switch their metrics off."""

    clip: ClipScorer
    dino: DinoEmbedder | None = None
    references: References | None = None
    concept: Concept | None = None

    def reference_embeddings(self, images: Sequence[Image.Image]) -> References:
        return References(
            self.clip.embed_images(list(images)).float().cpu(),
            self.dino.embed_images(list(images)) if self.dino is not None else None,
        )

    def concept_for(self, labels: Sequence[str], target: str) -> Concept:
        if target not in labels:
            raise ValueError(f"eval.concept.target={target!r} is not one of eval.concept.labels {list(labels)}")
        return Concept(list(labels), self.clip.embed_texts(list(labels)).float().cpu(), list(labels).index(target))


@dataclass
class EvalResult:
    """Per-image values of every metric (in sample order: prompt, then seed, then image) and the grid."""

    values: dict[str, list[float]]
    prompts: list[str]  # the scoring prompt of each sample
    images: list[list[Image.Image]]  # images[i]: every sample of prompts[i] (all seeds)
    grid: Image.Image
    per_prompt: dict[str, float] = field(default_factory=dict)  # mean clip_t of each prompt
    concept: str | None = None  # the label concept_acc counts (e.g. "a star"), when it is measured

    @property
    def clip_score(self) -> float:
        return self.mean("clip_t")

    def mean(self, metric: str) -> float:
        values = [v for v in self.values[metric_name(metric)] if not math.isnan(v)]
        return sum(values) / len(values) if values else float("nan")

    def clusters(self, metric: str) -> list[str] | None:
        """Each value's prompt (the bootstrap's clusters); None for ``val_loss`` (held-out images)."""
        return self.prompts if len(self.values[metric_name(metric)]) == len(self.prompts) else None

    def estimate(self, metric: str) -> Estimate:
        """The mean over this file's samples, prompt-clustered: conditions on this trained file."""
        values, clusters = self.values[metric_name(metric)], self.clusters(metric)
        kept = [i for i, v in enumerate(values) if not math.isnan(v)]
        return mean_interval([values[i] for i in kept], clusters=[clusters[i] for i in kept] if clusters else None)

    def gain(self, metric: str, baseline: EvalResult) -> Estimate:
        """The paired gain over ``baseline``: same prompt and seed (same held-out image for val_loss)."""
        name, clusters = metric_name(metric), self.clusters(metric)
        kept = [
            i
            for i, (a, b) in enumerate(zip(self.values[name], baseline.values[name], strict=True))
            if not (math.isnan(a) or math.isnan(b))
        ]
        return paired_gain(
            [self.values[name][i] for i in kept],
            [baseline.values[name][i] for i in kept],
            clusters=[clusters[i] for i in kept] if clusters else None,
        )

    def half(self, which: int) -> EvalResult:
        """The samples with an even (``which=0``) or odd (``1``) position within their prompt (held-out
        images: within the list), so a checkpoint is chosen on one half and reported on the other."""
        seen: dict[str, int] = {}
        positions = []
        for prompt in self.prompts:
            positions.append(seen.get(prompt, 0))
            seen[prompt] = positions[-1] + 1
        picked = [i for i, position in enumerate(positions) if position % 2 == which]
        values = {}
        for name, series in self.values.items():
            if len(series) == len(self.prompts):
                index = picked
            else:  # held-out images (val_loss): alternate images; a single one serves both halves
                index = list(range(which, len(series), 2)) if len(series) >= 2 else list(range(len(series)))
            values[name] = [series[i] for i in index]
        prompts = [self.prompts[i] for i in picked]
        by_prompt: dict[str, list[float]] = {}
        for prompt, score in zip(prompts, values["clip_t"], strict=True):
            by_prompt.setdefault(prompt, []).append(score)
        per_prompt = {prompt: sum(v) / len(v) for prompt, v in by_prompt.items()}
        return EvalResult(values, prompts, self.images, self.grid, per_prompt, self.concept)

    @property
    def splittable(self) -> bool:
        """At least two samples of every prompt: a selection half and a report half."""
        return bool(self.prompts) and min(self.prompts.count(p) for p in set(self.prompts)) >= 2

    def with_values(self, extra: dict[str, list[float]]) -> EvalResult:
        return EvalResult({**self.values, **extra}, self.prompts, self.images, self.grid, self.per_prompt, self.concept)


def evaluate(
    pipeline: DiffusionPipeline,
    scorers: Scorers | ClipScorer,
    prompts: list[str],
    *,
    test_seed: int,
    images_per_prompt: int,
    num_inference_steps: int,
    guidance_scale: float,
    seeds: Sequence[int] | None = None,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | None = None,
    encode_prompt: PromptEncoder | None = None,
    generation_prompts: list[str] | None = None,
    batch_size: int = 16,
    progress: str | None = None,
    initial_latents: LatentDraw | None = None,
) -> EvalResult:
    """Sample ``images_per_prompt`` images per prompt for each seed (``seeds``, default ``[test_seed]``)
    and compute every metric the scorers allow, per image.

    ``generation_prompts`` (same length) are what the pipeline sees when it differs from what CLIP
    should score against, e.g. a trigger word written as its textual-inversion tokens.
    ``progress`` names a progress bar (images sampled, then scoring); None = no bar.
    """
    if not prompts:
        raise ValueError("evaluate needs at least one prompt (eval.prompts is empty)")
    if images_per_prompt < 1:
        raise ValueError(f"eval.images_per_prompt must be >= 1, got {images_per_prompt}")
    scorers = scorers if isinstance(scorers, Scorers) else Scorers(scorers)
    rows: list[list[Image.Image]] = [[] for _ in prompts]
    all_seeds = list(seeds or []) or [test_seed]
    bar = tqdm(
        total=len(prompts) * images_per_prompt * len(all_seeds),
        desc=progress,
        unit="image",
        leave=False,
        disable=progress is None,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total} images [{elapsed}<{remaining}]{postfix}",
    )
    for seed in all_seeds:
        samples = generate_samples(
            pipeline,
            generation_prompts or prompts,
            test_seed=seed,
            images_per_prompt=images_per_prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            negative_prompt=negative_prompt,
            encode_prompt=encode_prompt,
            batch_size=batch_size,
            on_progress=None if progress is None else bar.update,
            initial_latents=initial_latents,
        )
        for row, images in zip(rows, samples, strict=True):
            row.extend(images)
    flat_images = [image for row in rows for image in row]
    flat_prompts = [prompt for prompt, row in zip(prompts, rows, strict=True) for _ in row]
    bar.set_postfix_str("scoring")
    values = score_images(scorers, flat_images, flat_prompts)
    bar.close()
    by_prompt: dict[str, list[float]] = {}
    for prompt, score in zip(flat_prompts, values["clip_t"], strict=True):
        by_prompt.setdefault(prompt, []).append(score)
    return EvalResult(
        values=values,
        prompts=flat_prompts,
        images=rows,
        grid=image_grid(rows, prompts),
        per_prompt={prompt: sum(v) / len(v) for prompt, v in by_prompt.items()},
        concept=scorers.concept.labels[scorers.concept.target] if scorers.concept is not None else None,
    )


def score_images(scorers: Scorers, images: list[Image.Image], prompts: list[str]) -> dict[str, list[float]]:
    """Every metric the scorers make possible, one value per image (NaN where a value is undefined)."""
    image_embeds = scorers.clip.embed_images(images).float().cpu()
    text_embeds = scorers.clip.embed_texts(prompts).float().cpu()
    values = {
        "clip_t": clip_score_from_embeddings(image_embeds, text_embeds),
        "diversity": diversity(image_embeds, prompts),
    }
    if scorers.references is not None:
        values["clip_i"] = fidelity(image_embeds, scorers.references.clip)
        values["copy_risk"] = copy_risk(image_embeds, scorers.references.clip)
        if scorers.dino is not None and scorers.references.dino is not None:
            values["dino_i"] = fidelity(scorers.dino.embed_images(images), scorers.references.dino)
    if scorers.concept is not None:
        values["concept_acc"] = concept_hits(image_embeds, scorers.concept.embeds, scorers.concept.target)
    if all(math.isnan(v) for v in values["diversity"].tolist()):
        del values["diversity"]  # one sample per prompt: nothing to compare
    return {name: [float(v) for v in tensor.tolist()] for name, tensor in values.items()}


DIGITS = {"clip_t": 1, "val_loss": 4}  # decimals shown; cosines and shares get 3


def summary_lines(result: EvalResult, baseline: EvalResult) -> list[str]:
    """``clip_t 38.7 (36.9-40.4), base 36.9, gain +1.8 (+0.4 to +3.2)`` for every metric of both."""
    lines = []
    for metric in DIRECTIONS:
        if metric not in result.values or metric not in baseline.values:
            continue
        digits = DIGITS.get(metric, 3)
        gain = result.gain(metric, baseline)
        lines.append(
            f"{shown_name(metric, result.concept)} {result.estimate(metric).text(digits=digits)} [{THIS_FILE}], "
            f"base {baseline.mean(metric):.{digits}f}, "
            f"gain {gain.text(signed=True, digits=digits)} [{THIS_FILE}]"
            + ("" if gain.excludes(0.0) else " (not distinguishable from 0 in this file)")
        )
    return lines
