"""Stable Diffusion (1.x, 2.x, SDXL) from a local diffusers folder, on fastdiff's own networks and kernels.

    from fastdiff.pipelines import Text2Image
    pipe = Text2Image.from_pretrained("path/to/stable-diffusion-v1-5")   # a `StableDiffusion`
    pipe = Text2Image.from_pretrained("path/to/sdxl-base-1.0")           # a `StableDiffusionXL`

* `folder` reads ``model_index.json``, the components' configs and their safetensors
  weights (pickle files are refused);
* `convert` maps diffusers' UNet and VAE configs and state dicts to fastdiff's (both ways
  for the UNet);
* `scheduler` turns ``scheduler_config.json`` into fastdiff's schedule, default sampler
  and the plan each sampler runs;
* `pipeline` holds `StableDiffusion` and `StableDiffusionXL`, the pipelines themselves.

See docs/stable-diffusion.md for what converts and what does not.
"""
from fastdiff.sd.convert import diffusers_name, unet_from_diffusers, unet_to_diffusers, vae_from_diffusers
from fastdiff.sd.folder import is_diffusers_folder
from fastdiff.sd.pipeline import StableDiffusion, StableDiffusionXL, img2img_steps
from fastdiff.sd.scheduler import SCHEDULERS, SchedulerConfig, read_scheduler_config

__all__ = [
    "SCHEDULERS",
    "SchedulerConfig",
    "StableDiffusion",
    "StableDiffusionXL",
    "diffusers_name",
    "img2img_steps",
    "is_diffusers_folder",
    "read_scheduler_config",
    "unet_from_diffusers",
    "unet_to_diffusers",
    "vae_from_diffusers",
]
