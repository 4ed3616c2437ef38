"""Text-to-image sampling end to end: images/s of the whole denoising loop.

GPU: the SD-1.5-shaped UNet (``UNetConfig.preset("sd15")``, random weights, bf16,
channels_last) on 64×64×4 latents, 77 text tokens of width 768, batch 1/4/8, 25 DDIM
steps with classifier-free guidance (scale 7.5: every step runs the UNet on 2B).
Implementations:

    fastdiff            our UNet on the Triton ops + samplers.sample (fused sampler step)
    fastdiff+graph      the same loop captured once in a CUDA graph and replayed (no host
                        launch cost; the loop has no host sync, so all of it is captured)
    fastdiff-reference  the same model and loop with the ops forced to their PyTorch reference
    diffusers-eager     diffusers' UNet2DConditionModel of the same shape (SDPA attention)
                        with diffusers' DDIMScheduler, same timesteps
    diffusers-compile   the same under torch.compile

The harness reports ms per call; images/s = 1000·B / ms (B is in the shape column).
CPU: only the reference path is timed, on the ``tiny`` preset (32×32 RGB), batch 1,
a few steps — a smoke test of the benchmark, not a performance figure.
"""
from __future__ import annotations

import torch

from benchmarks.harness import Case, compile_baselines, cuda_graph
from fastdiff import samplers
from fastdiff.nn import UNet, UNetConfig
from fastdiff.ops import use_backend
from fastdiff.schedule import make_schedule, timesteps

GUIDANCE = 7.5


def _our_loop(unet: UNet, ctx: torch.Tensor, pooled, x_T: torch.Tensor, seeds: torch.Tensor, plan, dtype):
    def model(x, t):
        return unet(x.to(dtype), t, ctx, pooled)

    return samplers.sample(model, x_T, seeds, plan, guidance_scale=GUIDANCE)


def _diffusers_unet(cfg: UNetConfig, device: str, dtype: torch.dtype):
    """diffusers' UNet2DConditionModel with the same shape as ``cfg`` (SD layout: no pooled input)."""
    from diffusers import UNet2DConditionModel

    levels = len(cfg.channel_mult)
    down = tuple("CrossAttnDownBlock2D" if i in cfg.attention_levels else "DownBlock2D" for i in range(levels))
    up = tuple("CrossAttnUpBlock2D" if i in cfg.attention_levels else "UpBlock2D" for i in reversed(range(levels)))
    widths = tuple(cfg.model_channels * m for m in cfg.channel_mult)
    return (
        UNet2DConditionModel(
            sample_size=64, in_channels=cfg.in_channels, out_channels=cfg.out_channels, block_out_channels=widths,
            layers_per_block=cfg.num_res_blocks, down_block_types=down, up_block_types=up,
            cross_attention_dim=cfg.context_dim, attention_head_dim=widths[0] // cfg.dim_head,
            norm_num_groups=cfg.num_groups,
        )  # fmt: skip
        .to(device=device, dtype=dtype, memory_format=torch.channels_last)
        .eval()
    )


def _diffusers_loop(unet, ctx2: torch.Tensor, x_T: torch.Tensor, steps: int, dtype):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="trailing")
    sched.set_timesteps(steps)
    x = x_T
    for t in sched.timesteps:
        out = unet(torch.cat([x, x]).to(dtype), t, encoder_hidden_states=ctx2).sample.float()
        out_u, out_c = out.chunk(2)
        x = sched.step(out_u + GUIDANCE * (out_c - out_u), t, x).prev_sample
    return x


def cases(device: str, quick: bool) -> list[Case]:
    gpu = device == "cuda"
    cfg = UNetConfig.preset("sd15") if gpu else UNetConfig.preset("tiny", context_dim=64, pooled_dim=64)
    dtype = torch.bfloat16 if gpu else torch.float32
    steps = (5 if quick else 25) if gpu else 2
    batches = ((1,) if quick else (1, 4, 8)) if gpu else (1,)
    res = 64 if gpu else 32
    L = 77 if gpu else 8
    sched = make_schedule("scaled_linear", 1000) if gpu else make_schedule("cosine", 1000)
    prediction = "epsilon" if gpu else "v"
    plan = samplers.ddim_plan(sched, timesteps(steps, 1000, "trailing"), prediction=prediction).to(device)

    torch.manual_seed(0)
    unet = UNet(cfg).to(device=device, dtype=dtype, memory_format=torch.channels_last).eval()
    theirs = _diffusers_unet(cfg, device, dtype) if gpu else None
    theirs_compiled = torch.compile(theirs) if compile_baselines() else None

    out = []
    for B in batches:
        ctx2 = torch.randn(2 * B, L, cfg.context_dim, device=device, dtype=dtype)  # [uncond; cond]
        pooled2 = torch.randn(2 * B, cfg.pooled_dim, device=device, dtype=dtype) if cfg.pooled_dim else None
        seeds = torch.arange(B, dtype=torch.int64, device=device)
        x_T = samplers.initial_noise(seeds, (B, cfg.in_channels, res, res))

        @torch.no_grad()
        def ours(ctx2=ctx2, pooled2=pooled2, seeds=seeds, x_T=x_T):
            return _our_loop(unet, ctx2, pooled2, x_T, seeds, plan, dtype)

        @torch.no_grad()
        def reference(ctx2=ctx2, pooled2=pooled2, seeds=seeds, x_T=x_T):
            with use_backend("reference"):
                return _our_loop(unet, ctx2, pooled2, x_T, seeds, plan, dtype)

        impls = {"fastdiff" if gpu else "fastdiff-reference": ours if gpu else reference}
        if gpu:
            graphed = cuda_graph(ours)
            if graphed is not None:
                impls["fastdiff+graph"] = graphed
            impls["fastdiff-reference"] = reference
            impls["diffusers-eager"] = torch.no_grad()(lambda ctx2=ctx2, x_T=x_T: _diffusers_loop(theirs, ctx2, x_T, steps, dtype))
            if theirs_compiled is not None:
                impls["diffusers-compile"] = torch.no_grad()(
                    lambda ctx2=ctx2, x_T=x_T: _diffusers_loop(theirs_compiled, ctx2, x_T, steps, dtype)
                )
        shape = f"B={B} {cfg.in_channels}x{res}x{res} {steps}st CFG"
        name = "sd15_sample" if gpu else "tiny_sample"
        out.append(Case(name, shape, "bf16" if gpu else "fp32", impls, note=f"images/s = {1000 * B}/ms"))
    return out
