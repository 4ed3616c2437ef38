"""diffusers' UNet2DConditionModel patched with fastdiff vs as shipped: one UNet evaluation, images/s.

GPU: the Stable Diffusion 1.5 UNet shape (block widths 320/640/1280/1280, 8 heads,
768-wide text tokens; random weights), fp16, channels_last, on 64×64×4 latents with
77 text tokens, batch 1/4/8.  Two cases per batch:

    sd15_unet.eager      fastdiff.patch(unet)  vs  the unpatched unet (SDPA attention)
    sd15_unet.cudagraph  each of the two captured in a CUDA graph: the GPU's work alone,
                         without the host's launch cost (which dominates eager at batch 1)
    sd15_unet.compile    torch.compile of each of the two (left out under --no-compile)

images/s = B / seconds per call: one denoiser evaluation per image (a sampling run costs
steps × this, ×2 with classifier-free guidance).  Target on an H100: patched eager ≥ 1.3×
unpatched eager.

CPU: diffusers' tiny test configuration (32/64 channels), batch 1, the patched model on
the ops' reference path only — a check that the benchmark runs, not a performance figure.

    python -m benchmarks.run --only diffusers_unet [--quick]
"""
from __future__ import annotations

import copy

import torch

from benchmarks.harness import Case, compile_baselines, cuda_graph
from fastdiff.ops import use_backend
from fastdiff.patch import patch

SD15 = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)  # fmt: skip
TINY = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    cross_attention_dim=32, attention_head_dim=1, norm_num_groups=32,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)  # fmt: skip


def _models(config: dict, device: str, dtype: torch.dtype):
    """(patched, unpatched) copies of one randomly initialised UNet."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    plain = UNet2DConditionModel(**config).to(device=device, dtype=dtype, memory_format=torch.channels_last).eval()
    fused = copy.deepcopy(plain)
    patch(fused)
    return fused, plain


def _call(model, x, t, ctx):
    @torch.no_grad()
    def run():
        return model(x, t, ctx).sample

    return run


def cases(device: str, quick: bool) -> list[Case]:
    gpu = device == "cuda"
    config = SD15 if gpu else TINY
    dtype = torch.float16 if gpu else torch.float32
    tokens = 77 if gpu else 8
    batches = ((1,) if quick else (1, 4, 8)) if gpu else (1,)
    fused, plain = _models(config, device, dtype)
    if compile_baselines():
        # one compiled graph per batch size, as a server compiled at a fixed batch would have
        fused_c, plain_c = torch.compile(fused, dynamic=False), torch.compile(plain, dynamic=False)
    res, dt = config["sample_size"], "fp16" if gpu else "fp32"
    out = []
    for B in batches:
        x = torch.randn(B, 4, res, res, device=device, dtype=dtype).to(memory_format=torch.channels_last)
        t = torch.full((B,), 500, device=device)
        ctx = torch.randn(B, tokens, config["cross_attention_dim"], device=device, dtype=dtype)
        shape = f"B={B} 4x{res}x{res} L={tokens}"
        if gpu:
            impls = {"patched": _call(fused, x, t, ctx), "unpatched": _call(plain, x, t, ctx)}
            out.append(Case("sd15_unet.eager", shape, dt, impls, items=B))
            graphs = {name: cuda_graph(_call(m, x, t, ctx)) for name, m in (("patched+graph", fused), ("unpatched+graph", plain))}
            if all(graphs.values()):
                out.append(Case("sd15_unet.cudagraph", shape, dt, graphs, items=B))
            if not compile_baselines():
                continue
            impls = {"patched+compile": _call(fused_c, x, t, ctx), "unpatched+compile": _call(plain_c, x, t, ctx)}
            out.append(Case("sd15_unet.compile", shape, dt, impls, items=B))
        else:
            run = _call(fused, x, t, ctx)

            def reference(run=run):
                with use_backend("reference"):
                    return run()

            out.append(Case("tiny_unet.eager", shape, dt, {"patched (reference path)": reference}, items=B))
    return out
