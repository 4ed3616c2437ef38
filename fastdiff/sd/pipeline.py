"""`StableDiffusion`: a diffusers Stable Diffusion 1.x/2.x folder, run on fastdiff's own networks.

    pipe = Text2Image.from_pretrained("path/to/stable-diffusion-v1-5")   # fastdiff.pipelines.Text2Image
    images = pipe(["an astronaut riding a horse"], guidance_scale=7.5, steps=25, seeds=[0])

Latent diffusion (Rombach et al. 2022): the CLIP text encoder (transformers) gives the
context, fastdiff's `UNet` (weights converted from the folder's ``UNet2DConditionModel``)
denoises (B, 4, H/8, W/8) latents with the folder's schedule, prediction type and timestep
spacing, and fastdiff's `VAE` decodes z = latents / scaling_factor to the image.  The
GroupNorm(+SiLU), attention and sampler-step kernels run in all three hot loops.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from fastdiff.checks import resolve_device
from fastdiff.nn.unet import UNet
from fastdiff.nn.vae import VAE
from fastdiff.pipelines import Sampling, Text2Image
from fastdiff.sd import convert
from fastdiff.sd.folder import find_weights, load_component, read_json, read_model_index
from fastdiff.sd.scheduler import SchedulerConfig, read_scheduler_config, sampling


class StableDiffusion(Text2Image):
    """Text-to-image on VAE latents: a `Text2Image` whose sample is decoded by ``vae``.

    ``scheduler``: the folder's `SchedulerConfig`: it sets the schedule, the prediction type,
    the timestep spacing of every sampler and the default sampler.
    """

    SHIPPED = None

    def __init__(self, unet: UNet, vae: VAE, text_encoder, spec: dict, scheduler: SchedulerConfig, prompt_cache=None):
        super().__init__(unet, text_encoder, spec, prompt_cache)
        self.vae = vae.eval()
        self.scheduler = scheduler
        self.default_sampler = scheduler.sampler

    @classmethod
    def build_unet(cls, spec: dict, path: str | os.PathLike) -> torch.nn.Module:
        raise ValueError(f"{str(path)!r} is not a Stable Diffusion folder (no model_index.json)")

    @classmethod
    def from_folder(
        cls, path: str | os.PathLike, device: str | torch.device | None = None, *, variant: str | None = None,
        text_encoder=None,
    ) -> "StableDiffusion":  # fmt: skip
        """Load a local diffusers Stable Diffusion 1.x/2.x folder, offline.

        variant: which weights files to read — None for ``*.safetensors``, or the fp16
        variant when that is all there is; "fp16" (or another name) for that variant only.
        Weights are converted to fastdiff's layout and kept in fp32.  text_encoder: a loaded
        encoder to use instead of the folder's (its width must be the UNet's context width).
        """
        root = Path(path)
        read_model_index(root)
        scheduler = read_scheduler_config(root / "scheduler" / "scheduler_config.json")
        unet, sample_size = _load_unet(root, variant)
        vae = _load_vae(root, variant)
        if unet.config.in_channels != vae.config.latent_channels:
            raise ValueError(
                f"{root / 'unet' / 'config.json'}: in_channels={unet.config.in_channels}, but the VAE's latents have "
                f"{vae.config.latent_channels} channels (inpainting UNets do not load yet)"
            )
        device = resolve_device(device)
        unet, vae = cls.place_network(unet, device), cls.place_network(vae, device)
        if text_encoder is None:
            text_encoder = _load_text_encoder(root, variant).to(device)
        if text_encoder.dim != unet.config.context_dim:
            raise ValueError(
                f"{root / 'text_encoder' / 'config.json'}: {text_encoder.dim}-wide text tokens, "
                f"the UNet's cross-attention takes {unet.config.context_dim}"
            )
        spec = {
            "model_type": "stable-diffusion", "source": str(root), "schedule": scheduler.schedule_spec(),
            "prediction": scheduler.prediction, "resolution": sample_size * vae.config.downscale,
        }  # fmt: skip
        return cls(unet, vae, text_encoder, spec, scheduler)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(4, H/8, W/8): the latent of one image at the folder's resolution."""
        f = self.vae.config.downscale
        return (self.vae.config.latent_channels, self.resolution // f, self.resolution // f)

    def sampling(self, sampler: str | None, steps: int) -> Sampling:
        """``sampler`` (None: the folder's scheduler's) over ``steps``, spaced as the folder's scheduler says."""
        return sampling(self.scheduler, self.schedule, sampler or self.default_sampler, steps)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, 4, h, w) → images (B, 3, 8h, 8w) in about [−1, 1] (fp32)."""
        return self.vae.decode(latents.float() / self.vae.config.scaling_factor)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [−1, 1] → latents (B, 4, H/8, W/8): the posterior mean, scaled."""
        mean, _ = self.vae.encode(images.float())
        return mean * self.vae.config.scaling_factor


def _load_unet(root: Path, variant: str | None) -> tuple[UNet, int]:
    """fastdiff's UNet with the folder's weights, and the latent size it was trained at."""
    config, state, file = load_component(root, "unet", variant)
    where = root / "unet" / "config.json"
    with torch.device("meta"):  # no random initialisation: every tensor comes from the file
        unet = UNet(convert.unet_config_from_diffusers(config, where))
    unet.load_state_dict(convert.unet_from_diffusers(state, unet, str(file)), assign=True)
    size = config.get("sample_size") or 64
    return unet, size if isinstance(size, int) else size[0]


def _load_vae(root: Path, variant: str | None) -> VAE:
    config, state, file = load_component(root, "vae", variant)
    with torch.device("meta"):
        vae = VAE(convert.vae_config_from_diffusers(config, root / "vae" / "config.json"))
    vae.load_state_dict(convert.vae_from_diffusers(state, vae, str(file)), assign=True)
    return vae


def _load_text_encoder(root: Path, variant: str | None):
    """The folder's CLIP text encoder and tokenizer (transformers), from safetensors only."""
    from fastdiff.text import CLIPTextEncoder

    folder = root / "text_encoder"
    read_json(folder / "config.json")
    _, variant = find_weights(folder, "model", variant)
    tokenizer = root / "tokenizer"
    if not (tokenizer / "tokenizer.json").is_file() and not (tokenizer / "vocab.json").is_file():
        raise FileNotFoundError(f"{tokenizer}: no tokenizer.json or vocab.json")
    return CLIPTextEncoder.from_diffusers_folder(root, variant=variant)
