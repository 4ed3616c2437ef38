"""Stable Diffusion end to end, from a diffusers folder: UNet it/s, images/s and peak memory.

GPU: a folder of SD 1.5's shape with random weights, built here from diffusers' default
``UNet2DConditionModel`` and ``AutoencoderKL`` configs and a CLIP ViT-L/14-shaped text encoder
(12 layers, width 768, 77 tokens; a toy vocabulary), saved with ``save_pretrained`` (fp16) to a
temporary folder: nothing is downloaded.  512×512 images (64×64×4 latents), 25 steps of the
folder's scheduler (SD 1.5's DDIM: scaled-linear betas, "leading" spacing, steps_offset 1),
classifier-free guidance 7.5 (every step runs the UNet on the doubled batch), batch 1 and 8
(the full run adds 4).  The prompts' embeddings are made once, outside the timed calls, and
every implementation starts from the same latents.  Two ops per batch:

    sd15_denoise    the denoising loop, x_T → latents; items = steps, so items/s is UNet it/s
                    (one "it": a CFG-doubled UNet evaluation and a sampler step, what
                    stable-fast's and diffusers' progress bars count)
    sd15_generate   the loop, then the VAE decode; items = B, so items/s is images/s

Implementations, fp16 weights:

    fastdiff+graph     fastdiff's `StableDiffusion` loaded from the folder, its `DenoiseLoop`
                       with the CUDA graph (one replay per call), as ``fastdiff generate`` runs
    fastdiff           the same loop eagerly
    diffusers-eager    diffusers' ``StableDiffusionPipeline`` from the same folder (SDPA attention)
    diffusers-compile  the same with ``torch.compile(unet, mode="max-autotune")``; these cases
                       are timed per call (``wall_ms``), not captured by the harness, so
                       Inductor keeps its own CUDA graphs.  Left out by ``--no-compile``; each
                       batch size compiles again (minutes).

Targets on an H100/H200: batch 1 ≥ 105 UNet it/s (stable-fast's published 104.6); batch 8
≥ 1.3× diffusers-compile; fastdiff at batch 8 in < 8 GB.

Check: every implementation's output (the latents; the images in [−1, 1]) against diffusers'
pipeline in float32 (GPU) / float64 (CPU), relative L2 error: tolerance 5e-2 in fp16 (25 steps
of a random network carry the UNet's fp16 rounding along), 1e-4 in fp32.

Memory (``peak_memory_mb``, GPU): an implementation's weights (UNet, VAE and text encoder)
plus the peak of ``torch.cuda.max_memory_allocated`` over its first call (which captures or
compiles) above what was allocated before that call.

CPU: the same ops on a tiny random folder (two-level UNet, 16×16 images), 2 steps, batch 1
(full: also 2), fp32: fastdiff eager timed, diffusers eager checked — a test of the
benchmark, not a performance figure.
"""
from __future__ import annotations

import atexit
import json
import shutil
import string
import tempfile
from pathlib import Path

import torch

from benchmarks.harness import Case, Reference, compile_baselines, compiled, reference_dtype
from fastdiff.pipelines import Text2Image

GUIDANCE = 7.5
PROMPT, NEGATIVE = "a red circle", "blurry"
# Relative L2 error allowed against diffusers in the reference precision.
TOLERANCE = {"fp16": 5e-2, "fp32": 1e-4}
# diffusers' component configs: SD 1.5's are its defaults; the tiny ones are the tests'.
SHAPES = {
    "sd15": dict(
        unet=dict(cross_attention_dim=768, sample_size=64), vae=dict(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        ), clip=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     max_position_embeddings=77),
    ),
    "tiny": dict(
        unet=dict(
            sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=24,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(1, 2), norm_num_groups=8,
        ), vae=dict(
            block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=16,
        ), clip=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                     max_position_embeddings=12),
    ),
}  # fmt: skip


def _tokenizer(folder: Path, max_length: int):
    """A CLIP tokenizer with a character-level vocabulary (SD's 49408-token one would be a download)."""
    import transformers

    letters = list(string.ascii_lowercase)
    tokens = ["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters)]
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    tok.model_max_length = max_length
    return tok


def write_folder(root: Path, shape: str, dtype: torch.dtype = torch.float32) -> Path:
    """A random-weight Stable Diffusion folder of ``shape`` ("sd15" or "tiny") in diffusers' layout."""
    import diffusers
    import transformers

    cfg = SHAPES[shape]
    torch.manual_seed(0)
    tokenizer = _tokenizer(root.parent / f"{root.name}-tokenizer", cfg["clip"]["max_position_embeddings"])
    clip = transformers.CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=1, pad_token_id=1,
                                       **cfg["clip"])  # fmt: skip
    scheduler = diffusers.DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, clip_sample=False,
        set_alpha_to_one=False,
    )  # fmt: skip
    pipe = diffusers.StableDiffusionPipeline(
        unet=diffusers.UNet2DConditionModel(**cfg["unet"]), vae=diffusers.AutoencoderKL(**cfg["vae"]),
        text_encoder=transformers.CLIPTextModel(clip), tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.to(dtype).save_pretrained(root)
    return root


def _diffusers(folder: Path, device: str, dtype: torch.dtype):
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        folder, dtype=dtype, safety_checker=None, requires_safety_checker=False
    ).to(device)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diffusers_call(pipe, latents, embeds, steps: int, output_type: str):
    """diffusers' pipeline from ``latents`` with the prompts' embeddings given: latents, or images in [−1, 1]."""
    dtype = pipe.unet.dtype
    cond, uncond = (e.to(dtype) for e in embeds)
    out = pipe(
        prompt_embeds=cond, negative_prompt_embeds=uncond, latents=latents.to(dtype), num_inference_steps=steps,
        guidance_scale=GUIDANCE, output_type="latent" if output_type == "latent" else "pt",
    ).images  # fmt: skip
    return out.float() if output_type == "latent" else out.float() * 2 - 1


def _weights_bytes(*modules) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


class _Impl:
    """A zero-argument implementation, without autograd, that records at its first call on a GPU its
    memory in ``record[name]`` (MiB): ``weights`` plus the peak allocated during that call above what
    was allocated before it."""

    def __init__(self, fn, name: str, weights: int, record: dict):
        self.fn, self.name, self.weights, self.record = fn, name, weights, record

    @torch.no_grad()
    def __call__(self):
        if self.name in self.record or not torch.cuda.is_available():
            return self.fn()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = self.fn()
        torch.cuda.synchronize()
        self.record[self.name] = (self.weights + torch.cuda.max_memory_allocated() - before) / 2**20
        return out


def _implementations(ours, loops: dict, diffusers_pipes: dict, latents, steps: int, output: str) -> dict:
    """name → zero-argument call of one batch: our loops (name → `DenoiseLoop`) and diffusers' pipelines."""
    B = latents.shape[0]
    seeds = torch.arange(B, dtype=torch.int64, device=latents.device)
    conditioning = ours.encode_prompt([PROMPT] * B, [NEGATIVE] * B, guided=True)  # [uncond; cond]
    embeds = (conditioning[0][B:], conditioning[0][:B])  # diffusers' prompt_embeds, negative_prompt_embeds

    def run_ours(loop):
        x = loop.run(latents, seeds, conditioning)
        return x if output == "latent" else ours.decode(x).clamp(-1, 1)

    impls = {name: (lambda loop=loop: run_ours(loop)) for name, loop in loops.items()}
    for name, pipe in diffusers_pipes.items():
        impls[name] = lambda pipe=pipe: _diffusers_call(pipe, latents, embeds, steps, output)
    return impls


def cases(device: str, quick: bool) -> list[Case]:
    import diffusers

    gpu = device == "cuda"
    dtype, dt = (torch.float16, "fp16") if gpu else (torch.float32, "fp32")
    steps = 25 if gpu else 2
    batches = ((1, 8) if quick else (1, 4, 8)) if gpu else ((1,) if quick else (1, 2))
    tmp = Path(tempfile.mkdtemp(prefix="fastdiff-bench-sd-"))
    atexit.register(shutil.rmtree, tmp, True)
    folder = write_folder(tmp / "sd", "sd15" if gpu else "tiny", dtype)

    ours = Text2Image.from_pretrained(folder, device, dtype=dtype)
    loops = {"fastdiff+graph": ours.denoise_loop(None, steps, GUIDANCE, cuda_graph=True)} if gpu else {}
    loops["fastdiff"] = ours.denoise_loop(None, steps, GUIDANCE)
    theirs = {"diffusers-eager": _diffusers(folder, device, dtype)}
    if compile_baselines():
        pipe = diffusers.StableDiffusionPipeline(**theirs["diffusers-eager"].components, requires_safety_checker=False)
        pipe.unet = compiled(pipe.unet, mode="max-autotune", fullgraph=True)
        pipe.set_progress_bar_config(disable=True)
        theirs["diffusers-compile"] = pipe
    precise = _diffusers(folder, device, reference_dtype(device))
    weights = {
        "fastdiff": _weights_bytes(ours.unet, ours.vae, ours.text_encoder.model),
        "diffusers": _weights_bytes(*(getattr(theirs["diffusers-eager"], c) for c in ("unet", "vae", "text_encoder"))),
    }  # fmt: skip
    h, w = ours.sample_shape[1:]
    image_side = h * ours.vae.config.downscale

    out = []
    for B in batches:
        latents = torch.randn(B, 4, h, w, generator=torch.Generator().manual_seed(B)).to(device)
        for op, output in (("denoise", "latent"), ("generate", "image")):
            memory: dict[str, float] = {}
            impls = {
                name: _Impl(fn, name, weights[name.split("+")[0].split("-")[0]], memory)
                for name, fn in _implementations(ours, loops, theirs, latents, steps, output).items()
            }  # fmt: skip
            [reference] = _implementations(ours, {}, {"reference": precise}, latents, steps, output).values()
            unit = "UNet it/s" if output == "latent" else "images/s"
            out.append(Case(
                f"{'sd15' if gpu else 'tiny'}_{op}", f"B={B} {image_side}² {steps}st CFG", dt, impls,
                note=f"items/s = {unit}", items=steps if output == "latent" else B,
                check=Reference(reference, TOLERANCE[dt]), peak_memory_mb=memory,
            ))  # fmt: skip
    return out
