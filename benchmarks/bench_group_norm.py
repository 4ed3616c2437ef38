"""GroupNorm + scale/shift + SiLU (a UNet ResBlock's norm), forward and forward+backward.

Shapes (B, C, H, W), 32 groups, ADM-style scale/shift (B, C):
  - SD-1.5 at batch 1, the UNet's four levels of a 64×64 latent: 320 @ 64², 640 @ 32²,
    1280 @ 16² and 8² (32 groups cannot fill an H100's 132 SMs: the batch-1 target is
    a time within 1.5× of a copy of the same bytes);
  - a training batch at 64² latents, (16, 320, 64, 64);
  - 1024² images (128×128 latents): batch 2, and batch 32 (336 MB in bf16: ≥ 256 MB fills
    the chip and passes any cache).
bf16 and fp16, channels-last and NCHW.  ``--quick``: bf16, channels-last, (1, 320, 64, 64)
and (32, 320, 128, 128).

Bytes (the minimum traffic, the roofline numerator), |x| = B·C·H·W·element size:
    forward          = 2·|x|                 (read x, write y)
    forward+backward = 2·|x| + 3·|x|         (forward; backward reads x and dy, writes dx)
(γ, β, scale and shift are (C,) and (B, C): negligible.)

Baselines: the eager chain (F.group_norm, then the FiLM terms, then F.silu),
torch.compile of the same function (`harness.compiled`), and a copy of the same bytes
(the floor).  Check: the output (forward) or the gradients of x, γ, β, scale and shift
(forward+backward) against the same chain in float64 (CPU) / float32 (GPU).
"""
from __future__ import annotations

import itertools
from typing import Callable

import torch
import torch.nn.functional as F

from benchmarks.harness import Case, ForwardBackward, Reference, SameBytesCopy, compile_baselines, compiled
from benchmarks.harness import reference_dtype
from fastdiff.ops import group_norm_silu

GROUPS = 32
EPS = 1e-5
SD15_LEVELS = [(320, 64), (640, 32), (1280, 16), (1280, 8)]  # (C, H = W) of SD-1.5's UNet on a 64² latent
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
LAYOUTS = {"channels_last": torch.channels_last, "NCHW": torch.contiguous_format}
# Relative error allowed against the reference: the eager chain rounds three times (norm,
# FiLM, SiLU) in the input dtype; the gradients of γ, β, scale, shift are sums of many terms.
TOLERANCE = {("fwd", "bf16"): 2e-2, ("fwd", "fp16"): 4e-3, ("fwd+bwd", "bf16"): 4e-2, ("fwd+bwd", "fp16"): 8e-3}


def shapes(quick: bool, device: str = "cuda") -> list[tuple[int, int, int, int]]:
    if device != "cuda":  # 32 groups of 2–3 channels, odd spatial sizes
        cpu = [(2, 64, 9, 11), (1, 96, 5, 7)]
        return cpu[:1] if quick else cpu
    if quick:
        return [(1, 320, 64, 64), (32, 320, 128, 128)]
    return [(1, C, HW, HW) for C, HW in SD15_LEVELS] + [(16, 320, 64, 64), (2, 320, 128, 128), (32, 320, 128, 128)]


def group_norm_bytes(x_numel: int, element_size: int, backward: bool) -> float:
    """Minimum bytes of one call (the module docstring's formula)."""
    return (5.0 if backward else 2.0) * x_numel * element_size


def eager_chain(x, w, b, scale, shift):
    """SiLU(GroupNorm(x)·(1 + scale) + shift) as separate PyTorch ops (a diffusers ResBlock's norm)."""
    h = F.group_norm(x, GROUPS, w, b, EPS)
    return F.silu(h * (1 + scale[:, :, None, None]) + shift[:, :, None, None])


def fastdiff_op(x, w, b, scale, shift):
    return group_norm_silu(x, GROUPS, w, b, EPS, scale=scale, shift=shift)


def _reference(x, w, b, scale, shift):
    ct = reference_dtype(x.device)
    return eager_chain(*(t.detach().to(ct) for t in (x, w, b, scale, shift)))


def _reference_grads(x, w, b, scale, shift, dy):
    ct = reference_dtype(x.device)
    leaves = [t.detach().to(ct).requires_grad_() for t in (x, w, b, scale, shift)]
    with torch.enable_grad():
        return torch.autograd.grad(eager_chain(*leaves), leaves, dy.to(ct))


def _inputs(shape, dtype, layout, device, backward: bool) -> Callable[[], tuple]:
    B, C = shape[:2]

    def make():
        x = torch.randn(shape, device=device, dtype=dtype).to(memory_format=layout)
        # γ, β in the model's dtype, as in a half-precision UNet (F.group_norm takes no other)
        params = [torch.randn(C, device=device, dtype=dtype) for _ in range(2)]
        film = [0.1 * torch.randn(B, C, device=device, dtype=dtype) for _ in range(2)]
        args = [x, *params, *film]
        if not backward:
            return tuple(args)
        return (*(t.requires_grad_() for t in args), torch.randn_like(x))

    return make


def cases(device: str, quick: bool) -> list[Case]:
    dtypes = {"bf16": DTYPES["bf16"]} if quick else DTYPES
    layouts = {"channels_last": LAYOUTS["channels_last"]} if quick else LAYOUTS
    compile_too = compile_baselines()
    out = []
    variants = itertools.product(dtypes.items(), layouts.items(), shapes(quick, device))
    for (dt, dtype), (layout_name, layout), shape in variants:
        numel, size = shape[0] * shape[1] * shape[2] * shape[3], dtype.itemsize
        label = "(" + ",".join(map(str, shape)) + ")"
        for op, backward in (("fwd", False), ("fwd+bwd", True)):
            wrap = ForwardBackward if backward else (lambda fn: fn)
            nbytes = group_norm_bytes(numel, size, backward)
            impls = {"fastdiff": wrap(fastdiff_op), "eager": wrap(eager_chain)}
            if compile_too:
                impls["torch.compile"] = wrap(compiled(eager_chain))
            impls["copy (same bytes)"] = SameBytesCopy(nbytes)
            expected = _reference_grads if backward else _reference
            out.append(Case(
                f"group_norm_silu.{op}", label, dt, impls, bytes=nbytes, note=layout_name,
                inputs=_inputs(shape, dtype, layout, device, backward),
                check=Reference(expected, TOLERANCE[op, dt]),
            ))  # fmt: skip
    return out
