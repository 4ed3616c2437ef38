"""Counter-based Gaussian noise, bit-compatible with Triton's ``tl.randn``.

The kernels draw noise in-register with ``tl.randn(key, offset)`` (Philox-4x32-10,
Salmon et al. 2011, then Box-Muller).  This module is the same generator written
in PyTorch, so the reference path produces the *same* noise as the kernels for the
same keys: an image drawn on the CPU matches the one drawn on a GPU, and tests can
compare kernel and reference exactly.

Noise is addressed by ``(key, offset)``: ``key`` is one int64 per sample (its seed),
``offset`` the element's logical (row-major, NCHW) index inside the sample.  It is
therefore independent of batch composition and memory layout.

uint32 arithmetic is emulated in int64; the 32x32->64 bit products are split into
16-bit halves so that nothing overflows int64.
"""
from __future__ import annotations

import torch

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


def randn_like_philox(keys: torch.Tensor, shape: tuple[int, ...], device=None) -> torch.Tensor:
    """N(0, 1) noise of ``shape`` = (B, *sample) in fp32; sample b uses ``keys[b]``.

    Element (b, i) (i the row-major index inside the sample) is
    ``tl.randn(keys[b], i)``.
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
    theta = 6.283185307179586 * _uniform(w1)
    r = torch.sqrt(-2.0 * torch.log(u1))
    return (r * torch.cos(theta)).view(shape)


def step_keys(seeds: torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
    """Philox keys for denoising step ``step`` of images with per-image ``seeds``.

    The same formula is used inside the kernels (int64 arithmetic wraps).
    """
    return seeds.to(torch.int64) + step * KEY_STRIDE
