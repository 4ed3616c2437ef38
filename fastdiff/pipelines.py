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
``ema.safetensors``, which is used instead.
"""
from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path

import torch

from fastdiff import samplers, schedule as schedules
from fastdiff.data import to_pil
from fastdiff.nn.unet import UNet, UNetConfig

SAMPLERS = ("ddpm", "ddim", "euler", "euler_a", "dpmpp_2m", "heun")
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "tiny-shapes"
PIPELINE_FILE = "pipeline.json"

_PLANS = {
    "ddpm": (samplers.ddpm_plan, True),
    "ddim": (samplers.ddim_plan, True),
    "euler": (samplers.euler_plan, False),
    "euler_a": (samplers.euler_ancestral_plan, False),
    "dpmpp_2m": (samplers.dpmpp_2m_plan, True),
    "heun": (samplers.heun_plan, False),
}


def make_plan(name: str, schedule: schedules.Schedule, steps: int, prediction: str) -> samplers.Plan:
    """The sampler's plan over ``steps`` "trailing" timesteps (they start at t = T − 1; Lin et al. 2023)."""
    if name not in _PLANS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {name!r}")
    fn, integer = _PLANS[name]
    T = schedule.num_timesteps
    if not isinstance(steps, int) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an int in [1, {T}], got {steps!r}")
    ts = schedules.timesteps(steps, T, "trailing") if integer else schedules.continuous_timesteps(steps, T, "trailing")
    return fn(schedule, ts, prediction=prediction)


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


def _seeds(seeds, n: int) -> list[int]:
    if seeds is None:
        seeds = int.from_bytes(os.urandom(4), "little")
    if isinstance(seeds, int):
        return [seeds + i for i in range(n)]
    seeds = [int(s) for s in seeds]
    if len(seeds) != n:
        raise ValueError(f"seeds must be one int per image ({n}), got {len(seeds)}")
    return seeds


def check_batching(batch_size, guidance_scale) -> None:
    """The settings every generating call takes: raise naming the bad one, before any work."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
        raise TypeError(f"guidance_scale must be a number, got {type(guidance_scale).__name__}")


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
            sch["kind"], sch["num_timesteps"], zero_terminal_snr=sch.get("zero_terminal_snr", False)
        )
        self.prediction = spec["prediction"]
        self.resolution = spec["resolution"]

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike | None = None, device: str | torch.device | None = None, text_encoder=None
    ):
        """Load a pipeline folder (or a training checkpoint: its EMA weights); no path: the shipped model."""
        from fastdiff.text import load_text_encoder

        if path is None:
            if cls.SHIPPED is None:
                raise ValueError(f"{cls.__name__} has no shipped model: pass the path of a pipeline folder")
            path = cls.SHIPPED
        spec = read_spec(path)
        unet = cls.build_unet(spec, path)
        unet.load_state_dict(load_weights(path))
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        unet = unet.to(device)
        if device.type == "cuda" and cls.CHANNELS_LAST:
            unet = unet.to(memory_format=torch.channels_last)
        if text_encoder is None:
            text_encoder = load_text_encoder(spec["text_encoder"], device)
        return cls(unet, text_encoder, spec)

    @classmethod
    def build_unet(cls, spec: dict, path: str | os.PathLike) -> torch.nn.Module:
        """The network ``spec`` (``pipeline.json`` of ``path``) describes, before its weights are loaded."""
        raise NotImplementedError

    def _model(self, context: torch.Tensor, pooled: torch.Tensor, **conditions):
        """The sampler's ``model(x, t)`` with the conditioning bound (bf16 autocast on CUDA)."""
        use_bf16 = self.device.type == "cuda"

        def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_bf16):
                return self.unet(x, t, context, pooled, **conditions)

        return model


class Text2Image(Pipeline):
    """A text-to-image pipeline: a UNet, a text encoder (with its prompt cache) and a schedule."""

    SHIPPED = DEFAULT_CHECKPOINT

    @classmethod
    def build_unet(cls, spec: dict, path: str | os.PathLike) -> torch.nn.Module:
        """The network ``spec`` (``pipeline.json`` of ``path``) describes, before its weights are loaded."""
        kind = spec.get("model_type", "video_unet" if "video" in spec else "unet")
        if kind != "unet":
            raise ValueError(f"{str(path)!r} holds a {kind!r} model, not a text-to-image UNet")
        return UNet(UNetConfig.from_dict(spec["unet"]))

    def _text_model(self, prompts: list[str], negatives: list[str], guided: bool):
        """``model(x, t)`` with one batch's prompts bound; guided, the negatives come first (the unconditional half)."""
        return self._model(*self.prompts.encode(negatives + prompts if guided else prompts, self.device))

    @torch.no_grad()
    def generate_tensors(
        self,
        prompts: list[str],
        *,
        negative_prompt: str | list[str] = "",
        guidance_scale: float = 4.0,
        sampler: str = "dpmpp_2m",
        steps: int = 20,
        seeds: int | list[int] | None = None,
        batch_size: int = 16,
        progress: bool = True,
    ) -> torch.Tensor:
        """(N, C, R, R) fp32 samples in [−1, 1] (un-clamped), one per prompt."""
        if isinstance(prompts, str):
            prompts = [prompts]
        n = len(prompts)
        if n == 0:
            raise ValueError("prompts must not be empty")
        negatives = [negative_prompt] * n if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != n:
            raise ValueError(f"negative_prompt must be a string or one per prompt ({n}), got {len(negatives)}")
        check_batching(batch_size, guidance_scale)
        seed_list = _seeds(seeds, n)
        plan = make_plan(sampler, self.schedule, steps, self.prediction).to(self.device)
        guided = guidance_scale != 1.0
        c = self.unet.config
        shape = (c.in_channels, self.resolution, self.resolution)
        out = []
        bar = progress_bar(progress, n, f"sample ({sampler}, {steps} steps)", "img")
        for start in range(0, n, batch_size):
            sl = slice(start, start + batch_size)
            seeds_t = torch.tensor(seed_list[sl], dtype=torch.int64, device=self.device)
            x_T = samplers.initial_noise(seeds_t, (len(seeds_t), *shape))
            model = self._text_model(prompts[sl], negatives[sl], guided)
            x = samplers.sample(model, x_T, seeds_t, plan, guidance_scale=guidance_scale if guided else None)
            out.append(x.float())
            if bar is not None:
                bar.update(len(seeds_t))
        if bar is not None:
            bar.close()
        return torch.cat(out)

    def __call__(self, prompts: list[str], **kwargs) -> list:
        """PIL images, one per prompt; keyword arguments as `generate_tensors`."""
        return [to_pil(x) for x in self.generate_tensors(prompts, **kwargs)]


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
    os.replace(tmp, out / "model.safetensors")
    (out / PIPELINE_FILE).write_text(json.dumps(spec, indent=2) + "\n")
    return out


def read_spec(path: str | os.PathLike) -> dict:
    """``pipeline.json`` of a pipeline or training-checkpoint folder (cheap: no weights)."""
    spec_file = Path(path) / PIPELINE_FILE
    if not spec_file.is_file():
        raise FileNotFoundError(f"--checkpoint {str(path)!r} is not a fastdiff pipeline or checkpoint (no {PIPELINE_FILE})")
    return json.loads(spec_file.read_text())


def weights_file(path: str | os.PathLike) -> Path:
    """The file a folder's weights come from: a training checkpoint's EMA average, else ``model.safetensors``."""
    path = Path(path)
    for name in ("ema.safetensors", "model.safetensors"):  # a checkpoint also holds the raw weights
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"no model.safetensors or ema.safetensors in --checkpoint {str(path)!r}")


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A folder's weights (`weights_file`) in fp32."""
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(str(weights_file(path))).items()}


@functools.lru_cache(maxsize=2)
def _cached_pipeline(checkpoint: str, device: str | None) -> Text2Image:
    """Loading costs seconds (the text encoder): `generate` reuses a pipeline per (checkpoint, device)."""
    return Text2Image.from_pretrained(checkpoint, device)


def generate(
    prompts: str | list[str],
    *,
    checkpoint: str | os.PathLike = DEFAULT_CHECKPOINT,
    negative_prompt: str | list[str] = "",
    guidance_scale: float = 4.0,
    sampler: str = "dpmpp_2m",
    steps: int = 20,
    seeds: int | list[int] | None = None,
    batch_size: int = 16,
    device: str | None = None,
    output_type: str = "pil",
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
):
    """Text to images in one call: PIL images (``output_type="pil"``) or a (N, C, H, W) tensor in [−1, 1] ("pt").

    The pipeline for (checkpoint, device) is loaded once and reused.  ``out_dir``:
    also save each image and a grid there.
    """
    if output_type not in ("pil", "pt"):
        raise ValueError(f"output_type must be 'pil' or 'pt', got {output_type!r}")
    if isinstance(prompts, str):
        prompts = [prompts]
    pipe = _cached_pipeline(str(Path(checkpoint).resolve()), device)
    x = pipe.generate_tensors(
        prompts, negative_prompt=negative_prompt, guidance_scale=guidance_scale, sampler=sampler, steps=steps,
        seeds=seeds, batch_size=batch_size, progress=progress,
    )  # fmt: skip
    images = [to_pil(xi) for xi in x]
    if out_dir is not None:
        save_images(images, out_dir, prompts)
    return images if output_type == "pil" else x
