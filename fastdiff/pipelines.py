"""Text-to-image: `Text2Image` (a pipeline object) and `generate` (one call).

    images = fastdiff.generate(["a large red circle in the center"], seeds=[0])

The pipeline encodes the prompts (cached), draws x_T per image from its seed
(`samplers.initial_noise`), and runs one of the samplers of `fastdiff.samplers` with
classifier-free guidance (Ho & Salimans 2022) fused into every step:

    ô = ô_uncond + w·(ô_cond − ô_uncond)        (inside ops.sampler_step)

where "uncond" is the negative prompt (the empty prompt by default).  Image b is a
function of (prompt_b, seed_b) only: the same seed gives the same image in any batch.

A pipeline folder holds ``pipeline.json`` (UNet config, text encoder, schedule,
prediction, resolution) and ``model.safetensors`` — or, for a training checkpoint,
``ema.safetensors``, which is used instead.  A diffusers Stable Diffusion folder
(``model_index.json``) loads as a `fastdiff.sd.StableDiffusion`, a Text2Image on latents.

Generating is three public steps, which applications compose:
`Text2Image.encode_prompt` (text → cross-attention context), `Text2Image.denoise`
(the sampling loop from x_T) and `Text2Image.decode` (sample → image: the identity for
pixel models, the VAE decoder for latent ones; `Text2Image.encode` goes the other way).
`DenoiseLoop` is `denoise` at fixed settings as one call per batch, captured in a CUDA
graph on a GPU (`Text2Image.denoise_loop`; bulk generation replays it batch after batch).

Precision (``dtype=``): the networks' weights are fp32 (on CUDA under bf16 autocast) unless
asked otherwise; a Stable Diffusion folder loads in fp16 on CUDA.  The samplers' state and
arithmetic stay fp32 whatever the weights.
"""
from __future__ import annotations

import functools
import json
import math
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from fastdiff import samplers, schedule as schedules
from fastdiff.checks import MAX_BATCH, check_fits_in_memory, check_int, check_number, check_out_dir, resolve_device
from fastdiff.checks import SEED_LIMIT, check_seed
from fastdiff.data import to_pil
from fastdiff.durable import fsync_path, write_atomic
from fastdiff.nn.unet import UNet, UNetConfig

SAMPLERS = ("ddpm", "ddim", "euler", "euler_a", "dpmpp_2m", "heun")
OUTPUT_TYPES = ("pil", "np", "pt")
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "tiny-shapes"
PIPELINE_FILE = "pipeline.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

_PLANS = {
    "ddpm": (samplers.ddpm_plan, True),
    "ddim": (samplers.ddim_plan, True),
    "euler": (samplers.euler_plan, False),
    "euler_a": (samplers.euler_ancestral_plan, False),
    "dpmpp_2m": (samplers.dpmpp_2m_plan, True),
    "heun": (samplers.heun_plan, False),
}


def make_plan(
    name: str, schedule: schedules.Schedule, steps: int, prediction: str, *, span: int | None = None
) -> samplers.Plan:
    """The sampler's plan over ``steps`` "trailing" timesteps of [0, span − 1] (Lin et al. 2023).

    The timesteps start at t₀ = span − 1 and are spaced span/steps apart down to 0
    (`schedule.timesteps`, or `schedule.continuous_timesteps` for the σ-space samplers).
    span: how many of the schedule's T timesteps the plan may use, from t = 0; None is all
    T (text to image, from pure noise); image-to-image (SDEdit) starts lower, at
    span ≈ strength·T.  steps must lie in [1, span].
    """
    if name not in _PLANS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {name!r}")
    fn, integer = _PLANS[name]
    T = schedule.num_timesteps
    span = T if span is None else check_int(span, "span", 1, T)
    check_int(steps, "steps", 1, span)
    spacing = schedules.timesteps if integer else schedules.continuous_timesteps
    return fn(schedule, spacing(steps, span, "trailing"), prediction=prediction)


@dataclass(frozen=True)
class Sampling:
    """A sampler setting made concrete for one pipeline: what `Text2Image.denoise` runs."""

    plan: samplers.Plan  # the unrolled sampler
    noise_scale: float = 1.0  # x_T = noise_scale·(N(0, I) draw or given latents), in the VP state
    clip_x0: float | None = None  # clamp x̂0 to [−clip_x0, clip_x0] at every step (None: no clipping)

    def start(self, noise: torch.Tensor) -> torch.Tensor:
        """x_T from an N(0, I) draw (or given latents): scaled by ``noise_scale``."""
        return noise * self.noise_scale if self.noise_scale != 1.0 else noise


def resolve_dtype(dtype, default: torch.dtype, name: str = "dtype") -> torch.dtype:
    """The weights' dtype: a torch dtype or its name in `DTYPES` ("float16", ...); None gives ``default``."""
    if dtype is None:
        return default
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    raise ValueError(f"{name} must be one of {', '.join(DTYPES)}, got {dtype!r}")


def dtype_name(dtype: torch.dtype) -> str:
    """How manifests and messages spell a dtype: "float16" for torch.float16."""
    return str(dtype).removeprefix("torch.")


def check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")


def to_output(x: torch.Tensor, output_type: str):
    """Images (N, 3, H, W) in [−1, 1] as ``output_type``: "pil" a list of PIL images, "np" a
    (N, H, W, 3) float32 array in [0, 1] (diffusers' "np"), "pt" the tensor itself."""
    check_output_type(output_type)
    if output_type == "pil":
        return [to_pil(xi) for xi in x]
    if output_type == "np":
        return (x.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return x


def make_grid(images: list, cols: int | None = None, pad: int = 2):
    """Tile PIL images (all the same size) into one image, row-major."""
    from PIL import Image

    if not images:
        raise ValueError("images must not be empty")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
    for i, img in enumerate(images):
        grid.paste(img, (pad + (i % cols) * (w + pad), pad + (i // cols) * (h + pad)))
    return grid


def resolve_seeds(seeds, n: int) -> list[int]:
    """The per-image seeds of ``n`` images, each an int64 Philox key in [0, 2**63).

    ``seeds`` is a list of one int per image (kept as given), an int s (image i gets s + i),
    or None (a random 32-bit s from the OS, then s + i).  Image i's noise is a function of its
    seed alone (`samplers.initial_noise`, the sampler's per-step keys), so an image comes out
    the same in any batch.  A list of the wrong length or a seed out of range is refused.
    """
    if seeds is None:
        seeds = int.from_bytes(os.urandom(4), "little")
    if isinstance(seeds, int):
        check_seed(seeds, "seeds", n)
        return [seeds + i for i in range(n)]
    seeds = [int(s) for s in seeds]
    if len(seeds) != n:
        raise ValueError(f"seeds must be one int per image ({n}), got {len(seeds)}")
    bad = next((s for s in seeds if not 0 <= s < SEED_LIMIT), None)
    if bad is not None:
        raise ValueError(f"seeds must lie in [0, 2**63) (int64 Philox keys), got {bad}")
    return seeds


def check_batching(batch_size, guidance_scale) -> None:
    """The settings every generating call takes: raise naming the bad one, before any work.

    A NaN or infinite guidance scale is refused: it makes every image NaN (black once saved).
    """
    check_int(batch_size, "batch_size", 1, MAX_BATCH)
    check_number(guidance_scale, "guidance_scale")


# What one image held in memory costs at the least (a PIL image object and its pixels): the
# bound `check_images_fit` uses before a model says how large its images are.
MIN_IMAGE_BYTES = 1024


def check_images_fit(n: int, what: str, bytes_per_image: int = MIN_IMAGE_BYTES) -> None:
    """Refuse ``n`` images kept in memory at once (a call that returns them all) when they cannot fit."""
    hint = "fastdiff generate (fastdiff.bulk) writes any number of images as it goes"
    check_fits_in_memory(n * bytes_per_image, f"{what} ({n} images at once)", hint)


def image_bytes(channels: int, pixels: int) -> int:
    """Memory of one generated image until it is returned: fp32 samples, twice while batches are
    concatenated, one byte per value as a PIL image, and the image object itself."""
    return channels * pixels * (2 * 4 + 1) + MIN_IMAGE_BYTES


def progress_bar(enabled: bool, total: int, desc: str, unit: str):
    """A tqdm bar of ``total`` ``unit``s, or None when progress is off."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)


def counting(model, bar, per_call: int = 1):
    """``model(x, t)`` that advances ``bar`` by ``per_call`` per evaluation (``model`` itself without a bar)."""
    if bar is None:
        return model

    def counted(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = model(x, t)
        bar.update(per_call)
        return out

    return counted


class Pipeline:
    """What every pipeline holds: a network, its text encoder (with its prompt cache), the
    schedule, prediction and resolution of its ``pipeline.json``.  A subclass says which
    network a folder holds (`build_unet`) and what it does with it."""

    CHANNELS_LAST = True  # NHWC weights on CUDA (faster convolutions on tensor cores)
    SHIPPED: Path | None = None  # the checkpoint `from_pretrained()` loads when given no path

    def __init__(self, unet: UNet, text_encoder, spec: dict, prompt_cache=None):
        from fastdiff.text import PromptCache

        self.unet = unet.eval()
        self.text_encoder = text_encoder
        self.prompts = prompt_cache if prompt_cache is not None else PromptCache(text_encoder)
        self.spec = spec
        sch = spec["schedule"]
        self.schedule = schedules.make_schedule(
            sch["kind"], sch["num_timesteps"], beta_start=sch.get("beta_start"), beta_end=sch.get("beta_end"),
            zero_terminal_snr=sch.get("zero_terminal_snr", False),
        )  # fmt: skip
        self.prediction = spec["prediction"]
        self.resolution = spec["resolution"]
        self._graph_loops: dict[tuple, DenoiseLoop] = {}  # `Text2Image.denoise_loop`'s loops that hold CUDA graphs

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike | None = None, device: str | torch.device | None = None, text_encoder=None,
        dtype: str | torch.dtype | None = None,
    ):  # fmt: skip
        """Load a pipeline folder (or a training checkpoint: its EMA weights); no path: the shipped model.

        A diffusers Stable Diffusion folder loads as `fastdiff.sd.StableDiffusion` (an SDXL one as
        its subclass `StableDiffusionXL`), through `Text2Image` or `Pipeline` only: the other
        pipelines do not run one yet.  dtype: the networks' weights ("float32", "float16",
        "bfloat16"); None: float32, or float16 for a Stable Diffusion folder on CUDA.
        """
        from fastdiff import sd
        from fastdiff.text import load_text_encoder

        if path is None:
            if cls.SHIPPED is None:
                raise ValueError(f"{cls.__name__} has no shipped model: pass the path of a pipeline folder")
            path = cls.SHIPPED
        device = resolve_device(device)
        if sd.is_diffusers_folder(path):
            if not issubclass(sd.StableDiffusion, cls):
                raise ValueError(f"{str(path)!r} is a Stable Diffusion folder, which {cls.__name__} cannot run yet")
            return sd.StableDiffusion.from_folder(path, device, text_encoder=text_encoder, dtype=dtype)
        dtype = resolve_dtype(dtype, torch.float32)
        spec = read_spec(path)
        try:
            unet = cls.build_unet(spec, path)
        except (KeyError, TypeError, ValueError) as e:  # a config field missing, unknown or of the wrong kind
            raise ValueError(f"{Path(path) / PIPELINE_FILE}: {e}") from None
        load_matching(unet, path)
        unet = cls.place_network(unet, device, dtype)
        if text_encoder is None:
            text_encoder = load_text_encoder(spec["text_encoder"], device)
        return cls(unet, text_encoder, spec)

    @classmethod
    def place_network(
        cls, network: torch.nn.Module, device: torch.device, dtype: torch.dtype = torch.float32
    ) -> torch.nn.Module:
        """``network`` on ``device`` with ``dtype`` weights, channels_last on CUDA."""
        network = network.to(device=device, dtype=dtype)
        if device.type == "cuda" and cls.CHANNELS_LAST:
            network = network.to(memory_format=torch.channels_last)
        return network

    @classmethod
    def build_unet(cls, spec: dict, path: str | os.PathLike) -> torch.nn.Module:
        """The network ``spec`` (``pipeline.json`` of ``path``) describes, before its weights are loaded."""
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        """The UNet's weights' dtype."""
        return next(self.unet.parameters()).dtype

    def denoiser(self, context: torch.Tensor, pooled: torch.Tensor | None = None, *, channels=None, **conditions):
        """The sampler's ``model(x, t)`` with the conditioning bound; it returns fp32.

        channels (B′, c, h, w): concatenated to x's channels at every call (Stable Diffusion's
        inpainting UNet reads the mask and the masked image's latents there); under guidance
        B′ = 2B, like the context.  fp32 weights run under bf16 autocast on CUDA; half-precision
        weights get their inputs cast to their dtype.
        """
        dtype = self.dtype
        use_autocast = dtype == torch.float32 and self.device.type == "cuda"
        if dtype != torch.float32:
            context, pooled, channels = (None if c is None else c.to(dtype) for c in (context, pooled, channels))
            conditions = {k: v.to(dtype) if v.is_floating_point() else v for k, v in conditions.items()}

        def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            x = x.to(dtype) if channels is None else torch.cat([x.to(dtype), channels], dim=1)
            # No autocast weight cache: it lives for one call anyway, and a cast cached while a
            # CUDA graph is captured would be freed under the graph.
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_autocast, cache_enabled=False):
                return self.unet(x, t, context, pooled, **conditions, **self.size_conditions(x))

        return model

    def size_conditions(self, x: torch.Tensor) -> dict:
        """Inputs of the network that follow from the size of the sample ``x`` it is called on (SDXL's
        time ids); none here."""
        return {}


    def in_batches(
        self, n: int, batch_size: int, work, *, progress: bool, desc: str, unit: str = "img", total: int | None = None
    ) -> torch.Tensor:
        """``torch.cat([work(sl, bar) for sl in batches])``: items 0 … n − 1 in slices of ``batch_size``
        (the last one shorter), under one progress bar, closed when the loop ends, on error too.

        bar is a tqdm bar (`progress_bar`), or None when ``progress`` is off.  total None: the
        bar counts the n images and advances by each batch's size once ``work`` returns it;
        otherwise it counts ``total`` ``unit``s that ``work`` advances itself (`counting`:
        per model evaluation, so that one large batch shows its progress too).
        """
        bar = progress_bar(progress, n if total is None else total, desc, unit)
        out = []
        try:
            for start in range(0, n, batch_size):
                sl = slice(start, min(start + batch_size, n))
                out.append(work(sl, bar))
                if bar is not None and total is None:
                    bar.update(sl.stop - sl.start)
        finally:
            if bar is not None:
                bar.close()
        return torch.cat(out)


class Text2Image(Pipeline):
    """A text-to-image pipeline: a UNet, a text encoder (with its prompt cache) and a schedule."""

    SHIPPED = DEFAULT_CHECKPOINT
    default_sampler = "dpmpp_2m"  # what ``sampler=None`` runs
    inpainting = False  # a UNet that also reads a mask and a masked image (Stable Diffusion's 9-channel one)
    latent = False  # samples are latents of an autoencoder (`encode`, `decode`), not images

    @classmethod
    def build_unet(cls, spec: dict, path: str | os.PathLike) -> torch.nn.Module:
        """The network ``spec`` (``pipeline.json`` of ``path``) describes, before its weights are loaded."""
        kind = spec.get("model_type", "video_unet" if "video" in spec else "unet")
        if kind != "unet":
            raise ValueError(f"{str(path)!r} holds a {kind!r} model, not a text-to-image UNet")
        config = UNetConfig.from_dict(spec["unet"])
        if config.added_time_ids:
            raise ValueError("added_time_ids: only an SDXL folder's pipeline supplies time ids")
        return UNet(config)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one x_T: the image itself for a pixel model."""
        return (self.unet.config.in_channels, self.resolution, self.resolution)

    def sampling(self, sampler: str | None, steps: int) -> Sampling:
        """``sampler`` (None: `default_sampler`) over ``steps`` "trailing" timesteps (`make_plan`)."""
        return Sampling(make_plan(sampler or self.default_sampler, self.schedule, steps, self.prediction))

    def encode_prompt(self, prompts: list[str], negatives: list[str], guided: bool):
        """(context (B′, L, D), pooled (B′, P)) for one batch, from the prompt cache; guided, B′ = 2B
        with the negatives first (the unconditional half, as `samplers.sample` expects)."""
        return self.prompts.encode(negatives + prompts if guided else prompts, self.device)

    def denoise(
        self, x_T, seeds, conditioning, sampling: Sampling, guidance_scale: float | None, *, known=None, mask=None,
        channels=None,
    ) -> torch.Tensor:  # fmt: skip
        """The sampling loop: x_T (B, C, h, w) → the sample, with ``conditioning`` (`encode_prompt`'s
        pair) bound and ``guidance_scale`` None for an unguided run.  seeds (B,) int64: per-step noise.
        known, mask: the sampler's inpainting blend (in the sample's space); channels: see `denoiser`."""
        model = self.denoiser(*conditioning, channels=channels)
        return samplers.sample(
            model, sampling.start(x_T), seeds, sampling.plan, guidance_scale=guidance_scale, clip_x0=sampling.clip_x0,
            known=known, mask=mask,
        )  # fmt: skip

    @staticmethod
    def guides(guidance_scale: float) -> bool:
        """Whether ``guidance_scale`` runs classifier-free guidance: any scale but 1 (1 is the conditional
        prediction alone; 0 the unconditional one, < 0 and > 1 extrapolate)."""
        return guidance_scale != 1.0

    def denoise_loop(
        self, sampler: str | None, steps: int, guidance_scale: float, *, cuda_graph: bool | None = False
    ) -> "DenoiseLoop":
        """`denoise` with ``sampler`` (None: `default_sampler`) over ``steps`` and ``guidance_scale``
        (1: unguided) as a `DenoiseLoop`, checked here, before any batch.  Loops that capture CUDA
        graphs are kept on the pipeline: a later call with the same settings replays the same graphs."""
        check_number(guidance_scale, "guidance_scale")
        if self.inpainting:
            raise ValueError(
                f"{self.spec.get('source', 'this pipeline')}: its UNet is an inpainting UNet "
                f"({self.unet.config.in_channels} input channels); it generates only by inpainting (fastdiff inpaint)"
            )
        sampling = self.sampling(sampler, steps)
        key = (sampler or self.default_sampler, steps, float(guidance_scale), cuda_graph)
        if key in self._graph_loops:
            return self._graph_loops[key]
        scale = guidance_scale if self.guides(guidance_scale) else None
        loop = DenoiseLoop(self, sampling, scale, cuda_graph=cuda_graph)
        if loop.capture:
            self._graph_loops[key] = loop
        return loop

    def sample_batch(self, loop: "DenoiseLoop", prompts: list[str], negatives: list[str], seeds: list[int],
                     latents: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """One batch's sample through ``loop``: x_T drawn from ``seeds`` (or ``latents``), the prompts encoded."""
        seeds_t = torch.tensor(seeds, dtype=torch.int64, device=self.device)
        if latents is None:
            x_T = samplers.initial_noise(seeds_t, (len(seeds), *self.sample_shape))
        else:
            x_T = latents.to(self.device, torch.float32)
        return loop.run(x_T, seeds_t, self.encode_prompt(prompts, negatives, loop.guided))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Image (N, C, H, W) in [−1, 1] → sample: a pixel model's sample is the image."""
        return images

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Sample → image (N, C, H, W) in [−1, 1]: a pixel model's sample is the image."""
        return x

    def _check_latents(self, latents, n: int) -> None:
        C, multiple = self.sample_shape[0], self.unet.downscale
        if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
            raise TypeError(f"latents must be a float tensor, got {type(latents).__name__}")
        shape = tuple(latents.shape)
        if len(shape) != 4 or shape[:2] != (n, C) or any(d < 1 or d % multiple for d in shape[2:]):
            raise ValueError(
                f"latents must have shape ({n}, {C}, h, w) (one per prompt; h, w multiples of {multiple}), got {shape}"
            )

    @torch.no_grad()
    def generate_tensors(
        self,
        prompts: list[str],
        *,
        negative_prompt: str | list[str] = "",
        guidance_scale: float = 4.0,
        sampler: str | None = None,
        steps: int = 20,
        seeds: int | list[int] | None = None,
        batch_size: int = 16,
        progress: bool = True,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(N, C, H, W) fp32 images in [−1, 1] (un-clamped), one per prompt.

        sampler: one of `SAMPLERS`, None for the pipeline's `default_sampler`.  latents:
        the initial noise x_T (N, C, h, w) instead of the draw from ``seeds`` (which then
        only key the noise of stochastic samplers); scaled as `sampling` says, as
        diffusers scales its ``latents`` by the scheduler's ``init_noise_sigma``.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        n = len(prompts)
        if n == 0:
            raise ValueError("prompts must not be empty")
        c = self.unet.config
        check_images_fit(n, "prompts", image_bytes(c.in_channels, self.resolution**2))
        negatives = [negative_prompt] * n if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != n:
            raise ValueError(f"negative_prompt must be a string or one per prompt ({n}), got {len(negatives)}")
        check_batching(batch_size, guidance_scale)
        if latents is not None:
            self._check_latents(latents, n)
        seed_list = resolve_seeds(seeds, n)
        loop = self.denoise_loop(sampler, steps, guidance_scale)

        def batch(sl: slice, bar) -> torch.Tensor:
            given = None if latents is None else latents[sl]
            return self.decode(self.sample_batch(loop, prompts[sl], negatives[sl], seed_list[sl], given)).float()

        desc = f"sample ({sampler or self.default_sampler}, {steps} steps)"
        return self.in_batches(n, batch_size, batch, progress=progress, desc=desc)

    def __call__(self, prompts: list[str], *, output_type: str = "pil", **kwargs):
        """Images, one per prompt, as ``output_type`` (`to_output`: "pil", "np" or "pt");
        keyword arguments as `generate_tensors`."""
        check_output_type(output_type)
        return to_output(self.generate_tensors(prompts, **kwargs), output_type)


class DenoiseLoop:
    """`Text2Image.denoise` at fixed settings as one call per batch: ``run(x_T, seeds, conditioning)`` → the sample.

    The body is the pipeline's own `denoise` (every evaluation: the UNet on the CFG-doubled
    batch, then the fused sampler step), run on static input buffers, one set per input
    shape: ``run`` copies its inputs in, runs the body and returns a copy of its output.

    With capture (a CUDA pipeline), the first batch of a shape runs the body `WARMUP` times
    on a side stream (Triton compiles, cuBLAS and cuDNN choose their kernels, the allocator
    fills its pool), then captures one more run in a CUDA graph; later batches of that shape
    replay the graph: every kernel of every step launched at once, no host in the loop (the
    loop never synchronises: the plan's coefficients are on the device).  Without capture
    the body runs eagerly on the same buffers: that is the CPU path, everything but the capture.

    cuda_graph: True captures, and a capture that fails raises naming the switch that turns
    it off; None captures on CUDA, and a capture that fails warns once and runs eagerly from
    then on; False never captures.
    """

    WARMUP = 2

    def __init__(self, pipe: Text2Image, sampling: Sampling, guidance_scale: float | None, *,
                 cuda_graph: bool | None = False):  # fmt: skip
        on_cuda = pipe.device.type == "cuda"
        if cuda_graph and not on_cuda:
            raise ValueError(f"cuda_graph=True needs a pipeline on a CUDA device; this one is on {pipe.device}")
        self.pipe, self.guidance_scale = pipe, guidance_scale
        self.sampling = replace(sampling, plan=sampling.plan.to(pipe.device))  # on the device before any capture
        self.capture = on_cuda if cuda_graph is None else cuda_graph
        self.strict = cuda_graph is True
        self.shapes: dict[tuple, tuple] = {}  # input shapes → (static inputs, replay () -> output)

    @property
    def guided(self) -> bool:
        return self.guidance_scale is not None

    def run(self, x_T: torch.Tensor, seeds: torch.Tensor, conditioning: tuple) -> torch.Tensor:
        """The sample from x_T (B, C, h, w) with per-image ``seeds`` and `encode_prompt`'s ``conditioning``."""
        inputs = (x_T, seeds, *conditioning)
        key = tuple(None if a is None else (tuple(a.shape), a.dtype) for a in inputs)
        if key not in self.shapes:
            self.shapes[key] = self._prepare(inputs)
        static, replay = self.shapes[key]
        for buffer, a in zip(static, inputs):
            if buffer is not None:
                buffer.copy_(a)
        return replay().clone()  # a replay overwrites its output

    def _body(self, x_T, seeds, context, pooled=None) -> torch.Tensor:
        return self.pipe.denoise(x_T, seeds, (context, pooled), self.sampling, self.guidance_scale)

    def _prepare(self, inputs: tuple) -> tuple:
        static = tuple(None if a is None else a.to(self.pipe.device).clone() for a in inputs)
        if self.capture:
            try:
                return static, self._captured(static)
            except Exception as e:  # a kernel or op the graph cannot take
                why = " ".join(str(e).split())[:300]
                if self.strict:
                    raise RuntimeError(
                        f"capturing the denoising loop in a CUDA graph failed ({type(e).__name__}: {why}); "
                        "sample without graphs (--no-cuda-graphs, cuda_graph=False)"
                    ) from e
                warnings.warn(f"CUDA graph capture failed, sampling eagerly: {type(e).__name__}: {why}", stacklevel=3)
                self.capture = False
        return static, lambda: self._body(*static)

    def _captured(self, static: tuple):
        side = torch.cuda.Stream(self.pipe.device)
        side.wait_stream(torch.cuda.current_stream(self.pipe.device))
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP):
                self._body(*static)
        torch.cuda.current_stream(self.pipe.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._body(*static)

        def replay() -> torch.Tensor:
            graph.replay()
            return out

        return replay


def save_images(images: list, out_dir: str | os.PathLike, prompts: list[str] | None = None, cols: int | None = None):
    """Write ``000.png``, ``001.png``, … and ``grid.png`` into ``out_dir``; returns the grid's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        img.save(out / f"{i:03d}.png")
    if prompts is not None:
        (out / "prompts.txt").write_text("\n".join(f"{i:03d}.png\t{p}" for i, p in enumerate(prompts)) + "\n")
    grid = out / "grid.png"
    make_grid(images, cols).save(grid)
    return grid


def export_pipeline(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, dtype=torch.float16) -> Path:
    """Copy a training checkpoint's EMA weights (in ``dtype``) and ``pipeline.json`` into a pipeline folder."""
    from safetensors.torch import load_file, save_file

    checkpoint, out = Path(checkpoint), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = json.loads((checkpoint / PIPELINE_FILE).read_text())
    state = json.loads((checkpoint / "state.json").read_text())
    spec["trained"] = {"step": state["step"], "recipe": state["train_config"]}
    weights = {k: v.to(dtype).contiguous() for k, v in load_file(str(checkpoint / "ema.safetensors")).items()}
    tmp = out / ".model.safetensors.tmp"
    save_file(weights, str(tmp))
    fsync_path(tmp)
    os.replace(tmp, out / "model.safetensors")
    write_atomic(out / PIPELINE_FILE, (json.dumps(spec, indent=2) + "\n").encode())  # written last: a folder
    fsync_path(out)  # with a pipeline.json has its weights, after a crash too
    return out


# What every pipeline.json holds, and the JSON type of each entry.
SPEC_FIELDS = {"unet": dict, "text_encoder": str, "schedule": dict, "prediction": str, "resolution": int}


def read_spec(path: str | os.PathLike) -> dict:
    """``pipeline.json`` of a pipeline or training-checkpoint folder (cheap: no weights).

    A file that is not a JSON object with `SPEC_FIELDS` is refused in one line naming it.
    """
    spec_file = Path(path) / PIPELINE_FILE
    if not spec_file.is_file():
        raise FileNotFoundError(f"--checkpoint {str(path)!r} is not a fastdiff pipeline or checkpoint (no {PIPELINE_FILE})")
    try:
        spec = json.loads(spec_file.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{spec_file}: not valid JSON ({e})") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{spec_file}: expected a JSON object, got {type(spec).__name__}")
    missing = [k for k in SPEC_FIELDS if k not in spec]
    if missing:
        raise ValueError(f"{spec_file}: missing {', '.join(missing)}")
    for key, kind in SPEC_FIELDS.items():
        if not isinstance(spec[key], kind) or isinstance(spec[key], bool):
            raise ValueError(f"{spec_file}: {key!r} must be a JSON {kind.__name__}, got {spec[key]!r}")
    schedule = spec["schedule"]
    if schedule.get("kind") not in schedules.SCHEDULES or not isinstance(schedule.get("num_timesteps"), int):
        want = f"a 'kind' in {schedules.SCHEDULES} and an integer 'num_timesteps'"
        raise ValueError(f"{spec_file}: 'schedule' needs {want}, got {schedule!r}")
    if spec["prediction"] not in samplers.PREDICTIONS:
        raise ValueError(f"{spec_file}: 'prediction' must be one of {samplers.PREDICTIONS}, got {spec['prediction']!r}")
    return spec


def weights_file(path: str | os.PathLike) -> Path:
    """The file a folder's weights come from: a training checkpoint's EMA average, else ``model.safetensors``."""
    path = Path(path)
    for name in ("ema.safetensors", "model.safetensors"):  # a checkpoint also holds the raw weights
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"no model.safetensors or ema.safetensors in --checkpoint {str(path)!r}")


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A folder's weights (`weights_file`) in fp32; a file safetensors cannot read is refused naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = weights_file(path)
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError) as e:  # empty, truncated, or not safetensors at all
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from None
    return {k: v.float() for k, v in state.items()}


def load_matching(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load a folder's weights into ``model``; weights of another shape than ``pipeline.json``'s model are
    refused in one line (instead of load_state_dict's list of every mismatched tensor)."""
    try:
        model.load_state_dict(load_weights(path))
    except RuntimeError as e:  # missing / unexpected keys, size mismatches
        detail = " ".join(line.strip() for line in str(e).strip().splitlines()[:3])
        raise ValueError(
            f"--checkpoint {str(path)!r}: the weights do not match {PIPELINE_FILE}'s model ({detail})"
        ) from None


def cached_pipeline(
    checkpoint: str | os.PathLike, device: str | None = None, dtype: str | None = None
) -> Text2Image:
    """``Text2Image.from_pretrained(checkpoint, device, dtype=dtype)``, loaded once per (folder, device, dtype)
    and reused: loading costs seconds (the text encoder).  The two most recent pipelines are kept."""
    return _load_cached(str(Path(checkpoint).resolve()), device, dtype)


@functools.lru_cache(maxsize=2)
def _load_cached(checkpoint: str, device: str | None, dtype: str | None) -> Text2Image:
    return Text2Image.from_pretrained(checkpoint, device, dtype=dtype)


def generate(
    prompts: str | list[str],
    *,
    checkpoint: str | os.PathLike = DEFAULT_CHECKPOINT,
    negative_prompt: str | list[str] = "",
    guidance_scale: float = 4.0,
    sampler: str | None = None,
    steps: int = 20,
    seeds: int | list[int] | None = None,
    batch_size: int = 16,
    device: str | None = None,
    dtype: str | None = None,
    output_type: str = "pil",
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
):
    """Text to images in one call, as ``output_type`` (`to_output`): PIL images ("pil"), a
    (N, H, W, 3) array in [0, 1] ("np") or a (N, C, H, W) tensor in [−1, 1] ("pt").

    The pipeline for (checkpoint, device, dtype) is loaded once and reused (dtype: see
    `Pipeline.from_pretrained`).  ``out_dir``: also save each image and a grid there.
    """
    check_output_type(output_type)
    if out_dir is not None:
        check_out_dir(out_dir, "out_dir")
    if isinstance(prompts, str):
        prompts = [prompts]
    resolve_dtype(dtype, torch.float32)  # a bad name is refused before a pipeline loads
    pipe = cached_pipeline(checkpoint, device, dtype)
    x = pipe.generate_tensors(
        prompts, negative_prompt=negative_prompt, guidance_scale=guidance_scale, sampler=sampler, steps=steps,
        seeds=seeds, batch_size=batch_size, progress=progress,
    )  # fmt: skip
    result = to_output(x, output_type)
    if out_dir is not None:
        save_images(result if output_type == "pil" else to_output(x, "pil"), out_dir, prompts)
    return result
