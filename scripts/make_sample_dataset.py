"""Draw the bundled sample dataset: the toy world's held-out concept (the star), for the default LoRA.

    python scripts/make_sample_dataset.py [--out data/sample] [--seed 0] [--count 16]

The toy base model was trained on every shape of the world but the star, so these images teach it
something it does not know, and the toy CLIP (which does know stars) can tell whether it learned.
Scenes come from ``training.toy.world`` with the star as the only shape; each image has its
sentence caption in a same-name ``.txt`` (the trigger word is added by ``data.trigger_word``).
Output is byte-identical for the same arguments: the world is seeded and PNGs carry no timestamps.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from training.toy.world import HELD_OUT_SHAPE, render, scenes, sentence_caption

FOLDER = f"10_{HELD_OUT_SHAPE}"  # kohya layout: 10 repeats per epoch
DEFAULT_COUNT = 16

README = """\
# Sample dataset

{count} images of the toy world's held-out concept, the {shape} (64x64, from `training.toy.world`):
a {shape} of some colour and size on a plain or patterned background, each with a sentence caption
in a same-name `.txt`; `{folder}/` is the kohya layout for 10 repeats per epoch. The toy base model
never saw a {shape}; the default run teaches it one. Made, byte for byte, by
`python scripts/make_sample_dataset.py --out data/sample --seed {seed} --count {count}`.
"""


def write_sample_dataset(out: Path, seed: int = 0, count: int = DEFAULT_COUNT) -> list[Path]:
    """Write the images, captions and README under ``out``; returns the image paths.

    Earlier files in the folder are removed first, so a smaller ``count`` leaves nothing stale.
    """
    folder = out / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(f"{HELD_OUT_SHAPE}_*"):
        stale.unlink()
    paths = []
    for i, scene in enumerate(scenes(seed, count, shapes=[HELD_OUT_SHAPE])):
        path = folder / f"{HELD_OUT_SHAPE}_{i:03d}.png"
        render(scene).save(path, format="PNG", optimize=True)  # Pillow writes no tIME chunk
        path.with_suffix(".txt").write_text(sentence_caption(scene) + "\n", encoding="utf-8")
        paths.append(path)
    text = README.format(count=count, folder=FOLDER, seed=seed, shape=HELD_OUT_SHAPE)
    (out / "README.md").write_text(text, encoding="utf-8")
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
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT, help="number of images")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be at least 1")
    paths = write_sample_dataset(args.out, args.seed, args.count)
    print(f"wrote {len(paths)} images to {args.out / FOLDER}")


if __name__ == "__main__":
    main()
