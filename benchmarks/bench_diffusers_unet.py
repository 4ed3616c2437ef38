"""diffusers' UNet2DConditionModel patched with fastdiff vs as shipped: one UNet evaluation, images/s.

GPU: the Stable Diffusion 1.5 UNet shape (block widths 320/640/1280/1280, 8 heads,
768-wide text tokens; random weights), fp16, channels_last, on 64×64×4 latents with
77 text tokens, batch 1/4/8 (``--quick``: batch 1).  Implementations of one case:

    patched            fastdiff.patch(unet)
    unpatched          the unet as shipped (SDPA attention)
    patched+compile    torch.compile of each (left out under --no-compile; the default mode:
    unpatched+compile  max-autotune would tune every convolution, many minutes per batch size)

Device time is the CUDA-graph replay of one forward (the weights, 1.7 GB, pass the cache
anyway); host time is the eager call, which decides the speed at batch 1.
images/s = B / seconds per call: one denoiser evaluation per image (a sampling run costs
steps × this, ×2 with classifier-free guidance).  Target on an H100: patched ≥ 1.3×
unpatched, eager.

Check: both models' outputs against the unpatched model in float32 (GPU) / float64 (CPU).

CPU: diffusers' tiny test configuration (32/64 channels), batch 1, fp32: the patched model
(the ops' reference path) timed, both checked — a check that the benchmark runs, not a
performance figure.

    python -m benchmarks.run --only diffusers_unet [--quick]
"""
from __future__ import annotations

import copy

import torch

from benchmarks.harness import Case, Reference, compile_baselines, compiled, reference_dtype
from fastdiff.dropin import patch

SD15 = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)  # fmt: skip
TINY = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    cross_attention_dim=32, attention_head_dim=1, norm_num_groups=32,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)  # fmt: skip
# Relative error allowed against the high-precision unpatched model: fp16 rounding compounds
# through ~50 layers of random weights.
TOLERANCE = {"fp16": 5e-2, "fp32": 1e-4}


def _models(config: dict, device: str, dtype: torch.dtype):
    """(patched, unpatched, unpatched in the reference precision) copies of one randomly initialised UNet."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    plain = UNet2DConditionModel(**config).to(device=device, dtype=dtype, memory_format=torch.channels_last).eval()
    fused = copy.deepcopy(plain)
    patch(fused)
    return fused, plain, copy.deepcopy(plain).to(reference_dtype(device))


def forward(model):
    """(x, t, ctx) -> the model's output, without autograd."""

    @torch.no_grad()
    def run(x, t, ctx):
        return model(x, t, ctx).sample

    return run


def _inputs(B: int, config: dict, tokens: int, device: str, dtype: torch.dtype):
    res = config["sample_size"]

    def make():
        x = torch.randn(B, 4, res, res, device=device, dtype=dtype).to(memory_format=torch.channels_last)
        ctx = torch.randn(B, tokens, config["cross_attention_dim"], device=device, dtype=dtype)
        return x, torch.full((B,), 500, device=device), ctx

    return make


def cases(device: str, quick: bool) -> list[Case]:
    gpu = device == "cuda"
    config = SD15 if gpu else TINY
    dtype, dt = (torch.float16, "fp16") if gpu else (torch.float32, "fp32")
    tokens = 77 if gpu else 8
    batches = ((1,) if quick else (1, 4, 8)) if gpu else (1,)
    fused, plain, precise = _models(config, device, dtype)
    impls = {"patched": forward(fused), "unpatched": forward(plain)}
    if compile_baselines():
        # one compiled graph per batch size, as a server compiled at a fixed batch would have
        impls["patched+compile"] = forward(compiled(fused, mode="default", fullgraph=False))
        impls["unpatched+compile"] = forward(compiled(plain, mode="default", fullgraph=False))
    ct = reference_dtype(device)
    check = Reference(lambda x, t, ctx: forward(precise)(x.to(ct), t, ctx.to(ct)), TOLERANCE[dt])
    res = config["sample_size"]
    return [
        Case(
            "sd15_unet" if gpu else "tiny_unet", f"B={B} 4x{res}x{res} L={tokens}", dt, dict(impls), items=B,
            inputs=_inputs(B, config, tokens, device, dtype), check=check, graph_calls=1,
        )  # fmt: skip
        for B in batches
    ]
