"""Counter-based Gaussian noise, the same in the kernels and in the PyTorch reference.

The kernels draw noise in-register with `philox_normal(key, offset)`: Triton's
Philox-4x32-10 (``tl.randint4x``; Salmon et al. 2011) and a Box-Muller transform.
`randn_like_philox` is the same generator written in PyTorch, so the reference path
produces the same noise as the kernels for the same keys (to fp32 rounding of log
and sqrt): an image drawn on the CPU matches the one drawn on a GPU, and tests can
compare kernel and reference element by element.

Box-Muller needs cos(2πu) for u in [0, 1) only.  Instead of ``tl.cos`` (whose
libdevice version carries a Payne-Hanek range reduction for huge arguments, with a
local-memory stack frame) both sides evaluate a short polynomial after folding the
argument into [0, π/2]: no stack frame, error within fp32 rounding (~2e-7).

Noise is addressed by ``(key, offset)``: ``key`` is one int64 per sample (its seed),
``offset`` the element's logical (row-major, NCHW) index inside the sample.  It is
therefore independent of batch composition and memory layout.

uint32 arithmetic is emulated in int64; the 32x32->64 bit products are split into
16-bit halves so that nothing overflows int64.
"""
from __future__ import annotations

import torch

from fastdiff.ops._backend import HAS_TRITON

_MASK32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_N_ROUNDS = 10
# uint_to_uniform_float: int32 (folded to >= 0) * 2^-31, as Triton writes it.
_UNIFORM_SCALE = 4.6566127342e-10
# Odd 63-bit multiplier that turns (seed, step) into a fresh Philox key.
KEY_STRIDE = 0x5851F42D4C957F2D


def _mulhilo(a: torch.Tensor, const: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * const for uint32 a (held in int64)."""
    p_hi = a * (const >> 16)  # < 2^48
    p_lo = a * (const & 0xFFFF)  # < 2^48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = ((p_hi << 16) + p_lo) & _MASK32
    return hi, lo


def philox4x32(key: torch.Tensor, counter: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Philox-4x32-10 with counter (counter, 0, 0, 0), key split from the int64 seed.

    ``key`` and ``counter`` broadcast together; returns four uint32 words in int64.
    """
    k0 = key & _MASK32
    k1 = (key >> 32) & _MASK32
    c0 = counter & _MASK32
    c1 = torch.zeros_like(c0)
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    c0, c1, c2, c3, k0, k1 = torch.broadcast_tensors(c0, c1, c2, c3, k0, k1)
    for _ in range(_N_ROUNDS):
        hi_b, lo_b = _mulhilo(c2, _ROUND_B)
        hi_a, lo_a = _mulhilo(c0, _ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def _uniform(word: torch.Tensor) -> torch.Tensor:
    signed = torch.where(word >= 2**31, word - 2**32, word)  # bitcast to int32
    folded = torch.where(signed < 0, -signed - 1, signed)  # ~x for x < 0
    return folded.to(torch.float32) * _UNIFORM_SCALE


# Taylor coefficients of cos(y) = Σ (−1)^k y^{2k}/(2k)!, k = 1..6; on [0, π/2] the
# first omitted term is below 7e-9.
_COS_COEFFS = (-1 / 2, 1 / 24, -1 / 720, 1 / 40320, -1 / 3628800, 1 / 479001600)
_PI = 3.141592653589793


def _cos_2pi_ref(u: torch.Tensor) -> torch.Tensor:
    """cos(2πu) for u in [0, 1), fp32, in the same steps as the kernel's `_cos_2pi`."""
    y = (2 * _PI) * (u - 0.5).abs()  # cos(2πu) = −cos(2π(u − ½)), and cos is even
    flip = y > _PI / 2
    y = torch.where(flip, _PI - y, y)  # cos(π − y) = −cos(y)
    y2 = y * y
    c = torch.full_like(y2, _COS_COEFFS[-1])
    for coeff in reversed(_COS_COEFFS[:-1]):
        c = coeff + y2 * c
    c = 1 + y2 * c
    return torch.where(flip, c, -c)


def randn_like_philox(keys: torch.Tensor, shape: tuple[int, ...], device=None) -> torch.Tensor:
    """N(0, 1) noise of ``shape`` = (B, *sample) in fp32; sample b uses ``keys[b]``.

    Element (b, i) (i the row-major index inside the sample) is the kernels'
    ``philox_normal(keys[b], i)``.
    """
    device = keys.device if device is None else device
    batch = shape[0]
    numel = 1
    for s in shape[1:]:
        numel *= s
    keys = keys.to(device=device, dtype=torch.int64).view(batch, 1)
    offsets = torch.arange(numel, device=device, dtype=torch.int64).view(1, numel)
    w0, w1, _, _ = philox4x32(keys, offsets)
    u1 = torch.clamp(_uniform(w0), min=1.0e-7)
    r = torch.sqrt(-2.0 * torch.log(u1))
    return (r * _cos_2pi_ref(_uniform(w1))).view(shape)


def step_keys(seeds: torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
    """Philox keys for denoising step ``step`` of images with per-image ``seeds``.

    The same formula is used inside the kernels (int64 arithmetic wraps).
    """
    # as an int64 tensor product, so that it wraps around exactly as in the kernels
    return seeds.to(torch.int64) + torch.as_tensor(step, dtype=torch.int64, device=seeds.device) * KEY_STRIDE


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _uniform_01(word):
        """uint32 word -> float in [0, 1): fold the int32 bit pattern to >= 0, scale by 2^-31."""
        x = word.to(tl.int32, bitcast=True)
        x = tl.where(x < 0, -x - 1, x)
        return x.to(tl.float32) * 4.6566127342e-10

    @triton.jit
    def _cos_2pi(u):
        """cos(2πu) for u in [0, 1); see `_cos_2pi_ref` for the steps."""
        y = 6.283185307179586 * tl.abs(u - 0.5)
        flip = y > 1.5707963267948966
        y = tl.where(flip, 3.141592653589793 - y, y)
        y2 = y * y
        c = 1.0 + y2 * (-0.5 + y2 * (1.0 / 24 + y2 * (-1.0 / 720 + y2 * (1.0 / 40320 + y2 * (
            -1.0 / 3628800 + y2 * (1.0 / 479001600))))))  # fmt: skip
        return tl.where(flip, c, -c)

    @triton.jit
    def sample_block(N, BLOCK: tl.constexpr):
        """Program (block, b) of a per-sample elementwise kernel over (B, N) rows of memory:
        (b, its in-sample offsets, their in-bounds mask, the row's int64 base offset b·N)."""
        b = tl.program_id(1)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        return b, offs, offs < N, b.to(tl.int64) * N

    @triton.jit
    def nchw_offsets(offs, C, S, CHANNELS_LAST: tl.constexpr):
        """The logical (NCHW) index of in-sample memory offsets: noise is addressed by it, so that a
        sample draws the same numbers in either layout (channels-last memory order is (spatial, C))."""
        if CHANNELS_LAST:
            logical = (offs % C) * S + offs // C
        else:
            logical = offs
        return logical

    @triton.jit
    def philox_normal(key, offset):
        """N(0, 1) fp32 for each int32 ``offset`` under the int64 Philox ``key``."""
        w0, w1, _, _ = tl.randint4x(key, offset)
        u1 = tl.maximum(_uniform_01(w0), 1.0e-7)
        return tl.sqrt(-2.0 * tl.log(u1)) * _cos_2pi(_uniform_01(w1))
