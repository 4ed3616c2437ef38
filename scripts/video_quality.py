"""Measure how well the video model follows its prompts: motion direction and frame consistency.

    python scripts/video_quality.py [--checkpoint DIR] [--per-caption 1] [--frames 16] [--steps 20]

For each clip:

* **direction**: the foreground centroid (pixels far from the background colour) is
  tracked across frames; the least-squares slope of x and of y over the frame index,
  times (F − 1), is the travel along each axis.  Travel below ``MIN_TRAVEL`` (of the
  image side) reads "still", otherwise the dominant axis and its sign give
  left / right / up / down.  The training clips travel 0.38–0.44.
* **consistency**: `fastdiff.data.analyse_shape_image` reads colour and shape of every
  frame; a clip is consistent when every frame has a shape and all frames agree,
  and it *matches* when they also agree with the prompt.

The measure is first checked on real clips of the training distribution (it must
read them back perfectly), then one clip per caption of the whole vocabulary (6
colours × 3 shapes × 5 motions = 90 prompts; ``--per-caption`` more seeds each) is
generated and the rates are printed.

It also prints the **direction prior**: what the model expects from the prompt alone.
At t = T − 1 (the first evaluation of every sampler) x_t is noise, and the best
prediction of x_0 is the average clip of the prompt.  For prompt pairs that differ
only in the direction word (right/left, down/up), the difference of the model's
x̂_0 is compared with the difference of the average real clips: its cosine (1 when
the model moves the shape the prompted way, 0 when the direction word changes nothing
useful) and its norm relative to the real one.
"""
from __future__ import annotations

import json
import time

import numpy as np
import torch

from fastdiff.data import BACKGROUND, COLOURS, SHAPES, SIZES, analyse_shape_image
from measure_cli import add_sampling_options, measurement_parser, parse  # scripts/measure_cli.py, beside this file

MIN_TRAVEL = 0.15  # fraction of the side; "still" below it
# Half the smallest palette-to-background distance, as the shapes analyser uses.
_THRESHOLD = 0.5 * min(float(np.linalg.norm(np.subtract(c, BACKGROUND))) for c in COLOURS.values())


def centroid_track(clip: torch.Tensor) -> np.ndarray:
    """(F, 2) centroid (x, y) of the foreground per frame, fractions of the side; NaN for an empty frame.

    clip: (3, F, H, W) in [−1, 1].
    """
    arr = ((clip.detach().float().clamp(-1, 1) + 1) * 127.5).permute(1, 2, 3, 0).cpu().numpy()  # (F, H, W, 3)
    F, H, W, _ = arr.shape
    fg = np.linalg.norm(arr - np.asarray(BACKGROUND, np.float32), axis=-1) > _THRESHOLD  # (F, H, W)
    track = np.full((F, 2), np.nan)
    for f in range(F):
        ys, xs = np.nonzero(fg[f])
        if len(xs):
            track[f] = ((xs.mean() + 0.5) / W, (ys.mean() + 0.5) / H)
    return track


def motion_direction(track: np.ndarray, min_travel: float = MIN_TRAVEL) -> str | None:
    """left / right / up / down / still from a centroid track; None when under half the frames have a shape."""
    ok = ~np.isnan(track[:, 0])
    F = len(track)
    if ok.sum() < max(2, F / 2):
        return "still" if F == 1 and ok.all() else None
    f = np.arange(F)[ok]
    travel = [np.polyfit(f, track[ok, axis], 1)[0] * (F - 1) for axis in (0, 1)]  # slope × clip length
    if max(abs(travel[0]), abs(travel[1])) < min_travel:
        return "still"
    if abs(travel[0]) >= abs(travel[1]):
        return "right" if travel[0] > 0 else "left"
    return "down" if travel[1] > 0 else "up"


def clip_scores(clip: torch.Tensor, want: dict) -> dict[str, bool]:
    """direction / consistent / matches for one clip against the prompt's attributes."""
    reads = [analyse_shape_image(clip[:, f]) for f in range(clip.shape[1])]
    kinds = [(r["colour"], r["shape"]) if r is not None else None for r in reads]
    consistent = kinds[0] is not None and all(k == kinds[0] for k in kinds)
    return {
        "direction": motion_direction(centroid_track(clip)) == want["direction"],
        "consistent": consistent,
        "matches": consistent and kinds[0] == (want["colour"], want["shape"]),
    }


def rates(clips: torch.Tensor, prompts: list[str]) -> dict[str, float]:
    """Fraction of clips whose motion matches the prompt, that are consistent, that match colour+shape, and all."""
    from fastdiff.apps.video import parse_video_caption

    keys = ("direction", "consistent", "matches", "all")
    hits = dict.fromkeys(keys, 0)
    for clip, p in zip(clips, prompts):
        s = clip_scores(clip, parse_video_caption(p))
        for k in keys[:-1]:
            hits[k] += s[k]
        hits["all"] += s["direction"] and s["matches"]
    return {k: v / len(prompts) for k, v in hits.items()}


def real_clip_rates(n: int = 200, seed: int = 4321) -> dict[str, float]:
    """The measure on ``n`` real training-distribution clips (should be 100%)."""
    from fastdiff.apps.video import MovingShapesDataset

    ds = MovingShapesDataset(length=n, seed=seed)
    items = [ds[i] for i in range(n)]
    return rates(torch.stack([it["image"] for it in items]), [it["text"] for it in items])


def mean_clip(colour: str, shape: str, direction: str, frames: int, resolution: int, n: int, rng) -> torch.Tensor:
    """(3, F, R, R): the average of ``n`` real clips of one prompt (sizes, starts and offsets drawn from ``rng``)."""
    from fastdiff.apps.video import clip_path, render_clip

    return torch.stack([render_clip(colour, shape, rng.choice(list(SIZES)), clip_path(direction, frames, rng), resolution)
                        for _ in range(n)]).mean(0)  # fmt: skip


def direction_prior(pipe, kinds: int = 6, clips: int = 32, seeds: int = 2) -> dict[str, float]:
    """Mean cosine and norm ratio of x̂_0(direction A) − x̂_0(direction B) at t = T − 1 against the real difference.

    ``kinds`` colour/shape pairs × (right − left, down − up) × ``seeds`` noise draws; the real difference
    is that of the average of ``clips`` rendered clips per prompt.  Needs a v-predicting model.
    """
    import random

    from fastdiff.apps.video import correlated_noise, video_caption

    if pipe.prediction != "v":
        raise ValueError(f"the direction prior needs a v-predicting model, got {pipe.prediction!r}")
    rng = random.Random(0)
    t = pipe.schedule.num_timesteps - 1
    a = pipe.schedule.alphas_cumprod[t].float()
    F, R = pipe.default_frames, pipe.resolution
    colours = list(COLOURS)
    cosines, ratios = [], []
    for i in range(kinds):
        colour, shape = colours[i % len(colours)], SHAPES[i % len(SHAPES)]
        for pair in (("right", "left"), ("down", "up")):
            real = mean_clip(colour, shape, pair[0], F, R, clips, rng) - mean_clip(colour, shape, pair[1], F, R, clips, rng)
            context, pooled = pipe.prompts.encode([video_caption(colour, shape, d) for d in pair], pipe.device)
            for seed in range(seeds):
                noise = torch.randn((1, 3, F + 1, R, R), generator=torch.Generator().manual_seed(seed))
                x_t = correlated_noise(noise, pipe.rho).expand(2, -1, -1, -1, -1).to(pipe.device)
                with torch.no_grad():
                    v = pipe.unet(x_t, torch.full((2,), t, device=pipe.device), context, pooled).float()
                x0 = (a.sqrt() * x_t - (1 - a).sqrt() * v).cpu()  # v = √ᾱ·ε − √(1−ᾱ)·x_0
                diff = (x0[0] - x0[1]).flatten()
                cosines.append(torch.nn.functional.cosine_similarity(diff, real.flatten(), dim=0).item())
                ratios.append((diff.norm() / real.norm()).item())
    return {"cosine": sum(cosines) / len(cosines), "norm_ratio": sum(ratios) / len(ratios)}


def main() -> None:
    from fastdiff.apps.video import VIDEO_CHECKPOINT, VideoPipeline, all_video_captions

    parser = measurement_parser(__doc__)
    add_sampling_options(parser, VIDEO_CHECKPOINT)
    parser.add_argument("--per-caption", type=int, default=1, help="clips per caption (seeds)")
    parser.add_argument("--frames", type=int, default=None, help="clip length (default: the trained one)")
    parser.add_argument("--seed", type=int, default=10_000)
    args = parse(parser)

    real = real_clip_rates()
    print("measure on 200 real clips: " + ", ".join(f"{k} {v:.1%}" for k, v in real.items()))
    pipe = VideoPipeline.from_pretrained(args.checkpoint)
    prior = direction_prior(pipe)
    print(f"direction prior at t = T-1: cosine with the real direction difference {prior['cosine']:+.3f}, "
          f"norm {prior['norm_ratio']:.2f} of the real one")  # fmt: skip
    prompts = [c for c in all_video_captions() for _ in range(args.per_caption)]
    seeds = [args.seed + i for i in range(len(prompts))]
    t0 = time.perf_counter()
    clips = pipe.generate_tensors(prompts, frames=args.frames, guidance_scale=args.guidance, sampler=args.sampler,
                                  steps=args.steps, seeds=seeds, batch_size=10)  # fmt: skip
    gen = rates(clips, prompts)
    print(f"generated {len(prompts)} clips of {clips.shape[2]} frames ({args.sampler}, {args.steps} steps, "
          f"guidance {args.guidance}) in {time.perf_counter() - t0:.0f} s")  # fmt: skip
    print(f"motion direction matches the prompt: {gen['direction']:.1%}")
    print(f"frame-to-frame consistency (same colour and shape in every frame): {gen['consistent']:.1%}")
    print(f"every frame matches the prompt's colour and shape: {gen['matches']:.1%}")
    print(f"direction AND every frame matching: {gen['all']:.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"real_clips": real, "direction_prior": prior, "generated": gen, "n": len(prompts), **vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
