"""Draw the bundled sample dataset: coloured shapes on plain backgrounds, with sentence captions.

    python scripts/make_sample_dataset.py [--out data/sample] [--seed 0] [--count 12]

The images are tiny (64x64) and drawn without anti-aliasing, so each caption is exactly true of
its image (the shape's pixels have the caption's colour), which is what lets tests and the tiny
model check that a LoRA learned the captions. Output is byte-identical for the same arguments:
the scene list comes from ``random.Random(seed)`` and PNGs carry no timestamps.
"""

from __future__ import annotations

import argparse
import itertools
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 64
FOLDER = "10_shapes"  # kohya layout: 10 repeats per epoch
SHAPES = ("circle", "square", "triangle")
SHAPE_COLOURS = ("red", "green", "blue", "yellow")
BACKGROUND_COLOURS = ("white", "black", "red", "green", "blue", "yellow")
PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
HALF_EXTENT = {"small": 10, "large": 20}  # pixels from the shape's centre to its bounding box
MARGIN = 2

README = """\
# Sample dataset

{count} synthetic 64x64 images of a coloured circle, square or triangle on a plain background, each with a
sentence caption in a same-name `.txt`; `{folder}/` is the kohya layout for 10 repeats per epoch.
Made, byte for byte, by
`python scripts/make_sample_dataset.py --out data/sample --seed {seed} --count {count}`.
"""


@dataclass(frozen=True)
class Scene:
    """One image: a ``size`` ``colour`` ``shape`` centred at ``center`` (x, y) on ``background``."""

    shape: str
    colour: str
    background: str
    size: str
    center: tuple[int, int]

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} on a {self.background} background"


def make_scenes(seed: int = 0, count: int = 12) -> list[Scene]:
    """``count`` scenes; every shape x colour pair appears before any repeats (12 pairs)."""
    rng = random.Random(seed)
    pairs = list(itertools.product(SHAPES, SHAPE_COLOURS))
    rng.shuffle(pairs)
    scenes = []
    for shape, colour in itertools.islice(itertools.cycle(pairs), count):
        background = rng.choice([c for c in BACKGROUND_COLOURS if c != colour])
        size = rng.choice(sorted(HALF_EXTENT))
        low, high = HALF_EXTENT[size] + MARGIN, SIZE - 1 - HALF_EXTENT[size] - MARGIN
        center = (rng.randint(low, high), rng.randint(low, high))
        scenes.append(Scene(shape, colour, background, size, center))
    return scenes


def draw_scene(scene: Scene) -> Image.Image:
    """Render ``scene`` as an RGB image (PIL's draw is not anti-aliased: two colours only)."""
    image = Image.new("RGB", (SIZE, SIZE), PALETTE[scene.background])
    draw = ImageDraw.Draw(image)
    (x, y), h, fill = scene.center, HALF_EXTENT[scene.size], PALETTE[scene.colour]
    box = (x - h, y - h, x + h, y + h)
    if scene.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif scene.shape == "square":
        draw.rectangle(box, fill=fill)
    else:  # triangle pointing up
        draw.polygon([(x, y - h), (x - h, y + h), (x + h, y + h)], fill=fill)
    return image


def write_sample_dataset(out: Path, seed: int = 0, count: int = 12) -> list[Path]:
    """Write the images, captions and README under ``out``; returns the image paths.

    Earlier ``shape_*`` files in the folder are removed first, so a smaller ``count`` leaves no
    stale images behind.
    """
    folder = out / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("shape_*"):
        stale.unlink()
    paths = []
    for i, scene in enumerate(make_scenes(seed, count)):
        path = folder / f"shape_{i:03d}.png"
        draw_scene(scene).save(path, format="PNG", optimize=True)  # Pillow writes no tIME chunk
        path.with_suffix(".txt").write_text(scene.caption + "\n", encoding="utf-8")
        paths.append(path)
    (out / "README.md").write_text(README.format(count=count, folder=FOLDER, seed=seed), encoding="utf-8")
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "data" / "sample",
        help="output folder (default: data/sample in the repository)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=12, help="number of images")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be at least 1")
    paths = write_sample_dataset(args.out, args.seed, args.count)
    print(f"wrote {len(paths)} images to {args.out / FOLDER}")


if __name__ == "__main__":
    main()
