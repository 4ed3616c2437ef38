"""GroupNorm (+ scale/shift) + SiLU at Stable Diffusion UNet shapes, forward and forward+backward.

Shapes: B ∈ {1, 2, 8}, (C, H×W) of the SD v1 UNet levels, 32 groups, bf16 and fp16,
channels-last and NCHW, with ADM-style scale/shift (B, C).  Baselines: eager PyTorch
(F.group_norm, then the FiLM terms, then F.silu), torch.compile of the same
function, and apex's fused GroupNorm + SiLU where apex is installed (it takes no
scale/shift, so it is timed on the plain GroupNorm + SiLU it supports; noted).

Bytes (the minimum traffic, the roofline numerator):
    forward          = 2·|x|                 (read x, write y)
    forward+backward = 2·|x| + 3·|x|         (forward; backward reads x and dy, writes dx)
with |x| = B·C·H·W·element size; the (C,) and (B, C) parameters are negligible.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from benchmarks.harness import Case, compile_baselines, forward_backward
from fastdiff.ops import group_norm_silu, use_backend

GROUPS = 32
# (C, H = W) of the SD v1 UNet: 320 @ 64², 640 @ 32², 1280 @ 16² and 8²
LEVELS = [(320, 64), (640, 32), (1280, 16), (1280, 8)]


def _eager(x, w, b, scale, shift):
    h = F.group_norm(x, GROUPS, w, b, 1e-5)
    return F.silu(h * (1 + scale[:, :, None, None]) + shift[:, :, None, None])


_compiled = None


def _compiled_eager():
    """torch.compile of the eager chain, specialised per shape like a model compiled at one resolution."""
    global _compiled
    if _compiled is None:
        # one graph per benchmarked shape (up to 48): lift Dynamo's per-function recompile cap
        import torch._dynamo.config as dynamo_config

        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo_config, knob):
                setattr(dynamo_config, knob, max(getattr(dynamo_config, knob), 64))
        _compiled = torch.compile(_eager, dynamic=False)
    return _compiled


def _apex_module(C: int, dtype: torch.dtype):
    """apex's fused NHWC GroupNorm + SiLU for C channels, or None where apex (or that API) is missing."""
    try:
        from apex.contrib.group_norm import GroupNorm as ApexGroupNorm

        return ApexGroupNorm(GROUPS, C, act="silu").to(device="cuda", dtype=dtype)
    except Exception:
        return None


def _ours(x, w, b, scale, shift):
    return group_norm_silu(x, GROUPS, w, b, scale=scale, shift=shift)


def _reference(x, w, b, scale, shift):
    with use_backend("reference"):
        return group_norm_silu(x, GROUPS, w, b, scale=scale, shift=shift)


def cases(device: str, quick: bool) -> list[Case]:
    on_gpu = device == "cuda"
    batches = [1] if quick else [1, 2, 8]
    levels = LEVELS[-1:] if quick else LEVELS
    dtypes = [torch.bfloat16] if quick or not on_gpu else [torch.bfloat16, torch.float16]
    formats = [torch.channels_last] if quick else [torch.channels_last, torch.contiguous_format]
    out = []
    for dtype, fmt, B, (C, HW) in itertools.product(dtypes, formats, batches, levels):
        dt = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        layout = "channels_last" if fmt == torch.channels_last else "NCHW"
        x = torch.randn(B, C, HW, HW, device=device, dtype=dtype).to(memory_format=fmt)
        # γ, β in the model's dtype, as in a half-precision UNet (F.group_norm takes no other)
        w = torch.randn(C, device=device, dtype=dtype)
        b = torch.randn(C, device=device, dtype=dtype)
        scale = 0.1 * torch.randn(B, C, device=device, dtype=dtype)
        shift = 0.1 * torch.randn(B, C, device=device, dtype=dtype)
        args = (x, w, b, scale, shift)
        nbytes = x.numel() * x.element_size()
        shape = f"({B},{C},{HW},{HW})"
        ours = _ours if on_gpu else _reference
        impls = {"fastdiff": lambda f=ours, a=args: f(*a)}
        if on_gpu:
            impls["eager"] = lambda a=args: _eager(*a)
            if compile_baselines():
                impls["torch.compile"] = lambda a=args: _compiled_eager()(*a)
            apex = _apex_module(C, dtype) if fmt == torch.channels_last else None
            if apex is not None:
                impls["apex (no FiLM)"] = lambda m=apex, xx=x: m(xx)
        out.append(Case("group_norm_silu.fwd", shape, dt, impls, bytes=2 * nbytes, note=layout))

        leaves = [t.detach().clone().requires_grad_() for t in args]
        dy = torch.randn_like(x)
        impls = {"fastdiff": forward_backward(ours, leaves, dy)}
        if on_gpu:
            impls["eager"] = forward_backward(_eager, leaves, dy)
            if compile_baselines():
                impls["torch.compile"] = forward_backward(lambda *a: _compiled_eager()(*a), leaves, dy)
        out.append(Case("group_norm_silu.fwd+bwd", shape, dt, impls, bytes=5 * nbytes, note=layout))
    return out
