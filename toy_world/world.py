"""A procedural world of 64x64 images: one coloured shape on a (possibly patterned) background.

Every image is a pure function of its ``Scene``, and every scene of a seed, so data sets, captions
and evaluation prompts are reproducible without storing a single file. Captions use only words the
word tokenizer keeps whole, so a tiny text encoder sees one token per concept.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

if TYPE_CHECKING:  # the world's shapes and words are read at startup (sweeper/config/eval_concept.py): no transformers
    from transformers import CLIPTokenizer

SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "diamond", "cross", "hexagon", "ring",
    "semicircle", "rectangle", "moon", "arrow",
)  # fmt: skip
# The concepts the base model never sees; a LoRA teaches each (one bundled dataset per shape). Each
# shares parts with shapes the base model knows: the star's points (triangle, diamond), the moon's
# arc (circle, ring, semicircle), the arrow's head and shaft (triangle, rectangle).
HELD_OUT_SHAPES: tuple[str, ...] = ("star", "moon", "arrow")
HELD_OUT_SHAPE = "star"  # the default run's concept (data/sample)
# Saturated, far-apart colours: neighbours (red/orange/yellow, blue/purple) must stay apart after blending.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 225),
    "yellow": (245, 220, 30),
    "orange": (250, 135, 15),
    "purple": (140, 40, 185),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SIZES = ("small", "medium", "large")
PATTERNS = ("plain", "striped", "dotted", "checkered")
FILLED_SHAPES = tuple(s for s in SHAPES if s not in ("ring", "moon"))  # the centre pixel has the shape's colour

# Circumradius as a fraction of the image side: small is 18 px across at 64 px, large 40 px.
SIZE_RADIUS = {"small": 9 / 64, "medium": 14 / 64, "large": 20 / 64}
MARGIN = 2 / 64  # the shape's bounding circle stays this far inside the image
MAX_ROTATION = 20.0  # degrees either way: more would turn a square into a diamond
SUPERSAMPLE = 4  # draw at 4x and box-filter down: anti-aliased edges with plain PIL drawing
PATTERN_PERIOD = 8 / 64  # stripes, dot grid and checks repeat every 8 px at 64 px
PATTERN_SHADE = 0.3  # the pattern is the background mixed 30 % towards black (or white if dark)

WORLD_WORDS: tuple[str, ...] = (
    *SHAPES,
    *COLOURS,
    *SIZES,
    *PATTERNS,
    *"a an on with of background shape object picture".split(),
)


@dataclass(frozen=True)
class Scene:
    """Everything that decides one image; ``x``/``y`` is the shape's centre as a fraction of the side."""

    shape: str
    colour: str
    size: str
    x: float
    y: float
    background: str
    pattern: str
    rotation: float


def random_scene(rng: random.Random, shapes: Sequence[str] = SHAPES) -> Scene:
    """One scene drawn from ``rng``, with the shape fully inside the image and a contrasting background."""
    shape = rng.choice(list(shapes))
    colour = rng.choice(list(COLOURS))
    background = rng.choice([c for c in COLOURS if c != colour])
    size = rng.choice(SIZES)
    pattern = rng.choice(PATTERNS)
    low = SIZE_RADIUS[size] + MARGIN
    x, y = rng.uniform(low, 1 - low), rng.uniform(low, 1 - low)
    rotation = rng.uniform(-MAX_ROTATION, MAX_ROTATION)
    return Scene(shape, colour, size, x, y, background, pattern, rotation)


def scenes(seed: int, count: int, shapes: Sequence[str] = SHAPES) -> list[Scene]:
    """``count`` scenes from their own ``random.Random(seed)``: the same seed gives the same list."""
    if not shapes:
        raise ValueError("scenes needs at least one shape")
    unknown = sorted(set(shapes) - set(SHAPES))
    if unknown:
        raise ValueError(f"unknown shapes {unknown}; known: {list(SHAPES)}")
    rng = random.Random(seed)
    return [random_scene(rng, shapes) for _ in range(count)]


def pattern_colour(background: str) -> tuple[int, int, int]:
    """The pattern's shade of ``background``: darker, or lighter where the background is already dark."""
    rgb = COLOURS[background]
    target = 255 if sum(rgb) < 3 * 80 else 0
    red, green, blue = (round(v + PATTERN_SHADE * (target - v)) for v in rgb)
    return red, green, blue


@lru_cache(maxsize=32)
def _pattern_mask(pattern: str, side: int) -> np.ndarray:
    """Boolean (side, side) mask of the pattern's pixels at drawing resolution (cached: pure of its args)."""
    period = PATTERN_PERIOD * side
    rows, cols = np.mgrid[0:side, 0:side].astype(np.float64) + 0.5
    if pattern == "plain":
        return np.zeros((side, side), dtype=bool)
    if pattern == "striped":  # diagonal, so stripes never look like the edges of a square or a check
        return ((rows + cols) % period) < period / 2
    if pattern == "dotted":
        dy, dx = (rows % period) - period / 2, (cols % period) - period / 2
        return dy**2 + dx**2 <= (0.22 * period) ** 2
    if pattern == "checkered":
        return ((rows // period + cols // period) % 2) == 1
    raise ValueError(f"unknown pattern {pattern!r}; known: {list(PATTERNS)}")


def _polygon(shape: str) -> list[tuple[float, float]] | None:
    """Unit-circumradius outline of ``shape`` (y down, pointing up), or None for round shapes."""

    def ring_of(count: int, radius: float, start: float = -90.0) -> list[tuple[float, float]]:
        angles = [math.radians(start + 360.0 * i / count) for i in range(count)]
        return [(radius * math.cos(a), radius * math.sin(a)) for a in angles]

    if shape == "square":
        h = math.sqrt(0.5)
        return [(-h, -h), (h, -h), (h, h), (-h, h)]
    if shape == "triangle":
        return ring_of(3, 1.0)
    if shape == "star":
        outer, inner = ring_of(5, 1.0), ring_of(5, 0.45, start=-90.0 + 36.0)
        return [p for pair in zip(outer, inner, strict=True) for p in pair]
    if shape == "diamond":  # elongated, so it is never a rotated square
        return [(0.0, -1.0), (0.6, 0.0), (0.0, 1.0), (-0.6, 0.0)]
    if shape == "cross":
        arm, half = 0.95, 0.3
        return [
            (-half, -arm), (half, -arm), (half, -half), (arm, -half), (arm, half), (half, half),
            (half, arm), (-half, arm), (-half, half), (-arm, half), (-arm, -half), (-half, -half),
        ]  # fmt: skip
    if shape == "hexagon":
        return ring_of(6, 1.0)
    if shape == "semicircle":  # flat side down; shifted so its bounding box is centred
        arc = [math.radians(180.0 + 180.0 * i / 24) for i in range(25)]
        return [(0.92 * math.cos(a), 0.37 + 0.92 * math.sin(a)) for a in arc]
    if shape == "rectangle":  # 2:1, so it is never a square
        return [(-0.89, -0.445), (0.89, -0.445), (0.89, 0.445), (-0.89, 0.445)]
    if shape == "arrow":  # pointing up: a triangle's head on a rectangle's shaft
        return [(0.0, -1.0), (0.6, -0.2), (0.22, -0.2), (0.22, 0.95), (-0.22, 0.95), (-0.22, -0.2), (-0.6, -0.2)]
    if shape in ("circle", "ring", "moon"):
        return None
    raise ValueError(f"unknown shape {shape!r}; known: {list(SHAPES)}")


def render(scene: Scene, size: int = 64) -> Image.Image:
    """The scene as an RGB image of ``size`` x ``size``, drawn at 4x and box-filtered down (anti-aliased)."""
    side = size * SUPERSAMPLE
    backdrop = np.empty((side, side, 3), dtype=np.uint8)
    backdrop[:] = COLOURS[scene.background]
    backdrop[_pattern_mask(scene.pattern, side)] = pattern_colour(scene.background)
    image = Image.fromarray(backdrop.copy())  # the ring hole pastes the untouched backdrop back
    draw = ImageDraw.Draw(image)

    cx, cy, radius = scene.x * side, scene.y * side, SIZE_RADIUS[scene.size] * side
    fill = COLOURS[scene.colour]
    outline = _polygon(scene.shape)
    if outline is None:
        outer = 0.9 * radius
        draw.ellipse([cx - outer, cy - outer, cx + outer, cy + outer], fill=fill)
        if scene.shape in ("ring", "moon"):  # the hole (or the moon's bite) shows the background, pattern included
            if scene.shape == "ring":
                inner, hx, hy = 0.5 * radius, cx, cy
            else:  # a disc bitten by an offset one: a crescent opening towards the rotation's direction
                turn = math.radians(scene.rotation)
                inner, hx, hy = 0.72 * radius, cx + 0.42 * radius * math.cos(turn), cy + 0.42 * radius * math.sin(turn)
            hole = Image.new("L", (side, side), 0)
            ImageDraw.Draw(hole).ellipse([hx - inner, hy - inner, hx + inner, hy + inner], fill=255)
            image.paste(Image.fromarray(backdrop), (0, 0), hole)
    else:
        turn = math.radians(scene.rotation)
        cos, sin = math.cos(turn), math.sin(turn)
        points = [(cx + radius * (px * cos - py * sin), cy + radius * (px * sin + py * cos)) for px, py in outline]
        draw.polygon(points, fill=fill)
    return image.resize((size, size), Image.Resampling.BOX)


def sentence_caption(scene: Scene) -> str:
    """``"a small red circle on a blue background"``; a pattern goes before ``background`` unless plain.

    The size always follows the first article, so only the background needs ``a``/``an``.
    """
    pattern = "" if scene.pattern == "plain" else f" {scene.pattern}"
    background = f"{article(scene.background)} {scene.background}{pattern} background"
    return f"a {scene.size} {scene.colour} {scene.shape} on {background}"


def article(word: str) -> str:
    """``"an"`` before a vowel (``an orange background``), else ``"a"``."""
    return "an" if word[:1] in "aeiou" else "a"


def tag_caption(scene: Scene) -> str:
    """``"red circle, blue background, striped, small"``: booru-style tags, plain pattern left out."""
    tags = [f"{scene.colour} {scene.shape}", f"{scene.background} background"]
    if scene.pattern != "plain":
        tags.append(scene.pattern)
    tags.append(scene.size)
    return ", ".join(tags)


def world_tokenizer() -> CLIPTokenizer:
    """The word tokenizer over the base and world words: every world word is a single token."""
    from training.text.tokenizer import BASE_WORDS, build_word_tokenizer

    return build_word_tokenizer(BASE_WORDS + list(WORLD_WORDS))
