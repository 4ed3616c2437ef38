r"""Text-to-video: ``fastdiff video --prompt "a red circle moving right" --frames 16 --out clip.gif``.

The model is `fastdiff.nn.video.VideoUNet`: the shipped image UNet with temporal
attention over frames, fine-tuned from the ``tiny-shapes`` weights on synthetic
clips of one shape moving across the frame (`MovingShapesDataset`).  A clip is
sampled like an image — the project's samplers work on any (B, …) tensor — with one
seed per clip: x_T of shape (C, F, H, W) from the seed, drawn from the model's
clip noise prior (frames share a fraction ρ of the noise; see `fastdiff.nn.video`),
then the F frames are denoised jointly, with classifier-free guidance fused into every
step (Ho & Salimans 2022).  Stochastic samplers (ddpm, euler_a) add independent
noise per frame in their steps; the default DPM-Solver++(2M) adds none.

The clips (32×32, 16 frames): a shape (colour × shape × size of the shapes set)
travels in a straight line at constant speed, left, right, up or down, over about
40% of the frame; or stays still at one of the five positions.  Positions are
sub-pixel: frames are drawn at 4× and box-filtered (`fastdiff.data.render_shape`).
Captions: "a red circle moving right", "a small blue square moving up", "a green
triangle staying still" (the size word is present in half of the captions, so
prompts with or without it both work).  Clip i is a pure function of (seed, i).

Training (`VideoTrainer`, the project's `Trainer` through its hooks) runs on
batch["image"] of shape (B, C, F, H, W); ``fastdiff train --task video``.  Then
``fastdiff train --task video-layout`` (`VideoLayoutTrainer`) adds the layout maps that
make the shape move the prompted way, every other weight frozen.

Output: GIF through Pillow (every frame a palette image, looping forever) or MP4
through imageio-ffmpeg (H.264, ``pip install 'fastdiff[video]'``).
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path

import torch
from torch.utils.data import Dataset

from fastdiff import ops, samplers
from fastdiff.checks import check_fits_in_memory, check_int, check_number, check_out_file, check_seed, int_arg
from fastdiff.checks import number_arg
from fastdiff.data import COLOURS, POSITIONS, SHAPES, SIZES, JITTER, Skipped, render_shape, to_pil, to_tensor
from fastdiff.nn.unet import UNetConfig
from fastdiff.nn.video import VideoConfig, VideoUNet, correlated_noise
from fastdiff.pipelines import (
    DEFAULT_CHECKPOINT, PIPELINE_FILE, SAMPLERS, Text2Image, check_batching, check_images_fit, counting,
    image_bytes, load_weights, make_plan, read_spec, resolve_seeds,
)
from fastdiff.training import Trainer, TrainConfig

HELP = "text to a short video clip (GIF or MP4) with the video model"
VIDEO_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "tiny-video"
DIRECTIONS = ("left", "right", "up", "down", "still")
FRAMES = 16  # the training clip length (and the model's max_frames)
FPS = 8
NOISE_CORRELATION = 0.75  # ρ of the clip noise prior (fastdiff.nn.video): frames share 75% of the noise variance
FORMATS = (".gif", ".mp4")
MAX_FPS = 1000.0  # a GIF stores frame times in 1/100 s: above 100 fps its players fall back to their own rate
# Largest frame side each container takes: GIF stores sizes in 16 bits; H.264's highest level
# (6.2) ends at 8192 pixels a side.
MAX_SIDE = {".gif": 65535, ".mp4": 8192}
ADDABLE_LAYERS = ("text_pool_heads", "layout_maps")  # VideoConfig layers a fine-tune may add (they start as no-ops)

# Motion of a moving clip, as fractions of the image side: the centre starts in
# [START_LO, START_HI] from the edge it leaves and travels TRAVEL_LO…TRAVEL_HI.
START_LO, START_HI = 0.25, 0.31
TRAVEL_LO, TRAVEL_HI = 0.38, 0.44
CROSS_LO, CROSS_HI = 0.28, 0.72  # the other coordinate, constant over the clip
_AXIS = {"left": (0, -1), "right": (0, 1), "up": (1, -1), "down": (1, 1)}  # (x = 0 / y = 1, sign)


# ----------------------------------------------------------------------------- captions and clips


def video_caption(colour: str, shape: str, direction: str, size: str | None = None) -> str:
    """"a [small ]red circle moving right" / "a red circle staying still"."""
    motion = "staying still" if direction == "still" else f"moving {direction}"
    return f"a {size + ' ' if size else ''}{colour} {shape} {motion}"


_CAPTION = re.compile(
    rf"a (?:(?P<size>{'|'.join(SIZES)}) )?(?P<colour>{'|'.join(COLOURS)}) (?P<shape>{'|'.join(SHAPES)}) "
    rf"(?:moving (?P<direction>left|right|up|down)|staying (?P<still>still))"
)


def parse_video_caption(text: str) -> dict:
    """colour, shape, size (None when absent) and direction of a clip caption (inverse of `video_caption`)."""
    m = _CAPTION.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"not a moving-shapes caption: {text!r}")
    return {"colour": m["colour"], "shape": m["shape"], "size": m["size"], "direction": m["direction"] or "still"}


def all_video_captions(sizes: bool = False) -> list[str]:
    """Every caption without a size word: 6 colours × 3 shapes × 5 directions = 90; ``sizes``: also with each size word."""
    size_words = (None, *SIZES) if sizes else (None,)
    return [video_caption(c, s, d, z) for c in COLOURS for s in SHAPES for d in DIRECTIONS for z in size_words]


def clip_path(direction: str, frames: int, rng: random.Random) -> list[tuple[float, float]]:
    """Centre (x, y) of the shape in each frame, fractions of the side; straight line, constant speed."""
    if direction == "still":
        x, y = POSITIONS[rng.choice(list(POSITIONS))]
        x, y = x + rng.uniform(-JITTER, JITTER), y + rng.uniform(-JITTER, JITTER)
        return [(x, y)] * frames
    axis, sign = _AXIS[direction]
    start = rng.uniform(START_LO, START_HI)
    travel = rng.uniform(TRAVEL_LO, TRAVEL_HI)
    cross = rng.uniform(CROSS_LO, CROSS_HI)
    path = []
    for f in range(frames):
        along = start + travel * f / max(frames - 1, 1)
        along = along if sign > 0 else 1.0 - along
        path.append((along, cross) if axis == 0 else (cross, along))
    return path


def render_clip(colour: str, shape: str, size: str, path: list[tuple[float, float]], resolution: int) -> torch.Tensor:
    """(3, F, R, R) float in [−1, 1]: the shape drawn at each centre of ``path``."""
    cx, cy = POSITIONS["in the center"]
    frames = [
        to_tensor(render_shape(colour, shape, size, "in the center", resolution, offset=(x - cx, y - cy)))
        for x, y in path
    ]
    return torch.stack(frames, dim=1)


class MovingShapesDataset(Dataset):
    """Synthetic captioned clips of one moving shape, ``length`` of them; clip i is a function of (seed, i).

    Items: ``{"image": (3, frames, R, R), "text": caption, "colour", "shape", "size", "direction"}``.
    """

    def __init__(self, resolution: int = 32, frames: int = FRAMES, length: int = 100_000, seed: int = 0):
        if resolution < 8:
            raise ValueError(f"resolution must be >= 8, got {resolution}")
        if not isinstance(frames, int) or frames < 1:
            raise ValueError(f"frames must be an int >= 1, got {frames!r}")
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        self.resolution, self.frames, self.length, self.seed = resolution, frames, length, seed
        self.skipped: list[Skipped] = []

    def __len__(self) -> int:
        return self.length

    def attributes(self, i: int) -> dict:
        rng = random.Random(self.seed * 1_000_003 + i)
        a = {
            "colour": rng.choice(list(COLOURS)),
            "shape": rng.choice(SHAPES),
            "size": rng.choice(list(SIZES)),
            "direction": rng.choice(DIRECTIONS),
            "say_size": rng.random() < 0.5,
        }
        a["path"] = clip_path(a["direction"], self.frames, rng)
        return a

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for {self.length} clips")
        a = self.attributes(i)
        clip = render_clip(a["colour"], a["shape"], a["size"], a["path"], self.resolution)
        text = video_caption(a["colour"], a["shape"], a["direction"], a["size"] if a["say_size"] else None)
        return {"image": clip, "text": text, **{k: a[k] for k in ("colour", "shape", "size", "direction")}}


# ----------------------------------------------------------------------------- training


def _pipeline_weights(path: Path, unet_config: UNetConfig) -> dict[str, torch.Tensor]:
    """A pipeline folder's weights, after checking that its UNet is the one being built."""
    spec = read_spec(path)
    mine = {k: v for k, v in unet_config.to_dict().items() if k != "gradient_checkpointing"}
    # through UNetConfig: fields added since the folder was written take their defaults
    theirs = {k: v for k, v in UNetConfig.from_dict(spec["unet"]).to_dict().items() if k != "gradient_checkpointing"}
    if mine != theirs:
        diff = sorted(k for k in mine if mine[k] != theirs.get(k))
        raise ValueError(
            f"the video UNet must have the image model's shape to start from it ({path}); differs in {diff}"
        )
    return load_weights(path)


class VideoTrainer(Trainer):
    """Fine-tunes a `VideoUNet` on `MovingShapesDataset` clips, starting from ``init_from``.

    ``init_from`` (``fastdiff train --init-from``): an image pipeline folder with the same UNet
    config (its weights become the spatial layers), or a video pipeline or training checkpoint
    (all its weights; temporal layers it lacks start new), or None (train from scratch).
    """

    SUPPORTS_DDP = False  # its noise is drawn for its own batch, not sliced by rank: one process
    DEFAULTS = dict(
        output_dir="runs/tiny-video", batch_size=4, steps=3000, lr=1e-3, warmup_steps=50, checkpoint_every=100,
    )  # fmt: skip
    init_from: Path | None = DEFAULT_CHECKPOINT
    frames: int = FRAMES
    noise_correlation: float = NOISE_CORRELATION
    # Attention pooling of the text tokens into the frame embedding (fastdiff.nn.video); off in the
    # shipped recipe: a 2000-step fine-tune with 4 heads did not move the measured motion direction
    # (docs/notes/video-motion-direction.md).
    text_pool_heads: int = 0
    layout_maps: int = 0  # per-frame layout maps from the whitened prompt (fastdiff.nn.video.FrameLayout)
    trainable: tuple[str, ...] = ()  # names of the parameters that train, by prefix; () trains all
    timestep_shift: float = 1.0  # s > 1 trains more at high noise: u = t/T → s·u / (1 + (s − 1)·u)

    @classmethod
    def open_dataset(cls, spec: str | None, config: TrainConfig) -> Dataset:
        if spec not in (None, "moving-shapes"):
            raise ValueError(f"--data for the video task must be 'moving-shapes' (the default), got {spec!r}")
        return MovingShapesDataset(resolution=config.resolution, frames=cls.frames, seed=config.seed)

    def build_model(self) -> torch.nn.Module:
        video = VideoConfig(self.frames, noise_correlation=self.noise_correlation, text_pool_heads=self.text_pool_heads,
                            layout_maps=self.layout_maps)  # fmt: skip
        model = VideoUNet(self.unet_config, video)
        if self.trainable:
            for name, p in model.named_parameters():
                p.requires_grad_(name.startswith(self.trainable))
        new = self._load_init(model, video)
        if video.layout_maps and "temporal_layout.text_mean" in new:  # a new layout: whiten with our captions
            _, pooled = self.prompts.encode(all_video_captions(sizes=True), "cpu")
            model.temporal_layout.set_text_statistics(pooled.float())
        return model

    def _load_init(self, model: VideoUNet, video: VideoConfig) -> list[str]:
        """Load ``init_from`` into ``model``; returns the names of the tensors it did not provide."""
        if self.init_from is None:
            return list(model.state_dict())
        path = Path(self.init_from)
        spec = read_spec(path)
        if "video" not in spec:
            model.load_image_weights(_pipeline_weights(path, self.unet_config))
            return [k for k in model.state_dict() if k.startswith("temporal_")]
        if {**spec["video"], **{k: getattr(video, k) for k in ADDABLE_LAYERS}} != video.to_dict():
            raise ValueError(f"--init-from {str(path)!r}: its video settings {spec['video']} differ from {video.to_dict()}")
        return model.load_video_weights(_pipeline_weights(path, self.unet_config))

    def pipeline_spec(self) -> dict:
        return {**super().pipeline_spec(), "video": self.ema.video.to_dict(), "frames": self.frames, "fps": FPS}

    def noised(self, x0, t, g, batch, rows):
        # The clip prior (frames correlated, ρ) instead of the base's per-element noise, drawn
        # from the micro-batch's generator after the timesteps and dropout flags.
        B, C, n, H, W = x0.shape
        t = shift_timesteps(t, self.timestep_shift, self.config.num_timesteps)
        eps = torch.randn((B, C, n + 1, H, W), generator=g).to(self.device)
        noise = correlated_noise(eps, self.noise_correlation)
        x_t, _, target = ops.training_target(x0, t, self.alphas_cumprod, noise, prediction=self.config.prediction)
        return x_t, t, target

    def sample_grid(self) -> Path:
        """The sample prompts as one GIF (clips side by side), ``samples/step_XXXXXXX.gif``."""
        pipe = VideoPipeline(self.ema, self.text_encoder, self.pipeline_spec(), self.prompts)
        clips = pipe(list(self.config.sample_prompts), steps=self.config.sample_steps, seeds=0, progress=False)
        path = self.out / "samples" / f"step_{self.step:07d}.gif"
        path.parent.mkdir(parents=True, exist_ok=True)
        return save_video(tile_clips(clips), path, fps=FPS)


class VideoLayoutTrainer(VideoTrainer):
    """Trains the layout maps (`fastdiff.nn.video.FrameLayout`) of a trained video model, every other weight frozen.

    ``fastdiff train --task video-layout --init-from DIR``: DIR is the video model (default: the
    shipped one, whose maps it then trains further; the recipe starts from a model without
    maps, ``scripts/train_video.sh``).  New maps are whitened with the training captions.
    The maps decide where the shape is in each frame at high noise, so training samples
    mostly high noise (``timestep_shift``) with the plain v-MSE; the frozen layers keep what
    the video model learned about drawing and keeping the shape.
    """

    DEFAULTS = dict(
        output_dir="runs/tiny-video-layout", batch_size=4, steps=600, lr=1e-2, warmup_steps=20, checkpoint_every=100,
        min_snr_gamma=None,
    )  # fmt: skip
    init_from: Path | None = VIDEO_CHECKPOINT
    layout_maps: int = 4
    trainable = ("temporal_layout.",)
    timestep_shift: float = 20.0


def shift_timesteps(t: torch.Tensor, shift: float, num_timesteps: int) -> torch.Tensor:
    """Uniform training timesteps moved toward high noise (the resolution shift of Esser et al. 2024).

    u = (t + ½)/T ↦ s·u / (1 + (s − 1)·u): s = 1 keeps t; s = 3 sends the median from T/2 to 3T/4.
    A clip's layout (where the shape is in each frame, hence its motion) is decided at high noise.
    """
    if shift == 1.0:
        return t
    u = (t.double() + 0.5) / num_timesteps
    u = shift * u / (1 + (shift - 1) * u)
    return (u * num_timesteps).long().clamp(0, num_timesteps - 1).to(t.dtype)


# ----------------------------------------------------------------------------- sampling


class VideoPipeline(Text2Image):
    """Text to clips: a `VideoUNet`, its text encoder and schedule; ``pipeline.json`` has a ``video`` entry."""

    CHANNELS_LAST = False  # the clip GroupNorm reads the folded frames as they come
    SHIPPED = VIDEO_CHECKPOINT

    @classmethod
    def build_unet(cls, spec: dict, path: str | os.PathLike) -> torch.nn.Module:
        return VideoUNet(UNetConfig.from_dict(spec["unet"]), _video_config(spec, path))

    @property
    def rho(self) -> float:
        """The noise prior's frame correlation the model was trained with."""
        return self.unet.video.noise_correlation

    @property
    def max_frames(self) -> int:
        return self.unet.video.max_frames

    @property
    def default_frames(self) -> int:
        return self.spec.get("frames", self.max_frames)

    def check_frames(self, frames: int) -> int:
        if isinstance(frames, bool) or not isinstance(frames, int) or not 1 <= frames <= self.max_frames:
            raise ValueError(f"frames must be an int in [1, {self.max_frames}] for this model, got {frames!r}")
        return frames

    @torch.no_grad()
    def generate_tensors(
        self,
        prompts: list[str],
        *,
        frames: int | None = None,
        negative_prompt: str = "",
        guidance_scale: float = 4.0,
        sampler: str = "dpmpp_2m",
        steps: int = 20,
        seeds: int | list[int] | None = None,
        batch_size: int = 8,
        progress: bool = True,
    ) -> torch.Tensor:
        """(N, C, F, R, R) fp32 clips in [−1, 1] (un-clamped), one per prompt; clip b from ``seeds[b]`` alone."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("prompts must not be empty")
        frames = self.check_frames(self.default_frames if frames is None else frames)
        check_batching(batch_size, guidance_scale)
        clip_bytes = image_bytes(self.unet.config.in_channels, frames * self.resolution**2)
        check_images_fit(len(prompts), "prompts (clips)", clip_bytes)
        seed_list = resolve_seeds(seeds, len(prompts))
        plan = make_plan(sampler, self.schedule, steps, self.prediction).to(self.device)
        guided = guidance_scale != 1.0
        C, R = self.unet.config.in_channels, self.resolution

        def batch(sl: slice, bar) -> torch.Tensor:
            seeds_t = torch.tensor(seed_list[sl], dtype=torch.int64, device=self.device)
            # one draw of F + 1 frames per seed: the shared part and each frame's own
            x_T = correlated_noise(samplers.initial_noise(seeds_t, (len(seeds_t), C, frames + 1, R, R)), self.rho)
            context = self.encode_prompt(prompts[sl], [negative_prompt] * len(seeds_t), guided)
            model = counting(self.denoiser(*context), bar)
            return samplers.sample(model, x_T, seeds_t, plan, guidance_scale=guidance_scale if guided else None).float()

        total = len(plan) * -(-len(prompts) // batch_size)
        desc = f"video ({sampler}, {steps} steps, {frames} frames)"
        return self.in_batches(len(prompts), batch_size, batch, progress=progress, desc=desc, unit="eval", total=total)

    def __call__(self, prompts: list[str], **kwargs) -> list[list]:
        """Clips as lists of PIL frames, one per prompt; keyword arguments as `generate_tensors`."""
        return [clip_to_pil(x) for x in self.generate_tensors(prompts, **kwargs)]


def _video_config(spec: dict, path: str | os.PathLike) -> VideoConfig:
    """The `VideoConfig` of a video pipeline's ``pipeline.json``; one line naming the folder when it has none."""
    if "video" not in spec:
        raise ValueError(f"--checkpoint {str(path)!r} holds an image model, not a video model")
    try:
        return VideoConfig(**spec["video"])
    except TypeError as e:
        raise ValueError(f"{Path(path) / PIPELINE_FILE}: bad 'video' entry ({e})") from None


def clip_to_pil(clip: torch.Tensor) -> list:
    """(3, F, H, W) in [−1, 1] → F PIL images."""
    return [to_pil(clip[:, f]) for f in range(clip.shape[1])]


def tile_clips(clips: list[list], pad: int = 2) -> list:
    """Clips of equal length side by side: one list of frames."""
    from fastdiff.pipelines import make_grid

    return [make_grid([c[f] for c in clips], cols=len(clips), pad=pad) for f in range(len(clips[0]))]


# ----------------------------------------------------------------------------- writing


def check_output(path: str | os.PathLike) -> str:
    """The container of ``path`` (".gif" / ".mp4"); raises before any work when it cannot be written."""
    ext = Path(path).suffix.lower()
    if ext not in FORMATS:
        raise ValueError(f"--out must end in {' or '.join(FORMATS)}, got {str(path)!r}")
    check_out_file(path, "--out")
    if ext == ".mp4":
        _ffmpeg()
    return ext


def check_frame_size(frames: int, width: int, height: int, scale, ext: str, name: str = "scale") -> None:
    """Refuse an upscaling whose frames the container cannot hold or the machine cannot keep in memory.

    The frames are upscaled in memory (RGB, 3 bytes a pixel) before encoding, and each one is
    converted once more on its way out: about 2 · F · (s·W) · (s·H) · 3 bytes at once.
    """
    check_int(scale, name, 1)
    side = max(width, height) * scale
    if side > MAX_SIDE[ext]:
        raise ValueError(
            f"{name} {scale} makes {width * scale}x{height * scale} frames; a {ext} frame is at most "
            f"{MAX_SIDE[ext]} pixels a side (scale <= {MAX_SIDE[ext] // max(width, height)} here)"
        )
    what = f"{name} {scale} ({frames} frames of {side} pixels)"
    check_fits_in_memory(2 * frames * width * height * scale**2 * 3, what)


def _ffmpeg():
    try:
        import imageio_ffmpeg
    except ImportError as e:
        raise ImportError("MP4 output needs imageio-ffmpeg: pip install 'fastdiff[video]' (or write a .gif)") from e
    return imageio_ffmpeg


def save_video(frames: list, path: str | os.PathLike, fps: float = FPS, scale: int = 1) -> Path:
    """Write PIL frames as a looping GIF (Pillow) or an H.264 MP4 (imageio-ffmpeg); ``scale``: nearest upscaling."""
    import numpy as np
    from PIL import Image

    path = Path(path)
    ext = check_output(path)
    if not frames:
        raise ValueError("frames must not be empty")
    check_number(fps, "fps", 0, MAX_FPS, low_open=True)
    check_frame_size(len(frames), frames[0].width, frames[0].height, scale, ext)
    if scale != 1:
        frames = [f.resize((f.width * scale, f.height * scale), Image.Resampling.NEAREST) for f in frames]
    path.parent.mkdir(parents=True, exist_ok=True)
    if ext == ".gif":
        # duration is per frame in ms; loop=0 repeats forever; disposal 1 keeps each frame whole.
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0,
                       disposal=1, optimize=False)  # fmt: skip
        return path
    w, h = frames[0].size
    # macro_block_size=1: H.264 wants even sizes, not multiples of 16; yuv420p plays everywhere.
    writer = _ffmpeg().write_frames(str(path), (w, h), fps=fps, codec="libx264", pix_fmt_out="yuv420p",
                                    macro_block_size=1, quality=9)  # fmt: skip
    writer.send(None)
    for f in frames:
        writer.send(np.ascontiguousarray(np.asarray(f.convert("RGB"))))
    writer.close()
    return path


def generate_video(
    prompt: str,
    *,
    frames: int | None = None,
    checkpoint: str | os.PathLike = VIDEO_CHECKPOINT,
    guidance_scale: float = 4.0,
    sampler: str = "dpmpp_2m",
    steps: int = 20,
    seed: int = 0,
    device: str | None = None,
    out: str | os.PathLike | None = None,
    fps: float = FPS,
    progress: bool = True,
) -> list:
    """One clip as a list of PIL frames; ``out``: also write it (.gif or .mp4)."""
    if out is not None:
        check_output(out)
        check_number(fps, "fps", 0, MAX_FPS, low_open=True)
    check_number(guidance_scale, "guidance_scale")
    check_seed(seed, "seed")
    pipe = VideoPipeline.from_pretrained(checkpoint, device)
    clip = pipe([prompt], frames=frames, guidance_scale=guidance_scale, sampler=sampler, steps=steps, seeds=[seed],
                progress=progress)[0]  # fmt: skip
    if out is not None:
        save_video(clip, out, fps=fps)
    return clip


# ----------------------------------------------------------------------------- command line


def add_arguments(parser) -> None:
    parser.add_argument("--prompt", required=True, help='e.g. "a red circle moving right"')
    parser.add_argument("--frames", type=int_arg(1), default=None, help=f"clip length (default: the trained {FRAMES})")
    parser.add_argument("--out", default="clip.gif", help="output file, .gif or .mp4 (default: %(default)s)")
    parser.add_argument("--checkpoint", default=str(VIDEO_CHECKPOINT), help="video pipeline folder (default: shipped)")
    parser.add_argument("--sampler", choices=SAMPLERS, default="dpmpp_2m")
    parser.add_argument("--steps", type=int_arg(1), default=20)
    parser.add_argument("--guidance", type=number_arg(), default=4.0, help="classifier-free guidance (1 disables)")
    parser.add_argument("--seed", type=int_arg(0), default=0)
    parser.add_argument("--fps", type=number_arg(0, MAX_FPS, low_open=True), default=FPS,
                        help="frames per second (default: %(default)s)")  # fmt: skip
    parser.add_argument("--scale", type=int_arg(1), default=1, help="upscale frames by this integer factor (nearest)")


def run(args) -> int:
    ext = check_output(args.out)
    check_seed(args.seed, "--seed")
    spec = read_spec(args.checkpoint)  # cheap: the frame count and size are checked before the model loads
    max_frames = _video_config(spec, args.checkpoint).max_frames
    frames = spec.get("frames", max_frames) if args.frames is None else args.frames
    if frames > max_frames:
        raise ValueError(f"--frames must be at most {max_frames} for this model, got {frames}")
    check_frame_size(frames, spec["resolution"], spec["resolution"], args.scale, ext, "--scale")
    pipe = VideoPipeline.from_pretrained(args.checkpoint, args.device)
    clip = pipe([args.prompt], frames=args.frames, guidance_scale=args.guidance, sampler=args.sampler,
                steps=args.steps, seeds=[args.seed])[0]  # fmt: skip
    path = save_video(clip, args.out, fps=args.fps, scale=args.scale)
    print(f"wrote {path} ({len(clip)} frames, {clip[0].width * args.scale}x{clip[0].height * args.scale})")
    return 0
