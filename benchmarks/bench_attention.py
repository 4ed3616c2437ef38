"""Flash attention, forward and backward, against PyTorch's SDPA backends, FlashAttention, xformers and eager math.

FLOPs (the two matmuls of the forward, Dao 2023 §4.1), per call:

    forward  = 4 · B · H · Lq · Lk · D          (q kᵀ and P v, 2 FLOPs per multiply-add)
    backward = 2.5 · forward                     (dv, dp, dq, dk and the recomputed q kᵀ:
                                                  five matmuls of the forward's size, over two)

FlashAttention-2/3 and cuDNN report their TFLOP/s with the same convention; % of roofline
is against the dense bf16/fp16 tensor-core peak of the device's data sheet.

Shapes (B, H, Lq, Lk, D):
  - Stable Diffusion 1.5's self-attention, 8 heads, at its four UNet levels of a 64×64
    latent: 4096 tokens × D 40, 1024 × 80, 256 × 160, 64 × 160; at batch 2 (one image
    with classifier-free guidance) and 16 (a training batch);
  - the same queries attending to 77 text tokens (cross-attention);
  - D = 64 and 128 at 16k tokens (B·L = 16k, H·D = 2048, flash-attn's benchmark
    convention), where the published Hopper kernels are measured, and at 4k.
In bf16 and fp16.  ``--quick``: bf16; at batch 16 SD's 4096 × 40 and 256 × 160 self-attention
and 4096 × 77 cross-attention; the two 16k-token shapes.

Baselines, each on the same inputs: SDPA restricted to its flash, memory-efficient and
cuDNN backends (``torch.nn.attention.sdpa_kernel``), FlashAttention-3 and -2 where they
are installed, xformers' memory_efficient_attention where it runs, and eager math
(softmax(q kᵀ·τ) v in the input dtype; left out where its score matrix would pass 2³⁰
elements).  A baseline that cannot run here gets a row saying why.

Check: every implementation's output (forward) or q, k, v gradients (backward) against
softmax(q kᵀ·τ) v in float64 (CPU) / float32 (GPU), computed a few (batch, head) slices
at a time so that 16k-token score matrices fit.

    python -m benchmarks.run --only attention [--quick]
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from benchmarks.harness import Backward, Case, Reference, reference_dtype
from fastdiff import ops

# Dense bf16/fp16 tensor-core peak by device name (vendor data sheets), for the % column.
_PEAKS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0,
          "RTX 4090": 165.0}  # fmt: skip


def _peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in _PEAKS.items() if key in name), None)


PEAK_TFLOPS = _peak_tflops()

# Eager math holds B·H·Lq·Lk scores (and their softmax, and their gradients): cap it.
EAGER_MAX_SCORES = 1 << 30
# The check's reference computes at most this many scores at once.
REFERENCE_CHUNK_SCORES = 1 << 28
TEXT_TOKENS = 77
SD_LEVELS = [(4096, 40), (1024, 80), (256, 160), (64, 160)]  # (tokens, head dim) of SD-1.5's UNet, 8 heads
# Relative error allowed against the fp32/fp64 reference: a few ulps of the dtype (bf16's is
# 2⁻⁸, fp16's 2⁻¹¹), more for eager math's bf16 score matrix and for the gradients.
TOLERANCE = {("fwd", "bf16"): 3e-2, ("fwd", "fp16"): 5e-3, ("bwd", "bf16"): 5e-2, ("bwd", "fp16"): 1e-2}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def attention_flops(B: int, H: int, Lq: int, Lk: int, D: int, backward: bool = False) -> float:
    """FLOPs of one call (the module docstring's formula)."""
    forward = 4.0 * B * H * Lq * Lk * D
    return 2.5 * forward if backward else forward


def shapes(quick: bool, device: str = "cuda") -> list[tuple[int, int, int, int, int]]:
    """(B, H, Lq, Lk, D) of each case."""
    if device != "cuda":  # a CPU times the reference path: small odd shapes, SD's head dims, self and cross
        cpu = [(1, 2, 67, 67, 40), (2, 1, 33, TEXT_TOKENS, 80), (1, 2, 19, 19, 160), (1, 1, 131, 131, 64)]
        return cpu[:2] if quick else cpu
    frontier = [(16384 // L, 2048 // D, L, L, D) for D in (64, 128) for L in ((16384,) if quick else (4096, 16384))]
    if quick:  # SD's largest level, its split head dim 160, its cross-attention at 4096 queries
        return [(16, 8, 4096, 4096, 40), (16, 8, 256, 256, 160), (16, 8, 4096, TEXT_TOKENS, 40)] + frontier
    self_attn = [(B, 8, L, L, D) for B in (2, 16) for L, D in SD_LEVELS]
    cross = [(B, 8, L, TEXT_TOKENS, D) for B in (2, 16) for L, D in SD_LEVELS]
    return self_attn + cross + frontier


# ----------------------------------------------------------------------------- implementations


def eager_math(q, k, v):
    """softmax(q kᵀ/√D) v as separate PyTorch ops in the input dtype."""
    return torch.softmax((q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1])), dim=-1) @ v


def sdpa(backend) -> Callable:
    """scaled_dot_product_attention restricted to one backend (an error where it cannot run)."""
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)

    return run


def _blhd(fn: Callable) -> Callable:
    """A (B, L, H, D) attention called on (B, H, L, D) tensors; the views keep one set of inputs for all."""

    def run(q, k, v):
        out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return (out[0] if isinstance(out, tuple) else out).transpose(1, 2)  # FA3 may return (out, lse)

    return run


@functools.cache
def flash_attn(module: str) -> tuple[Callable | None, str]:
    """(flash_attn_func of FlashAttention-3 ("flash_attn_interface") or -2 ("flash_attn"), or None and why)."""
    try:
        fn = __import__(module).flash_attn_func
    except Exception as e:
        return None, f"{module} is not importable ({type(e).__name__})"
    return _blhd(fn), ""


@functools.cache
def xformers_attention() -> tuple[Callable | None, str]:
    """(xformers' memory_efficient_attention, or None and why): a wheel built for another
    torch, or without CUDA kernels, imports but cannot run, so it is tried once."""
    try:
        import xformers.ops as xops
    except Exception as e:
        return None, f"xformers is not importable ({type(e).__name__})"
    run = _blhd(xops.memory_efficient_attention)
    try:
        probe = torch.randn(1, 1, 16, 64, device="cuda", dtype=torch.float16)
        run(probe, probe, probe)
    except Exception as e:
        return None, f"xformers does not run here: {type(e).__name__}: {str(e).strip().splitlines()[0][:120]}"
    return run, ""


def implementations(B: int, H: int, Lq: int, Lk: int, gpu: bool) -> tuple[dict[str, Callable], dict[str, str]]:
    """(name -> forward, baseline -> why it cannot run) for one shape; fastdiff first."""
    from torch.nn.attention import SDPBackend

    impls = {"fastdiff": ops.attention, "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION)}
    unavailable = {}
    if gpu:  # a CPU build has neither of these backends, nor the libraries below
        impls["sdpa_efficient"] = sdpa(SDPBackend.EFFICIENT_ATTENTION)
        impls["sdpa_cudnn"] = sdpa(SDPBackend.CUDNN_ATTENTION)
        for name, (fn, why) in (
            ("flash_attn3", flash_attn("flash_attn_interface")),
            ("flash_attn2", flash_attn("flash_attn")),
            ("xformers", xformers_attention()),
        ):
            if fn is None:
                unavailable[name] = why
            else:
                impls[name] = fn
    scores = B * H * Lq * Lk
    if scores <= EAGER_MAX_SCORES:
        impls["eager_math"] = eager_math
    else:
        unavailable["eager_math"] = f"left out: {scores:.2g} scores > 2^30"
    return impls, unavailable


# ----------------------------------------------------------------------------- reference


def _slices(q: torch.Tensor, k: torch.Tensor) -> Iterator[slice]:
    """Slices of the flattened (B·H) dimension holding at most REFERENCE_CHUNK_SCORES scores."""
    BH, Lq, Lk = q.shape[0] * q.shape[1], q.shape[2], k.shape[2]
    step = max(1, REFERENCE_CHUNK_SCORES // (Lq * Lk))
    return (slice(i, min(i + step, BH)) for i in range(0, BH, step))


def reference_forward(q, k, v):
    """softmax(q kᵀ/√D) v in the reference precision, a few (batch, head) slices at a time."""
    ct = reference_dtype(q.device)
    flat = [t.detach().flatten(0, 1) for t in (q, k, v)]
    out = torch.empty(flat[0].shape, dtype=ct, device=q.device)
    for s in _slices(q, k):
        out[s] = eager_math(*(t[s].to(ct) for t in flat))
    return out.view(q.shape)


def reference_backward(q, k, v, do):
    """(dq, dk, dv) of softmax(q kᵀ/√D) v for the output gradient ``do``, in the reference precision."""
    ct = reference_dtype(q.device)
    flat = [t.detach().flatten(0, 1) for t in (q, k, v, do)]
    grads = [torch.empty(t.shape, dtype=ct, device=q.device) for t in flat[:3]]
    for s in _slices(q, k):
        leaves = [t[s].to(ct).requires_grad_() for t in flat[:3]]
        with torch.enable_grad():
            parts = torch.autograd.grad(eager_math(*leaves), leaves, flat[3][s].to(ct))
        for g, part in zip(grads, parts):
            g[s] = part
    return tuple(g.view(t.shape) for g, t in zip(grads, (q, k, v)))


# ----------------------------------------------------------------------------- cases


def _inputs(shape, dtype, device, backward: bool) -> Callable[[], tuple]:
    B, H, Lq, Lk, D = shape

    def make():
        q = torch.randn(B, H, Lq, D, device=device, dtype=dtype, requires_grad=backward)
        k, v = (torch.randn(B, H, Lk, D, device=device, dtype=dtype, requires_grad=backward) for _ in range(2))
        return (q, k, v, torch.randn_like(q)) if backward else (q, k, v)

    return make


def cases(device: str, quick: bool) -> Iterator[Case]:
    """Yields the cases one at a time: only one case's tensors are alive at once."""
    gpu = device == "cuda"
    dtypes = {"bf16": DTYPES["bf16"]} if quick else DTYPES
    for shape in shapes(quick, device):
        B, H, Lq, Lk, D = shape
        impls, unavailable = implementations(B, H, Lq, Lk, gpu)
        label, note = f"({B},{H},{Lq},{Lk},{D})", "cross" if Lk == TEXT_TOKENS else "self"
        for dt, dtype in dtypes.items():
            yield Case(
                "attention_fwd", label, dt, dict(impls), flops=attention_flops(*shape), note=note,
                inputs=_inputs(shape, dtype, device, backward=False), unavailable=dict(unavailable),
                check=Reference(reference_forward, TOLERANCE["fwd", dt]),
            )  # fmt: skip
            yield Case(
                "attention_bwd", label, dt, {name: Backward(fn) for name, fn in impls.items()},
                flops=attention_flops(*shape, backward=True), note=note, unavailable=dict(unavailable),
                inputs=_inputs(shape, dtype, device, backward=True),
                check=Reference(reference_backward, TOLERANCE["bwd", dt]),
            )  # fmt: skip
