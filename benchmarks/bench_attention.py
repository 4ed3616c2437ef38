"""Flash attention, forward and backward, against PyTorch's SDPA backends, xformers and eager math.

FLOPs (the two matmuls of the forward, Dao 2023 §4.1), per call:

    forward  = 4 · B · H · Lq · Lk · D          (q kᵀ and P v, 2 FLOPs per multiply-add)
    backward = 2.5 · forward                     (five matmuls of the same size, over two)

Shapes: Stable Diffusion's self-attention at 64×64, 32×32 and 16×16 latents
((2, 8, 4096, 40), (2, 8, 1024, 80), (2, 8, 256, 160)), the same queries attending to
77 text tokens, and D = 64/128 at L = 1k..16k with B·L = 16k tokens and H·D = 2048
(flash-attn's benchmark convention), in bf16 and fp16.

Baselines, each timed on the same tensors: SDPA restricted to its flash backend and
to its memory-efficient backend (torch.nn.attention.sdpa_kernel), xformers'
memory_efficient_attention where installed, and eager math (softmax(q kᵀ·τ) v in the
input dtype; skipped where its score matrix would not fit comfortably).

    python -m benchmarks.run --only attention [--quick]
"""
from __future__ import annotations

import functools
import math
from typing import Iterator

import torch
import torch.nn.functional as F

from benchmarks.harness import Case
from fastdiff.ops.attention import attention

# Dense bf16/fp16 tensor-core peak by device name (vendor data sheets), for the % column.
_PEAKS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.0}


def _peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in _PEAKS.items() if key in name), None)


PEAK_TFLOPS = _peak_tflops()

# Eager math holds B·H·Lq·Lk scores (and their softmax, and their gradients): cap it.
_EAGER_MAX_SCORES = 1 << 30


def _shapes(quick: bool) -> list[tuple[int, int, int, int, int]]:
    """(B, H, Lq, Lk, D)."""
    sd = [(2, 8, 4096, 4096, 40), (2, 8, 1024, 1024, 80), (2, 8, 256, 256, 160)]
    cross = [(2, 8, 4096, 77, 40), (2, 8, 1024, 77, 80), (2, 8, 256, 77, 160)]
    if quick:
        return sd + [(2, 8, 4096, 77, 40), (8, 16, 2048, 2048, 128)]
    long = [(16384 // L, 2048 // D, L, L, D) for D in (64, 128) for L in (1024, 2048, 4096, 8192, 16384)]
    return sd + cross + long


def _cpu_shape(shape):
    """On a CPU only the reference path is timed: shrink the sequence so that it finishes."""
    B, H, Lq, Lk, D = shape
    return 1, 2, min(Lq, 512), min(Lk, 512), D


def _eager_math(q, k, v):
    return torch.softmax((q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1])), dim=-1) @ v


def _sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)

    return run


@functools.cache
def _xformers():
    try:
        import xformers.ops as xops
    except Exception:  # not installed, or built for another torch: skip the baseline
        return None

    def run(q, k, v):
        # xformers takes (B, L, H, D); the views keep one set of tensors for every implementation.
        return xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    try:  # a wheel built for another torch or without CUDA kernels imports but cannot run
        probe = torch.randn(1, 1, 16, 64, device="cuda", dtype=torch.float16)
        run(probe, probe, probe)
    except Exception as e:
        print(f"xformers baseline skipped: {type(e).__name__}: {str(e).splitlines()[0]}")
        return None
    return run


def _implementations(on_gpu: bool, scores: int) -> dict:
    impls = {"fastdiff": attention}
    if not on_gpu:
        return impls
    from torch.nn.attention import SDPBackend

    impls["sdpa_flash"] = _sdpa(SDPBackend.FLASH_ATTENTION)
    impls["sdpa_efficient"] = _sdpa(SDPBackend.EFFICIENT_ATTENTION)
    xf = _xformers()
    if xf is not None:
        impls["xformers"] = xf
    if scores <= _EAGER_MAX_SCORES:
        impls["eager_math"] = _eager_math
    return impls


def _forward(fn, q, k, v):
    return lambda: fn(q, k, v)


def _backward(fn, q, k, v):
    """Time the backward alone: one forward builds the graph, each call replays its backward."""
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves)
    do = torch.randn_like(out)
    return lambda: torch.autograd.grad(out, leaves, do, retain_graph=True)


def cases(device: str, quick: bool) -> Iterator[Case]:
    """Yields the cases one at a time, so that only one shape's tensors and graphs are alive at once."""
    on_gpu = device == "cuda"
    for shape in _shapes(quick):
        B, H, Lq, Lk, D = shape if on_gpu else _cpu_shape(shape)
        impls = _implementations(on_gpu, B * H * Lq * Lk)
        flops = 4.0 * B * H * Lq * Lk * D
        for dtype, dt in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
            gen = torch.Generator(device).manual_seed(0)
            q, k, v = (
                torch.randn(B, H, L, D, device=device, generator=gen).to(dtype) for L in (Lq, Lk, Lk)
            )  # fmt: skip
            label = f"({B},{H},{Lq},{Lk},{D})"
            yield Case("attention_fwd", label, dt, {n: _forward(f, q, k, v) for n, f in impls.items()}, flops=flops)
            bwd = {n: _backward(f, q, k, v) for n, f in impls.items()}
            yield Case("attention_bwd", label, dt, bwd, flops=2.5 * flops)
