"""`StableDiffusion`: a diffusers Stable Diffusion 1.x/2.x (or SDXL) folder, run on fastdiff's own networks.

    pipe = Text2Image.from_pretrained("path/to/stable-diffusion-v1-5")   # fastdiff.pipelines.Text2Image
    images = pipe(["an astronaut riding a horse"], guidance_scale=7.5, steps=25, seeds=[0])

Latent diffusion (Rombach et al. 2022): the CLIP text encoder (transformers) gives the
context, fastdiff's `UNet` (weights converted from the folder's ``UNet2DConditionModel``)
denoises (B, 4, H/8, W/8) latents with the folder's schedule, prediction type and timestep
spacing, and fastdiff's `VAE` decodes z = latents / scaling_factor to the image.  The
GroupNorm(+SiLU), attention and sampler-step kernels run in all three hot loops.

Precision: the UNet and the VAE hold fp16 weights on CUDA (``dtype=`` chooses), the CLIP
text encoder fp32.  The VAE decodes (and encodes) one image at a time, as diffusers'
``enable_vae_slicing()``: its activations at 512² are ~0.5 GB per image in fp16, and an
image's pixels do not depend on the batch it was decoded in.

An inpainting folder (``StableDiffusionInpaintPipeline``: a UNet with 9 input channels, the
latents, the mask and the masked image's latents) loads too; it samples through
`fastdiff.apps.inpaint` only (`inpainting`).

An SDXL folder (Podell et al. 2023; ``StableDiffusionXLPipeline``) loads as `StableDiffusionXL`:
two CLIP towers (`fastdiff.text.SDXLTextEncoder`), a UNet whose time embedding also reads the
pooled text and the image's size (``time_ids``), and a VAE kept in fp32 where its config says
``force_upcast`` and the weights would be fp16 (SDXL's VAE overflows fp16).
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch

from fastdiff.checks import check_int, check_number, resolve_device
from fastdiff.nn.unet import UNet, UNetConfig
from fastdiff.nn.vae import VAE
from fastdiff.pipelines import Sampling, Text2Image, resolve_dtype
from fastdiff.sd import convert
from fastdiff.sd.folder import find_weights, is_sdxl, load_component, read_files, read_json, read_model_index
from fastdiff.sd.scheduler import SchedulerConfig, read_scheduler_config, sampling

DECODE_SLICE = 1  # images per VAE call (see the module docstring)


class StableDiffusion(Text2Image):
    """Text-to-image on VAE latents: a `Text2Image` whose sample is decoded by ``vae``.

    ``scheduler``: the folder's `SchedulerConfig`: it sets the schedule, the prediction type,
    the timestep spacing of every sampler and the default sampler.  ``source_files``: every
    file the pipeline was read from (what a bulk manifest's ``checkpoint_sha256`` digests).
    """

    SHIPPED = None
    latent = True

    def __init__(
        self, unet: UNet, vae: VAE, text_encoder, spec: dict, scheduler: SchedulerConfig, prompt_cache=None,
        source_files: tuple[Path, ...] = (),
    ):  # fmt: skip
        super().__init__(unet, text_encoder, spec, prompt_cache)
        self.vae = vae.eval()
        self.scheduler = scheduler
        self.default_sampler = scheduler.sampler
        self.source_files = tuple(source_files)

    @property
    def inpainting(self) -> bool:
        """The UNet reads the mask and the masked image's latents besides the latents (9 input channels)."""
        return self.unet.config.in_channels == 2 * self.vae.config.latent_channels + 1

    @property
    def size_multiple(self) -> int:
        """An image's sides must be multiples of this: the VAE's downscale × the UNet's (8 × 8 for SD)."""
        return self.vae.config.downscale * self.unet.downscale

    @classmethod
    def build_unet(cls, spec: dict, path: str | os.PathLike) -> torch.nn.Module:
        raise ValueError(f"{str(path)!r} is not a Stable Diffusion folder (no model_index.json)")

    @classmethod
    def from_folder(
        cls, path: str | os.PathLike, device: str | torch.device | None = None, *, variant: str | None = None,
        text_encoder=None, dtype: str | torch.dtype | None = None,
    ) -> "StableDiffusion":  # fmt: skip
        """Load a local diffusers Stable Diffusion 1.x/2.x folder, or an SDXL one (as a `StableDiffusionXL`), offline.

        variant: which weights files to read — None for ``*.safetensors``, or the fp16
        variant when that is all there is; "fp16" (or another name) for that variant only.
        Weights are converted to fastdiff's layout and cast to ``dtype`` ("float32",
        "float16", "bfloat16"; None: float16 on CUDA, else float32) for the UNet and the VAE;
        the text encoder stays fp32.  text_encoder: a loaded encoder to use instead of the
        folder's (its width must be the UNet's context width).
        """
        root = Path(path)
        index = read_model_index(root)
        sdxl = is_sdxl(index)
        cls = StableDiffusionXL if sdxl else StableDiffusion
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, torch.float16 if device.type == "cuda" else torch.float32)
        scheduler = read_scheduler_config(root / "scheduler" / "scheduler_config.json")
        unet_config = _check_conditioning(root, sdxl, text_encoder is None)  # before gigabytes of weights
        unet, sample_size, unet_file = _load_unet(root, unet_config, variant)
        vae, vae_file = _load_vae(root, variant)
        latent = vae.config.latent_channels
        if unet.config.in_channels not in (latent, 2 * latent + 1) or unet.config.out_channels != latent:
            raise ValueError(
                f"{root / 'unet' / 'config.json'}: in_channels={unet.config.in_channels}, "
                f"out_channels={unet.config.out_channels}; with the VAE's {latent}-channel latents fastdiff reads "
                f"{latent} in and out, or {2 * latent + 1} in (an inpainting UNet)"
            )
        upcast = sdxl and read_json(root / "vae" / "config.json").get("force_upcast", True)  # diffusers' default
        vae_dtype = torch.float32 if upcast and dtype == torch.float16 else dtype
        unet, vae = cls.place_network(unet, device, dtype), cls.place_network(vae, device, vae_dtype)
        weights = [unet_file, vae_file]
        if text_encoder is None:
            text_encoder, text_files = _load_text_encoder(root, variant, sdxl)
            text_encoder = text_encoder.to(device)
            weights += text_files
        if text_encoder.dim != unet.config.context_dim:
            raise ValueError(
                f"{root / 'text_encoder' / 'config.json'}: {text_encoder.dim}-wide text tokens, "
                f"the UNet's cross-attention takes {unet.config.context_dim}"
            )
        if sdxl and text_encoder.pooled_dim != unet.config.pooled_dim:
            raise ValueError(
                f"{root / 'text_encoder_2' / 'config.json'}: a {text_encoder.pooled_dim}-wide pooled embedding, the "
                f"UNet's add_embedding takes {unet.config.pooled_dim} (and {unet.config.added_time_ids} time ids)"
            )
        spec = {
            "model_type": "stable-diffusion-xl" if sdxl else "stable-diffusion", "source": str(root),
            "schedule": scheduler.schedule_spec(), "prediction": scheduler.prediction,
            "resolution": sample_size * vae.config.downscale,
        }  # fmt: skip
        pipe = cls(unet, vae, text_encoder, spec, scheduler, source_files=read_files(root, weights, sdxl))
        if sdxl:
            pipe.zero_empty_negatives = bool(index.get("force_zeros_for_empty_prompt", True))
        return pipe

    @staticmethod
    def image_multiple(path: str | os.PathLike) -> int:
        """`size_multiple` of the folder ``path``, from its configs alone (before its weights load)."""
        root = Path(path)
        unet_file, vae_file = root / "unet" / "config.json", root / "vae" / "config.json"
        unet = convert.unet_config_from_diffusers(read_json(unet_file), unet_file)
        vae = convert.vae_config_from_diffusers(read_json(vae_file), vae_file)
        return vae.downscale * unet.downscale

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(4, H/8, W/8): the latent of one image at the folder's resolution."""
        f = self.vae.config.downscale
        return (self.vae.config.latent_channels, self.resolution // f, self.resolution // f)

    def sampling(self, sampler: str | None, steps: int) -> Sampling:
        """``sampler`` (None: the folder's scheduler's) over ``steps``, spaced as the folder's scheduler says."""
        return sampling(self.scheduler, self.schedule, sampler or self.default_sampler, steps)

    def img2img_sampling(self, sampler: str | None, steps: int, strength: float) -> Sampling:
        """Image-to-image as diffusers' ``StableDiffusionImg2ImgPipeline`` runs it: the last
        int(steps·strength) of the ``steps`` timesteps.  x_T is the caller's (the encoded image
        noised to the first of them), so the plan's ``noise_scale`` is 1."""
        check_int(steps, "steps", 1, self.scheduler.num_train_timesteps)
        skip = steps - img2img_steps(steps, strength)
        run = sampling(self.scheduler, self.schedule, sampler or self.default_sampler, steps, skip=skip)
        return replace(run, noise_scale=1.0)

    @staticmethod
    def guides(guidance_scale: float) -> bool:
        """diffusers' rule for its Stable Diffusion pipelines: guidance runs only above 1 (a scale ≤ 1 samples
        the conditional prediction alone, so SDXL-Turbo's 0 is unguided)."""
        return guidance_scale > 1.0

    @property
    def vae_dtype(self) -> torch.dtype:
        """The VAE's weights' dtype (fp32 where an SDXL VAE's ``force_upcast`` keeps it out of fp16)."""
        return next(self.vae.parameters()).dtype

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, 4, h, w) → images (B, 3, 8h, 8w) in about [−1, 1] (fp32), `DECODE_SLICE` images per call."""
        z = latents.float() / self.vae.config.scaling_factor
        return _sliced(lambda zi: self.vae.decode(zi.to(self.vae_dtype)).float(), z)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [−1, 1] → latents (B, 4, H/8, W/8) in fp32: the posterior mean, scaled."""
        mean = _sliced(lambda x: self.vae.encode(x.to(self.vae_dtype))[0].float(), images)
        return mean * self.vae.config.scaling_factor


class StableDiffusionXL(StableDiffusion):
    """An SDXL folder's pipeline: `StableDiffusion` with SDXL's conditioning.

    * text: `fastdiff.text.SDXLTextEncoder` (both towers' penultimate states; the second's pooled);
    * the empty negative prompt (the default) gives zero embeddings, token and pooled alike, where
      ``model_index.json`` says ``force_zeros_for_empty_prompt`` — what diffusers does for
      ``negative_prompt=None``;
    * time ids, per image: (H, W, 0, 0, H, W) — the original size equal to the target size, no
      crop, as diffusers' defaults — from the size of the latents being denoised.
    """

    zero_empty_negatives = True  # model_index.json's force_zeros_for_empty_prompt

    def encode_prompt(self, prompts: list[str], negatives: list[str], guided: bool):
        context, pooled = super().encode_prompt(prompts, negatives, guided)
        empty = [i for i, n in enumerate(negatives) if n == ""] if guided and self.zero_empty_negatives else []
        if empty:
            rows = torch.tensor(empty, device=context.device)
            context, pooled = context.index_fill(0, rows, 0.0), pooled.index_fill(0, rows, 0.0)
        return context, pooled

    def size_conditions(self, x: torch.Tensor) -> dict:
        """``time_ids`` (B, 6) int64 for latents ``x`` (B, 4, h, w): (H, W, 0, 0, H, W) with H, W = 8h, 8w.
        Made on x's device by fills alone, so a CUDA graph can capture it."""
        f = self.vae.config.downscale
        ids = x.new_zeros((x.shape[0], 3, 2), dtype=torch.int64)  # rows: original size, crop corner, target size
        ids[:, 0::2, 0] = x.shape[-2] * f
        ids[:, 0::2, 1] = x.shape[-1] * f
        return {"time_ids": ids.view(x.shape[0], 6)}


def img2img_steps(steps: int, strength: float) -> int:
    """How many of ``steps`` an image-to-image run of ``strength`` runs: int(steps·strength), diffusers'
    ``init_timestep`` in the same float arithmetic; a setting that runs none is refused."""
    check_int(steps, "steps", 1)
    check_number(strength, "strength", 0, 1, low_open=True)
    count = int(steps * strength)
    if count < 1:
        raise ValueError(f"strength {strength} of {steps} steps runs int({steps}·{strength}) = 0 steps; "
                         "raise the strength or the steps")  # fmt: skip
    return count


def _sliced(fn, x: torch.Tensor) -> torch.Tensor:
    """``fn`` over ``x`` in slices of `DECODE_SLICE` images, concatenated."""
    return torch.cat([fn(x[i : i + DECODE_SLICE]) for i in range(0, x.shape[0], DECODE_SLICE)])


def _check_conditioning(root: Path, sdxl: bool, folder_text: bool) -> UNetConfig:
    """The folder's UNet config, converted, once its added conditioning is found to fit the folder:
    SDXL's text_time embedding in an SDXL folder only, its inputs the second text tower's projection and
    `convert.SDXL_TIME_IDS` time ids (``folder_text``: the folder's towers are the ones used).  The SDXL
    refiner's UNet (5 ids) is refused here."""
    file = root / "unet" / "config.json"
    unet = convert.unet_config_from_diffusers(read_json(file), file)
    if bool(unet.added_time_ids) != sdxl:
        wrong = "an SDXL folder needs addition_embed_type 'text_time'"
        raise ValueError(f"{file}: {wrong if sdxl else 'an SDXL UNet in an SD 1.x/2.x folder'}")
    if sdxl and folder_text:
        projection = read_json(root / "text_encoder_2" / "config.json").get("projection_dim")
        if projection != unet.pooled_dim:
            ids, width = unet.added_time_ids, unet.added_time_dim
            raise ValueError(
                f"{file}: projection_class_embeddings_input_dim={unet.pooled_dim + ids * width} is not "
                f"text_encoder_2's projection_dim ({projection}) + {ids} time ids × addition_time_embed_dim ({width})"
            )
    return unet


def _load_unet(root: Path, unet_config: UNetConfig, variant: str | None) -> tuple[UNet, int, Path]:
    """fastdiff's UNet of ``unet_config`` (the folder's, converted) with the folder's weights, the latent
    size it was trained at, and the weights file."""
    config, state, file = load_component(root, "unet", variant)
    with torch.device("meta"):  # no random initialisation: every tensor comes from the file
        unet = UNet(unet_config)
    unet.load_state_dict(convert.unet_from_diffusers(state, unet, str(file)), assign=True)
    size = config.get("sample_size") or 64
    return unet, size if isinstance(size, int) else size[0], file


def _load_vae(root: Path, variant: str | None) -> tuple[VAE, Path]:
    config, state, file = load_component(root, "vae", variant)
    with torch.device("meta"):
        vae = VAE(convert.vae_config_from_diffusers(config, root / "vae" / "config.json"))
    vae.load_state_dict(convert.vae_from_diffusers(state, vae, str(file)), assign=True)
    return vae, file


def _load_text_encoder(root: Path, variant: str | None, sdxl: bool = False):
    """The folder's CLIP text encoder(s) and tokenizer(s) (transformers), from safetensors only, and
    their weights files: one pair, or SDXL's two."""
    from fastdiff.text import CLIPTextEncoder, SDXLTextEncoder

    files, variants = [], []
    for suffix in ("", "_2") if sdxl else ("",):
        folder = root / f"text_encoder{suffix}"
        read_json(folder / "config.json")
        file, chosen = find_weights(folder, "model", variant)
        files.append(file)
        variants.append(chosen)
        tokenizer = root / f"tokenizer{suffix}"
        if not (tokenizer / "tokenizer.json").is_file() and not (tokenizer / "vocab.json").is_file():
            raise FileNotFoundError(f"{tokenizer}: no tokenizer.json or vocab.json")
    if sdxl:
        return SDXLTextEncoder.from_diffusers_folder(root, variants=tuple(variants)), files
    return CLIPTextEncoder.from_diffusers_folder(root, variant=variants[0]), files
