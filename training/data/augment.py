"""Image augmentations: horizontal flip, hue jitter and cropping, as pure functions of PIL images.

The randomness comes from the ``rng`` argument: a ``random.Random``, a ``torch.Generator``, or
``None`` for torch's global generator. The dataset passes ``None`` on purpose: the training loop
seeds torch's global RNG and the DataLoader re-seeds it per worker process, whereas a generator
stored in the dataset would be copied into every worker and repeat the same draws in each.
"""

from __future__ import annotations

import random as _random

import numpy as np
import torch
from PIL import Image

Rng = _random.Random | torch.Generator | None

# kohya's color_aug shifts the hue by up to 8 of OpenCV's 180 hue units (about ±16 degrees).
DEFAULT_MAX_HUE_SHIFT = 8 / 180


def uniform(rng: Rng, low: float, high: float) -> float:
    """A float drawn uniformly from ``[low, high)`` with whichever kind of ``rng`` is given."""
    if isinstance(rng, _random.Random):
        return rng.uniform(low, high)
    return low + (high - low) * float(torch.rand((), generator=rng).item())


def randint(rng: Rng, high: int) -> int:
    """An integer drawn uniformly from ``[0, high]`` (inclusive)."""
    if isinstance(rng, _random.Random):
        return rng.randint(0, high)
    return int(torch.randint(0, high + 1, (1,), generator=rng).item())


def flip_horizontal(image: Image.Image) -> Image.Image:
    """The mirror image (left <-> right); kohya's ``flip_aug``. Vertical flips are not used:
    upside-down people and landscapes are not something the model should learn."""
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def _rgb_to_hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Float ``[..., 3]`` RGB in ``[0, 1]`` -> hue (turns, ``[0, 1)``), saturation, value."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    value = rgb.max(axis=-1)
    chroma = value - rgb.min(axis=-1)
    saturation = np.divide(chroma, value, out=np.zeros_like(value), where=value > 0)
    safe = np.where(chroma > 0, chroma, 1.0)
    hue = np.where(value == r, (g - b) / safe, np.where(value == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    hue = np.where(chroma > 0, hue / 6.0, 0.0) % 1.0
    return hue, saturation, value


def _hsv_to_rgb(hue: np.ndarray, saturation: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Inverse of ``_rgb_to_hsv`` (the textbook sextant formula, vectorised)."""
    sextant = np.floor(hue * 6.0)
    fraction = hue * 6.0 - sextant
    p = value * (1.0 - saturation)
    q = value * (1.0 - saturation * fraction)
    t = value * (1.0 - saturation * (1.0 - fraction))
    index = sextant.astype(np.int64) % 6
    r = np.choose(index, [value, q, p, p, t, value])
    g = np.choose(index, [t, value, value, q, p, p])
    b = np.choose(index, [p, p, t, value, value, q])
    return np.stack([r, g, b], axis=-1)


def shift_hue(image: Image.Image, shift: float) -> Image.Image:
    """``image`` with every hue rotated by ``shift`` turns of the colour wheel (0.5 = opposite).

    Done in floating-point HSV so value (the brightest channel) and saturation are kept: only the
    colour changes, not the lighting, and grey pixels (no hue) are untouched. PIL's own ``HSV``
    mode is not used: it stores hue in 256 steps, which would shift colours even for a zero shift.
    """
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    hue, saturation, value = _rgb_to_hsv(rgb)
    shifted = _hsv_to_rgb((hue + shift) % 1.0, saturation, value)
    return Image.fromarray(np.clip(np.rint(shifted * 255.0), 0, 255).astype(np.uint8), "RGB")


def color_jitter_hue(image: Image.Image, rng: Rng, max_shift: float = DEFAULT_MAX_HUE_SHIFT) -> Image.Image:
    """kohya's ``color_aug``: rotate the hue by a uniform amount in ``[-max_shift, max_shift]``
    turns of the colour wheel, so a LoRA does not tie its subject to one exact tint."""
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    return shift_hue(image, uniform(rng, -max_shift, max_shift))


def crop_origin(
    image_size: tuple[int, int], size: tuple[int, int], *, random: bool, rng: Rng = None, center: bool = True
) -> tuple[int, int]:
    """``(top, left)`` of a ``size = (width, height)`` window in an image of ``image_size = (w, h)``.

    Random: uniform over every position that stays inside (row drawn first, then column).
    Otherwise the middle, or the top-left corner when ``center`` is false.
    """
    slack_x, slack_y = image_size[0] - size[0], image_size[1] - size[1]
    if slack_x < 0 or slack_y < 0:
        raise ValueError(f"crop {size[0]}x{size[1]} does not fit in a {image_size[0]}x{image_size[1]} image")
    if random:
        return randint(rng, slack_y), randint(rng, slack_x)
    if center:
        return slack_y // 2, slack_x // 2
    return 0, 0


def crop(
    image: Image.Image, size: int | tuple[int, int], random: bool = False, generator: Rng = None
) -> tuple[Image.Image, tuple[int, int]]:
    """A ``size`` (``(width, height)``, or one side for a square) window of ``image``, centered or
    at a random position, and its ``(top, left)`` (SDXL's crop micro-conditioning needs it)."""
    width, height = (size, size) if isinstance(size, int) else size
    top, left = crop_origin(image.size, (width, height), random=random, rng=generator)
    return image.crop((left, top, left + width, top + height)), (top, left)
