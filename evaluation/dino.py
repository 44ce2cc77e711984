"""Image embeddings from a self-supervised DINO ViT, for DreamBooth's DINO subject-fidelity score.

DreamBooth (Ruiz et al. 2023, arXiv:2208.12242, sec. 4.1) scores fidelity with the cosine of ViT-S/16
DINO (Caron et al. 2021, arXiv:2104.14294) class-token embeddings, because a self-supervised model,
unlike CLIP, tells apart two instances of one class. ``eval.dino_model`` is any folder or hub id of a
transformers ``Dinov2Model`` or ``ViTModel`` (e.g. ``facebook/dino-vits16``) with its image processor.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel

from training.families.checked_loading import load_checked


class DinoEmbedder:
    """The class token of the last layer, one row per image (not normalised)."""

    def __init__(self, model: str, device: str | torch.device = "cpu", batch_size: int = 32) -> None:
        self.source = model
        self.device = torch.device(device)
        self.batch_size = batch_size
        local = Path(model).expanduser()
        location = str(local) if local.exists() else model
        try:
            self.model = load_checked(AutoModel, location).to(self.device).eval()
            self.processor = AutoImageProcessor.from_pretrained(location)
        except (OSError, ValueError, KeyError) as error:
            raise ValueError(
                f"eval.dino_model={model!r} could not be loaded as a DINO ViT ({error}); give a local folder of a "
                "transformers Dinov2Model/ViTModel with its image processor, or a hub id such as "
                "facebook/dinov2-small that is in the Hugging Face cache"
            ) from error

    @torch.no_grad()
    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        rows = []
        for start in range(0, len(images), self.batch_size):
            batch = [image.convert("RGB") for image in images[start : start + self.batch_size]]
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"]
            output = self.model(pixel_values=pixels.to(self.device, self.model.dtype))
            rows.append(output.last_hidden_state[:, 0].float().cpu())
        return torch.cat(rows) if rows else torch.empty(0)
