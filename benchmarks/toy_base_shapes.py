"""How often the toy base model draws the shape it is asked for, per shape, as the toy CLIP judges it.

For each shape the toy CLIP knows, ``--per-prompt`` samples of each of the six eval prompts' colour
combinations (``sweeper.config.eval_prompts.concept_prompts``), sampled as the default eval does (DDIM,
10 steps, guidance 7.5), classified zero-shot over ``a {shape}`` for every shape. For the trained
shapes this is the ceiling a LoRA's ``concept_acc`` can reach with this base and judge; for the
held-out ones it is the base model's own ``concept_acc`` (what the word alone draws).

    python benchmarks/toy_base_shapes.py [--base DIR] [--clip DIR] [--per-prompt 4] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    import torch
    from diffusers import StableDiffusionPipeline

    from evaluation.clip_score import ClipScorer
    from sweeper.config.eval_prompts import concept_prompts
    from toy_world.pretrain_base import generate
    from toy_world.pretrain_clip import resolve_device
    from toy_world.shipped import BASE_DIR, CLIP_DIR, MANIFEST, clip_shapes
    from toy_world.world import HELD_OUT_SHAPES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default=str(BASE_DIR))
    parser.add_argument("--clip", default=str(CLIP_DIR))
    parser.add_argument("--per-prompt", type=int, default=4, help="samples of each of the six prompts")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None, help="write the table as JSON here too")
    parser.add_argument("--manifest", default=str(MANIFEST), help="whose CLIP shapes to classify over")
    args = parser.parse_args()
    shapes = clip_shapes(Path(args.manifest))  # a label the CLIP never saw would be noise

    device = resolve_device(args.device)
    pipeline = StableDiffusionPipeline.from_pretrained(args.base).to(device)
    pipeline.set_progress_bar_config(disable=True)
    scorer = ClipScorer(args.clip, device=str(device))
    labels = scorer.embed_texts([f"a {shape}" for shape in shapes])
    table = {}
    for shape in shapes:
        prompts = [p for p in concept_prompts(shape) for _ in range(args.per_prompt)]
        with torch.no_grad():
            images = generate(pipeline, prompts, args.seed, 10, 7.5)
            picks = (scorer.embed_images(images) @ labels.T).argmax(1).tolist()
        named = [shapes[i] for i in picks]
        table[shape] = {
            "held_out": shape in HELD_OUT_SHAPES,
            "accuracy": round(sum(p == shape for p in named) / len(named), 4),
            "most_common_other": max((s for s in shapes if s != shape), key=named.count),
            "samples": len(named),
        }
        print(json.dumps({"shape": shape, **table[shape]}), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(table, indent=1) + "\n")


if __name__ == "__main__":
    main()
