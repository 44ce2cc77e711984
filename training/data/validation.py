"""A held-out denoising loss that compares across checkpoints, runs and trials (``val_loss``).

The training loss is too noisy to compare checkpoints by: every step draws new images, noise and
timesteps. In the style of the "demystifying Stable Diffusion fine-tuning" validation protocol,
the held-out images are encoded once (the VAE's mean, no sampling), each paired with its own fixed
noise at a fixed, evenly spaced set of timesteps covering the whole schedule. The loss of a model
is then a deterministic function of its weights: the same LoRA gives the same value, and two runs,
trials or checkpoints are compared on identical inputs, image by image (so the base model's values
pair with the LoRA's for a paired interval).

Held-out images come from ``data.val_split`` (a seeded fraction of the training images, which are
then never trained on) or ``data.val_dir`` (a separate folder in the same layout).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from training.data.dataset import CaptionedImageDataset, collate_captioned
from training.data.scan import ImageRecord
from training.families.base import Conditioning, ImageGeometry, batch_geometry
from training.objective.base import Objective

VAL_SEED = 20_231_130  # the held-out noise; fixed so every run and trial uses the same
VAL_TIMESTEPS = 8  # evenly spaced over the whole schedule (the objective's held_out_timesteps)
MIN_TRAINING_IMAGES = 2  # a split that would leave fewer is refused


@dataclass
class HeldOut:
    """The training records left after the split, the held-out ones, and why it is off (if it is)."""

    train: list[ImageRecord]
    held_out: list[ImageRecord]
    note: str | None = None


def split_held_out(records: Sequence[ImageRecord], fraction: float, seed: int) -> HeldOut:
    """Hold out ``round(fraction * images)`` training images, chosen with ``seed``; regularisation
    images always train. Off (with a note) when that is no image or leaves fewer than 2 to train on."""
    trainable = [i for i, r in enumerate(records) if not r.is_reg]
    count = round(fraction * len(trainable))
    if fraction <= 0:
        return HeldOut(list(records), [])
    if count < 1 or len(trainable) - count < MIN_TRAINING_IMAGES:
        return HeldOut(
            list(records),
            [],
            f"val_loss is off: data.val_split={fraction:g} of {len(trainable)} image(s) holds out {count}, "
            f"which leaves no held-out image or fewer than {MIN_TRAINING_IMAGES} to train on; "
            "add images or give data.val_dir",
        )
    chosen = set(random.Random(seed).sample(trainable, count))
    return HeldOut(
        [r for i, r in enumerate(records) if i not in chosen], [r for i, r in enumerate(records) if i in chosen]
    )


class ValidationLoss:
    """Per held-out image, the mean denoising MSE over the fixed timesteps (the loop's plain loss).

    ``encode(captions) -> conditioning`` and ``predict(noisy, timesteps, conditioning) -> prediction``
    are the trainer's own (its text encoding with the trigger word, its UNet call under autocast),
    so the loss is that of the model as trained, LoRA and all.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        *,
        vae: torch.nn.Module,
        objective: Objective,
        resolution: int,
        device: torch.device,
        dtype: torch.dtype,
        caption: Callable[[str], str],
    ) -> None:
        self.records = list(records)
        self.objective = objective
        dataset = CaptionedImageDataset(self.records, resolution)  # centre crop, no augmentation
        latents = []
        self.geometry: list[ImageGeometry] = []
        with torch.no_grad():
            for index in range(len(self.records)):
                item = collate_captioned([dataset[index]])
                self.geometry += batch_geometry(item)  # the held-out crop's size/crop conditioning (SDXL)
                pixels = item["pixel_values"].to(device, dtype)
                latents.append(objective.latents(vae.encode(pixels).latent_dist))  # the mean: no sampling
        self.latents = torch.cat(latents).float()
        self.captions = [caption(r.caption) for r in self.records]
        self.timesteps = objective.held_out_timesteps(VAL_TIMESTEPS, device)
        generator = torch.Generator().manual_seed(VAL_SEED)
        shape = (len(self.timesteps), *self.latents.shape[1:])
        # one noise tensor per (image, timestep), drawn on the CPU so every device sees the same numbers
        self.noise = torch.stack([torch.randn(shape, generator=generator) for _ in self.records]).to(device)

    @torch.no_grad()
    def per_image(
        self,
        encode: Callable[[list[str]], Conditioning],
        predict: Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor],
        extras: Callable[[list[ImageGeometry]], Conditioning],
    ) -> list[float]:
        """``encode`` and ``predict`` are the trainer's; ``extras`` its family's per-image conditioning."""
        values = []
        steps = len(self.timesteps)
        for index, caption in enumerate(self.captions):
            latents = self.latents[index : index + 1].expand(steps, -1, -1, -1)
            noise = self.noise[index]
            draw = self.objective.at(latents, noise, self.timesteps)
            cond = {key: value.expand(steps, *value.shape[1:]) for key, value in encode([caption]).items()}
            cond.update(extras([self.geometry[index]] * steps))
            prediction = predict(draw.noisy, draw.timesteps, cond)
            values.append(float(self.objective.loss(prediction, draw).mean()))
        return values
