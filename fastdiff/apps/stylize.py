r"""Style transfer: keep the content image's layout, take colour from a style prompt and/or a style image.

    fastdiff stylize --content cat.png --style-image ref.png --strength 0.4 --out out.png
    fastdiff.apps.stylize.stylize("cat.png", style_prompt="red", strength=0.4)

**Image-to-image (SDEdit, Meng et al. 2022).**  The content x_c is noised part of the way,
to t₀ = round(s·T) − 1 for a strength s ∈ (0, 1],

    x_t₀ = α_t₀·x_c + σ_t₀·ε,        ε from the image's seed (`samplers.initial_noise`)

and the sampler runs from t₀ down to 0 under the style condition (a plan over ``steps``
"trailing" timesteps of [0, t₀]).  Noise at t₀ hides the details (the colour of a
flat shape is among the first to go, relative to the condition's pull) while the
large-scale layout — what is where — survives and steers the denoiser: small s keeps
more of the content, s = 1 is plain generation.  Classifier-free guidance (Ho & Salimans
2022) contrasts the style condition with the unconditional model (empty prompt, no
style image), fused into every sampler step.

**Style image.**  `fastdiff.nn.style.StyleUNet` adds a learned embedding of the style
image to the pooled text embedding.  `StyleTrainer` fine-tunes it from the shipped text
model on `StylePairs`: each training image comes with a *style image* of the same colour
but another shape, size and position, so the only thing the style can tell the model
is the colour.  The captions vary (full; colour word removed; colour word alone), so the
colour must often come from the style image, and text and style are dropped
independently (CFG works over either).  With the text model (``tiny-shapes``) only the
style prompt is available.

**Editing examples.**  A denoiser trained only on consistent data learns to read the
colour off x_t wherever it can, and the style then matters only near pure noise: at the
strengths that keep the layout, SDEdit would keep the content's colour.  So a fraction of
the training examples (`EDIT_FRACTION`, t ≥ `EDIT_MIN_T`·T) are the SDEdit situation
itself: the noisy input is made from the same drawing in *another* colour, the target is
the image in the style's colour (`StyleTrainer.noised`).

Measured with ``scripts/style_quality.py`` (docs/applications.md): the rate at which the analyser reads
the content's shape and position and the style's colour from the result.

**Stable Diffusion folders** (``--checkpoint`` a diffusers folder: a style prompt, no style
image).  `img2img_tensors` runs diffusers' ``StableDiffusionImg2ImgPipeline``: the content
(any size whose sides are multiples of 64) is VAE-encoded (the posterior mean, scaled), noised
to the first of the last int(steps·strength) timesteps of the folder's ``steps``-step schedule
and denoised over those — ``steps`` counts the whole schedule, as diffusers'
``num_inference_steps``, so ``strength`` 0.5 of 20 steps runs 10.  fastdiff's own models
instead spend all ``steps`` on [0, t₀] with t₀ = round(strength·T) − 1 (`img2img_plan`).
"""
from __future__ import annotations

import functools
import os
import random
from pathlib import Path

import torch
from torch.utils.data import Dataset

from fastdiff import ops, samplers, schedule as schedules
from fastdiff.checks import check_int, check_number, check_out_file, check_seed, int_arg, number_arg
from fastdiff.data import COLOURS, JITTER, POSITIONS, SHAPES, SIZES, ShapesDataset, collate, render_shape
from fastdiff.data import fit_image, open_image, to_pil, to_tensor
from fastdiff.nn.style import StyleConfig, StyleUNet
from fastdiff.nn.unet import UNet, UNetConfig
from fastdiff.pipelines import DEFAULT_CHECKPOINT, PIPELINE_FILE, SAMPLERS, Pipeline, check_batching, counting
from fastdiff.pipelines import load_weights, make_plan, read_spec, resolve_seeds
from fastdiff.schedule import sigmas_at
from fastdiff.training import Trainer, pipeline_spec

STYLE_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "tiny-style"
MODEL_TYPE = "style_unet"  # ``pipeline.json``'s "model_type" for a StyleUNet; absent means a plain UNet

HELP = "restyle a content image by a style prompt and/or a style image (SDEdit + style conditioning)"


# ----------------------------------------------------------------------------- training data


def colourless(text: str) -> str:
    """A shapes caption without its colour word: "a small red circle …" → "a small circle …"."""
    words = text.split()
    return " ".join(w for w in words if w not in COLOURS)


def colour_word(text: str) -> str:
    """The colour word of a shapes caption ("" when it has none)."""
    return next((w for w in text.split() if w in COLOURS), "")


class StylePairs(Dataset):
    """`ShapesDataset` items plus ``style``: another shape in the same colour.

    The style image's shape, position and size are drawn different from the image's
    (size at random), so it carries the colour and nothing about the layout.  Item i
    is a pure function of (seed, i).
    """

    def __init__(self, resolution: int = 32, length: int = 100_000, seed: int = 0):
        self.shapes = ShapesDataset(resolution=resolution, length=length, seed=seed)
        self.skipped = self.shapes.skipped

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, i: int) -> dict:
        item = self.shapes[i]
        R = self.shapes.resolution
        rng = random.Random(self.shapes.seed * 1_000_003 + i + (1 << 40))  # a stream apart from the image's
        shape = rng.choice([s for s in SHAPES if s != item["shape"]])
        position = rng.choice([p for p in POSITIONS if p != item["position"]])
        size = rng.choice(list(SIZES))
        offset = (rng.uniform(-JITTER, JITTER), rng.uniform(-JITTER, JITTER))
        style = render_shape(item["colour"], shape, size, position, R, offset)
        # The same drawing in another colour: the "content" of an editing example (StyleTrainer).
        colour = rng.choice([c for c in COLOURS if c != item["colour"]])
        offset = self.shapes.attributes(i)["offset"]
        recoloured = render_shape(colour, item["shape"], item["size"], item["position"], R, offset)
        return {**item, "style": to_tensor(style), "recoloured": to_tensor(recoloured)}


# ----------------------------------------------------------------------------- trainer

CAPTION_MIX = (0.4, 0.4, 0.2)  # P(full caption), P(colour word removed), P(colour word alone)
STYLE_DROPOUT = 0.2  # P(train an example without its style image), independent of the text dropout
EDIT_FRACTION = 0.4  # P(an example with its style is an editing example: noisy input from another colour)
EDIT_MIN_T = 0.2  # editing examples draw t from [EDIT_MIN_T·T, T): below, σ is too small to hide the swap


class StyleTrainer(Trainer):
    """Fine-tunes a `StyleUNet` from a text model (``init``, default the shipped ``tiny-shapes``).

    ``fastdiff train --task style``.  Besides the hooks ``model_kwargs`` and ``noised``
    (editing examples) it overrides ``_batch`` (the style images and flags travel with
    the batch).  Per micro-batch, a generator seeded with (seed, micro-batch)
    picks each caption's variant (`CAPTION_MIX`), which style images are dropped
    (`STYLE_DROPOUT`) and which examples are editing ones (`EDIT_FRACTION`); timesteps
    and noise come from the base trainer's generator: a resumed run is as exact as the
    base trainer's.
    """

    SUPPORTS_DDP = False  # its noise is drawn for its own batch, not sliced by rank: one process
    DEFAULTS = dict(output_dir="runs/tiny-style", steps=1000, lr=1e-3, warmup_steps=50, checkpoint_every=100)

    def __init__(self, config, dataset, *, init: str | os.PathLike | None = DEFAULT_CHECKPOINT, **kwargs):
        self.init = Path(init) if init is not None else None
        self.style_config = StyleConfig()
        super().__init__(config, dataset, **kwargs)

    @classmethod
    def open_dataset(cls, spec: str | None, config) -> Dataset:
        if spec not in (None, "shapes"):
            raise ValueError(f"--task style trains on the synthetic shapes set only (--data shapes), got {spec!r}")
        return StylePairs(config.resolution, seed=config.seed)

    def build_model(self) -> torch.nn.Module:
        model = StyleUNet(self.unet_config, self.style_config)
        if self.init is not None:
            spec = read_spec(self.init)
            theirs = {**UNetConfig.from_dict(spec["unet"]).to_dict(), "gradient_checkpointing": False}
            if theirs != {**self.unet_config.to_dict(), "gradient_checkpointing": False}:
                raise ValueError(f"init checkpoint {str(self.init)!r} has another UNet shape than this run's")
            # Only the UNet's weights exist in the text model: the style encoder keeps its zero output.
            missing, unexpected = model.load_state_dict(load_weights(self.init), strict=False)
            if unexpected or any(not k.startswith("style_encoder.") for k in missing):
                raise ValueError(f"init checkpoint {str(self.init)!r} does not match the UNet")
        return model

    def _style_generator(self, micro: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.config.seed * 1_000_003 + micro + (1 << 40))

    def _batch(self, micro: int) -> dict:
        # The base collate keeps image and text only: stack the style images here, and
        # draw the caption variants and the style dropout from this micro-batch's generator.
        items = [self.dataset[i] for i in self._indices(micro)]
        batch = collate(items)
        good = [e for e in items if "skipped" not in e]
        g = self._style_generator(micro)
        variant = torch.rand(len(good), generator=g)
        keep = torch.rand(len(good), generator=g) >= STYLE_DROPOUT
        full, removed = CAPTION_MIX[0], CAPTION_MIX[0] + CAPTION_MIX[1]
        batch["text"] = [
            text if u < full else colourless(text) if u < removed else colour_word(text)
            for text, u in zip(batch["text"], variant.tolist())
        ]
        batch["style"] = torch.stack([e["style"] for e in good]) if good else torch.empty(0)
        batch["style_keep"] = keep.float()
        batch["edit"] = keep & (torch.rand(len(good), generator=g) < EDIT_FRACTION)
        batch["recoloured"] = torch.stack([e["recoloured"] for e in good]) if good else torch.empty(0)
        return batch

    def noised(self, x0, t, g, batch, rows):
        """The base trainer's forward process, where editing examples start from the recoloured image.

        For an editing example the noisy input is x_t = α·x_other + σ·ε (same shape, another
        colour) while the target is still the image's: written as x_t = α·x_0 + σ·ε* with
        ε* = ε + (α/σ)·(x_other − x_0), so the usual ``ops.training_target`` computes the
        target (v of (x_0, ε*)).  This is the SDEdit situation at sampling time — a noisy
        content of the wrong colour, and a style that says which — so the style learns to
        override the colour the input shows, not only to fill it in from pure noise.
        Editing examples draw t from [EDIT_MIN_T·T, T).
        """
        B, T = x0.shape[0], self.config.num_timesteps
        eps = torch.randn(x0.shape, generator=g).to(self.device)
        edit = batch["edit"].to(t.device)
        t_min = int(EDIT_MIN_T * T)
        t = torch.where(edit, t_min + t % (T - t_min), t)
        ab = self.alphas_cumprod[t].view(B, 1, 1, 1)
        shift = (ab.sqrt() / (1 - ab).sqrt()) * (batch["recoloured"].to(self.device) - x0)
        eps = eps + edit.to(self.device, x0.dtype).view(B, 1, 1, 1) * shift
        x_t, _, target = ops.training_target(x0, t, self.alphas_cumprod, eps, prediction=self.config.prediction)
        return x_t, t, target

    def model_kwargs(self, batch: dict, drop: list[bool]) -> dict:
        kwargs = super().model_kwargs(batch, drop)
        return {**kwargs, "style": batch["style"].to(self.device), "style_keep": batch["style_keep"].to(self.device)}

    def pipeline_spec(self) -> dict:
        return {
            **pipeline_spec(self.config, self.unet_config),
            "model_type": MODEL_TYPE,
            "style_encoder": self.style_config.to_dict(),
        }


# ----------------------------------------------------------------------------- pipeline


def build_model(spec: dict) -> UNet:
    """The network ``pipeline.json`` describes: a `StyleUNet` when its "model_type" says so, else a `UNet`."""
    kind = spec.get("model_type", "unet")
    config = UNetConfig.from_dict(spec["unet"])
    if kind == MODEL_TYPE:
        return StyleUNet(config, StyleConfig(**spec["style_encoder"]))
    if kind == "unet":
        return UNet(config)
    raise ValueError(f"unknown model_type {kind!r} in {PIPELINE_FILE} (expected 'unet' or {MODEL_TYPE!r})")


def img2img_plan(sampler: str, schedule: schedules.Schedule, strength: float, steps: int, prediction: str):
    """The sampler's plan over ``steps`` trailing timesteps of [0, t₀], t₀ = round(strength·T) − 1
    (`make_plan` with span = t₀ + 1; steps beyond the span's timesteps are dropped)."""
    check_strength(strength)
    span = max(1, round(strength * schedule.num_timesteps))  # t₀ + 1 timesteps to choose from
    return make_plan(sampler, schedule, min(check_int(steps, "steps", 1), span), prediction, span=span)


def check_strength(strength) -> None:
    check_number(strength, "strength", 0, 1, low_open=True)


class Stylizer(Pipeline):
    """A restyling pipeline: a `StyleUNet` (or a text-only `UNet`), its text encoder and schedule."""

    CHANNELS_LAST = False
    SHIPPED = STYLE_CHECKPOINT  # the model type (text-only or style-image) comes from its pipeline.json

    @property
    def model(self) -> UNet:
        """The network (``unet``): a `StyleUNet` takes a style image, a `UNet` only the prompt."""
        return self.unet

    @property
    def takes_style_image(self) -> bool:
        return isinstance(self.unet, StyleUNet)

    @classmethod
    def build_unet(cls, spec: dict, path: str | os.PathLike) -> UNet:
        return build_model(spec)

    def _check_images(self, name: str, x: torch.Tensor, n: int | None) -> torch.Tensor:
        R, C = self.resolution, self.unet.config.in_channels
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[1] != C or x.shape[2:] != (R, R):
            want = f"({C}, {R}, {R}) or (N, {C}, {R}, {R})"
            raise ValueError(f"{name} must be {want} for this model, got {tuple(x.shape)}")
        if n is not None and x.shape[0] not in (1, n):
            raise ValueError(f"{name} must be one image or one per content image ({n}), got {x.shape[0]}")
        return x.float().to(self.device)

    def _model_fn(self, texts: list[str], style: torch.Tensor | None, keep: torch.Tensor | None, bar=None):
        """The sampler's ``model(x, t)`` with the conditions bound; ticks ``bar`` once per evaluation."""
        context, pooled = self.prompts.encode(texts, self.device)
        extra = {"style": style, "style_keep": keep} if style is not None else {}
        return counting(self.denoiser(context, pooled, **extra), bar)

    @torch.no_grad()
    def stylize_tensors(
        self,
        content: torch.Tensor,
        *,
        style_image: torch.Tensor | None = None,
        style_prompt: str | list[str] | None = None,
        strength: float = 0.4,
        guidance_scale: float = 4.0,
        sampler: str = "dpmpp_2m",
        steps: int = 20,
        seeds: int | list[int] | None = 0,
        batch_size: int = 16,
        progress: bool = True,
        negative_prompt: str = "",
    ) -> torch.Tensor:
        """(N, C, R, R) restyled images in [−1, 1] (un-clamped).

        content: (N, C, R, R) or (C, R, R) in [−1, 1]; style_image: one image (broadcast) or
        one per content image; style_prompt: one string or one per content image.  At
        least one of the two styles must be given.  Image b depends on (inputs_b, seed_b) only.
        negative_prompt: the text of guidance's unconditional half (which never has a style image).
        """
        content = self._check_images("content", content, None)
        n = content.shape[0]
        if style_image is None and not style_prompt:
            raise ValueError("give a style: style_prompt and/or style_image")
        if style_image is not None:
            if not self.takes_style_image:
                raise ValueError("this checkpoint has no style-image conditioning (a text model): use style_prompt")
            style_image = self._check_images("style_image", style_image, n).expand(n, -1, -1, -1)
        one_prompt = style_prompt is None or isinstance(style_prompt, str)
        prompts = [style_prompt or ""] * n if one_prompt else list(style_prompt)
        if len(prompts) != n:
            raise ValueError(f"style_prompt must be a string or one per content image ({n}), got {len(prompts)}")
        check_batching(batch_size, guidance_scale)
        seed_list = resolve_seeds(seeds, n)
        plan = img2img_plan(sampler, self.schedule, strength, steps, self.prediction).to(self.device)
        acp = self.schedule.alphas_cumprod.to(self.device, torch.float32)

        def batch(sl: slice, bar) -> torch.Tensor:
            return self._batch(content[sl], style_image, sl, prompts[sl], seed_list[sl], plan, acp, guidance_scale,
                               bar, negative_prompt)  # fmt: skip

        # one tick per model evaluation: a single image shows its progress too
        desc = f"stylize {n} image(s) ({sampler}, from t={int(plan.timesteps[0])})"
        total = -(-n // batch_size) * len(plan)
        return self.in_batches(n, batch_size, batch, progress=progress, desc=desc, unit="step", total=total)

    def _batch(self, content, style_all, sl, prompts, seed_list, plan, acp, guidance_scale, bar, negative):
        B = content.shape[0]
        seeds = torch.tensor(seed_list, dtype=torch.int64, device=self.device)
        # SDEdit: x_t₀ = α_t₀·x_c + σ_t₀·ε, the noise keyed by each image's seed.
        eps = samplers.initial_noise(seeds, tuple(content.shape))
        t0 = plan.timesteps[:1].round().long().expand(B)
        x_t, _ = ops.q_sample(content.contiguous(), t0, acp, eps)
        guided = guidance_scale != 1.0
        style = style_all[sl] if style_all is not None else None
        texts, keep = prompts, None
        if style is not None:
            keep = torch.ones(B, device=self.device)
        if guided:  # the unconditional half first: the negative prompt, style dropped
            texts = [negative] * B + prompts
            if style is not None:
                style, keep = torch.cat([style, style]), torch.cat([torch.zeros_like(keep), keep])
        model = self._model_fn(texts, style, keep, bar)
        x = samplers.sample(model, x_t, seeds, plan, guidance_scale=guidance_scale if guided else None)
        return x.float()


# ----------------------------------------------------------------------------- Stable Diffusion folders


@torch.no_grad()
def img2img_tensors(
    pipe,
    content: torch.Tensor,
    prompts: str | list[str],
    *,
    negative_prompt: str | list[str] = "",
    strength: float = 0.4,
    guidance_scale: float = 4.0,
    sampler: str | None = None,
    steps: int = 20,
    seeds: int | list[int] | None = 0,
    batch_size: int = 16,
    progress: bool = True,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Image-to-image on a Stable Diffusion folder's pipeline (`fastdiff.sd.StableDiffusion`), as
    diffusers' ``StableDiffusionImg2ImgPipeline`` (module docstring): content (N, 3, H, W) or
    (3, H, W) in [−1, 1], sides multiples of ``pipe.size_multiple`` → (N, 3, H, W) in [−1, 1] (un-clamped).

    prompts, negative_prompt: one string or one per image.  sampler: None for the folder's
    scheduler's.  noise: ε (N, 4, H/8, W/8) added to the content's latents, instead of the draw
    from ``seeds`` (which also key the noise of stochastic samplers).
    """
    if not getattr(pipe, "latent", False):
        raise TypeError("img2img_tensors runs a Stable Diffusion folder's pipeline; fastdiff's own models restyle "
                        "through Stylizer")  # fmt: skip
    content = content[None] if content.ndim == 3 else content
    n, k = content.shape[0], pipe.size_multiple
    if content.ndim != 4 or content.shape[1] != 3 or any(d < 1 or d % k for d in content.shape[2:]):
        raise ValueError(f"content must be (N, 3, H, W) with H and W multiples of {k}, got {tuple(content.shape)}")
    prompts = [prompts] * n if isinstance(prompts, str) else list(prompts)
    negatives = [negative_prompt] * n if isinstance(negative_prompt, str) else list(negative_prompt)
    if len(prompts) != n or len(negatives) != n:
        raise ValueError(f"prompts and negative_prompt must be a string or one per image ({n})")
    check_batching(batch_size, guidance_scale)
    seed_list = resolve_seeds(seeds, n)
    run = pipe.img2img_sampling(sampler, steps, strength)
    # SDEdit (Meng et al. 2022): x_t₀ = α_t₀·z + σ_t₀·ε at the plan's first timestep
    s0 = float(sigmas_at(run.plan.timesteps[:1].cpu(), pipe.schedule)[0])
    alpha, sigma = samplers.vp_alpha_sigma(s0)
    guided = pipe.guides(guidance_scale)

    def batch(sl: slice, bar) -> torch.Tensor:
        seeds_t = torch.tensor(seed_list[sl], dtype=torch.int64, device=pipe.device)
        z = pipe.encode(content[sl].to(pipe.device))
        eps = samplers.initial_noise(seeds_t, tuple(z.shape)) if noise is None else noise[sl].to(z.device, z.dtype)
        conditioning = pipe.encode_prompt(prompts[sl], negatives[sl], guided)
        x = pipe.denoise(alpha * z + sigma * eps, seeds_t, conditioning, run, guidance_scale if guided else None)
        return pipe.decode(x).float().cpu()

    desc = f"img2img ({len(run.plan)} of {steps} steps)"
    return pipe.in_batches(n, batch_size, batch, progress=progress, desc=desc)


def _folder_content(name: str, image, multiple: int) -> torch.Tensor:
    """A path / PIL image / tensor → (3, H, W) for a Stable Diffusion folder, sides multiples of ``multiple``."""
    x = image if torch.is_tensor(image) else to_tensor(open_image(image, name))
    if x.ndim != 3 or x.shape[0] != 3 or x.shape[1] % multiple or x.shape[2] % multiple:
        size = f"{x.shape[-1]}×{x.shape[-2]}" if x.ndim == 3 else str(tuple(x.shape))
        raise ValueError(f"{name} is {size}; on this folder an image's sides must be multiples of {multiple}")
    return x


# ----------------------------------------------------------------------------- one call


def _as_tensor(name: str, image, resolution: int | None, resize: bool) -> torch.Tensor:
    """A path / PIL image / tensor → (3, R, R) tensor; a file that is missing or not an image names ``name``.

    ``resize``: a file is fitted (shorter side to R, centre crop), a PIL image squeezed to R×R.
    """
    if torch.is_tensor(image):
        return image
    from_file = isinstance(image, (str, os.PathLike))
    image = open_image(image, name)
    if resize:
        image = fit_image(image, resolution) if from_file else image.resize((resolution, resolution))
    if resolution is not None and image.size != (resolution, resolution):
        got = f"{image.size[0]}×{image.size[1]}"
        raise ValueError(f"{name} must be {resolution}×{resolution} pixels for this model, got {got}")
    return to_tensor(image)


@functools.lru_cache(maxsize=2)
def _cached_stylizer(checkpoint: str, device: str | None, dtype: str | None = None) -> Stylizer:
    """Loading costs seconds (the text encoder): `stylize` reuses a pipeline per (checkpoint, device, dtype)."""
    return Stylizer.from_pretrained(checkpoint, device, dtype=dtype)


def stylize(
    content,
    *,
    style_image=None,
    style_prompt: str | None = None,
    strength: float = 0.4,
    checkpoint: str | os.PathLike = STYLE_CHECKPOINT,
    guidance_scale: float = 4.0,
    sampler: str | None = None,
    steps: int = 20,
    seed: int = 0,
    device: str | None = None,
    dtype: str | None = None,
    negative_prompt: str = "",
    progress: bool = True,
):
    """Restyle one content image (path, PIL image or (3, R, R) tensor); returns a PIL image.

    The content must be R×R (the model's resolution: its layout is kept pixel for
    pixel); a style image is resized to R×R.  ``checkpoint`` may be a diffusers Stable
    Diffusion folder: then only ``style_prompt``, and any content size whose sides are
    multiples of 64 (`img2img_tensors`).  See the module docstring for the method.
    """
    from fastdiff.pipelines import cached_pipeline
    from fastdiff.sd import StableDiffusion, is_diffusers_folder

    check_strength(strength)
    check_batching(1, guidance_scale)
    check_seed(seed, "seed")
    if style_image is None and not style_prompt:
        raise ValueError("give a style: style_prompt and/or style_image")
    if is_diffusers_folder(checkpoint):
        if style_image is not None:
            raise ValueError("style_image: a Stable Diffusion folder has no style-image conditioning; use style_prompt")
        x = _folder_content("content", content, StableDiffusion.image_multiple(checkpoint))
        pipe = cached_pipeline(checkpoint, device, dtype)
        out = img2img_tensors(
            pipe, x, style_prompt, negative_prompt=negative_prompt, strength=strength, guidance_scale=guidance_scale,
            sampler=sampler, steps=steps, seeds=[seed], progress=progress,
        )  # fmt: skip
        return to_pil(out[0])
    R = read_spec(checkpoint)["resolution"]
    x = _as_tensor("content", content, R, resize=False)
    s = _as_tensor("style_image", style_image, R, resize=True) if style_image is not None else None
    pipe = _cached_stylizer(str(Path(checkpoint).resolve()), device, dtype)
    out = pipe.stylize_tensors(
        x, style_image=s, style_prompt=style_prompt, strength=strength, guidance_scale=guidance_scale,
        sampler=sampler or "dpmpp_2m", steps=steps, seeds=[seed], progress=progress, negative_prompt=negative_prompt,
    )  # fmt: skip
    return to_pil(out[0])


# ----------------------------------------------------------------------------- command line


def add_arguments(parser) -> None:
    from fastdiff.bulk import add_dtype_argument

    parser.add_argument("--content", required=True,
                        help="content image, R×R (the model's resolution: 32 here); on a Stable Diffusion folder "
                             "any size with sides multiples of 64")  # fmt: skip
    parser.add_argument("--style-image", help="style image (any size; resized); needs a style-conditioned checkpoint")
    parser.add_argument("--style-prompt", help='style as text, e.g. "red"')
    parser.add_argument("--negative-prompt", default="", help="the unconditional side of guidance (default: empty)")
    parser.add_argument("--strength", type=number_arg(0, 1, low_open=True), default=0.4,
                        help="noise level to start from, (0, 1] (%(default)s)")  # fmt: skip
    parser.add_argument("--out", default="stylized.png", help="output PNG (default: %(default)s)")
    parser.add_argument("--checkpoint", default=str(STYLE_CHECKPOINT),
                        help="pipeline folder (default: tiny-style), or a diffusers Stable Diffusion folder")
    add_dtype_argument(parser)
    parser.add_argument("--guidance", type=number_arg(), default=4.0, help="classifier-free guidance (1 disables)")
    parser.add_argument("--sampler", choices=SAMPLERS,
                        help="(default: dpmpp_2m, or a Stable Diffusion folder's scheduler's)")  # fmt: skip
    parser.add_argument("--steps", type=int_arg(1), default=20,
                        help="sampler steps from the start level to 0; on a Stable Diffusion folder the whole "
                             "schedule's, of which the last int(steps·strength) run (%(default)s)")  # fmt: skip
    parser.add_argument("--seed", type=int_arg(0), default=0, help="seed of the noise (default: %(default)s)")


def run(args) -> int:
    # Every check that needs no model comes first: a bad argument fails in milliseconds.
    if not args.style_image and not args.style_prompt:
        raise ValueError("give --style-image and/or --style-prompt")
    check_seed(args.seed, "--seed")
    out = check_out_file(args.out, "--out")
    from PIL import Image

    from fastdiff.sd import is_diffusers_folder

    if out.suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"--out must end in an image file extension such as .png, got {args.out!r}")
    if is_diffusers_folder(args.checkpoint):
        x = _stylize_folder(args)
    else:
        x = _stylize_fastdiff(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    to_pil(x[0]).save(out)
    print(f"wrote {out}")
    return 0


def _stylize_folder(args) -> torch.Tensor:
    from fastdiff.pipelines import cached_pipeline
    from fastdiff.sd import StableDiffusion, img2img_steps

    if args.style_image:
        raise ValueError("--style-image: a Stable Diffusion folder has no style-image conditioning; use --style-prompt")
    img2img_steps(args.steps, args.strength)
    content = _folder_content("--content", args.content, StableDiffusion.image_multiple(args.checkpoint))
    pipe = cached_pipeline(args.checkpoint, args.device, args.dtype)
    return img2img_tensors(
        pipe, content, args.style_prompt, negative_prompt=args.negative_prompt, strength=args.strength,
        guidance_scale=args.guidance, sampler=args.sampler, steps=args.steps, seeds=[args.seed],
    )  # fmt: skip


def _stylize_fastdiff(args) -> torch.Tensor:
    spec = read_spec(args.checkpoint)
    if args.style_image and spec.get("model_type") != MODEL_TYPE:
        raise ValueError(f"--checkpoint {args.checkpoint!r} is a text model without style-image conditioning")
    content = _as_tensor("--content", args.content, spec["resolution"], resize=False)
    style = _as_tensor("--style-image", args.style_image, spec["resolution"], resize=True) if args.style_image else None
    pipe = Stylizer.from_pretrained(args.checkpoint, args.device, dtype=args.dtype)
    return pipe.stylize_tensors(
        content, style_image=style, style_prompt=args.style_prompt, strength=args.strength,
        guidance_scale=args.guidance, sampler=args.sampler or "dpmpp_2m", steps=args.steps, seeds=[args.seed],
        negative_prompt=args.negative_prompt,
    )  # fmt: skip
