"""Measure style transfer on the synthetic shapes: layout from the content, colour from the style.

    python scripts/style_quality.py [--checkpoint DIR] [--n 150] [--strength 0.4] [--steps 20] [--guidance 4]

Each case is a content image (shape A, size Z, position P, colour X) and a style of
colour Y ≠ X: a style *image* (a shape of colour Y of another kind, at another
position, of random size) or a style *prompt* (the colour word Y alone).  The result
of `Stylizer.stylize_tensors` is read back by the analyser
(`fastdiff.data.analyse_shape_image`); a case succeeds when it reads shape A,
position P and colour Y.  Also printed: each attribute's rate and the rate at which the
content's colour X survived (a failed transfer).  Rows: the style model with the style
image, the style model with the prompt, and the shipped text model (``tiny-shapes``)
with the prompt (SDEdit alone).

The analyser reads the content images themselves perfectly; it is strict on squares
(fill ≥ 0.9 of the bounding box), so a model that rounds a corner by a pixel loses the
shape: the shape rate is a lower bound on what a person would see.
"""
from __future__ import annotations

import json
import random
import time

import torch

from fastdiff.data import COLOURS, POSITIONS, SHAPES, SIZES, analyse_shape_image, render_shape, to_tensor
from measure_cli import add_sampling_options, measurement_parser, parse  # scripts/measure_cli.py, beside this file


def make_cases(n: int, seed: int = 0, resolution: int = 32) -> list[dict]:
    """``n`` (content, style) cases, a pure function of ``seed``."""
    rng = random.Random(seed)
    cases = []
    for _ in range(n):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        size, position = rng.choice(list(SIZES)), rng.choice(list(POSITIONS))
        style_colour = rng.choice([c for c in COLOURS if c != colour])
        style_shape = rng.choice([s for s in SHAPES if s != shape])
        style_position = rng.choice([p for p in POSITIONS if p != position])
        cases.append({
            "content": to_tensor(render_shape(colour, shape, size, position, resolution)),
            "style": to_tensor(
                render_shape(style_colour, style_shape, rng.choice(list(SIZES)), style_position, resolution)
            ),
            "colour": colour, "shape": shape, "position": position, "style_colour": style_colour,
        })  # fmt: skip
    return cases


def transfer_rates(images: torch.Tensor, cases: list[dict]) -> dict[str, float]:
    """Fractions of results with the content's shape / position, the style's colour, all three, or the old colour."""
    keys = ("shape", "position", "style colour", "all", "content colour")
    hits = dict.fromkeys(keys, 0)
    for x, case in zip(images, cases):
        got = analyse_shape_image(x)
        if got is None:
            continue
        ok = (got["shape"] == case["shape"], got["position"] == case["position"], got["colour"] == case["style_colour"])
        for k, v in zip(keys, (*ok, all(ok), got["colour"] == case["colour"])):
            hits[k] += v
    return {k: v / len(cases) for k, v in hits.items()}


def run_cases(pipe, cases: list[dict], mode: str, *, seed: int = 10_000, batch_size: int = 50, **kwargs):
    """Restyle every case by its style image (``mode="image"``) or its colour word ("prompt")."""
    content = torch.stack([c["content"] for c in cases])
    seeds = [seed + i for i in range(len(cases))]
    if mode == "image":
        style = {"style_image": torch.stack([c["style"] for c in cases])}
    elif mode == "prompt":
        style = {"style_prompt": [c["style_colour"] for c in cases]}
    else:
        raise ValueError(f"mode must be 'image' or 'prompt', got {mode!r}")
    return pipe.stylize_tensors(content, seeds=seeds, batch_size=batch_size, progress=False, **{**kwargs, **style})


def main() -> None:
    from fastdiff.apps.stylize import STYLE_CHECKPOINT, Stylizer
    from fastdiff.pipelines import DEFAULT_CHECKPOINT

    parser = measurement_parser(__doc__)
    add_sampling_options(parser, STYLE_CHECKPOINT, help="the style model")
    parser.add_argument("--text-checkpoint", default=str(DEFAULT_CHECKPOINT), help="a text model, for SDEdit alone")
    parser.add_argument("--n", type=int, default=150, help="cases per style mode")
    parser.add_argument("--strength", type=float, default=0.4)
    parser.add_argument("--seed", type=int, default=0, help="seed of the cases (the noise uses 10000 + i)")
    parser.add_argument("--grid", help="also save a picture of the first 8 cases here: content | style image | result "
                        "(style image) | result (style prompt), 4× nearest-neighbour")
    args = parse(parser)

    pipe = Stylizer.from_pretrained(args.checkpoint)
    cases = make_cases(args.n, args.seed, pipe.resolution)
    content_read = transfer_rates(torch.stack([c["content"] for c in cases]), cases)
    print(f"analyser on the {args.n} content images: shape {content_read['shape']:.1%}, "
          f"position {content_read['position']:.1%}")  # fmt: skip
    settings = dict(strength=args.strength, steps=args.steps, guidance_scale=args.guidance, sampler=args.sampler)
    rows = [("style model, style image ", pipe, "image"), ("style model, style prompt", pipe, "prompt")]
    if args.text_checkpoint:
        text_pipe = Stylizer.from_pretrained(args.text_checkpoint, text_encoder=pipe.text_encoder)
        rows.append(("text model, style prompt ", text_pipe, "prompt"))
    figures, results = {}, {}
    for label, p, mode in rows:
        if mode == "image" and not p.takes_style_image:
            continue
        t0 = time.perf_counter()
        results[label.strip()] = x = run_cases(p, cases, mode, **settings)
        rates = transfer_rates(x, cases)
        figures[label.strip()] = rates
        print(f"{label}: shape {rates['shape']:.1%}, position {rates['position']:.1%}, "
              f"style colour {rates['style colour']:.1%} (content colour kept {rates['content colour']:.1%}); "
              f"all three {rates['all']:.1%}  [{time.perf_counter() - t0:.0f} s]")  # fmt: skip
    print(f"({args.n} cases each; strength {args.strength}, {args.sampler} {args.steps} steps, "
          f"guidance {args.guidance})")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"content": content_read, **figures, **vars(args)}, f, indent=2)
    if args.grid and pipe.takes_style_image:
        by_image, by_prompt = results["style model, style image"], results["style model, style prompt"]
        save_grid(args.grid, cases[:8], by_image[:8], by_prompt[:8])


def save_grid(path: str, cases: list[dict], by_image: torch.Tensor, by_prompt: torch.Tensor, scale: int = 4) -> None:
    """One row per case: content, style image, result with the style image, result with the prompt."""
    from PIL import Image

    from fastdiff.data import to_pil
    from fastdiff.pipelines import make_grid

    tiles = []
    for case, a, b in zip(cases, by_image, by_prompt):
        for x in (case["content"], case["style"], a, b):
            img = to_pil(x)
            tiles.append(img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST))
    make_grid(tiles, cols=4).save(path)


if __name__ == "__main__":
    main()
