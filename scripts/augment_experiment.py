"""Does a synthetic set from `fastdiff augment` help a classifier that has only a few real images?

    python scripts/augment_experiment.py [--real-per-class 5] [--synthetic-per-class 100] [--held-out 300] \\
                                         [--seeds 5] [--steps 20] [--out runs/augment-shapes] [--threads 1] \\
                                         [--picture docs/augment.png]

Task: classify the shape (circle / square / triangle) of real synthetic-shapes images
(`fastdiff.data.ShapesDataset`: any colour, size and position).  The same small CNN
(3 conv + BatchNorm layers, ~6 k parameters, CPU, seconds to train) is trained twice with the same recipe (Adam, a
fixed number of steps, mini-batches drawn uniformly from its training set):

* "real only":        ``--real-per-class`` real images per class;
* "real + synthetic": the same real images plus ``--synthetic-per-class`` images per class
  written by ``fastdiff augment --classes circle square triangle`` (default prompt template:
  random colour, size and position per image).

Both are scored on ``--held-out`` real images that neither saw (another dataset seed).  Each
of ``--seeds`` repeats draws another real subset and another initialisation; the script
prints both accuracies per repeat and their means.  The synthetic set is resumable: a rerun
with the same ``--out`` reuses it.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fastdiff.data import SHAPES, ShapesDataset
from measure_cli import measurement_parser, parse  # scripts/measure_cli.py, beside this file

CLASSES = list(SHAPES)


def real_few(per_class: int, seed: int, resolution: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``per_class`` images of each shape in ShapesDataset(seed): (x (N, 3, R, R), labels (N,))."""
    ds = ShapesDataset(resolution=resolution, length=100 * per_class * len(CLASSES), seed=seed)
    xs, ys, counts = [], [], dict.fromkeys(CLASSES, 0)
    for i in range(len(ds)):
        shape = ds.attributes(i)["shape"]
        if counts[shape] < per_class:
            xs.append(ds[i]["image"])
            ys.append(CLASSES.index(shape))
            counts[shape] += 1
        if min(counts.values()) == per_class:
            break
    return torch.stack(xs), torch.tensor(ys)


def held_out(n: int, seed: int, resolution: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    ds = ShapesDataset(resolution=resolution, length=n, seed=seed)
    items = [ds[i] for i in range(n)]
    return torch.stack([it["image"] for it in items]), torch.tensor([CLASSES.index(it["shape"]) for it in items])


def load_synthetic(out_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The images of an augment folder with their labels, from its manifest."""
    from fastdiff.data import load_image

    out = Path(out_dir)
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines() if x.strip()]
    x = torch.stack([load_image(out / line["file"], 32) for line in lines])
    return x, torch.tensor([CLASSES.index(line["label"]) for line in lines])


def save_picture(path: str, synthetic, per_row: int = 8) -> None:
    """One row per class: its first ``per_row`` synthetic images, 3× nearest upscaled."""
    from fastdiff.data import to_pil
    from fastdiff.pipelines import make_grid

    x, y = synthetic
    first = [i for c in range(len(CLASSES)) for i in (y == c).nonzero()[:per_row, 0]]
    tiles = [to_pil(x[i]).resize((96, 96), resample=0) for i in first]
    make_grid(tiles, cols=per_row, pad=3).save(path, optimize=True)


def make_classifier() -> nn.Module:
    """~6 k parameters: three 3×3 conv + BatchNorm layers and a global average pool (shape, not position, decides)."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),  # (8, 16, 16)
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),  # (16, 8, 8)
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, len(CLASSES)),
    )  # fmt: skip


def train_classifier(x: torch.Tensor, y: torch.Tensor, seed: int, steps: int = 300, batch: int = 32) -> nn.Module:
    """The same recipe for every training set: Adam 3e-3, ``steps`` mini-batches drawn with replacement."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = make_classifier()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        idx = torch.randint(len(x), (batch,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def compare(synthetic, *, real_per_class: int, held: tuple, seeds: int, train_steps: int = 300) -> dict:
    """Accuracy on ``held`` of real-only and real+synthetic classifiers, per seed and mean."""
    xs, ys = synthetic
    x_test, y_test = held
    real_acc, aug_acc = [], []
    for s in range(seeds):
        xr, yr = real_few(real_per_class, seed=100 + s)
        real_acc.append(accuracy(train_classifier(xr, yr, seed=s, steps=train_steps), x_test, y_test))
        xa, ya = torch.cat([xr, xs]), torch.cat([yr, ys])
        aug_acc.append(accuracy(train_classifier(xa, ya, seed=s, steps=train_steps), x_test, y_test))
    return {
        "real_only": real_acc, "real_plus_synthetic": aug_acc,
        "real_only_mean": float(np.mean(real_acc)), "real_plus_synthetic_mean": float(np.mean(aug_acc)),
    }  # fmt: skip


def main() -> None:
    from fastdiff.apps.augment import augment

    parser = measurement_parser(__doc__)
    parser.add_argument("--real-per-class", type=int, default=5)
    parser.add_argument("--synthetic-per-class", type=int, default=100)
    parser.add_argument("--held-out", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=5, help="repeats (real subset and initialisation)")
    parser.add_argument("--train-steps", type=int, default=300, help="classifier training steps (batch 32)")
    parser.add_argument("--steps", type=int, default=20, help="sampler steps of the synthetic set")
    parser.add_argument("--out", default="runs/augment-shapes", help="the synthetic set's folder (resumable)")
    parser.add_argument("--picture", help="also save a grid of synthetic images per class here (PNG)")
    args = parse(parser)

    t0 = time.perf_counter()
    augment(CLASSES, args.synthetic_per_class, args.out, steps=args.steps, batch_size=50)
    synthetic = load_synthetic(args.out)
    print(f"synthetic set: {len(synthetic[0])} images in {args.out} ({time.perf_counter() - t0:.0f} s)")
    held = held_out(args.held_out, seed=999)
    r = compare(
        synthetic, real_per_class=args.real_per_class, held=held, seeds=args.seeds, train_steps=args.train_steps
    )
    for s, (a, b) in enumerate(zip(r["real_only"], r["real_plus_synthetic"])):
        print(f"  repeat {s}: real only {a:.1%}   real + synthetic {b:.1%}")
    print(f"held-out accuracy on {args.held_out} real images, mean of {args.seeds} repeats: "
          f"real only ({args.real_per_class}/class) {r['real_only_mean']:.1%}, "
          f"real + synthetic ({args.synthetic_per_class}/class) {r['real_plus_synthetic_mean']:.1%}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**r, **vars(args)}, f, indent=2)
    if args.picture:
        save_picture(args.picture, synthetic)
        print(f"picture (one row per class): {args.picture}")


if __name__ == "__main__":
    main()
