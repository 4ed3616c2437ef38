r"""Inpainting: repaint the masked part of an image from a prompt; every other pixel is kept bit for bit.

    fastdiff inpaint --image photo.png --mask mask.png --prompt "a large red circle in the center" --out out.png

    from fastdiff.apps.inpaint import inpaint
    [out] = inpaint("photo.png", "mask.png", "a large red circle in the center", seed=0)

Inputs.  The image (PIL image, path, or (3, H, W) tensor in [−1, 1]) must already have the
model's resolution, unless ``resize=True`` (``--resize``) resizes it (bicubic) and the mask
(nearest).  The mask (PIL image, path, or (H, W) / (1, H, W) tensor in [0, 1]) must have the
image's size; it is made binary per pixel: value ≥ 0.5 (white) = repaint, < 0.5 (black) = keep.
Soft masks are not supported: a grey pixel is either repainted or kept, never mixed.

Known region.  The sampler's own blend (``ops.sampler_step``, the "replacement" method): after
each evaluation, with m the mask, the known image x_known re-noised to the output's level,

    x' ← m·x' + (1 − m)·(α'·x_known + σ'·z')                      (z' fresh Philox noise)

and α' = 1, σ' = 0 after the last evaluation, so the returned tensor *equals* x_known where
m = 0, and ``to_pil`` maps the input's 8-bit values back to themselves: the saved PNG keeps
every unmasked pixel of the (RGB) input exactly.  The known region is never pasted back.

RePaint resampling (Lugmayr et al. 2022, Sec. 4.2 and Alg. 1).  The replacement method
conditions the unknown region on the known one only through x_t, so seams can disagree.
RePaint jumps back: after a block of ``jump`` sampler steps has taken the state from level a
to level b (a noisier), it re-noises x_b to level a with the forward process

    q(x_a | x_b) = N( sqrt(ᾱ_a/ᾱ_b)·x_b, (1 − ᾱ_a/ᾱ_b)·I )        (ᾱ_b > ᾱ_a; ᾱ = 1 after the last step)

and runs the block again — ``resample`` extra times per block (RePaint's r counts passes:
r = resample + 1), so the model sees the blended known region again at every level.  Cost:
(resample + 1)× the evaluations.  The noise of the jump is Philox noise keyed by the image's
seed and a jump counter (step keys −2, −3, …; the initial noise uses −1), and the sampler
steps of pass p use step key i + p·E (E evaluations in the plan): every draw is fresh, and an
image is a function of (image, mask, prompt, seed, settings) only, whatever its batch.  After
a jump the multistep history (DPM-Solver++(2M)'s previous x̂0) belongs to another trajectory,
so the block's first step runs first order (x̂0_prev := x̂0); Heun's blocks start at a
predictor, so they always hold whole steps.  With ``resample=0`` the loop is
`fastdiff.samplers.sample` itself.

Stable Diffusion folders (``--checkpoint`` a diffusers folder).  The image's sides must be
multiples of 64 (the VAE's 8 × the UNet's 8; any size, not only the folder's), and the
sampling runs on latents, as diffusers' ``StableDiffusionInpaintPipeline`` does:

* a plain UNet (4 channels): the known image's latents z = VAE-encode(image) (the posterior
  mean, scaled) take the place of x_known above, with the mask downsampled to the latents
  (nearest, as diffusers), so the blend keeps z where the mask is 0; RePaint jumps work the same;
* an inpainting UNet (9 input channels: latents, mask, masked image's latents): no blend; at
  every evaluation the UNet reads [x_t, m, VAE-encode(image·(1 − m))], as diffusers feeds it.

The decoder's output differs slightly from the input outside the mask (the VAE is lossy), so
`inpaint` and the command line paste the input's pixels back where the mask is 0: the
promise above holds for SD folders too.  `inpaint_tensors` returns the decoded images as they
are (the tensors diffusers returns).  Two differences from diffusers: the image's latents are
the posterior's mean, not a draw from it, and the blend re-noises the known latents with fresh
noise at each step (diffusers re-noises them with the initial noise; the two agree in law).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from fastdiff import samplers
from fastdiff.checks import MAX_BATCH, check_int, check_out_file, check_seed, int_arg, number_arg
from fastdiff.data import open_image, to_pil, to_tensor
from fastdiff.ops.philox import randn_like_philox, step_keys
from fastdiff.ops.fused_step import coefficient_index
from fastdiff.schedule import sigmas_at

HELP = "repaint the masked region of an image from a prompt (the rest is kept exactly)"
MASK_THRESHOLD = 0.5  # mask value ≥ this: repaint
# RePaint's paper resamples r = 10 times (resample 9); the cost grows as (resample + 1)×.
MAX_RESAMPLE = 100


# ----------------------------------------------------------------------------- inputs


def _image_tensor(image, what: str) -> torch.Tensor:
    if torch.is_tensor(image):
        if image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
            raise ValueError(f"{what} as a tensor must be float (3, H, W) in [-1, 1], got {tuple(image.shape)}")
        return image.detach().float().cpu()
    return to_tensor(open_image(image, what))


def _mask_tensor(mask, what: str) -> torch.Tensor:
    """(1, H, W) float32 of 0 (keep) and 1 (repaint)."""
    if torch.is_tensor(mask):
        m = mask.detach().float().cpu()
        if m.ndim == 2:
            m = m[None]
        if m.ndim != 3 or m.shape[0] != 1:
            raise ValueError(f"{what} as a tensor must be (H, W) or (1, H, W), got {tuple(mask.shape)}")
    else:
        import numpy as np

        m = torch.from_numpy(np.asarray(open_image(mask, what).convert("L"), dtype=np.float32) / 255.0)[None]
    return (m >= MASK_THRESHOLD).float()


def prepare_inputs(
    image, mask, resolution: int, *, resize: bool = False, multiple: int | None = None,
    names: tuple[str, str] = ("image", "mask"),
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(known (3, H, W) in [−1, 1], mask (1, H, W) of 0/1): at the model's resolution R×R, or, with
    ``multiple`` (a Stable Diffusion folder), at any size whose sides are multiples of it.

    ``resize``: an image of another size is resized to R×R.  ``names`` are the argument names
    used in error messages (the CLI passes its flags).
    """
    what_img, what_mask = names
    known = _image_tensor(image, what_img)
    m = _mask_tensor(mask, what_mask)
    (h, w), (mh, mw) = known.shape[1:], m.shape[1:]
    if (mh, mw) != (h, w):
        raise ValueError(f"{what_mask} is {mw}x{mh} pixels but {what_img} is {w}x{h}: they must have the same size")
    fits = (h, w) == (resolution, resolution) if multiple is None else h % multiple == 0 and w % multiple == 0
    if not fits:
        if not resize:
            flag = "--resize" if what_img.startswith("--") else "resize=True"
            takes = f"works at {resolution}x{resolution}"
            if multiple is not None:
                takes = f"takes sides that are multiples of {multiple}"
            raise ValueError(
                f"{what_img} is {w}x{h} pixels but the model {takes}; pass {flag} to resize image and mask to "
                f"{resolution}x{resolution} (the kept pixels are then those of the resized image)"
            )
        known, m = _resize(known, m, resolution)
    if not bool(m.any()):
        raise ValueError(f"{what_mask} selects no pixel to repaint (white, value >= {MASK_THRESHOLD}, = repaint)")
    return known, m


def _resize(known: torch.Tensor, mask: torch.Tensor, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    img = to_pil(known).resize((resolution, resolution), Image.Resampling.BICUBIC)
    # Nearest keeps the mask binary: a pixel is kept or repainted, never half of each.
    m = torch.nn.functional.interpolate(mask[None], size=(resolution, resolution), mode="nearest")[0]
    return to_tensor(img), m


def check_settings(steps, num_images, resample, jump) -> None:
    """Raise ValueError naming the first bad count, before any work (batch size: `check_batching`)."""
    check_int(steps, "steps", 1)
    check_int(num_images, "num_images", 1)
    check_int(resample, "resample", 0, MAX_RESAMPLE)
    check_int(jump, "jump", 1)


# ----------------------------------------------------------------------------- the RePaint loop


def _boundaries(plan: samplers.Plan) -> list[int]:
    """Evaluation indices where a whole sampler step ends (a blend follows): where jumps may happen."""
    return [0] + [i + 1 for i, b in enumerate(plan.blends) if b]


def _alpha_levels(plan: samplers.Plan, schedule) -> list[float]:
    """α = sqrt(ᾱ) of the state at each boundary: x_T's from the schedule, then each step's output level."""
    s0 = float(sigmas_at(plan.timesteps[:1].cpu(), schedule)[0])
    alphas = [0.0 if math.isinf(s0) else 1 / math.sqrt(1 + s0 * s0)]
    coeffs = plan.coeffs.cpu()
    alphas += [float(coeffs[i - 1, coefficient_index("known")]) for i in _boundaries(plan)[1:]]
    return alphas


def _first_order(row: torch.Tensor) -> torch.Tensor:
    """The step with x̂0_prev replaced by x̂0 (the history is void after a jump)."""
    row = row.clone()
    row[coefficient_index("x0")] += row[coefficient_index("x0_prev")]
    row[coefficient_index("x0_prev")] = 0.0
    return row


def _renoise(x: torch.Tensor, seeds: torch.Tensor, alpha_from: float, alpha_to: float, jump_index: int):
    """x re-noised from level alpha_from down to alpha_to by q(x_to | x_from); Philox step key −2 − jump_index."""
    ratio = alpha_to / alpha_from
    z = randn_like_philox(step_keys(seeds, -2 - jump_index), tuple(x.shape), x.device).to(x.dtype)
    return ratio * x + math.sqrt(max(1.0 - ratio * ratio, 0.0)) * z


def repaint_sample(
    model,
    x_T: torch.Tensor,
    seeds: torch.Tensor,
    plan: samplers.Plan,
    schedule,
    *,
    known: torch.Tensor,
    mask: torch.Tensor,
    guidance_scale: float | None = None,
    resample: int = 0,
    jump: int = 1,
    clip_x0: float | None = None,
) -> torch.Tensor:
    """`samplers.sample` with RePaint jumps (see the module docstring); resample=0 is the plain loop."""
    levels = _alpha_levels(plan, schedule)
    bounds = _boundaries(plan)
    loop = samplers.prepare_loop(
        model, x_T, seeds, plan, guidance_scale=guidance_scale, clip_x0=clip_x0, known=known, mask=mask
    )
    E, n_steps = len(plan), len(bounds) - 1
    x, x0, jumps = x_T, None, 0
    for start in range(0, n_steps, jump):
        end = min(start + jump, n_steps)
        x0_start = x0
        for p in range(resample + 1):
            if p > 0:  # jump back: re-noise from the block's end level to its start level
                x = _renoise(x, seeds, levels[end], levels[start], jumps)
                jumps += 1
            x0 = x0_start
            for i in range(bounds[start], bounds[end]):
                row = None
                if p > 0 and i == bounds[start] and plan.reads_x0[i]:
                    row = _first_order(loop.coeffs[i])
                x, x0 = samplers.step(loop, i, x, x0, coeffs=row, key=i + p * E)
    return x


# ----------------------------------------------------------------------------- API


def sample_space(pipe, known: torch.Tensor, mask: torch.Tensor, guided: bool):
    """What the sampler needs from (known (B, 3, H, W), mask (B, 1, H, W)), in the pipeline's sample space:
    (known, mask) for the blend and None, or — an inpainting UNet — (None, None) and its extra input
    channels [mask, masked image's latents] (doubled under guidance, like the batch)."""
    if not pipe.inpainting:
        z = pipe.encode(known)  # the image itself for a pixel model
        return z, F.interpolate(mask, size=z.shape[-2:], mode="nearest"), None
    masked = pipe.encode(known * (1 - mask))
    channels = torch.cat([F.interpolate(mask, size=masked.shape[-2:], mode="nearest"), masked], dim=1)
    return None, None, torch.cat([channels, channels]) if guided else channels


@torch.no_grad()
def inpaint_tensors(
    pipe,
    known: torch.Tensor,
    mask: torch.Tensor,
    prompts: list[str],
    *,
    seeds: list[int],
    negative_prompt: str = "",
    guidance_scale: float = 4.0,
    sampler: str | None = None,
    steps: int = 20,
    resample: int = 0,
    jump: int = 1,
    batch_size: int = 16,
    progress: bool = True,
    latents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Batched inpainting: known (N, 3, H, W) in [−1, 1], mask (N, 1, H, W) of 0/1 (1 = repaint),
    one prompt and one seed per image → (N, 3, H, W) in [−1, 1]; a pixel model's equals ``known``
    where mask is 0, a Stable Diffusion folder's is the decoded sample (see the module docstring).

    sampler: None for the pipeline's default.  latents: the initial noise (N, C, h, w) instead of
    the draw from ``seeds``, scaled as the sampler's plan says (as diffusers' ``latents``).
    """
    from fastdiff.pipelines import check_batching, counting

    n = len(prompts)
    if known.shape[0] != n or mask.shape[0] != n or len(seeds) != n:
        raise ValueError(f"known, mask, prompts and seeds must have one entry per image ({n})")
    check_settings(steps, 1, resample, jump)
    check_batching(batch_size, guidance_scale)
    for s in seeds:
        check_seed(s, "seeds")
    if resample and pipe.inpainting:
        raise ValueError("resample needs the sampler's blend; this folder's inpainting UNet reads the mask "
                         "instead: use resample 0")  # fmt: skip
    run = pipe.sampling(sampler, steps)
    plan = run.plan.to(pipe.device)
    guided = pipe.guides(guidance_scale)
    g = guidance_scale if guided else None
    how = f"{sampler or pipe.default_sampler}, {steps} steps"
    how += f", resample {resample} every {jump}" if resample else ""

    def batch(sl: slice, bar) -> torch.Tensor:
        b = len(prompts[sl])
        seeds_t = torch.tensor(seeds[sl], dtype=torch.int64, device=pipe.device)
        kn, m, channels = sample_space(pipe, known[sl].to(pipe.device), mask[sl].to(pipe.device), guided)
        context = pipe.encode_prompt(prompts[sl], [negative_prompt] * b, guided)
        model = counting(pipe.denoiser(*context, channels=channels), bar, per_call=b)
        if latents is None:
            size = (kn if channels is None else channels).shape[-2:]
            noise = samplers.initial_noise(seeds_t, (b, pipe.sample_shape[0], *size))
        else:
            noise = latents[sl].to(pipe.device, torch.float32)
        x_T = run.start(noise)
        if resample == 0:
            x = samplers.sample(model, x_T, seeds_t, plan, guidance_scale=g, clip_x0=run.clip_x0, known=kn, mask=m)
        else:
            x = repaint_sample(
                model, x_T, seeds_t, plan, pipe.schedule, known=kn, mask=m, guidance_scale=g, resample=resample,
                jump=jump, clip_x0=run.clip_x0,
            )  # fmt: skip
        return pipe.decode(x).float().cpu()

    total = n * len(plan) * (resample + 1)
    return pipe.in_batches(n, batch_size, batch, progress=progress, desc=f"inpaint ({how})", unit="img·eval",
                           total=total)  # fmt: skip


def inpaint(
    image,
    mask,
    prompt: str,
    *,
    pipe=None,
    checkpoint: str | os.PathLike | None = None,
    device: str | None = None,
    dtype: str | None = None,
    num_images: int = 1,
    seed: int = 0,
    resize: bool = False,
    negative_prompt: str = "",
    guidance_scale: float = 4.0,
    sampler: str | None = None,
    steps: int = 20,
    resample: int = 0,
    jump: int = 1,
    batch_size: int = 16,
    progress: bool = True,
) -> list:
    """Repaint where ``mask`` is white (≥ 0.5) following ``prompt``; PIL images, image i from seed + i.

    image: PIL image, path, or (3, H, W) tensor in [−1, 1]; mask: PIL image, path, or (H, W) /
    (1, H, W) tensor.  ``pipe``: a loaded `Text2Image` (else ``checkpoint``, default the shipped
    model, or a diffusers Stable Diffusion folder, is loaded once and cached, with ``dtype``
    weights).  The unmasked pixels of the result equal the input's.
    """
    from fastdiff.pipelines import DEFAULT_CHECKPOINT, cached_pipeline, check_batching, check_images_fit, image_bytes

    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    check_settings(steps, num_images, resample, jump)
    check_batching(batch_size, guidance_scale)
    check_seed(seed, "seed", num_images)
    check_images_fit(num_images, f"num_images {num_images}")
    if pipe is None:
        pipe = cached_pipeline(checkpoint or DEFAULT_CHECKPOINT, device, dtype)
    check_images_fit(num_images, f"num_images {num_images}", image_bytes(3, pipe.resolution**2))
    known, m = prepare_inputs(image, mask, pipe.resolution, resize=resize, multiple=_sides_multiple(pipe))
    x = inpaint_tensors(
        pipe, known.expand(num_images, -1, -1, -1), m.expand(num_images, -1, -1, -1), [prompt] * num_images,
        seeds=[seed + i for i in range(num_images)], negative_prompt=negative_prompt, guidance_scale=guidance_scale,
        sampler=sampler, steps=steps, resample=resample, jump=jump, batch_size=batch_size, progress=progress,
    )  # fmt: skip
    if pipe.latent:  # the VAE's round trip moved the kept pixels a little: they are the input's again
        x = torch.where(m.bool(), x, known)
    return [to_pil(xi) for xi in x]


def _sides_multiple(pipe) -> int | None:
    """What `prepare_inputs` takes for ``pipe``: None (its resolution only) for a pixel model, else
    the multiple an image's sides must have (any size of those: a Stable Diffusion folder)."""
    return pipe.size_multiple if pipe.latent else None


# ----------------------------------------------------------------------------- command line


def add_arguments(parser) -> None:
    from fastdiff.bulk import CHECKPOINT_HELP, add_dtype_argument
    from fastdiff.pipelines import DEFAULT_CHECKPOINT, SAMPLERS

    parser.add_argument("--image", required=True, help="the image to edit (PNG etc., the model's size unless --resize)")
    parser.add_argument("--mask", required=True, help="same size as --image; white (>= 50%% grey) = repaint, else keep")
    parser.add_argument("--prompt", required=True, help="what to paint into the masked region")
    parser.add_argument(
        "--out", default="inpainted.png", help="output PNG; --num-images N: OUT_000.png … (default: %(default)s)"
    )
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help=CHECKPOINT_HELP)
    add_dtype_argument(parser)
    parser.add_argument("--negative-prompt", default="", help="the unconditional side of guidance (default: empty)")
    parser.add_argument("--sampler", choices=SAMPLERS,
                        help="(default: the checkpoint's: dpmpp_2m, or a Stable Diffusion folder's scheduler's)")
    parser.add_argument("--steps", type=int_arg(1), default=20)
    parser.add_argument("--guidance", type=number_arg(), default=4.0, help="classifier-free guidance (1 disables)")
    parser.add_argument("--seed", type=int_arg(0), default=0, help="seed of the first image; image i uses seed + i")
    parser.add_argument("--num-images", type=int_arg(1), default=1, help="how many variants to draw")
    parser.add_argument("--resample", type=int_arg(0, MAX_RESAMPLE), default=0,
                        help="RePaint: jumps back per block (0: none)")  # fmt: skip
    parser.add_argument("--jump", type=int_arg(1), default=1, help="RePaint: sampler steps per block (jump length)")
    parser.add_argument("--resize", action="store_true",
                        help="resize image and mask to the model's resolution (when their size does not fit it)")
    parser.add_argument("--batch-size", type=int_arg(1, MAX_BATCH), default=16)


def _out_paths(out: str, n: int) -> list[Path]:
    """The files ``--out`` names for ``n`` images, each checked writable (and not a folder) before any work."""
    path = Path(out)
    if path.suffix.lower() != ".png":
        raise ValueError(f"--out must be a .png file (a lossy format would change the kept pixels), got {out!r}")
    paths = [path] if n == 1 else [path.with_name(f"{path.stem}_{i:03d}.png") for i in range(n)]
    for p in paths:
        check_out_file(p, "--out")
    return paths


def run(args) -> int:
    from fastdiff.pipelines import cached_pipeline, check_images_fit

    check_images_fit(args.num_images, f"--num-images {args.num_images}")
    check_seed(args.seed, "--seed", args.num_images)
    paths = _out_paths(args.out, args.num_images)
    image, mask = open_image(args.image, "--image"), open_image(args.mask, "--mask")
    if image.size != mask.size:
        (w, h), (mw, mh) = image.size, mask.size
        raise ValueError(f"--mask is {mw}x{mh} pixels but --image is {w}x{h}: they must have the same size")
    pipe = cached_pipeline(args.checkpoint, args.device, args.dtype)
    known, m = prepare_inputs(
        image, mask, pipe.resolution, resize=args.resize, multiple=_sides_multiple(pipe), names=("--image", "--mask")
    )
    images = inpaint(
        known, m[0], args.prompt, pipe=pipe, num_images=args.num_images, seed=args.seed,
        negative_prompt=args.negative_prompt, guidance_scale=args.guidance, sampler=args.sampler, steps=args.steps,
        resample=args.resample, jump=args.jump, batch_size=args.batch_size,
    )  # fmt: skip
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    for img, p in zip(images, paths):
        img.save(p)
    kept = int((m == 0).sum())
    print(f"wrote {', '.join(map(str, paths))} ({kept} of {m.numel()} pixels kept from --image)")
    return 0
