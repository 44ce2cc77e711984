"""Per-image metrics of generated samples, from embeddings: alignment, fidelity, concept, copying, diversity.

Each function returns one value per sample image, so every metric is aggregated the same way (a mean
with a bootstrap interval, ``evaluation.stats``) and compared image by image against the base model
(same prompt, same seed).

- ``clip_t`` - text alignment: CLIPScore (Hessel et al. 2021, arXiv:2104.08718), 100 x cosine of the
  image and its prompt, clamped at 0 (``evaluation.clip_score``).
- ``clip_i`` / ``dino_i`` - subject fidelity as in DreamBooth (Ruiz et al. 2023, arXiv:2208.12242,
  sec. 4.1): the mean cosine between a sample's image embedding and each training image's, with
  CLIP's image tower or a self-supervised DINO ViT (Caron et al. 2021), which DreamBooth prefers
  because it separates instances of one class rather than classes.
- ``concept_acc`` - zero-shot CLIP classification (Radford et al. 2021, arXiv:2103.00020) over
  ``eval.concept.labels``: 1 when the best label of the sample is ``eval.concept.target``.
- ``copy_risk`` - the highest cosine between a sample and any single training image: a sample close
  to 1 reproduces a training image rather than the concept (memorisation, Somepalli et al. 2023,
  arXiv:2212.03860, use the same nearest-training-image similarity).
- ``diversity`` - the mean cosine distance (1 - cosine) of a sample's CLIP embedding to the other
  samples of the same prompt (other seeds): low = the LoRA collapsed to one picture.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def cosine_matrix(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``[len(left), len(right)]`` cosines of every row pair."""
    return F.normalize(left.float(), dim=-1) @ F.normalize(right.float(), dim=-1).T


def fidelity(sample_embeds: torch.Tensor, reference_embeds: torch.Tensor) -> torch.Tensor:
    """DreamBooth's CLIP-I / DINO: per sample, the mean cosine with every reference (training) image."""
    return cosine_matrix(sample_embeds, reference_embeds).mean(dim=1)


def copy_risk(sample_embeds: torch.Tensor, reference_embeds: torch.Tensor) -> torch.Tensor:
    """Per sample, the cosine with its nearest reference (training) image."""
    return cosine_matrix(sample_embeds, reference_embeds).max(dim=1).values


def concept_hits(sample_embeds: torch.Tensor, label_embeds: torch.Tensor, target: int) -> torch.Tensor:
    """Per sample, 1.0 when label ``target`` is the most similar of ``label_embeds``, else 0.0."""
    return (cosine_matrix(sample_embeds, label_embeds).argmax(dim=1) == target).float()


def diversity(sample_embeds: torch.Tensor, groups: Sequence[object]) -> torch.Tensor:
    """Per sample, the mean cosine distance to the other samples of its group (its prompt).

    NaN for a sample alone in its group (one image per prompt and one seed: nothing to compare).
    """
    similarity = cosine_matrix(sample_embeds, sample_embeds)
    values = torch.full((len(groups),), float("nan"))
    for i, group in enumerate(groups):
        others = [j for j, g in enumerate(groups) if g == group and j != i]
        if others:
            values[i] = (1 - similarity[i, others]).mean()
    return values
