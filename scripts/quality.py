"""Measure how well a shapes model follows its prompts.

    python scripts/quality.py [--checkpoint DIR] [--per-caption 1] [--steps 20] [--guidance 4]

1. The analyser (`fastdiff.data.analyse_shape_image`, deterministic) is checked on
   real synthetic images: its own accuracy per attribute.
2. One image per caption of the whole synthetic vocabulary (6 colours × 3 shapes ×
   2 sizes × 5 positions = 180 prompts; ``--per-caption`` more seeds each) is generated
   at the demo's settings, and the analyser reads colour and shape back.

Prints the fraction of generated images whose colour AND shape match the prompt
(target ≥ 90%), with per-attribute rates.
"""
from __future__ import annotations

import json
import time

import torch

from fastdiff.data import ShapesDataset, all_captions, analyse_shape_image, parse_caption
from measure_cli import add_sampling_options, measurement_parser, parse  # scripts/measure_cli.py, beside this file

ATTRS = ("colour", "shape", "size", "position")


def analyser_accuracy(n: int = 1000, seed: int = 1234) -> dict[str, float]:
    """Per-attribute accuracy of the analyser on ``n`` real synthetic images."""
    ds = ShapesDataset(resolution=32, length=n, seed=seed)
    hits = dict.fromkeys(ATTRS, 0)
    for i in range(n):
        item = ds[i]
        got = analyse_shape_image(item["image"])
        for a in ATTRS:
            hits[a] += got is not None and got[a] == item[a]
    return {a: hits[a] / n for a in ATTRS}


def prompt_match(images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
    """Fraction of images matching their prompt: per attribute and colour-and-shape together."""
    hits = dict.fromkeys((*ATTRS, "colour+shape"), 0)
    for x, p in zip(images, prompts):
        want, got = parse_caption(p), analyse_shape_image(x)
        if got is None:
            continue
        for a in ATTRS:
            hits[a] += got[a] == want[a]
        hits["colour+shape"] += got["colour"] == want["colour"] and got["shape"] == want["shape"]
    return {k: v / len(prompts) for k, v in hits.items()}


def main() -> None:
    from fastdiff.pipelines import DEFAULT_CHECKPOINT, Text2Image

    parser = measurement_parser(__doc__)
    add_sampling_options(parser, DEFAULT_CHECKPOINT)
    parser.add_argument("--per-caption", type=int, default=1, help="images per caption (seeds)")
    parser.add_argument("--seed", type=int, default=10_000)
    args = parse(parser)

    real = analyser_accuracy()
    print("analyser accuracy on 1000 real synthetic images: " + ", ".join(f"{a} {v:.1%}" for a, v in real.items()))
    pipe = Text2Image.from_pretrained(args.checkpoint)
    prompts = [c for c in all_captions() for _ in range(args.per_caption)]
    seeds = [args.seed + i for i in range(len(prompts))]
    t0 = time.perf_counter()
    x = pipe.generate_tensors(
        prompts, guidance_scale=args.guidance, sampler=args.sampler, steps=args.steps, seeds=seeds, batch_size=60
    )
    gen = prompt_match(x, prompts)
    print(f"generated {len(prompts)} images ({args.sampler}, {args.steps} steps, guidance {args.guidance}) "
          f"in {time.perf_counter() - t0:.0f} s")  # fmt: skip
    print("match rates: " + ", ".join(f"{a} {v:.1%}" for a, v in gen.items()))
    print(f"colour AND shape match: {gen['colour+shape']:.1%} (target >= 90%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"analyser_on_real": real, "generated": gen, "n": len(prompts), **vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
