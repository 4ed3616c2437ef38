"""Measure inpainting on the synthetic shapes: does the repainted region follow the prompt,
and is the kept region bit-identical?

    python scripts/inpaint_quality.py [--n 150] [--steps 20] [--resample 2 --jump 2] [--threads 1] \\
                                      [--picture docs/inpaint.png]

Set-up, per case: a real synthetic image of caption A (one shape at position P, from
`ShapesDataset`); the mask is the square of side 0.6·R centred on P — it covers any shape at P
(half-extent ≤ 0.25·R plus 0.03·R jitter), so the kept region is background only (checked); the
prompt is caption B: same position and size, another colour-and-shape pair.  Success: the
analyser (`data.analyse_shape_image`) reads B's colour, shape and position from the result.
Kept region: every unmasked pixel of the result, written to PNG and read back, must equal
the input's 8-bit value.  Runs once without RePaint resampling and once with it.
"""
from __future__ import annotations

import io
import json
import random
import time

import numpy as np
import torch

from fastdiff.data import COLOURS, POSITIONS, SHAPES, ShapesDataset, analyse_shape_image, caption, to_pil
from measure_cli import add_sampling_options, measurement_parser, parse  # scripts/measure_cli.py, beside this file

MASK_SIDE = 0.6  # fraction of the image side


def position_mask(position: str, resolution: int) -> torch.Tensor:
    """(1, R, R): 1 on the pixels whose centre lies in the square of side MASK_SIDE·R around the position."""
    cx, cy = POSITIONS[position]
    centres = (torch.arange(resolution) + 0.5) / resolution
    half = MASK_SIDE / 2
    rows = ((centres - cy).abs() <= half).float()
    cols = ((centres - cx).abs() <= half).float()
    return (rows[:, None] * cols[None, :])[None]


def make_cases(n: int, seed: int = 0, resolution: int = 32):
    """(known (n, 3, R, R), mask (n, 1, R, R), prompts, wanted attributes) for n cases."""
    ds = ShapesDataset(resolution=resolution, length=n, seed=seed)
    rng = random.Random(seed)
    known, masks, prompts, wants = [], [], [], []
    for i in range(n):
        item = ds[i]
        pairs = [(c, s) for c in COLOURS for s in SHAPES if (c, s) != (item["colour"], item["shape"])]
        colour, shape = rng.choice(pairs)
        m = position_mask(item["position"], resolution)
        bg = item["image"].new_tensor([40, 40, 40]).div(127.5).sub(1)[:, None, None]
        if not torch.allclose(item["image"] * (1 - m), bg * (1 - m), atol=1e-6):
            raise AssertionError(f"case {i}: the shape is not inside its mask")
        known.append(item["image"])
        masks.append(m)
        prompts.append(caption(colour, shape, item["size"], item["position"]))
        wants.append({"colour": colour, "shape": shape, "size": item["size"], "position": item["position"]})
    return torch.stack(known), torch.stack(masks), prompts, wants


def png_roundtrip(x: torch.Tensor) -> np.ndarray:
    """The (H, W, 3) uint8 pixels of ``to_pil(x)`` after writing it as PNG and reading it back."""
    from PIL import Image

    buf = io.BytesIO()
    to_pil(x).save(buf, format="PNG")
    buf.seek(0)
    with Image.open(buf) as img:
        return np.asarray(img.convert("RGB")).copy()


def evaluate(out: torch.Tensor, known: torch.Tensor, mask: torch.Tensor, wants: list[dict]) -> dict:
    """Match rates per attribute and colour+shape+position together; kept pixels that changed."""
    attrs = ("colour", "shape", "size", "position")
    hits = dict.fromkeys((*attrs, "colour+shape+position"), 0)
    changed = 0
    for x, k, m, want in zip(out, known, mask, wants):
        got = analyse_shape_image(x)
        if got is not None:
            for a in attrs:
                hits[a] += got[a] == want[a]
            hits["colour+shape+position"] += all(got[a] == want[a] for a in ("colour", "shape", "position"))
        keep = (m[0] == 0).numpy()
        changed += int((png_roundtrip(x)[keep] != png_roundtrip(k)[keep]).any(-1).sum())
    rates = {a: v / len(wants) for a, v in hits.items()}
    return {"rates": rates, "kept_pixels_changed": changed, "kept_pixels": int((mask == 0).sum())}


def run_setting(pipe, cases, *, steps, sampler, guidance, resample, jump, seed, progress=True) -> dict:
    from fastdiff.apps.inpaint import inpaint_tensors

    known, mask, prompts, wants = cases
    seeds = [seed + i for i in range(len(prompts))]
    t0 = time.perf_counter()
    out = inpaint_tensors(
        pipe, known, mask, prompts, seeds=seeds, guidance_scale=guidance, sampler=sampler, steps=steps,
        resample=resample, jump=jump, batch_size=50, progress=progress,
    )  # fmt: skip
    result = evaluate(out, known, mask, wants)
    result["seconds"] = time.perf_counter() - t0
    return result, out


def save_picture(path: str, cases, outputs: list[torch.Tensor], n: int = 6) -> None:
    """Rows of (image, mask, each output) for the first ``n`` cases, 4× nearest upscaled."""
    from fastdiff.pipelines import make_grid

    known, mask = cases[0], cases[1]
    tiles = []
    for i in range(n):
        row = [known[i], mask[i].expand(3, -1, -1) * 2 - 1, *(o[i] for o in outputs)]
        tiles += [to_pil(t).resize((128, 128), resample=0) for t in row]
    make_grid(tiles, cols=2 + len(outputs), pad=4).save(path, optimize=True)


def _line(name: str, r: dict, n: int) -> str:
    rates = ", ".join(f"{a} {v:.1%}" for a, v in r["rates"].items())
    return (f"{name}: colour+shape+position match {r['rates']['colour+shape+position']:.1%} of {n} ({rates}); "
            f"kept pixels changed: {r['kept_pixels_changed']} of {r['kept_pixels']}; {r['seconds']:.0f} s")  # fmt: skip


def main() -> None:
    from fastdiff.pipelines import DEFAULT_CHECKPOINT, Text2Image

    parser = measurement_parser(__doc__)
    add_sampling_options(parser, DEFAULT_CHECKPOINT)
    parser.add_argument("--n", type=int, default=150, help="cases")
    parser.add_argument("--resample", type=int, default=2, help="RePaint jumps back per block for the second run")
    parser.add_argument("--jump", type=int, default=2, help="RePaint block length for the second run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the cases and of the sampler noise")
    parser.add_argument("--picture", help="also save a grid of the first cases here (PNG)")
    args = parse(parser)

    pipe = Text2Image.from_pretrained(args.checkpoint)
    cases = make_cases(args.n, args.seed, pipe.resolution)
    common = dict(steps=args.steps, sampler=args.sampler, guidance=args.guidance, seed=args.seed)
    plain, plain_x = run_setting(pipe, cases, resample=0, jump=1, **common)
    repaint, repaint_x = run_setting(pipe, cases, resample=args.resample, jump=args.jump, **common)
    print(f"{args.n} cases, {args.sampler}, {args.steps} steps, guidance {args.guidance}")
    print(_line("replacement only", plain, args.n))
    print(_line(f"RePaint (resample {args.resample}, jump {args.jump})", repaint, args.n))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"plain": plain, "repaint": repaint, **vars(args)}, f, indent=2)
    if args.picture:
        save_picture(args.picture, cases, [plain_x, repaint_x])
        print(f"picture (image, mask, replacement, RePaint per row): {args.picture}")


if __name__ == "__main__":
    main()
