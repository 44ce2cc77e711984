"""CLIP score of generated images against their prompts: the number a sweep trial reports.

CLIPScore (Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for Image
Captioning", arXiv:2104.08718) as torchmetrics' ``CLIPScore`` computes it: ``max(100 * cos(E_I, E_C), 0)``
per image/caption pair, with no rescaling weight, averaged by the caller.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

from evaluation.tiny_clip import ensure_tiny_clip
from toy_world.shipped import shipped_folder
from training.families.checked_loading import load_checked

TINY = "tiny"
TOY = "toy"
_FIX = (
    "Set eval.clip_model to 'toy' (the toy world's trained CLIP, shipped with the project), 'tiny' (a "
    "small random CLIP built offline, for smoke tests), to a local "
    "folder written by CLIPModel.save_pretrained (with its CLIPProcessor), or to a hub id such as "
    "'openai/clip-vit-large-patch14' that is already in the Hugging Face cache or can be downloaded "
    "(not with HF_HUB_OFFLINE=1)."
)


def clip_score_from_embeddings(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Per-pair CLIP score of row ``i`` of ``image_embeds`` with row ``i`` of ``text_embeds``.

    Hessel et al. 2021 (arXiv:2104.08718), eq. 1 with w = 100 as in torchmetrics'
    ``CLIPScore``: L2-normalise both embeddings, ``100 * cosine``, clamp negatives to 0
    (an anti-correlated pair scores no worse than an unrelated one).
    """
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(f"embedding shapes differ: {tuple(image_embeds.shape)} vs {tuple(text_embeds.shape)}")
    image_embeds = F.normalize(image_embeds.float(), p=2, dim=-1)
    text_embeds = F.normalize(text_embeds.float(), p=2, dim=-1)
    score = 100 * (image_embeds * text_embeds).sum(dim=-1)
    return score.clamp(min=0)


def _embeddings(output: torch.Tensor | object) -> torch.Tensor:
    """The projected embeddings from ``get_{image,text}_features``.

    transformers 4 returns the projected tensor; transformers 5 returns a
    ``BaseModelOutputWithPooling`` whose ``pooler_output`` holds the projection.
    """
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if not isinstance(pooled, torch.Tensor):
        raise TypeError(f"unexpected CLIP feature output {type(output).__name__}: no pooler_output tensor")
    return pooled


class ClipScorer:
    """A CLIP model and its processor, loaded once per run and used to score every evaluation."""

    def __init__(
        self,
        model: str,
        device: str | torch.device = "cpu",
        cache_root: Path | None = None,
        batch_size: int = 32,
    ) -> None:
        self.source = model
        self.device = torch.device(device)
        self.batch_size = batch_size
        path = clip_location(model, cache_root)
        self.model, self.processor = _load(path, model)
        self.model.to(self.device).eval()
        tokenizer_max = self.processor.tokenizer.model_max_length or 0
        positions = self.model.config.text_config.max_position_embeddings
        # Longer prompts are truncated, as CLIP's position table ends at max_position_embeddings.
        self.max_length = min(tokenizer_max, positions) if tokenizer_max > 0 else positions

    @torch.no_grad()
    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        """Projected (not normalised) image embeddings, one row per image, ``batch_size`` at a time."""
        return self._batched(images, self._embed_images)

    @torch.no_grad()
    def embed_texts(self, prompts: list[str]) -> torch.Tensor:
        """Projected (not normalised) text embeddings, one row per prompt, truncated to max_length."""
        return self._batched(prompts, self._embed_texts)

    def _embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        pixels = pixels.to(self.device, dtype=self.model.dtype)
        return _embeddings(self.model.get_image_features(pixel_values=pixels))

    def _embed_texts(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.processor.tokenizer(
            prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        return _embeddings(
            self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        )

    def _batched(self, items: list, embed: Any) -> torch.Tensor:
        """``embed`` over ``items`` in chunks of ``batch_size`` (a dataset's images need not fit at once)."""
        self.model.eval()
        chunks = [embed(items[i : i + self.batch_size]) for i in range(0, len(items), self.batch_size)]
        return torch.cat(chunks) if chunks else torch.empty(0)

    @torch.no_grad()
    def score(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        """CLIP score of ``images[i]`` against ``prompts[i]``, as a float tensor on the CPU."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts: they are scored in pairs")
        return clip_score_from_embeddings(self.embed_images(images), self.embed_texts(prompts)).cpu()


def clip_location(model: str, cache_root: Path | None = None) -> str | Path:
    """The folder or hub id behind ``eval.clip_model`` (the names toy and tiny are built in)."""
    if model == TOY:
        return shipped_folder("clip")
    if model == TINY:
        return ensure_tiny_clip(cache_root)
    return model


def _load(path: str | Path, name: str) -> tuple[CLIPModel, CLIPProcessor]:
    """Load a CLIP model and processor, turning loader errors into one that names the config key."""
    text = str(path)
    looks_local = text.startswith(("/", ".", "~")) or Path(text).expanduser().exists()
    local = Path(text).expanduser()
    if looks_local and not local.exists():
        raise FileNotFoundError(f"eval.clip_model={name!r}: no such folder {str(local)!r}. {_FIX}")
    source = str(local) if looks_local else text
    try:
        model = load_checked(CLIPModel, source)
        processor = CLIPProcessor.from_pretrained(source)
    except (OSError, ValueError, KeyError) as err:
        error = ValueError if looks_local else FileNotFoundError
        raise error(f"eval.clip_model={name!r} could not be loaded as a CLIP model ({err}). {_FIX}") from err
    return model, processor
