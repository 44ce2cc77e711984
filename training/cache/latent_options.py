"""Where latents may be cached and which data options a cache cannot serve, checked without loading torch."""

from __future__ import annotations

from typing import Any

LATENT_CACHE_MODES = ("none", "memory", "disk")


def incompatible_with_cache(data_cfg: Any) -> list[str]:
    """Problems with caching latents under this ``data`` config, each naming both keys at fault.

    A cached latent is one fixed crop of one image; ``color_aug`` and ``random_crop`` make a new
    one each time, so caching would silently turn them off. ``flip_aug`` is fine: both
    orientations are cached.
    """
    mode = data_cfg.cache_latents
    if mode in (None, "none"):
        return []
    problems = []
    for key, enabled, why in (
        ("data.color_aug", data_cfg.color_aug, "a hue jitter that changes every time"),
        ("data.random_crop", data_cfg.random_crop, "a crop that moves every time"),
    ):
        if enabled:
            problems.append(
                f"data.cache_latents={mode} cannot be combined with {key}=true: a cached latent is encoded "
                f"once, which would freeze {why}; set {key}=false or data.cache_latents=none"
            )
    return problems
