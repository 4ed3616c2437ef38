"""q_sample and the v-prediction training target against the eager chain, torch.compile of it and a copy.

Shapes: an SD-1.5 latent at batch 1 (1, 4, 64, 64), a training batch of them (64, 4, 64, 64),
1024² images' latents (128×128×4) at batch 16 and at batch 256 (33.5 MB per bf16 tensor: the
call moves 100–134 MB, which fills the chip and passes the cache), and pixel space
(8, 3, 256, 256).  bf16, fp16 and fp32.  ``--quick``: bf16, (1, 4, 64, 64) and (256, 4, 128, 128).

Bytes (minimum traffic, N elements of s bytes):
    q_sample with in-kernel noise:   read x0, write x_t and ε        = 3·N·s
    training_target (v-prediction):  read x0, write x_t, ε and v     = 4·N·s
(t and ᾱ are B and T elements: negligible.)

The eager chain is what a training loop runs (diffusers' ``DDPMScheduler.add_noise``):
randn_like, ᾱ gathered at t, sqrt, cast to the sample's dtype, mul, add (and v).
Check: each implementation returns its noise; x_t (and v) must equal the formula in float64
applied to that noise, and the noise must look like N(0, I) (mean and standard deviation
within 6σ of their sampling error: a chain returning zeros as its noise fails).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from benchmarks.harness import Case, SameBytesCopy, compile_baselines, compiled, error_ratio, normal_law_ratio
from fastdiff import ops
from fastdiff.schedule import make_schedule

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Relative error allowed: the chain rounds sqrt(ᾱ), sqrt(1 − ᾱ) and each product to the sample's dtype.
TOLERANCE = {"bf16": 2e-2, "fp16": 3e-3, "fp32": 1e-5}


def shapes(quick: bool, device: str = "cuda") -> list[tuple[int, ...]]:
    if device != "cuda":
        return [(2, 4, 17, 19)] if quick else [(2, 4, 17, 19), (3, 3, 13, 11)]
    if quick:
        return [(1, 4, 64, 64), (256, 4, 128, 128)]
    return [(1, 4, 64, 64), (64, 4, 64, 64), (16, 4, 128, 128), (256, 4, 128, 128), (8, 3, 256, 256)]


def noising_bytes(numel: int, element_size: int, outputs: int) -> float:
    """Minimum bytes of one call: x0 read once, ``outputs`` tensors written (the module docstring's formula)."""
    return (1.0 + outputs) * numel * element_size


def _coefficients(x0, t, acp):
    """sqrt(ᾱ_t), sqrt(1 − ᾱ_t) computed from the fp32 schedule, then cast to the sample's dtype
    and shaped to broadcast over a sample.

    Not diffusers' order (``add_noise`` casts ᾱ to the sample's dtype first): in bf16 ᾱ_0 =
    0.99915 rounds to 1, and the noise term of the first timesteps vanishes (3 % of x_t).
    """
    abar = acp[t].view(-1, *([1] * (x0.ndim - 1)))
    return abar.sqrt().to(x0.dtype), (1 - abar).sqrt().to(x0.dtype)


def eager_q_sample(x0, t, acp):
    """(x_t, ε) as separate PyTorch ops."""
    noise = torch.randn_like(x0)
    a, s = _coefficients(x0, t, acp)
    return a * x0 + s * noise, noise


def eager_v_target(x0, t, acp):
    """(x_t, ε, v) as separate PyTorch ops."""
    noise = torch.randn_like(x0)
    a, s = _coefficients(x0, t, acp)
    return a * x0 + s * noise, noise, a * noise - s * x0


def fastdiff_q_sample(x0, t, acp):
    return ops.q_sample(x0, t, acp)


def fastdiff_v_target(x0, t, acp):
    return ops.training_target(x0, t, acp, prediction="v")


def expected(x0, t, acp, noise):
    """(x_t, v) in float64 for this noise (Ho et al. 2020 Eq. 4; Salimans & Ho 2022)."""
    abar = acp.double()[t].view(-1, *([1] * (x0.ndim - 1)))
    a, s, x0, noise = abar.sqrt(), (1 - abar).sqrt(), x0.double(), noise.double()
    return a * x0 + s * noise, a * noise - s * x0


def noising_check(tolerance: float) -> Callable:
    """x_t (and v) against the formula applied to the implementation's own noise, and that noise's law."""

    def run(call, inputs):
        x_t, noise, *v = call(inputs)  # (x_t, ε) or (x_t, ε, v)
        ref_x_t, ref_v = expected(*inputs, noise)
        error = error_ratio((x_t, *v), (ref_x_t, ref_v)[: 1 + len(v)], tolerance)
        return max(error, normal_law_ratio(noise))

    return run


def _inputs(shape, dtype, device, acp) -> Callable[[], tuple]:
    def make():
        x0 = torch.randn(shape, device=device, dtype=dtype)
        return x0, torch.randint(0, acp.shape[0], (shape[0],), device=device), acp

    return make


def cases(device: str, quick: bool) -> list[Case]:
    acp = make_schedule("scaled_linear", 1000).alphas_cumprod.to(device, torch.float32)
    compile_too = compile_baselines()
    dtypes = {"bf16": DTYPES["bf16"]} if quick else DTYPES
    out = []
    for shape in shapes(quick, device):
        for dt, dtype in dtypes.items():
            numel = math.prod(shape)
            for op, ours, chain, outputs in (
                ("q_sample", fastdiff_q_sample, eager_q_sample, 2),
                ("training_target[v]", fastdiff_v_target, eager_v_target, 3),
            ):
                nbytes = noising_bytes(numel, dtype.itemsize, outputs)
                impls = {"fastdiff": ours, "eager": chain}
                if compile_too:
                    impls["torch.compile"] = compiled(chain)
                impls["copy (same bytes)"] = SameBytesCopy(nbytes)
                out.append(Case(
                    op, str(shape), dt, impls, bytes=nbytes, inputs=_inputs(shape, dtype, device, acp),
                    check=noising_check(TOLERANCE[dt]),
                ))  # fmt: skip
    return out
