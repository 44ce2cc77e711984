"""Draw a bundled sample dataset: one of the toy world's held-out concepts (default: the star).

    python scripts/make_sample_dataset.py [--shape star] [--out data/sample] [--seed 0] [--count 16]

The toy base model was trained on every shape of the world but the held-out ones (star, moon,
arrow), so these images teach it something it does not know, and the toy CLIP (which knows every
shape) can tell whether it learned. Scenes come from ``toy_world.world`` with the one shape;
each image has its sentence caption in a same-name ``.txt``. ``--out`` defaults to the folder
``sweeper.config.eval_prompts.BUNDLED_SAMPLES`` names for the shape (``data/sample`` for the star, the
default run's; ``data/sample_moon``, ``data/sample_arrow``).
Output is byte-identical for the same arguments: the world is seeded and PNGs carry no timestamps.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sweeper.config.eval_prompts import BUNDLED_SAMPLES
from toy_world.world import HELD_OUT_SHAPE, HELD_OUT_SHAPES, render, scenes, sentence_caption

REPEATS = 10  # kohya layout: <repeats>_<name>/, 10 repeats per epoch
DEFAULT_COUNT = 16

README = """\
# Sample dataset

{count} images of one of the toy world's held-out concepts, the {shape} (64x64, from `toy_world.world`):
a {shape} of some colour and size on a plain or patterned background, each with a sentence caption
in a same-name `.txt`; `{folder}/` is the kohya layout for 10 repeats per epoch. The toy base model
never saw a {shape}; `python -m sweeper data={preset}` teaches it one. Made, byte for byte, by
`python scripts/make_sample_dataset.py --shape {shape} --seed {seed} --count {count}`.
"""


def write_sample_dataset(
    out: Path, seed: int = 0, count: int = DEFAULT_COUNT, shape: str = HELD_OUT_SHAPE
) -> list[Path]:
    """Write the images of ``shape``, their captions and a README under ``out``; returns the image paths.

    Earlier files in the folder are removed first, so a smaller ``count`` leaves nothing stale.
    """
    folder = out / f"{REPEATS}_{shape}"
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(f"{shape}_*"):
        stale.unlink()
    paths = []
    for i, scene in enumerate(scenes(seed, count, shapes=[shape])):
        path = folder / f"{shape}_{i:03d}.png"
        render(scene).save(path, format="PNG", optimize=True)  # Pillow writes no tIME chunk
        path.with_suffix(".txt").write_text(sentence_caption(scene) + "\n", encoding="utf-8")
        paths.append(path)
    text = README.format(count=count, folder=folder.name, seed=seed, shape=shape, preset=f"toy_{shape}")
    (out / "README.md").write_text(text, encoding="utf-8")
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default=HELD_OUT_SHAPE, choices=HELD_OUT_SHAPES, help="the held-out concept")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the shape's bundled folder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT, help="number of images")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be at least 1")
    out = args.out if args.out is not None else BUNDLED_SAMPLES[args.shape]
    paths = write_sample_dataset(out, args.seed, args.count, args.shape)
    print(f"wrote {len(paths)} images to {paths[0].parent}")


if __name__ == "__main__":
    main()
