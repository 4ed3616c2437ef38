"""One denoising step: the fused ``sampler_step`` against the eager chain of PyTorch ops doing the same.

Configurations: DDIM with classifier-free guidance; DDPM with guidance and fresh noise;
guidance with rescale (Lin et al. 2023); inpainting with guidance and noise.  Shapes: an
SD-1.5 latent at batch 1 (1, 4, 64, 64), 1024² images' latents (128×128×4) at batch 16, and at
batch 256 (33.5 MB per bf16 tensor: a step moves ≥ 134 MB, which fills the chip and passes
the cache).  bf16 and fp32 states.  ``--quick``: bf16; DDPM at batch 1, every configuration
at batch 256.

Bytes (the minimum one step must move through memory), with E = elements of x:
    reads   x (s_x) + o_c, o_u (2·s_o) [+ known (s_x) + mask (s_x / C, one value per pixel)]
    writes  x_next (s_x)
    rescale: + o_c and o_u read once more by the statistics pass (counted: it is real traffic)
where s_x, s_o are the element sizes of the state and of the model output (here equal).

The eager chain is what a diffusers-style loop runs per step: guidance combine, (rescale),
prediction conversion, the update, ``torch.randn_like`` noise, the inpainting blend — each a
separate kernel, in fp32 like the kernel, reading the step's coefficients from device memory
like the kernel.  ``torch.compile`` of the same chain and a copy of the same bytes are the
other baselines.  Check: every implementation against the same chain in float64 (CPU) /
float32 (GPU), with the noise coefficients set to 0 for the check — the implementations draw
from different random streams — so that the draws are still made and added, and every other
term is compared exactly.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from benchmarks.harness import Case, Reference, SameBytesCopy, compile_baselines, compiled, reference_dtype
from fastdiff.ops import sampler_step
from fastdiff.ops.fused_step import COEFFICIENTS, step_coefficients

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# name: (guidance rescale φ, add noise, inpaint)
CONFIGS = {
    "ddim+cfg": (0.0, False, False),
    "ddpm+cfg+noise": (0.0, True, False),
    "cfg+rescale": (0.7, False, False),
    "inpaint+cfg+noise": (0.0, True, True),
}
GUIDANCE = 7.5
STEP = 3
# A DDPM-like step with ε-prediction (the values matter only to the check)
NAMED = dict(x0_from_x=1.2, x0_from_out=-0.6, eps_from_out=1.0, x=0.9, x0=0.1, noise=0.05, known=0.9, known_noise=0.4)
NOISE_COEFFICIENTS = ("noise", "known_noise")
# Relative error allowed: everything is computed in fp32 and stored once in the state's dtype.
TOLERANCE = {"bf16": 1e-2, "fp32": 1e-5}


def shapes(quick: bool, device: str = "cuda") -> list[tuple[tuple[int, ...], list[str]]]:
    """(shape, configurations) of each case group."""
    every = list(CONFIGS)
    if device != "cuda":
        return [((2, 4, 17, 19), every)] + ([] if quick else [((3, 3, 13, 11), every)])
    if quick:
        return [((1, 4, 64, 64), ["ddpm+cfg+noise"]), ((256, 4, 128, 128), every)]
    return [((1, 4, 64, 64), every), ((16, 4, 128, 128), every), ((256, 4, 128, 128), every)]


def sampler_step_bytes(numel: int, channels: int, element_size: int, rescale: bool, inpaint: bool) -> float:
    """Minimum bytes of one step (the module docstring's formula)."""
    nbytes = numel * element_size * 4  # x, o_c, o_u read; x_next written
    if inpaint:
        nbytes += numel * element_size + numel // channels * element_size  # known, mask
    if rescale:
        nbytes += 2 * numel * element_size  # o_c, o_u read again for their statistics
    return float(nbytes)


def eager_step(rescale: float, noise: bool) -> Callable:
    """The step as separate PyTorch ops: (x, o_c, o_u, coeffs, seeds, known, mask) -> x_next.

    Math in fp32 (fp64 for fp64 inputs), stored in x's dtype; ``seeds`` (the kernel's noise
    keys) is unused: the chain draws with ``torch.randn_like``.
    """

    def step(x, o_c, o_u, coeffs, seeds, known, mask):
        ct = torch.promote_types(x.dtype, torch.float32)
        c = dict(zip(COEFFICIENTS, coeffs.to(ct).unbind()))
        o_c, o_u, xf = o_c.to(ct), o_u.to(ct), x.to(ct)
        o = o_u + GUIDANCE * (o_c - o_u)  # Ho & Salimans 2022, Eq. 6
        if rescale:  # Lin et al. 2023, Alg. 2
            dims = tuple(range(1, o.ndim))
            o = rescale * o * (o_c.std(dim=dims, keepdim=True) / o.std(dim=dims, keepdim=True)) + (1 - rescale) * o
        x0 = c["x0_from_x"] * xf + c["x0_from_out"] * o
        eps = c["eps_from_x"] * xf + c["eps_from_out"] * o
        x_next = c["x"] * xf + c["x0"] * x0 + c["eps"] * eps
        if noise:
            x_next = x_next + c["noise"] * torch.randn_like(xf)
        if known is not None:
            renoised = c["known"] * known.to(ct) + c["known_noise"] * torch.randn_like(xf)
            x_next = mask.to(ct) * x_next + (1 - mask.to(ct)) * renoised
        return x_next.to(x.dtype)

    return step


def fastdiff_step(rescale: float, noise: bool) -> Callable:
    """The fused op with the same signature as `eager_step`'s chain."""

    def step(x, o_c, o_u, coeffs, seeds, known, mask):
        return sampler_step(
            x, o_c, coeffs, uncond_output=o_u, guidance_scale=GUIDANCE, guidance_rescale=rescale, seeds=seeds,
            step=STEP, add_noise=noise, known=known, mask=mask,
        )[0]  # fmt: skip

    return step


def without_noise(inputs: tuple) -> tuple:
    """The inputs with the noise coefficients set to 0: the draws are made but add nothing."""
    x, o_c, o_u, coeffs, *rest = inputs
    quiet = coeffs.clone()
    for name in NOISE_COEFFICIENTS:
        quiet[COEFFICIENTS.index(name)] = 0.0
    return (x, o_c, o_u, quiet, *rest)


def _expected(rescale: float, noise: bool) -> Callable:
    chain = eager_step(rescale, noise)

    def expected(*inputs):
        ct = reference_dtype(inputs[0].device)
        return chain(*(t.to(ct) if t is not None and t.is_floating_point() else t for t in inputs))

    return expected


def _inputs(shape, dtype, device, inpaint: bool) -> Callable[[], tuple]:
    B = shape[0]
    coeffs = step_coefficients(**NAMED).float().to(device)

    def make():
        x = torch.randn(shape, device=device, dtype=dtype)
        o_c, o_u = torch.randn_like(x), torch.randn_like(x)
        seeds = torch.arange(B, device=device, dtype=torch.int64)
        known = torch.randn_like(x) if inpaint else None
        mask = (torch.rand(B, 1, *shape[2:], device=device) < 0.5).to(dtype) if inpaint else None
        return x, o_c, o_u, coeffs.clone(), seeds, known, mask

    return make


def cases(device: str, quick: bool) -> list[Case]:
    compile_too = compile_baselines()
    dtypes = {"bf16": DTYPES["bf16"]} if quick else DTYPES
    out = []
    for shape, configs in shapes(quick, device):
        numel = math.prod(shape)
        for dt, dtype in dtypes.items():
            for name in configs:
                rescale, noise, inpaint = CONFIGS[name]
                nbytes = sampler_step_bytes(numel, shape[1], dtype.itemsize, bool(rescale), inpaint)
                impls = {"fastdiff": fastdiff_step(rescale, noise), "eager": eager_step(rescale, noise)}
                if compile_too:
                    impls["torch.compile"] = compiled(eager_step(rescale, noise))
                impls["copy (same bytes)"] = SameBytesCopy(nbytes)
                out.append(Case(
                    "sampler_step", f"{tuple(shape)} {name}", dt, impls, bytes=nbytes,
                    inputs=_inputs(shape, dtype, device, inpaint),
                    check=Reference(_expected(rescale, noise), TOLERANCE[dt], checked_inputs=without_noise),
                ))  # fmt: skip
    return out
