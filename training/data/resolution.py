"""A training resolution far above the model's native one, or the images' own sizes, is warned about.

Neither is an error (a model fine-tuned at 768 px trains well at 768), but an imported 512 px
setting on the 64 px toy model ran 0 of 400 steps in 142 s at 3.6 GB without a word: cost grows
with the square of the side, the model has never denoised at that size, and upscaled images add
no detail. The warnings carry the numbers so the cause is plain.
"""

from __future__ import annotations

from collections.abc import Sequence

FAR_ABOVE = 2.0  # warn above twice the native side, or twice the largest image's shorter side


def resolution_warnings(resolution: int, native: int, image_sizes: Sequence[tuple[int, int]]) -> list[str]:
    """Warnings (``[]`` when none) for ``resolution`` against the model's ``native`` side and the
    training images' ``(width, height)``."""
    warnings = []
    if resolution > FAR_ABOVE * native:
        factor = resolution / native
        warnings.append(
            f"warning: training resolution {resolution} px (bucket.resolution) is {factor:g}x the base model's "
            f"native {native} px: each step works on {factor**2:g}x the pixels (time and memory grow with them) "
            f"at a size the model never learned to denoise; set bucket.resolution=null (= {native}) unless "
            "this model was fine-tuned larger"
        )
    if image_sizes:
        short_sides = sorted(min(size) for size in image_sizes)
        largest = short_sides[-1]
        if resolution > FAR_ABOVE * largest:
            spread = f"run {short_sides[0]}-{largest} px" if short_sides[0] < largest else f"are all {largest} px"
            warnings.append(
                f"warning: training resolution {resolution} px is {resolution / largest:.1f}x the largest "
                f"training image's shorter side ({largest} px; the {len(short_sides)} images' shorter sides "
                f"{spread}): every image is upscaled at least that much, which adds no detail; use larger "
                "images or a lower bucket.resolution"
            )
    return warnings
