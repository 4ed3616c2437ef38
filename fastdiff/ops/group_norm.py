r"""Fused GroupNorm (+ FiLM scale/shift) + SiLU, forward and backward.

Math (Wu & He 2018 for GroupNorm; Dhariwal & Nichol 2021, §3, for the scale-shift
norm of ADM ResBlocks; Elfwing et al. 2018 / Hendrycks & Gimpel 2016 for SiLU).
x is (B, C, *spatial), S spatial positions, G groups of C_g = C/G channels, so a
group holds N = C_g·S elements:

    μ_bg  = (1/N) Σ_{c∈g, s} x_bcs            σ²_bg = (1/N) Σ_{c∈g, s} (x_bcs − μ_bg)²
    r_bg  = 1 / sqrt(σ²_bg + eps)              x̂_bcs = (x_bcs − μ_bg)·r_bg
    h     = γ_c·x̂ + β_c                       (GroupNorm)
    z     = h·(1 + scale_bc) + shift_bc        (FiLM from the time embedding)
    y     = SiLU(z) = z·σ(z)                   (or y = z when silu=False)

Per channel this is one multiply-add on the centred input:
    z = (x − μ_bg)·A_bc + d_bc,   a_bc = γ_c(1 + scale_bc),  A_bc = r_bg·a_bc,
                                  d_bc = β_c(1 + scale_bc) + shift_bc.
Keeping x − μ (instead of x·A + (d − μA)) avoids cancellation when |μ| ≫ σ.

Backward, with dz = dy·σ(z)·(1 + z(1 − σ(z))) (dz = dy without SiLU) and the two
per-channel sums P_bc = Σ_s dz_bcs, Q_bc = Σ_s dz_bcs·x̂_bcs:

    dshift_bc = P_bc                   dscale_bc = γ_c·Q_bc + β_c·P_bc
    dβ_c      = Σ_b (1 + scale_bc)·P_bc    dγ_c  = Σ_b (1 + scale_bc)·Q_bc
    dx_bcs    = r·(a·dz − m1/N − x̂·m2/N),  m1_bg = Σ_{c∈g} a_bc P_bc,  m2_bg = Σ_{c∈g} a_bc Q_bc
              = dz·A_bc + (x − μ_bg)·E_bg + F_bg,   E = −r²·m2/N,  F = −r·m1/N.

Statistics: each program reduces a (channel block × spatial chunk) tile by tile;
each tile's mean and centred sum of squares M2 are exact two-pass values in
registers, merged into the running ones with Chan et al.'s (1979) parallel
update δ = m_t − m, m += δ·n_t/n', M2 += M2_t + δ²·n·n_t/n'.  A per-group
finalize merges the per-channel, per-chunk partials the same way.  Nothing is
computed as E[x²] − E[x]², which loses every digit in fp32 when |μ| ≫ σ.

Filling the GPU: at batch 1–2 a Stable Diffusion block has only B·G = 32–64
groups; the reductions are split over (spatial chunk, channel block, sample)
programs, the number of chunks picked from the shape so that there are a few
programs per SM, and a small per-group kernel combines the partials.  Forward is
three launches (partial stats, per-group finalize, normalise); backward four
(partial sums, per-group finalize, dγ/dβ column sums, dx).

Precision: inputs are read and all arithmetic done in fp32; y and dx are stored
in x's dtype; weight/bias/scale/shift are read as fp32 (the public function casts
them once if they are stored in another dtype, and autograd casts the gradients
back).  Layouts: contiguous (NC…) and channels-last (N…C) inputs are read in
place, the output has the input's strides; any other stride pattern is made
contiguous first (a copy).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch

from fastdiff.ops import tensor_checks
from fastdiff.ops import _aot, _backend
from fastdiff.ops._backend import HAS_TRITON, cdiv, define_op, use_triton
from fastdiff.ops.launch_tables import DTYPE_CODES, KernelCase, LaunchTable, Plans, aligned, device_sms, divisible_key
from fastdiff.ops.launch_tables import dtype_code
from fastdiff.ops._layout import sample_layout

# ----------------------------------------------------------------------------- reference


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for fp32/fp16/bf16; fp64 stays fp64 (so gradcheck can run on the reference)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_channel(t: Optional[torch.Tensor], x: torch.Tensor, default: float, acc: torch.dtype) -> torch.Tensor:
    """(C,) or (B, C) → broadcastable against x (B, C, *spatial), in ``acc``; None → ``default``."""
    if t is None:
        return torch.tensor(default, dtype=acc, device=x.device)
    shape = (1, -1) if t.ndim == 1 else tuple(t.shape)
    return t.to(acc).reshape(*shape, *([1] * (x.ndim - 2)))


def _stats_ref(x: torch.Tensor, num_groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """μ and r = 1/sqrt(σ² + eps) per (B, G), biased variance, in the accumulation dtype."""
    xg = x.to(_acc_dtype(x)).reshape(x.shape[0], num_groups, -1)
    mean = xg.mean(-1)
    var = (xg - mean[..., None]).square().mean(-1)
    return mean, torch.rsqrt(var + eps)


def _expand_groups(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B, G) per-group values → broadcastable against x (B, C, *spatial)."""
    B, G = t.shape
    return t.repeat_interleave(x.shape[1] // G, dim=1).reshape(B, -1, *([1] * (x.ndim - 2)))


def group_norm_silu_ref(
    x: torch.Tensor,
    num_groups: int,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    *,
    scale: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    silu: bool = True,
) -> torch.Tensor:
    """Reference y = SiLU(GN(x)·(1 + scale) + shift) in fp32 (fp64 for fp64 x), returned in x's dtype.

    Plain differentiable PyTorch: the ground truth of the kernels and of their gradients.
    """
    acc = _acc_dtype(x)
    mean, rstd = _stats_ref(x, num_groups, eps)
    xhat = (x.to(acc) - _expand_groups(mean, x)) * _expand_groups(rstd, x)
    h = xhat * _per_channel(weight, x, 1.0, acc) + _per_channel(bias, x, 0.0, acc)
    z = h * (1 + _per_channel(scale, x, 0.0, acc)) + _per_channel(shift, x, 0.0, acc)
    y = torch.nn.functional.silu(z) if silu else z
    return y.to(x.dtype)


def group_norm_silu_backward_ref(
    dy: torch.Tensor,
    x: torch.Tensor,
    num_groups: int,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    scale: Optional[torch.Tensor],
    shift: Optional[torch.Tensor],
    silu: bool,
) -> tuple[torch.Tensor, ...]:
    """(dx, dweight, dbias, dscale, dshift) from the closed form in the module docstring.

    fp32 math (fp64 for fp64 x); dx in x's dtype, the rest fp32 (None for absent inputs).
    """
    acc = _acc_dtype(x)
    B, C = x.shape[:2]
    N = x[0, : C // num_groups].numel()
    mean, rstd = _stats_ref(x, num_groups, eps)
    xc = x.to(acc) - _expand_groups(mean, x)
    r = _expand_groups(rstd, x)
    xhat = xc * r
    one_plus_s = 1 + _per_channel(scale, x, 0.0, acc)
    gamma, beta = _per_channel(weight, x, 1.0, acc), _per_channel(bias, x, 0.0, acc)
    a = gamma * one_plus_s
    z = xhat * a + beta * one_plus_s + _per_channel(shift, x, 0.0, acc)
    dz = dy.to(acc)
    if silu:
        sig = torch.sigmoid(z)
        dz = dz * sig * (1 + z * (1 - sig))
    spatial = tuple(range(2, x.ndim))
    P = dz.sum(spatial) if spatial else dz  # (B, C)
    Q = (dz * xhat).sum(spatial) if spatial else dz * xhat

    def bc(t):  # broadcastable per-channel value → (B, C)
        return t.reshape(t.shape[0] if t.ndim else 1, -1).expand(B, C)

    a_bc, s_bc = bc(a), bc(one_plus_s)
    m1 = (a_bc * P).reshape(B, num_groups, -1).sum(-1) / N
    m2 = (a_bc * Q).reshape(B, num_groups, -1).sum(-1) / N
    dx = r * (a * dz - _expand_groups(m1, x) - xhat * _expand_groups(m2, x))
    dweight = (s_bc * Q).sum(0) if weight is not None else None
    dbias = (s_bc * P).sum(0) if bias is not None else None
    dscale = bc(gamma) * Q + bc(beta) * P if scale is not None else None
    dshift = P if shift is not None else None
    return dx.to(x.dtype), dweight, dbias, dscale, dshift


# ----------------------------------------------------------------------------- kernels

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _tile_offsets(
        c,  # (BLOCK_C,) channel indices
        s,  # (BLOCK_S,) spatial indices
        C,
        S,
        CHANNELS_LAST: tl.constexpr,
    ):
        """In-sample offsets of a (BLOCK_C, BLOCK_S) tile and its bounds mask."""
        if CHANNELS_LAST:
            offs = s[None, :] * C + c[:, None]
        else:
            offs = c[:, None] * S + s[None, :]
        return offs, (c[:, None] < C) & (s[None, :] < S)

    @triton.jit
    def _centred_tile(
        X,  # (B, C, S) or (B, S, C)
        MEAN,  # (B, G) fp32
        b,
        c,  # (BLOCK_C,) channel indices
        s,  # (BLOCK_S,) spatial indices
        C, S, G, CG,
        CHANNELS_LAST: tl.constexpr,
    ):
        """x − μ in fp32 over a (BLOCK_C, BLOCK_S) tile of sample b, with the tile's in-sample offsets,
        its bounds mask and the sample's start: what the apply and dx kernels read first."""
        mu = tl.load(MEAN + b * G + c // CG, mask=c < C, other=0.0)
        offs, mask = _tile_offsets(c, s, C, S, CHANNELS_LAST)
        sample = b.to(tl.int64) * C * S
        x = tl.load(X + sample + offs, mask=mask, other=0.0).to(tl.float32)
        return x - mu[:, None], offs, mask, sample

    @triton.jit
    def _elementwise_tile(C, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
        """Program (spatial tile, channel tile, b) of the elementwise passes: (s, c, b, c < C)."""
        s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        return s, c, tl.program_id(2), c < C

    @triton.jit
    def _sigmoid(z):
        # e^{−z} overflows fp32 below z ≈ −88, where σ(z) < 1e-38 anyway: clamp instead of producing inf
        return 1.0 / (1.0 + tl.exp2(tl.minimum(-z * 1.4426950408889634, 126.0)))

    @triton.jit
    def _silu_grad(
        dy,  # fp32 tile
        z,  # fp32 tile
    ):
        """dy · d SiLU(z)/dz = dy · σ(z)·(1 + z·(1 − σ(z)))."""
        return dy * _sigmoid(z) * (1.0 + z * (1.0 - _sigmoid(z)))

    # C and S may be specialised (cases for both multiples of 16: vector loads); other
    # integers never are, as in the compiled library (see launch_tables).
    @triton.jit(do_not_specialize=["CHUNK_S", "TILES", "SPLIT"])
    def _gn_stats_kernel(
        X,  # (B, C, S) or (B, S, C) input
        PMEAN,  # (B, C, SPLIT) fp32 out: per-channel mean of one spatial chunk
        PM2,  # (B, C, SPLIT) fp32 out: per-channel Σ (x − mean)² of that chunk
        C,
        S,
        CHUNK_S,  # spatial positions per chunk (TILES·BLOCK_S)
        TILES,  # tiles per chunk
        SPLIT,  # chunks per channel
        CHANNELS_LAST: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        k = tl.program_id(0)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        b = tl.program_id(2)
        base = X + b.to(tl.int64) * C * S
        s_start = k * CHUNK_S
        n_tiles = tl.minimum(TILES, tl.cdiv(S - s_start, BLOCK_S))
        n = 0.0
        mean = tl.zeros([BLOCK_C], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
        for t in range(0, n_tiles):
            s0 = s_start + t * BLOCK_S
            offs, mask = _tile_offsets(c, s0 + tl.arange(0, BLOCK_S), C, S, CHANNELS_LAST)
            x = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
            n_t = tl.minimum(S - s0, BLOCK_S).to(tl.float32)
            mean_t = tl.sum(x, axis=1) / n_t
            dev = tl.where(mask, x - mean_t[:, None], 0.0)
            m2_t = tl.sum(dev * dev, axis=1)
            # Chan et al. merge of (n, mean, m2) with the tile's (n_t, mean_t, m2_t)
            n_new = n + n_t
            delta = mean_t - mean
            mean += delta * (n_t / n_new)
            m2 += m2_t + delta * delta * (n * n_t / n_new)
            n = n_new
        out = (b * C + c) * SPLIT + k
        tl.store(PMEAN + out, mean, mask=c < C)
        tl.store(PM2 + out, m2, mask=c < C)

    @triton.jit(do_not_specialize=["C", "S", "G", "CG", "SPLIT", "CHUNK_S", "stride_scale_b", "stride_shift_b"])
    def _gn_finalize_kernel(
        PMEAN,  # (B, C, SPLIT) fp32 partial means
        PM2,  # (B, C, SPLIT) fp32 partial M2
        WEIGHT,  # (C,) γ, any float dtype (HAS_WEIGHT)
        BIAS,  # (C,) β, any float dtype (HAS_BIAS)
        SCALE,  # (B, C) any float dtype, row stride stride_scale_b (HAS_SCALE)
        SHIFT,  # (B, C) any float dtype, row stride stride_shift_b (HAS_SHIFT)
        MEAN,  # (B, G) fp32 out: μ
        RSTD,  # (B, G) fp32 out: 1/sqrt(σ² + eps)
        COEF_A,  # (B, C) fp32 out: A = r·γ(1 + scale)
        COEF_D,  # (B, C) fp32 out: d = β(1 + scale) + shift
        C,
        S,
        G,
        CG,  # channels per group
        SPLIT,
        CHUNK_S,
        stride_scale_b,
        stride_shift_b,
        eps,
        HAS_WEIGHT: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        HAS_SHIFT: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_CG: tl.constexpr,
    ):
        pid = tl.program_id(0)  # = b·G + g
        b = pid // G
        g = pid % G
        # A group's partials are one contiguous run: channels g·CG … g·CG + CG − 1, all chunks.
        first = (b * C + g * CG) * SPLIT
        count = CG * SPLIT
        n_total = (CG * S).to(tl.float32)
        acc = tl.zeros([BLOCK_P], dtype=tl.float32)
        for i0 in range(0, count, BLOCK_P):
            i = i0 + tl.arange(0, BLOCK_P)
            chunk = i % SPLIT
            n_k = tl.minimum(S - chunk * CHUNK_S, CHUNK_S).to(tl.float32)
            acc += tl.where(i < count, n_k * tl.load(PMEAN + first + i, mask=i < count, other=0.0), 0.0)
        mean = tl.sum(acc, axis=0) / n_total
        # second pass over the partials: Σ M2_k + Σ n_k (μ_k − μ)², exact parallel variance
        acc = tl.zeros([BLOCK_P], dtype=tl.float32)
        for i0 in range(0, count, BLOCK_P):
            i = i0 + tl.arange(0, BLOCK_P)
            chunk = i % SPLIT
            n_k = tl.minimum(S - chunk * CHUNK_S, CHUNK_S).to(tl.float32)
            pm = tl.load(PMEAN + first + i, mask=i < count, other=0.0)
            pm2 = tl.load(PM2 + first + i, mask=i < count, other=0.0)
            acc += tl.where(i < count, pm2 + n_k * (pm - mean) * (pm - mean), 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / n_total + eps)
        tl.store(MEAN + pid, mean)
        tl.store(RSTD + pid, rstd)
        for j0 in range(0, CG, BLOCK_CG):
            j = j0 + tl.arange(0, BLOCK_CG)
            m = j < CG
            c = g * CG + j
            one_plus_s = tl.full([BLOCK_CG], 1.0, dtype=tl.float32)
            if HAS_SCALE:
                one_plus_s += tl.load(SCALE + b * stride_scale_b + c, mask=m, other=0.0).to(tl.float32)
            a = one_plus_s
            if HAS_WEIGHT:
                a = a * tl.load(WEIGHT + c, mask=m, other=0.0).to(tl.float32)
            d = tl.zeros([BLOCK_CG], dtype=tl.float32)
            if HAS_BIAS:
                d += tl.load(BIAS + c, mask=m, other=0.0).to(tl.float32) * one_plus_s
            if HAS_SHIFT:
                d += tl.load(SHIFT + b * stride_shift_b + c, mask=m, other=0.0).to(tl.float32)
            tl.store(COEF_A + b * C + c, rstd * a, mask=m)
            tl.store(COEF_D + b * C + c, d, mask=m)

    @triton.jit(do_not_specialize=["G", "CG"])
    def _gn_apply_kernel(
        X,  # (B, C, S) or (B, S, C) input
        Y,  # same layout, out
        MEAN,  # (B, G) fp32
        COEF_A,  # (B, C) fp32
        COEF_D,  # (B, C) fp32
        C, S, G, CG,
        CHANNELS_LAST: tl.constexpr, SILU: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        s, c, b, cm = _elementwise_tile(C, BLOCK_C, BLOCK_S)
        A = tl.load(COEF_A + b * C + c, mask=cm, other=0.0)
        d = tl.load(COEF_D + b * C + c, mask=cm, other=0.0)
        xc, offs, mask, sample = _centred_tile(X, MEAN, b, c, s, C, S, G, CG, CHANNELS_LAST)
        z = xc * A[:, None] + d[:, None]
        if SILU:
            z = z * _sigmoid(z)
        tl.store(Y + sample + offs, z.to(Y.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["G", "CG", "CHUNK_S", "TILES", "SPLIT"])
    def _gn_bwd_reduce_kernel(
        X,  # (B, C, S) or (B, S, C) input of the forward
        DY,  # same layout: upstream gradient
        MEAN,  # (B, G) fp32
        RSTD,  # (B, G) fp32
        COEF_A,  # (B, C) fp32
        COEF_D,  # (B, C) fp32
        PP,  # (B, C, SPLIT) fp32 out: Σ_s dz over one chunk
        PQ,  # (B, C, SPLIT) fp32 out: Σ_s dz·x̂ over one chunk
        C, S, G, CG,
        CHUNK_S, TILES, SPLIT,
        CHANNELS_LAST: tl.constexpr, SILU: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        k = tl.program_id(0)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        b = tl.program_id(2)
        cm = c < C
        grp = b * G + c // CG
        mu = tl.load(MEAN + grp, mask=cm, other=0.0)[:, None]
        r = tl.load(RSTD + grp, mask=cm, other=0.0)[:, None]
        A = tl.load(COEF_A + b * C + c, mask=cm, other=0.0)[:, None]
        d = tl.load(COEF_D + b * C + c, mask=cm, other=0.0)[:, None]
        sample = b.to(tl.int64) * C * S
        s_start = k * CHUNK_S
        n_tiles = tl.minimum(TILES, tl.cdiv(S - s_start, BLOCK_S))
        p = tl.zeros([BLOCK_C], dtype=tl.float32)
        q = tl.zeros([BLOCK_C], dtype=tl.float32)
        for t in range(0, n_tiles):
            offs, mask = _tile_offsets(c, s_start + t * BLOCK_S + tl.arange(0, BLOCK_S), C, S, CHANNELS_LAST)
            xc = tl.load(X + sample + offs, mask=mask, other=0.0).to(tl.float32) - mu
            # masked dy = 0 makes dz = 0 there, so padding adds nothing to P or Q
            dz = tl.load(DY + sample + offs, mask=mask, other=0.0).to(tl.float32)
            if SILU:
                dz = _silu_grad(dz, xc * A + d)
            p += tl.sum(dz, axis=1)
            q += tl.sum(dz * (xc * r), axis=1)
        out = (b * C + c) * SPLIT + k
        tl.store(PP + out, p, mask=cm)
        tl.store(PQ + out, q, mask=cm)

    @triton.jit(do_not_specialize=["C", "S", "G", "CG", "SPLIT", "stride_scale_b"])
    def _gn_bwd_finalize_kernel(
        PP,  # (B, C, SPLIT) fp32 partial Σ dz
        PQ,  # (B, C, SPLIT) fp32 partial Σ dz·x̂
        WEIGHT,  # (C,) γ, any float dtype (HAS_WEIGHT)
        BIAS,  # (C,) β, any float dtype (HAS_BIAS)
        SCALE,  # (B, C) any float dtype, row stride stride_scale_b (HAS_SCALE)
        RSTD,  # (B, G) fp32
        DX_E,  # (B, G) fp32 out: E = −r²·m2/N
        DX_F,  # (B, G) fp32 out: F = −r·m1/N
        DSCALE,  # (B, C) fp32 out (HAS_SCALE)
        DSHIFT,  # (B, C) fp32 out (HAS_SHIFT)
        TERM_W,  # (B, C) fp32 out: (1 + scale)·Q, summed over B for dγ (HAS_WEIGHT)
        TERM_B,  # (B, C) fp32 out: (1 + scale)·P, summed over B for dβ (HAS_BIAS)
        C, S, G, CG,
        SPLIT,
        stride_scale_b,
        HAS_WEIGHT: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        HAS_SHIFT: tl.constexpr,
        BLOCK_CG: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid = tl.program_id(0)  # = b·G + g
        b = pid // G
        g = pid % G
        kk = tl.arange(0, BLOCK_K)
        m1 = tl.zeros([BLOCK_CG], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_CG], dtype=tl.float32)
        for j0 in range(0, CG, BLOCK_CG):
            j = j0 + tl.arange(0, BLOCK_CG)
            m = j < CG
            c = g * CG + j
            idx = (b * C + c)[:, None] * SPLIT + kk[None, :]
            pm = m[:, None] & (kk[None, :] < SPLIT)
            P = tl.sum(tl.load(PP + idx, mask=pm, other=0.0), axis=1)
            Q = tl.sum(tl.load(PQ + idx, mask=pm, other=0.0), axis=1)
            one_plus_s = 1.0
            if HAS_SCALE:
                one_plus_s += tl.load(SCALE + b * stride_scale_b + c, mask=m, other=0.0).to(tl.float32)
            gamma = 1.0
            if HAS_WEIGHT:
                gamma = tl.load(WEIGHT + c, mask=m, other=0.0).to(tl.float32)
                tl.store(TERM_W + b * C + c, one_plus_s * Q, mask=m)
            if HAS_BIAS:
                tl.store(TERM_B + b * C + c, one_plus_s * P, mask=m)
            if HAS_SCALE:
                dscale = gamma * Q
                if HAS_BIAS:
                    dscale += tl.load(BIAS + c, mask=m, other=0.0).to(tl.float32) * P
                tl.store(DSCALE + b * C + c, dscale, mask=m)
            if HAS_SHIFT:
                tl.store(DSHIFT + b * C + c, P, mask=m)
            a = gamma * one_plus_s
            m1 += tl.where(m, a * P, 0.0)
            m2 += tl.where(m, a * Q, 0.0)
        r = tl.load(RSTD + pid)
        n_total = (CG * S).to(tl.float32)
        tl.store(DX_E + pid, -r * r * tl.sum(m2, axis=0) / n_total)
        tl.store(DX_F + pid, -r * tl.sum(m1, axis=0) / n_total)

    @triton.jit(do_not_specialize=["G", "CG"])
    def _gn_dx_kernel(
        X,  # (B, C, S) or (B, S, C) input of the forward
        DY,  # same layout
        DX,  # same layout, out
        MEAN,  # (B, G) fp32
        COEF_A,  # (B, C) fp32
        COEF_D,  # (B, C) fp32
        DX_E,  # (B, G) fp32
        DX_F,  # (B, G) fp32
        C, S, G, CG,
        CHANNELS_LAST: tl.constexpr, SILU: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        s, c, b, cm = _elementwise_tile(C, BLOCK_C, BLOCK_S)
        grp = b * G + c // CG
        E = tl.load(DX_E + grp, mask=cm, other=0.0)[:, None]
        F = tl.load(DX_F + grp, mask=cm, other=0.0)[:, None]
        A = tl.load(COEF_A + b * C + c, mask=cm, other=0.0)[:, None]
        xc, offs, mask, sample = _centred_tile(X, MEAN, b, c, s, C, S, G, CG, CHANNELS_LAST)
        dz = tl.load(DY + sample + offs, mask=mask, other=0.0).to(tl.float32)
        if SILU:
            d = tl.load(COEF_D + b * C + c, mask=cm, other=0.0)[:, None]
            dz = _silu_grad(dz, xc * A + d)
        dx = dz * A + xc * E + F
        tl.store(DX + sample + offs, dx.to(DX.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["B", "C"])
    def _col_sum_kernel(
        TW,  # (B, C) fp32 per-sample dγ terms
        TB,  # (B, C) fp32 per-sample dβ terms
        DW,  # (C,) fp32 out: Σ_b TW
        DB,  # (C,) fp32 out: Σ_b TB
        B,
        C,
        BLOCK: tl.constexpr,
    ):
        c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = c < C
        acc_w = tl.zeros([BLOCK], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK], dtype=tl.float32)
        for b in range(0, B):
            acc_w += tl.load(TW + b * C + c, mask=m, other=0.0)
            acc_b += tl.load(TB + b * C + c, mask=m, other=0.0)
        tl.store(DW + c, acc_w, mask=m)
        tl.store(DB + c, acc_b, mask=m)


# ----------------------------------------------------------------------------- launch configuration

TILE = 4096  # elements per (BLOCK_C, BLOCK_S) tile (2048 for small NC… maps, see _tile_shape)
NUM_WARPS = 8
MAX_SPLIT = 64  # spatial chunks per channel; BLOCK_K of the backward finalize covers them in one load
FINAL_BLOCK_P = 1024  # partials merged per step by the forward finalize
FINAL_BLOCK_CG = 16  # channels per step in both finalize kernels
FINAL_WARPS = 4
COLSUM_BLOCK = 1024
PROGRAMS_PER_SM = 4  # enough resident programs to hide memory latency


def _tile_shape(layout: str, C: int, S: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_S): the memory-contiguous dimension gets the wide side of the tile.

    NC…: rows of 1024 positions for large maps, 64 (128 bytes at bf16, one cache
    line) for the 8²–16² maps of the inner UNet blocks; those get 32 rows, not 64,
    because 64 per-row statistics in a 4096 tile cost the backward reduction ~230
    registers (one program per SM) against ~125 at 32.  N…C: 64 channels, which
    divides every Stable Diffusion width, or 16 × 128 for narrow tensors (16 × 256
    made the SiLU backward spill on sm_90 with the ptxas of triton 3.6).
    """
    if layout == "channels_last":
        return (16, 128) if C <= 16 else (64, TILE // 64)
    return (32, 64) if S < 1024 else (TILE // 1024, 1024)


def _split(device_index: int | None, B: int, c_blocks: int, S: int, block_s: int) -> tuple[int, int]:
    """(SPLIT, TILES): spatial chunks per channel block and tiles per chunk.

    Just enough chunks that B·c_blocks·SPLIT programs give every SM a few; a
    large batch keeps one chunk (the whole group in one program per channel
    block, no merge overhead).
    """
    n_tiles = cdiv(S, block_s)
    want = cdiv(PROGRAMS_PER_SM * device_sms(device_index), B * c_blocks)
    split = max(1, min(want, n_tiles, MAX_SPLIT))
    tiles = cdiv(n_tiles, split)
    return cdiv(n_tiles, tiles), tiles


@dataclass(frozen=True)
class Geometry:
    """How the kernels cut one input: computed once per shape, saved by the forward for the backward."""

    channels_last: bool
    block_c: int
    block_s: int
    c_blocks: int  # channel blocks per sample
    split: int  # spatial chunks per channel block
    tiles: int  # tiles of block_s positions per chunk
    divisible: int  # C and S multiples of 16: the vector-load cases apply

    @property
    def chunk_s(self) -> int:
        return self.tiles * self.block_s


@functools.lru_cache(maxsize=1024)
def _geometry(channels_last: bool, B: int, C: int, S: int, device_index: int | None) -> Geometry:
    block_c, block_s = _tile_shape("channels_last" if channels_last else "contiguous", C, S)
    c_blocks = cdiv(C, block_c)
    split, tiles = _split(device_index, B, c_blocks, S, block_s)
    return Geometry(channels_last, block_c, block_s, c_blocks, split, tiles, divisible_key(C, S))


def geometry_of(x: torch.Tensor) -> Geometry:
    B, C = x.shape[:2]
    S = math.prod(x.shape[2:])
    return _geometry(sample_layout(x) == "channels_last", B, C, S, x.device.index if x.is_cuda else None)


def _saved_layout(B: int, C: int, G: int) -> tuple[int, int, int, int]:
    """Offsets, in floats, of r, A and d in the statistics the forward saves for the backward (μ first),
    and their total: μ, r (B, G) and A, d (B, C) of the module docstring, each 16-byte aligned."""
    bg, bc = aligned(B * G), aligned(B * C)
    return bg, 2 * bg, 2 * bg + bc, 2 * (bg + bc)


def _saved_views(saved: torch.Tensor, B: int, C: int, G: int) -> tuple[torch.Tensor, ...]:
    """(μ, r, A, d) in ``saved``, flat."""
    o_rstd, o_a, o_d, _ = _saved_layout(B, C, G)
    return saved[: B * G], saved[o_rstd : o_rstd + B * G], saved[o_a : o_a + B * C], saved[o_d : o_d + B * C]


def _prepared(x, weight, bias, scale, shift):
    """The arguments as the kernels read them: x contiguous unless it is channels-last; γ, β, scale and
    shift with unit stride along channels, in their own dtype (the kernels read any float dtype and any
    row stride, e.g. a chunk of a Linear's output, so a half-precision model pays no cast per call), or
    all in fp32 when they mix dtypes (the launch tables have one parameter dtype per case)."""
    if sample_layout(x) is None:
        x = x.contiguous()
    params = [t if t is None or t.stride(-1) == 1 else t.contiguous() for t in (weight, bias, scale, shift)]
    if len({t.dtype for t in params if t is not None}) > 1:
        params = [t if t is None else t.float() for t in params]
    return (x, *params)


class _Plan:
    """The launches of one call signature (see `launch_tables.Plans`): what the launchers pass besides data
    pointers and eps, in the library's argument order where it can be."""

    __slots__ = ("copies", "geo", "silu", "code", "pd", "flags", "stride_scale", "stride_shift",
                 "sizes", "saved", "o_rstd", "o_a", "o_d", "partials", "o_m2", "scratch", "o_q", "o_e", "o_f",
                 "o_tw", "o_tb", "o_spare")  # fmt: skip

    def __init__(self, x, num_groups, weight, bias, scale, shift, silu):
        prepared = _prepared(x, weight, bias, scale, shift)
        self.copies = any(a is not b for a, b in zip(prepared, (x, weight, bias, scale, shift)))
        x, weight, bias, scale, shift = prepared
        B, C = x.shape[:2]
        S, G = math.prod(x.shape[2:]), num_groups
        geo = self.geo = geometry_of(x)
        self.silu = int(silu)
        present = [t for t in (weight, bias, scale, shift) if t is not None]
        self.code, self.pd = dtype_code(x.dtype), dtype_code(present[0].dtype) if present else DTYPE_CODES["fp32"]
        self.flags = tuple(int(t is not None) for t in (weight, bias, scale, shift))
        self.stride_scale = scale.stride(0) if scale is not None else 0
        self.stride_shift = shift.stride(0) if shift is not None else 0
        self.sizes = (B, C, S, G, int(geo.channels_last))
        # forward: the saved statistics, then (in scratch) the per-chunk partial means and M2
        o_rstd, o_a, o_d, self.saved = _saved_layout(B, C, G)
        self.o_rstd, self.o_a, self.o_d = 4 * o_rstd, 4 * o_a, 4 * o_d  # bytes
        bck = aligned(B * C * geo.split)
        self.partials, self.o_m2 = 2 * bck, 4 * bck
        # backward scratch: per-chunk Σ dz and Σ dz·x̂, E and F (B, G), the per-sample dγ and dβ terms
        # (B, C), and a (C,) row for the column sum of a γ or β that is not given
        bg, bc = aligned(B * G), aligned(B * C)
        self.o_q, self.o_e, self.o_f = 4 * bck, 8 * bck, 8 * bck + 4 * bg
        self.o_tw, self.o_tb, self.o_spare = 8 * (bck + bg), 8 * (bck + bg) + 4 * bc, 8 * (bck + bg + bc)
        self.scratch = 2 * (bck + bg + bc) + aligned(C)


_plans, _checked_plans = Plans(), Plans()


def _plan(x, num_groups, weight, bias, scale, shift, silu) -> _Plan:
    """The plan of a call (computed on the first call of its signature), without checking it."""
    key = (
        x.shape, x.stride(), x.dtype, x.get_device(), num_groups, silu,
        None if weight is None else (weight.dtype, weight.stride()),
        None if bias is None else (bias.dtype, bias.stride()),
        None if scale is None else (scale.dtype, scale.stride()),
        None if shift is None else (shift.dtype, shift.stride()),
    )  # fmt: skip
    plan = _plans.get(key)
    if plan is None:
        plan = _plans.remember(key, _Plan(x, num_groups, weight, bias, scale, shift, silu))
    return plan


def _checked_plan(x, num_groups, weight, bias, eps, scale, shift, silu) -> _Plan:
    """The plan of a call whose arguments `group_norm_silu` accepts; raises as `_validate` otherwise.

    A signature is checked once: what the checks read of the tensors (types, shapes, dtypes, devices)
    is part of it.  ``eps``, ``silu`` and ``num_groups`` are checked on every call, by type first (1 and
    True, or 8 and 8.0, are equal keys).
    """
    try:
        key = (
            x.shape, x.stride(), x.dtype, x.device, num_groups, silu,
            None if weight is None else (type(weight), weight.dtype, weight.shape, weight.stride(), weight.device),
            None if bias is None else (type(bias), bias.dtype, bias.shape, bias.stride(), bias.device),
            None if scale is None else (type(scale), scale.dtype, scale.shape, scale.stride(), scale.device),
            None if shift is None else (type(shift), shift.dtype, shift.shape, shift.stride(), shift.device),
        )  # fmt: skip
    except AttributeError:  # a parameter that is not a tensor
        key = None
    plan = _checked_plans.get(key)
    if plan is None or type(num_groups) is not int or type(silu) is not bool or type(eps) is not float \
            or not 0.0 <= eps < math.inf:  # fmt: skip
        _validate(x, num_groups, weight, bias, eps, scale, shift, silu)
    if plan is None:
        plan = _checked_plans.remember(key, _Plan(x, num_groups, weight, bias, scale, shift, silu))
    return plan


# ----------------------------------------------------------------------------- launchers


def _forward_triton(x, weight, bias, scale, shift, eps, plan: _Plan, keep: bool):
    """(y, saved statistics): ``saved`` is a fresh buffer when ``keep`` (the backward reads it), else None
    (the statistics go to scratch with the partials)."""
    y = torch.empty_like(x)
    saved = torch.empty(plan.saved, device=x.device, dtype=torch.float32) if keep else None
    stream = _aot.target(x)
    if stream is not None:
        if keep:
            partials, hold = _aot.scratch(x, stream, plan.partials)
            stats = saved.data_ptr()
        else:
            stats, hold = _aot.scratch(x, stream, plan.saved + plan.partials)
            partials = stats + 4 * plan.saved
        B, C, S, G, cl = plan.sizes
        if _aot.launch(
            "group_norm_silu_fwd",
            plan.code, plan.pd, x.data_ptr(), y.data_ptr(), 0 if weight is None else weight.data_ptr(),
            0 if bias is None else bias.data_ptr(), 0 if scale is None else scale.data_ptr(),
            0 if shift is None else shift.data_ptr(), plan.stride_scale, plan.stride_shift, stats,
            stats + plan.o_rstd, stats + plan.o_a, stats + plan.o_d, partials, partials + plan.o_m2, B, C, S, G,
            cl, plan.silu, eps, stream,
        ):  # fmt: skip
            return y, saved
    _forward_jit(x, y, weight, bias, scale, shift, eps, plan, saved if keep else None)
    return y, saved


def _forward_jit(x, y, weight, bias, scale, shift, eps, plan: _Plan, saved):
    """The forward's three launches through Triton's JIT (fresh buffers for the statistics when ``saved`` is None)."""
    B, C, S, G, _ = plan.sizes
    geo = plan.geo
    f32 = torch.float32
    if saved is None:
        saved = torch.empty(plan.saved, device=x.device, dtype=f32)
    mean, rstd, A, d = _saved_views(saved, B, C, G)
    partials = torch.empty(plan.partials, device=x.device, dtype=f32)
    pmean, pm2 = partials[: B * C * geo.split], partials[plan.o_m2 // 4 : plan.o_m2 // 4 + B * C * geo.split]
    tile = (plan.code, int(geo.channels_last), geo.block_c, geo.block_s)
    stand_in = next((t for t in (weight, bias, scale, shift) if t is not None), mean)
    GN_STATS.pick(tile + (geo.divisible,)).launch(
        (geo.split, geo.c_blocks, B), x, pmean, pm2, C, S, geo.chunk_s, geo.tiles, geo.split
    )
    GN_FINALIZE.pick((plan.pd, *plan.flags)).launch(
        (B * G,), pmean, pm2, *(stand_in if t is None else t for t in (weight, bias, scale, shift)), mean, rstd, A,
        d, C, S, G, C // G, geo.split, geo.chunk_s, plan.stride_scale, plan.stride_shift, eps,
    )  # fmt: skip
    GN_APPLY.pick(tile + (plan.silu, geo.divisible)).launch(
        (cdiv(S, geo.block_s), geo.c_blocks, B), x, y, mean, A, d, C, S, G, C // G
    )


def _backward_triton(dy, x, saved, weight, bias, scale, shift, plan: _Plan):
    """(dx, dγ, dβ, dscale, dshift) from the forward's saved statistics; None for an absent parameter's gradient."""
    B, C, S, G, cl = plan.sizes
    has_w, has_b, has_s, has_sh = plan.flags
    dx = torch.empty_like(x)
    dweight = torch.empty(C, device=x.device, dtype=torch.float32) if has_w else None
    dbias = torch.empty(C, device=x.device, dtype=torch.float32) if has_b else None
    dscale = torch.empty((B, C), device=x.device, dtype=torch.float32) if has_s else None
    dshift = torch.empty((B, C), device=x.device, dtype=torch.float32) if has_sh else None
    stream = _aot.target(x)
    if stream is not None:
        work, hold = _aot.scratch(x, stream, plan.scratch)
        stats = saved.data_ptr()
        affine = has_w or has_b
        if _aot.launch(
            "group_norm_silu_bwd",
            plan.code, plan.pd, dy.data_ptr(), x.data_ptr(), stats, stats + plan.o_rstd, stats + plan.o_a,
            stats + plan.o_d, 0 if weight is None else weight.data_ptr(), 0 if bias is None else bias.data_ptr(),
            0 if scale is None else scale.data_ptr(), has_sh, plan.stride_scale, dx.data_ptr(),
            dweight.data_ptr() if has_w else work + plan.o_spare if affine else 0,
            dbias.data_ptr() if has_b else work + plan.o_spare if affine else 0,
            0 if dscale is None else dscale.data_ptr(), 0 if dshift is None else dshift.data_ptr(), work,
            work + plan.o_q, work + plan.o_e, work + plan.o_f, work + plan.o_tw if affine else 0,
            work + plan.o_tb if affine else 0, B, C, S, G, cl, plan.silu, stream,
        ):  # fmt: skip
            return dx, dweight, dbias, dscale, dshift
    _backward_jit(dy, x, saved, weight, bias, scale, plan, dx, dweight, dbias, dscale, dshift)
    return dx, dweight, dbias, dscale, dshift


def _backward_jit(dy, x, saved, weight, bias, scale, plan: _Plan, dx, dweight, dbias, dscale, dshift):
    """The backward's launches through Triton's JIT, with fresh scratch."""
    B, C, S, G, _ = plan.sizes
    geo = plan.geo
    mean, rstd, A, d = _saved_views(saved, B, C, G)
    work = torch.empty(plan.scratch, device=x.device, dtype=torch.float32)

    def region(offset: int, n: int) -> torch.Tensor:
        return work[offset // 4 : offset // 4 + n]

    n = B * C * geo.split
    sum_dz, sum_dzx, dx_e, dx_f = region(0, n), region(plan.o_q, n), region(plan.o_e, B * G), region(plan.o_f, B * G)
    terms = (region(plan.o_tw, B * C), region(plan.o_tb, B * C))
    spare = region(plan.o_spare, C)
    tile = (plan.code, int(geo.channels_last), geo.block_c, geo.block_s, plan.silu, geo.divisible)
    stand_in = next((t for t in (weight, bias, scale) if t is not None), rstd)
    GN_BWD_REDUCE.pick(tile).launch(
        (geo.split, geo.c_blocks, B), x, dy, mean, rstd, A, d, sum_dz, sum_dzx, C, S, G, C // G, geo.chunk_s,
        geo.tiles, geo.split,
    )  # fmt: skip
    GN_BWD_FINALIZE.pick((plan.pd, *plan.flags)).launch(
        (B * G,), sum_dz, sum_dzx, *(stand_in if t is None else t for t in (weight, bias, scale)), rstd, dx_e, dx_f,
        *(rstd if t is None else t for t in (dscale, dshift)), *(terms if dweight is not None or dbias is not None
        else (rstd, rstd)), C, S, G, C // G, geo.split, plan.stride_scale,
    )  # fmt: skip
    if dweight is not None or dbias is not None:
        # both sums in one pass; a row of terms that was not written only feeds the spare row
        GN_COL_SUM.pick(()).launch(
            (cdiv(C, COLSUM_BLOCK),), *terms, spare if dweight is None else dweight,
            spare if dbias is None else dbias, B, C,
        )  # fmt: skip
    GN_DX.pick(tile).launch(
        (cdiv(S, geo.block_s), geo.c_blocks, B), x, dy, dx, mean, A, d, dx_e, dx_f, C, S, G, C // G
    )


# ----------------------------------------------------------------------------- torch.library ops


def _forward_ref_outputs(x, weight, bias, scale, shift, num_groups, eps, silu, keep):
    """The reference with the kernel path's saved statistics (μ, r, A and d, laid out as `_saved_layout` says)."""
    y = group_norm_silu_ref(x, num_groups, weight, bias, eps, scale=scale, shift=shift, silu=silu)
    y = torch.empty_like(x).copy_(y)  # y keeps x's strides (channels_last stays channels_last), as the fake says
    if not keep:
        return y, None
    mean, rstd = _stats_ref(x, num_groups, eps)
    B, C = x.shape[:2]
    one_plus_s = 1 + (scale if scale is not None else x.new_zeros(B, C, dtype=torch.float32))
    a = one_plus_s * (weight if weight is not None else 1.0)
    d = one_plus_s * (bias if bias is not None else 0.0) + (shift if shift is not None else 0.0)
    A = a * rstd.repeat_interleave(C // num_groups, dim=1)
    saved = x.new_zeros(_saved_layout(B, C, num_groups)[-1], dtype=torch.float32)
    for view, value in zip(_saved_views(saved, B, C, num_groups), (mean, rstd, A, d.expand(B, C))):
        view.copy_(value.reshape(-1))
    return y, saved


def _forward_impl(
    x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], scale: Optional[torch.Tensor],
    shift: Optional[torch.Tensor], num_groups: int, eps: float, silu: bool, plan: Optional[_Plan] = None,
    keep: bool = True,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:  # fmt: skip
    """(y, the statistics saved for the backward (fp32, `_saved_layout`); None unless ``keep``).

    Eager calls pass their ``plan``; ``keep`` is False where no backward follows (inference).
    """
    if use_triton(x):
        if plan is None:
            plan = _plan(x, num_groups, weight, bias, scale, shift, silu)
        return _forward_triton(x, weight, bias, scale, shift, eps, plan, keep)
    return _forward_ref_outputs(x, weight, bias, scale, shift, num_groups, eps, silu, keep)


def _forward_inference(x, weight, bias, scale, shift, num_groups, eps, silu, plan):
    """An eager call that no backward follows: nothing saved, the statistics in scratch."""
    return _forward_impl(x, weight, bias, scale, shift, num_groups, eps, silu, plan, False)


def _saved_empty(x, weight, bias, scale, shift, num_groups, *_):
    B, C = x.shape[:2]
    return x.new_empty(_saved_layout(B, C, num_groups)[-1], dtype=torch.float32)


def _forward_fake(x, weight, bias, scale, shift, num_groups, eps, silu):
    return torch.empty_like(x), _saved_empty(x, weight, bias, scale, shift, num_groups)


def _backward_impl(
    dy: torch.Tensor, x: torch.Tensor, saved: torch.Tensor, weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor], scale: Optional[torch.Tensor], shift: Optional[torch.Tensor], num_groups: int,
    eps: float, silu: bool, plan: Optional[_Plan] = None,
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """(dx, dweight, dbias, dscale, dshift), None for an absent input's gradient.

    ``plan``: the forward's, which eager calls save with it; looked up here when not given.
    """
    if dy.stride() != x.stride():
        dy = torch.empty_like(x).copy_(dy)  # the kernels read dy with x's strides
    if use_triton(x):
        if plan is None:
            plan = _plan(x, num_groups, weight, bias, scale, shift, silu)
        return _backward_triton(dy, x, saved, weight, bias, scale, shift, plan)
    grads = group_norm_silu_backward_ref(dy, x, num_groups, weight, bias, eps, scale, shift, silu)
    return (torch.empty_like(x).copy_(grads[0]), *grads[1:])


def _backward_fake(dy, x, saved, weight, bias, scale, shift, num_groups, eps, silu):
    B, C = x.shape[:2]
    f32 = dict(dtype=torch.float32)
    return (
        torch.empty_like(x),
        x.new_empty((C,) if weight is not None else (0,), **f32),
        x.new_empty((C,) if bias is not None else (0,), **f32),
        x.new_empty((B, C) if scale is not None else (0,), **f32),
        x.new_empty((B, C) if shift is not None else (0,), **f32),
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, scale, shift, *args = inputs  # args: num_groups, eps, silu (and an eager call's plan)
    ctx.save_for_backward(x, output[1], weight, bias, scale, shift)
    ctx.args = tuple(args)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zeros for the statistics' gradient


def _backward(ctx, dy, _dsaved):
    x, saved, weight, bias, scale, shift = ctx.saved_tensors
    args = ctx.args
    if len(args) > 3:  # an eager call: no dispatcher, and the forward's plan
        dx, dw, db, ds, dsh = _backward_impl(dy, x, saved, weight, bias, scale, shift, *args)
    else:
        dx, dw, db, ds, dsh = _group_norm_silu_backward_call(dy, x, saved, weight, bias, scale, shift, *args)
    need = ctx.needs_input_grad
    grads = (dx if need[0] else None, dw if need[1] else None, db if need[2] else None, ds if need[3] else None,
             dsh if need[4] else None)  # fmt: skip
    return grads + (None,) * len(args)  # none for num_groups, eps, silu (and the plan)


_group_norm_silu_call = define_op(
    "fastdiff::group_norm_silu", _forward_impl, _forward_fake, eager_only=("plan", "keep"),
    returns=tuple[torch.Tensor, torch.Tensor], empty=_saved_empty, setup_context=_setup_context, backward=_backward,
    inference=_forward_inference,
)  # fmt: skip
_group_norm_silu_backward_call = define_op(
    "fastdiff::group_norm_silu_backward", _backward_impl, _backward_fake, eager_only=("plan",),
    returns=tuple[(torch.Tensor,) * 5], empty=lambda dy, x, *_: x.new_empty(0, dtype=torch.float32),
)  # fmt: skip


# ----------------------------------------------------------------------------- public API


def _validate(x, num_groups, weight, bias, eps, scale, shift, silu) -> None:
    tensor_checks.check_float("x", x)
    tensor_checks.check_min_ndim("x", x, 2, " (B, C, *spatial)")
    if x.numel() == 0:
        raise ValueError(f"x must not be empty, got shape {tuple(x.shape)}")
    B, C = x.shape[:2]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0:
        raise TypeError(f"num_groups must be a positive int, got {num_groups!r}")
    if C % num_groups:
        raise ValueError(f"num_groups must divide the {C} channels of x (dim 1), got num_groups={num_groups}")
    if x.numel() // B >= 2**31:
        raise ValueError(f"x must have fewer than 2**31 elements per sample, got shape {tuple(x.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < float("inf"):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if not isinstance(silu, bool):
        raise TypeError(f"silu must be a bool, got {type(silu).__name__}")
    for name, t, shape, what in (
        ("weight", weight, (C,), " (one per channel of x)"),
        ("bias", bias, (C,), " (one per channel of x)"),
        ("scale", scale, (B, C), " (batch, channels of x)"),
        ("shift", shift, (B, C), " (batch, channels of x)"),
    ):
        if t is not None:
            tensor_checks.check_float(name, t)
            tensor_checks.check_shape(name, t, shape, what)
            tensor_checks.check_device(name, t, x.device, "x")


def group_norm_silu(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    silu: bool = True,
) -> torch.Tensor:
    """y = SiLU(GroupNorm(x)·(1 + scale) + shift); ``silu=False`` gives plain GroupNorm (+ FiLM).

    x: (B, C, *spatial), fp32/fp16/bf16, contiguous or channels-last (read in place;
    other strides are copied first). ``weight``/``bias``: (C,) affine γ, β as in
    ``torch.nn.GroupNorm``; ``scale``/``shift``: (B, C) per-sample FiLM terms.  Same
    numbers as ``F.silu(F.group_norm(x, num_groups, weight, bias, eps) * (1 + scale) +
    shift)`` in fp32, returned in x's dtype with x's memory layout.  Differentiable
    in x, weight, bias, scale and shift.
    """
    if not torch.compiler.is_compiling():
        y = _aot.eager.group_norm_silu(x, weight, bias, scale, shift, num_groups, eps, silu, True)
        if y is not None:
            return y
    if _backend.traced(x):
        _validate(x, num_groups, weight, bias, eps, scale, shift, silu)
        return _group_norm_silu_call(*_prepared(x, weight, bias, scale, shift), num_groups, float(eps), silu)[0]
    plan = _checked_plan(x, num_groups, weight, bias, eps, scale, shift, silu)
    return _eager(plan, x, weight, bias, scale, shift, num_groups, float(eps), silu)


def group_norm_silu_unchecked(
    x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
    eps: float = 1e-5, *, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None, silu: bool = True,
) -> torch.Tensor:  # fmt: skip
    """`group_norm_silu` without its argument checks, for a caller that made them once (a model's
    layer whose channels, groups and eps are fixed at construction).  Layouts are still taken
    care of; arguments `group_norm_silu` would refuse give undefined results."""
    if not torch.compiler.is_compiling():
        y = _aot.eager.group_norm_silu(x, weight, bias, scale, shift, num_groups, eps, silu, False)
        if y is not None:
            return y
    if _backend.traced(x):
        return _group_norm_silu_call(*_prepared(x, weight, bias, scale, shift), num_groups, float(eps), silu)[0]
    plan = _plan(x, num_groups, weight, bias, scale, shift, silu)
    return _eager(plan, x, weight, bias, scale, shift, num_groups, float(eps), silu)


def _eager(plan: _Plan, x, weight, bias, scale, shift, num_groups, eps, silu) -> torch.Tensor:
    if plan.copies:
        x, weight, bias, scale, shift = _prepared(x, weight, bias, scale, shift)
    return _group_norm_silu_call.eager(x, weight, bias, scale, shift, num_groups, eps, silu, plan)[0]


def _eager_plan(x, weight, bias, scale, shift, num_groups, eps, silu, checked) -> tuple[int, ...] | None:
    """The plan of `_aot.eager.group_norm_silu`'s signature (checked first when ``checked``): the library's
    numbers, the floats of the statistics and partials and their offsets, then the backward's scratch
    floats and offsets."""
    if checked:
        plan = _checked_plan(x, num_groups, weight, bias, eps, scale, shift, silu)
    else:
        plan = _plan(x, num_groups, weight, bias, scale, shift, silu)
    if plan.copies:
        return None
    return (plan.code, plan.pd, plan.stride_scale, plan.stride_shift, *plan.sizes, plan.silu, plan.saved,
            plan.partials, plan.o_rstd, plan.o_a, plan.o_d, plan.o_m2, plan.scratch, plan.o_q, plan.o_e, plan.o_f,
            plan.o_tw, plan.o_tb, plan.o_spare)  # fmt: skip


_aot.set_planner("group_norm_silu", _eager_plan, _backward_impl)


# ----------------------------------------------------------------------------- launch tables

_FLAGS = ("HAS_WEIGHT", "HAS_BIAS", "HAS_SCALE", "HAS_SHIFT")


def _tile_shapes(channels_last: bool) -> set[tuple[int, int]]:
    """Every (BLOCK_C, BLOCK_S) `_tile_shape` can return for a layout."""
    layout = "channels_last" if channels_last else "contiguous"
    return {_tile_shape(layout, C, S) for C in (1, 16, 17, 1280) for S in (1, 1023, 1024, 4096)}


def _tiled_tables() -> dict[str, dict]:
    """The four kernels that walk x in tiles: keyed by (dtype, layout, BLOCK_C, BLOCK_S[, SILU], C and S % 16 == 0)."""
    out = {"stats": {}, "apply": {}, "reduce": {}, "dx": {}}
    for dt, code in DTYPE_CODES.items():
        for cl in (0, 1):
            for bc, bs in sorted(_tile_shapes(bool(cl))):
                tile = {"CHANNELS_LAST": bool(cl), "BLOCK_C": bc, "BLOCK_S": bs}
                for div in (0, 1):
                    divisible = ("C", "S") if div else ()
                    tag = f"{dt},{'cl' if cl else 'nc'},{bc}x{bs}{',c16s16' if div else ''}"
                    out["stats"][(code, cl, bc, bs, div)] = KernelCase(
                        f"gn_stats[{tag}]", _gn_stats_kernel,
                        {"X": f"*{dt}", "PMEAN": "*fp32", "PM2": "*fp32", "C": "i32", "S": "i32", "CHUNK_S": "i32",
                         "TILES": "i32", "SPLIT": "i32", "CHANNELS_LAST": "constexpr", "BLOCK_C": "constexpr",
                         "BLOCK_S": "constexpr"},
                        tile, NUM_WARPS, divisible=divisible,
                    )  # fmt: skip
                    for silu in (0, 1):
                        stag = f"{tag}{',silu' if silu else ''}"
                        cx = {**tile, "SILU": bool(silu)}
                        key = (code, cl, bc, bs, silu, div)
                        out["apply"][key] = KernelCase(
                            f"gn_apply[{stag}]", _gn_apply_kernel,
                            {"X": f"*{dt}", "Y": f"*{dt}", "MEAN": "*fp32", "COEF_A": "*fp32", "COEF_D": "*fp32",
                             "C": "i32", "S": "i32", "G": "i32", "CG": "i32", "CHANNELS_LAST": "constexpr",
                             "SILU": "constexpr", "BLOCK_C": "constexpr", "BLOCK_S": "constexpr"},
                            cx, NUM_WARPS, divisible=divisible,
                        )  # fmt: skip
                        out["reduce"][key] = KernelCase(
                            f"gn_bwd_reduce[{stag}]", _gn_bwd_reduce_kernel,
                            {"X": f"*{dt}", "DY": f"*{dt}", "MEAN": "*fp32", "RSTD": "*fp32", "COEF_A": "*fp32",
                             "COEF_D": "*fp32", "PP": "*fp32", "PQ": "*fp32", "C": "i32", "S": "i32", "G": "i32",
                             "CG": "i32", "CHUNK_S": "i32", "TILES": "i32", "SPLIT": "i32",
                             "CHANNELS_LAST": "constexpr", "SILU": "constexpr", "BLOCK_C": "constexpr",
                             "BLOCK_S": "constexpr"},
                            cx, NUM_WARPS, divisible=divisible,
                        )  # fmt: skip
                        out["dx"][key] = KernelCase(
                            f"gn_dx[{stag}]", _gn_dx_kernel,
                            {"X": f"*{dt}", "DY": f"*{dt}", "DX": f"*{dt}", "MEAN": "*fp32", "COEF_A": "*fp32",
                             "COEF_D": "*fp32", "DX_E": "*fp32", "DX_F": "*fp32", "C": "i32", "S": "i32", "G": "i32",
                             "CG": "i32", "CHANNELS_LAST": "constexpr", "SILU": "constexpr", "BLOCK_C": "constexpr",
                             "BLOCK_S": "constexpr"},
                            cx, NUM_WARPS, divisible=divisible,
                        )  # fmt: skip
    return out


def _finalize_tables() -> tuple[dict, dict]:
    """The two per-group kernels, keyed by (dtype of γ/β/scale/shift, which of them are given)."""
    forward, backward = {}, {}
    for pd, code in DTYPE_CODES.items():
        for bits in range(16):
            has = tuple(int(bool(bits & (1 << i))) for i in range(4))
            flags = dict(zip(_FLAGS, map(bool, has)))
            tag = ",".join(k[4:].lower() for k, v in flags.items() if v) or "plain"
            tag = f"{tag},{pd} params"
            cx = dict.fromkeys(flags, "constexpr")
            forward[(code, *has)] = KernelCase(
                f"gn_finalize[{tag}]", _gn_finalize_kernel,
                {"PMEAN": "*fp32", "PM2": "*fp32", "WEIGHT": f"*{pd}", "BIAS": f"*{pd}", "SCALE": f"*{pd}",
                 "SHIFT": f"*{pd}", "MEAN": "*fp32", "RSTD": "*fp32", "COEF_A": "*fp32", "COEF_D": "*fp32",
                 "C": "i32", "S": "i32", "G": "i32", "CG": "i32", "SPLIT": "i32", "CHUNK_S": "i32",
                 "stride_scale_b": "i32", "stride_shift_b": "i32", "eps": "fp32", **cx,
                 "BLOCK_P": "constexpr", "BLOCK_CG": "constexpr"},
                {**flags, "BLOCK_P": FINAL_BLOCK_P, "BLOCK_CG": FINAL_BLOCK_CG}, FINAL_WARPS,
            )  # fmt: skip
            backward[(code, *has)] = KernelCase(
                f"gn_bwd_finalize[{tag}]", _gn_bwd_finalize_kernel,
                {"PP": "*fp32", "PQ": "*fp32", "WEIGHT": f"*{pd}", "BIAS": f"*{pd}", "SCALE": f"*{pd}",
                 "RSTD": "*fp32", "DX_E": "*fp32", "DX_F": "*fp32", "DSCALE": "*fp32", "DSHIFT": "*fp32",
                 "TERM_W": "*fp32", "TERM_B": "*fp32", "C": "i32", "S": "i32", "G": "i32", "CG": "i32",
                 "SPLIT": "i32", "stride_scale_b": "i32", **cx, "BLOCK_CG": "constexpr", "BLOCK_K": "constexpr"},
                {**flags, "BLOCK_CG": FINAL_BLOCK_CG, "BLOCK_K": MAX_SPLIT}, FINAL_WARPS,
            )  # fmt: skip
    return forward, backward


def _launch_tables() -> tuple[LaunchTable, ...]:
    tiled = _tiled_tables()
    finalize, bwd_finalize = _finalize_tables()
    col_sum = KernelCase(
        "gn_col_sum", _col_sum_kernel,
        {"TW": "*fp32", "TB": "*fp32", "DW": "*fp32", "DB": "*fp32", "B": "i32", "C": "i32", "BLOCK": "constexpr"},
        {"BLOCK": COLSUM_BLOCK}, FINAL_WARPS,
    )  # fmt: skip
    tile = ("dtype", "channels_last", "block_c", "block_s")
    params = ("params_dtype", "has_weight", "has_bias", "has_scale", "has_shift")
    return (
        LaunchTable("gn_stats", tile + ("c16s16",), tiled["stats"]),
        LaunchTable("gn_finalize", params, finalize),
        LaunchTable("gn_apply", tile + ("silu", "c16s16"), tiled["apply"]),
        LaunchTable("gn_bwd_reduce", tile + ("silu", "c16s16"), tiled["reduce"]),
        LaunchTable("gn_bwd_finalize", params, bwd_finalize),
        LaunchTable("gn_col_sum", (), {(): col_sum}),
        LaunchTable("gn_dx", tile + ("silu", "c16s16"), tiled["dx"]),
    )


LAUNCH_TABLES = _launch_tables() if HAS_TRITON else ()
GN_STATS, GN_FINALIZE, GN_APPLY, GN_BWD_REDUCE, GN_BWD_FINALIZE, GN_COL_SUM, GN_DX = LAUNCH_TABLES or (None,) * 7
