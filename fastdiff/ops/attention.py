r"""Fused (flash) attention, forward and backward, for UNet self- and cross-attention.

Math, per batch b and head h (Vaswani et al. 2017, Eq. 1), with queries q_i (Lq of
them), keys k_j and values v_j (Lk of them), head dim D and scale τ (1/sqrt(D) by
default):

    s_ij = τ · q_i·k_j,    P_ij = exp(s_ij − L_i),    L_i = log Σ_j exp(s_ij),    o_i = Σ_j P_ij v_j

Forward (Dao et al. 2022, Alg. 1; Dao 2023 "FlashAttention-2", Alg. 1).  One program
owns BLOCK_M query rows and streams the keys in blocks of BLOCK_N, keeping the
running row max m, the running sum ℓ and the unnormalised output acc in fp32
registers (the "online softmax", Milakov & Gimelshein 2018):

    m' = max(m, max_j s_ij)
    ℓ' = ℓ·exp(m − m') + Σ_j exp(s_ij − m')
    acc' = acc·exp(m − m') + Σ_j exp(s_ij − m') v_j
    o = acc / ℓ,   L = m + log ℓ

so no Lq×Lk matrix ever exists in memory.  Exponentials are exp2 with log2(e) folded
into the scale (exp(x) = 2^(x·log2 e)): the kernels work with s₂ = s·log2(e) and
store L₂ = L·log2(e) ("lse" below, base 2) for the backward.

Backward (Dao 2023, Alg. 2), with dO the output's gradient:

    δ_i  = Σ_d dO_id · O_id                        (preprocess kernel)
    dV_j = Σ_i P_ij dO_i
    dP_ij = dO_i · v_j
    dS_ij = P_ij (dP_ij − δ_i)
    dQ_i = τ Σ_j dS_ij k_j,     dK_j = τ Σ_i dS_ij q_i

P is recomputed from q, k and L.  One kernel per key block accumulates dK, dV over all
queries; a second kernel per query block accumulates dQ over all keys: no atomics,
and every output element is written by exactly one program.

Precision: inputs fp16/bf16 (or fp32, for tests); the score and output matmuls run on
tensor cores with fp32 accumulation; softmax statistics, δ and all gradient
accumulators are fp32; outputs are stored in the input dtype.  P and dS are rounded
to the input dtype before their matmuls (as in FlashAttention).  For fp32 inputs the
matmuls use input_precision="ieee" (true fp32 FMA, not TF32), so fp32 results hold
fp32 tolerances; that path is for testing, not speed.

Layout: (B, H, L, D) as in `torch.nn.functional.scaled_dot_product_attention`; any
strides, as long as the head dim is the unit-stride one (q/k/v slices of a fused qkv
projection are read in place).  Head dims that are not a power of two (40, 80, 160)
are padded to the next power of two inside the kernel with masked loads, never by
copying the inputs.  The output is stored in (B, Lq, H, D) memory order and returned
as a (B, H, Lq, D) view, so merging heads afterwards is free.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from fastdiff.ops import _aot, _checks
from fastdiff.ops._backend import HAS_TRITON, INTERPRET, Op, cdiv, use_triton
from fastdiff.ops._launch import ARCHS, DTYPE_CODES, KernelCase, LaunchTable, dtype_code

HEAD_DIMS = (32, 40, 64, 80, 96, 128, 160)
LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------- reference


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(τ q kᵀ) v with the whole score matrix in memory, in fp32 (fp64 for fp64 inputs).

    Differentiable; output in q's dtype.  The readable definition the kernels are tested against.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    ct = torch.promote_types(q.dtype, torch.float32)
    s = scale * (q.to(ct) @ k.to(ct).transpose(-1, -2))
    return (torch.softmax(s, dim=-1) @ v.to(ct)).to(q.dtype)


# The op's reference path bounds its score matrix to this many elements per chunk of
# queries, so that CPU inference at 64×64 latents does not allocate gigabytes.
_REF_CHUNK_ELEMS = 1 << 24


def _chunk_rows(Lq: int, Lk: int, BH: int) -> int:
    return max(1, min(Lq, _REF_CHUNK_ELEMS // max(1, Lk * BH)))


def _forward_ref(q, k, v, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse₂) of the kernel's forward, computed in fp32 chunk by chunk of queries."""
    B, H, Lq, _ = q.shape
    k32, v32 = k.float(), v.float()
    o = q.new_empty(B, H, Lq, q.shape[-1], dtype=torch.float32)
    lse = q.new_empty(B, H, Lq, dtype=torch.float32)
    step = _chunk_rows(Lq, k.shape[2], B * H)
    for i in range(0, Lq, step):
        sl = slice(i, i + step)
        s = scale * (q[:, :, sl].float() @ k32.transpose(-1, -2))
        L = torch.logsumexp(s, dim=-1)
        o[:, :, sl] = torch.exp(s - L[..., None]) @ v32
        lse[:, :, sl] = L * LOG2E
    return o.to(q.dtype), lse


def _backward_ref(do, q, k, v, o, lse, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) from the backward equations of the docstring, fp32, chunk by chunk of queries."""
    B, H, Lq, _ = q.shape
    k32, v32 = k.float(), v.float()
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    step = _chunk_rows(Lq, k.shape[2], B * H)
    for i in range(0, Lq, step):
        sl = slice(i, i + step)
        q32, do32 = q[:, :, sl].float(), do[:, :, sl].float()
        p = torch.exp(scale * (q32 @ k32.transpose(-1, -2)) - lse[:, :, sl, None] / LOG2E)
        delta = (do32 * o[:, :, sl].float()).sum(-1, keepdim=True)
        ds = p * (do32 @ v32.transpose(-1, -2) - delta)
        dv += p.transpose(-1, -2) @ do32
        dq[:, :, sl] = scale * (ds @ k32)
        dk += scale * (ds.transpose(-1, -2) @ q32)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ----------------------------------------------------------------------------- kernels
#
# Every (rows, D) tile is addressed as base + row·stride + d with a unit-stride head
# dim.  The launcher guarantees 16-byte aligned rows (data pointer and token/head/batch
# strides), and the kernels say so with `tl.multiple_of(ptrs, [1, 16])`: the compiler
# then issues 16-byte vector loads and asynchronous (pipelined) copies even for head
# dim 40, whose row stride (80 bytes) is not a multiple of Triton's own 16-element
# specialisation.

if HAS_TRITON:
    import triton
    import triton.language as tl

    # Triton's interpreter multiplies the raw bit patterns of bf16 operands in tl.dot
    # (it stores bf16 as uint16); under the interpreter bf16 tiles are widened to fp32
    # first, which is exact for the products.  Compiled kernels never take this branch.
    _WIDEN_BF16_DOT = tl.constexpr(INTERPRET)

    @triton.jit
    def _dot(a, b, DOT_PRECISION: tl.constexpr):
        """a @ b accumulated in fp32 (tensor cores for fp16/bf16 tiles)."""
        if _WIDEN_BF16_DOT and a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, input_precision=DOT_PRECISION)

    # Integers are never specialised (see _launch): the kernels' pointer hints carry the alignment.
    @triton.jit(do_not_specialize=[
        "stride_q_b", "stride_q_h", "stride_q_m", "stride_k_b", "stride_k_h", "stride_k_n", "stride_v_b",
        "stride_v_h", "stride_v_n", "stride_o_b", "stride_o_h", "stride_o_m", "H", "Lq", "Lk", "head_dim"
    ])  # fmt: skip
    def _attn_fwd_kernel(
        Q,  # (B, H, Lq, D)
        K,  # (B, H, Lk, D)
        V,  # (B, H, Lk, D)
        O,  # (B, H, Lq, D) out
        LSE,  # (B, H, Lq) fp32 out: base-2 log-sum-exp of each score row
        stride_q_b,
        stride_q_h,
        stride_q_m,
        stride_k_b,
        stride_k_h,
        stride_k_n,
        stride_v_b,
        stride_v_h,
        stride_v_n,
        stride_o_b,
        stride_o_h,
        stride_o_m,
        H,
        Lq,
        Lk,
        head_dim,  # D, a multiple of 8
        qk_scale,  # τ · log2(e)
        BLOCK_D: tl.constexpr,  # next power of two ≥ head_dim
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        bh = tl.program_id(0)  # batch·heads on the grid's x axis: no 65535 limit
        pid_m = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        # D is a multiple of 8: the padding mask is constant over 8 lanes (16-byte vectors).
        mask_d = tl.max_constancy(offs_d < head_dim, [8])
        mask_q = (offs_m < Lq)[:, None] & mask_d[None, :]

        q_ptrs = Q + b * stride_q_b + h * stride_q_h + offs_m[:, None] * stride_q_m + offs_d[None, :]
        q = tl.load(tl.multiple_of(q_ptrs, [1, 16]), mask=mask_q, other=0.0)
        K += b * stride_k_b + h * stride_k_h
        V += b * stride_v_b + h * stride_v_h

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(0, Lk, BLOCK_N):
            rows = start_n + offs_n
            mask_n = rows < Lk
            mask_kv = mask_n[:, None] & mask_d[None, :]
            k_ptrs = K + rows[:, None] * stride_k_n + offs_d[None, :]
            k = tl.load(tl.multiple_of(k_ptrs, [1, 16]), mask=mask_kv, other=0.0)
            qk = _dot(q, tl.trans(k), DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
            if start_n + BLOCK_N > Lk:  # only the last block is ragged: a uniform branch
                # -inf before the max: padded keys never raise m nor add to ℓ.
                qk = tl.where(mask_n[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)  # finite: each block holds a real key
            p = tl.exp2(qk * qk_scale - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v_ptrs = V + rows[:, None] * stride_v_n + offs_d[None, :]
            v = tl.load(tl.multiple_of(v_ptrs, [1, 16]), mask=mask_kv, other=0.0)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION)
            m_i = m_new

        # ℓ ≥ 1 in every row (its max term is exp2(0)); the guard only keeps the
        # division finite should that invariant ever break.
        l_i = tl.where(l_i > 0.0, l_i, 1.0)
        o = acc / l_i[:, None]
        o_ptrs = O + b * stride_o_b + h * stride_o_h + offs_m[:, None] * stride_o_m + offs_d[None, :]
        tl.store(tl.multiple_of(o_ptrs, [1, 16]), o.to(O.dtype.element_ty), mask=mask_q)
        tl.store(LSE + bh.to(tl.int64) * Lq + offs_m, m_i + tl.log2(l_i), mask=offs_m < Lq)

    @triton.jit(do_not_specialize=[
        "stride_o_b", "stride_o_h", "stride_o_m", "stride_do_b", "stride_do_h", "stride_do_m", "H", "Lq",
        "head_dim"
    ])  # fmt: skip
    def _attn_bwd_preprocess_kernel(
        O,  # (B, H, Lq, D)
        DO,  # (B, H, Lq, D)
        DELTA,  # (B, H, Lq) fp32 out: δ_i = Σ_d dO_id O_id
        stride_o_b,
        stride_o_h,
        stride_o_m,
        stride_do_b,
        stride_do_h,
        stride_do_m,
        H,
        Lq,
        head_dim,  # D, a multiple of 8
        BLOCK_D: tl.constexpr,  # next power of two ≥ head_dim
        BLOCK_M: tl.constexpr,
    ):
        bh = tl.program_id(0)  # batch·heads on the grid's x axis: no 65535 limit
        pid_m = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_m < Lq)[:, None] & tl.max_constancy(offs_d < head_dim, [8])[None, :]
        o_ptrs = O + b * stride_o_b + h * stride_o_h + offs_m[:, None] * stride_o_m + offs_d[None, :]
        do_ptrs = DO + b * stride_do_b + h * stride_do_h + offs_m[:, None] * stride_do_m + offs_d[None, :]
        o = tl.load(tl.multiple_of(o_ptrs, [1, 16]), mask=mask, other=0.0).to(tl.float32)
        do = tl.load(tl.multiple_of(do_ptrs, [1, 16]), mask=mask, other=0.0).to(tl.float32)
        tl.store(DELTA + bh.to(tl.int64) * Lq + offs_m, tl.sum(o * do, 1), mask=offs_m < Lq)

    @triton.jit(do_not_specialize=[
        "stride_q_b", "stride_q_h", "stride_q_m", "stride_k_b", "stride_k_h", "stride_k_n", "stride_v_b",
        "stride_v_h", "stride_v_n", "stride_do_b", "stride_do_h", "stride_do_m", "stride_dk_b", "stride_dk_h",
        "stride_dk_n", "stride_dv_b", "stride_dv_h", "stride_dv_n", "H", "Lq", "Lk", "head_dim"
    ])  # fmt: skip
    def _attn_bwd_dkdv_kernel(
        Q,  # (B, H, Lq, D)
        K,  # (B, H, Lk, D)
        V,  # (B, H, Lk, D)
        DO,  # (B, H, Lq, D)
        LSE,  # (B, H, Lq) fp32, base 2
        DELTA,  # (B, H, Lq) fp32
        DK,  # (B, H, Lk, D) out
        DV,  # (B, H, Lk, D) out
        stride_q_b,
        stride_q_h,
        stride_q_m,
        stride_k_b,
        stride_k_h,
        stride_k_n,
        stride_v_b,
        stride_v_h,
        stride_v_n,
        stride_do_b,
        stride_do_h,
        stride_do_m,
        stride_dk_b,
        stride_dk_h,
        stride_dk_n,
        stride_dv_b,
        stride_dv_h,
        stride_dv_n,
        H,
        Lq,
        Lk,
        head_dim,  # D, a multiple of 8
        sm_scale,  # τ
        qk_scale,  # τ · log2(e)
        BLOCK_D: tl.constexpr,  # next power of two ≥ head_dim
        BLOCK_M: tl.constexpr,  # queries per iteration
        BLOCK_N: tl.constexpr,  # keys per program
        DOT_PRECISION: tl.constexpr,
        COMPUTE_DK: tl.constexpr,  # one accumulator per launch halves the registers
        COMPUTE_DV: tl.constexpr,  # (head dim 160 on sm_90 runs two launches)
    ):
        bh = tl.program_id(0)
        pid_n = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = tl.max_constancy(offs_d < head_dim, [8])
        mask_kv = (offs_n < Lk)[:, None] & mask_d[None, :]
        k_ptrs = K + b * stride_k_b + h * stride_k_h + offs_n[:, None] * stride_k_n + offs_d[None, :]
        v_ptrs = V + b * stride_v_b + h * stride_v_h + offs_n[:, None] * stride_v_n + offs_d[None, :]
        k = tl.load(tl.multiple_of(k_ptrs, [1, 16]), mask=mask_kv, other=0.0)
        v = tl.load(tl.multiple_of(v_ptrs, [1, 16]), mask=mask_kv, other=0.0)
        Q += b * stride_q_b + h * stride_q_h
        DO += b * stride_do_b + h * stride_do_h
        LSE += bh.to(tl.int64) * Lq
        DELTA += bh.to(tl.int64) * Lq

        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for start_m in range(0, Lq, BLOCK_M):
            rows = start_m + offs_m
            mask_m = rows < Lq
            mask_q = mask_m[:, None] & mask_d[None, :]
            q_ptrs = Q + rows[:, None] * stride_q_m + offs_d[None, :]
            q = tl.load(tl.multiple_of(q_ptrs, [1, 16]), mask=mask_q, other=0.0)
            # lse = +inf on padded queries makes their column of Pᵀ exactly 0 (and their
            # q, dO and δ load as 0): they add nothing to dK or dV.
            lse = tl.load(LSE + rows, mask=mask_m, other=float("inf"))
            qk_t = _dot(k, tl.trans(q), DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
            p_t = tl.exp2(qk_t * qk_scale - lse[None, :])
            do_ptrs = DO + rows[:, None] * stride_do_m + offs_d[None, :]
            do = tl.load(tl.multiple_of(do_ptrs, [1, 16]), mask=mask_q, other=0.0)
            if COMPUTE_DV:
                dv += _dot(p_t.to(do.dtype), do, DOT_PRECISION)
            if COMPUTE_DK:
                delta = tl.load(DELTA + rows, mask=mask_m, other=0.0)
                dp_t = _dot(v, tl.trans(do), DOT_PRECISION)
                ds_t = p_t * (dp_t - delta[None, :])
                dk += _dot(ds_t.to(q.dtype), q, DOT_PRECISION)

        if COMPUTE_DK:
            dk_ptrs = DK + b * stride_dk_b + h * stride_dk_h + offs_n[:, None] * stride_dk_n + offs_d[None, :]
            tl.store(tl.multiple_of(dk_ptrs, [1, 16]), (dk * sm_scale).to(DK.dtype.element_ty), mask=mask_kv)
        if COMPUTE_DV:
            dv_ptrs = DV + b * stride_dv_b + h * stride_dv_h + offs_n[:, None] * stride_dv_n + offs_d[None, :]
            tl.store(tl.multiple_of(dv_ptrs, [1, 16]), dv.to(DV.dtype.element_ty), mask=mask_kv)

    @triton.jit(do_not_specialize=[
        "stride_q_b", "stride_q_h", "stride_q_m", "stride_k_b", "stride_k_h", "stride_k_n", "stride_v_b",
        "stride_v_h", "stride_v_n", "stride_do_b", "stride_do_h", "stride_do_m", "stride_dq_b", "stride_dq_h",
        "stride_dq_m", "H", "Lq", "Lk", "head_dim"
    ])  # fmt: skip
    def _attn_bwd_dq_kernel(
        Q,  # (B, H, Lq, D)
        K,  # (B, H, Lk, D)
        V,  # (B, H, Lk, D)
        DO,  # (B, H, Lq, D)
        LSE,  # (B, H, Lq) fp32, base 2
        DELTA,  # (B, H, Lq) fp32
        DQ,  # (B, H, Lq, D) out
        stride_q_b,
        stride_q_h,
        stride_q_m,
        stride_k_b,
        stride_k_h,
        stride_k_n,
        stride_v_b,
        stride_v_h,
        stride_v_n,
        stride_do_b,
        stride_do_h,
        stride_do_m,
        stride_dq_b,
        stride_dq_h,
        stride_dq_m,
        H,
        Lq,
        Lk,
        head_dim,  # D, a multiple of 8
        sm_scale,  # τ
        qk_scale,  # τ · log2(e)
        BLOCK_D: tl.constexpr,  # next power of two ≥ head_dim
        BLOCK_M: tl.constexpr,  # queries per program
        BLOCK_N: tl.constexpr,  # keys per iteration
        DOT_PRECISION: tl.constexpr,
    ):
        bh = tl.program_id(0)  # batch·heads on the grid's x axis: no 65535 limit
        pid_m = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = tl.max_constancy(offs_d < head_dim, [8])
        mask_m = offs_m < Lq
        mask_q = mask_m[:, None] & mask_d[None, :]
        q_ptrs = Q + b * stride_q_b + h * stride_q_h + offs_m[:, None] * stride_q_m + offs_d[None, :]
        do_ptrs = DO + b * stride_do_b + h * stride_do_h + offs_m[:, None] * stride_do_m + offs_d[None, :]
        q = tl.load(tl.multiple_of(q_ptrs, [1, 16]), mask=mask_q, other=0.0)
        do = tl.load(tl.multiple_of(do_ptrs, [1, 16]), mask=mask_q, other=0.0)
        lse = tl.load(LSE + bh.to(tl.int64) * Lq + offs_m, mask=mask_m, other=float("inf"))
        delta = tl.load(DELTA + bh.to(tl.int64) * Lq + offs_m, mask=mask_m, other=0.0)
        K += b * stride_k_b + h * stride_k_h
        V += b * stride_v_b + h * stride_v_h

        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(0, Lk, BLOCK_N):
            rows = start_n + offs_n
            mask_n = rows < Lk
            mask_kv = mask_n[:, None] & mask_d[None, :]
            k_ptrs = K + rows[:, None] * stride_k_n + offs_d[None, :]
            k = tl.load(tl.multiple_of(k_ptrs, [1, 16]), mask=mask_kv, other=0.0)
            qk = _dot(q, tl.trans(k), DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
            p = tl.exp2(qk * qk_scale - lse[:, None])
            if start_n + BLOCK_N > Lk:  # only the last block is ragged: a uniform branch
                # A padded key scores 0 and exp2(0 − lse) may overflow: select, never multiply.
                p = tl.where(mask_n[None, :], p, 0.0)
            v_ptrs = V + rows[:, None] * stride_v_n + offs_d[None, :]
            v = tl.load(tl.multiple_of(v_ptrs, [1, 16]), mask=mask_kv, other=0.0)
            dp = _dot(do, tl.trans(v), DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            dq += _dot(ds.to(k.dtype), k, DOT_PRECISION)

        dq_ptrs = DQ + b * stride_dq_b + h * stride_dq_h + offs_m[:, None] * stride_dq_m + offs_d[None, :]
        tl.store(tl.multiple_of(dq_ptrs, [1, 16]), (dq * sm_scale).to(DQ.dtype.element_ty), mask=mask_q)


# ----------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class Tiles:
    """One kernel's launch configuration."""

    block_m: int  # query rows: per program (forward, dq) or per iteration (dk/dv)
    block_n: int  # key rows: per iteration (forward, dq) or per program (dk/dv)
    num_warps: int
    num_stages: int  # software-pipelining depth of the loads in the main loop


@dataclass(frozen=True)
class AttnConfig:
    """The tiles of every attention kernel for one (architecture, head dim, dtype class)."""

    fwd: Tiles
    bwd_kv: Tiles  # dk/dv: block_n keys per program (the wgmma M dimension: ≥ 64)
    bwd_q: Tiles  # dq: block_m queries per program (the wgmma M dimension: ≥ 64)
    pre_block_m: int = 128  # rows of the δ preprocess
    split_dkdv: bool = False  # dK and dV in two launches (one accumulator each; recomputes P)


# fp16/bf16 tables, keyed by head dim.  Every tile feeding tl.dot has M ≥ 64 and
# num_warps ≥ 4, so on sm_90 the matmuls lower to wgmma (HGMMA).  Head dims sharing a
# BLOCK_D share a config where the register file allows (one compiled kernel).
# sm_80: every tile but head dim 160's dK pass (100 KB) fits the 99 KB of shared memory
# of sm_86/sm_89 as well as the A100's 163 KB.
# Head dim 160 (BLOCK_D 256) splits dK and dV into two launches: both fp32
# accumulators of a 64×256 key block do not fit beside the rest without spilling.
_T = Tiles
PRE_TILES = _T(0, 0, 4, 1)  # the δ preprocess: one pass, nothing to pipeline
_SM90_D32 = AttnConfig(fwd=_T(128, 64, 4, 3), bwd_kv=_T(32, 128, 4, 3), bwd_q=_T(128, 64, 4, 3))
_SM90_D64 = AttnConfig(fwd=_T(128, 128, 8, 3), bwd_kv=_T(32, 128, 8, 3), bwd_q=_T(128, 64, 8, 3))
_SM90_D128 = AttnConfig(fwd=_T(128, 64, 8, 3), bwd_kv=_T(32, 64, 4, 3), bwd_q=_T(64, 64, 4, 3))
_SM90_D256 = AttnConfig(fwd=_T(64, 64, 8, 2), bwd_kv=_T(32, 64, 8, 2), bwd_q=_T(64, 32, 8, 2), split_dkdv=True)
_SM80_D64 = AttnConfig(fwd=_T(128, 64, 4, 3), bwd_kv=_T(32, 128, 8, 3), bwd_q=_T(128, 64, 8, 3))
_SM80_D128 = AttnConfig(fwd=_T(128, 64, 8, 2), bwd_kv=_T(32, 64, 4, 3), bwd_q=_T(64, 64, 4, 2))
_SM80_D256 = AttnConfig(fwd=_T(128, 32, 8, 1), bwd_kv=_T(32, 64, 8, 2), bwd_q=_T(64, 32, 8, 1), split_dkdv=True)
CONFIGS_16BIT: dict[int, dict[int, AttnConfig]] = {
    90: {32: _SM90_D32, 40: _SM90_D64, 64: _SM90_D64, 80: _SM90_D128, 96: _SM90_D128, 128: _SM90_D128, 160: _SM90_D256},
    80: {32: _SM90_D32, 40: _SM80_D64, 64: _SM80_D64, 80: _SM80_D128, 96: _SM80_D128, 128: _SM80_D128, 160: _SM80_D256},
}

# fp32 (tests): true-fp32 matmuls run on FMA units with operands in registers, so
# tiles are small; one table for every architecture, keyed by BLOCK_D.  Two stages:
# with one, ptxas moves the FMA dot's operands to local memory.
CONFIGS_FP32: dict[int, AttnConfig] = {
    32: AttnConfig(_T(32, 32, 4, 2), _T(16, 32, 4, 2), _T(32, 32, 4, 2), pre_block_m=64),
    64: AttnConfig(_T(32, 32, 4, 2), _T(16, 32, 4, 2), _T(32, 32, 4, 2), pre_block_m=64),
    128: AttnConfig(_T(32, 16, 4, 2), _T(16, 32, 4, 2), _T(32, 16, 4, 2), pre_block_m=32),
    256: AttnConfig(_T(16, 16, 4, 2), _T(16, 16, 4, 2), _T(16, 16, 4, 2), pre_block_m=16),
}


def _block_d(head_dim: int) -> int:
    """The head dim rounded up to a power of two (not triton.next_power_of_2: ~5 µs a call on the host)."""
    return 1 << (head_dim - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _arch(device_index: int | None) -> int:
    """Which table a device uses: 90 for Hopper and newer, else 80.  Interpreter: 90."""
    if INTERPRET or device_index is None:
        return 90
    major, _ = torch.cuda.get_device_capability(device_index)
    return 90 if major >= 9 else 80


def _key(x: torch.Tensor) -> tuple[int, int, int]:
    """The launch tables' key of a call: (arch, dtype code, head dim)."""
    return _arch(x.device.index if x.is_cuda else None), dtype_code(x.dtype), x.shape[-1]


# ----------------------------------------------------------------------------- launchers


def _aligned(x: torch.Tensor) -> bool:
    """Unit-stride head dim and 16-byte aligned rows: what the kernels' hints promise."""
    step = 16 // x.element_size()
    strides = x.stride()
    return (
        strides[3] == 1
        and x.data_ptr() % 16 == 0
        and all(st % step == 0 for st, n in zip(strides[:3], x.shape[:3]) if n > 1)
    )


def _kernel_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when the kernels can read it in place (fused-qkv views included), else a dense copy."""
    return x if _aligned(x) else torch.empty_like(x, memory_format=torch.contiguous_format).copy_(x)


def _bhl_strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _empty_out(q: torch.Tensor) -> torch.Tensor:
    """(B, H, Lq, D) output stored in (B, Lq, H, D) order (SDPA's flash layout)."""
    B, H, Lq, D = q.shape
    return torch.empty((B, Lq, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)


def _forward_triton(q, k, v, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = _kernel_layout(q), _kernel_layout(k), _kernel_layout(v)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    o = _empty_out(q)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    if _aot.active(q) and _aot.launch(
        "attention_fwd", dtype_code(q.dtype), q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr(),
        B, H, Lq, Lk, D, *q.stride(), *k.stride(), *v.stride(), *o.stride(), scale, _aot.stream(q),
    ):  # fmt: skip
        return o, lse
    case = ATTN_FWD.pick(_key(q))
    case.launch(
        (B * H, cdiv(Lq, case.constexprs["BLOCK_M"])), q, k, v, o, lse,
        *_bhl_strides(q), *_bhl_strides(k), *_bhl_strides(v), *_bhl_strides(o), H, Lq, Lk, D, scale * LOG2E,
    )  # fmt: skip
    return o, lse


def _backward_triton(do, q, k, v, o, lse, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Gradients take the layout of torch.empty_like of each input (as the fake does);
    # the kernels write an aligned buffer, copied over only in the rare other case.
    grads = [torch.empty_like(x) for x in (q, k, v)]
    bufs = [g if _aligned(g) else torch.empty_like(g, memory_format=torch.contiguous_format) for g in grads]
    dq, dk, dv = bufs
    do, q, k, v, o = (_kernel_layout(x) for x in (do, q, k, v, o))
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    key = _key(q)

    delta = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    if not (_aot.active(q) and _aot.launch(
        "attention_bwd", key[1], do.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(),
        lse.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), delta.data_ptr(), B, H, Lq, Lk, D,
        *do.stride(), *q.stride(), *k.stride(), *v.stride(), *o.stride(), *dq.stride(), *dk.stride(), *dv.stride(),
        scale, _aot.stream(q),
    )):  # fmt: skip
        _backward_jit(do, q, k, v, o, lse, dq, dk, dv, delta, scale, key)
    for g, buf in zip(grads, bufs):
        if buf is not g:
            g.copy_(buf)
    return tuple(grads)


def _backward_jit(do, q, k, v, o, lse, dq, dk, dv, delta, scale: float, key: tuple[int, int, int]) -> None:
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    pre = ATTN_BWD_PRE.pick(key)
    pre.launch(
        (B * H, cdiv(Lq, pre.constexprs["BLOCK_M"])), o, do, delta, *_bhl_strides(o), *_bhl_strides(do), H, Lq, D
    )
    # one launch computing dK and dV, or (head dim 160) one launch for each
    passes = [ATTN_BWD_DKDV.pick(key + (1, 1))] if ATTN_BWD_DKDV.pick(key + (1, 1)) else [
        ATTN_BWD_DKDV.pick(key + (1, 0)), ATTN_BWD_DKDV.pick(key + (0, 1))]  # fmt: skip
    for kv in passes:
        kv.launch(
            (B * H, cdiv(Lk, kv.constexprs["BLOCK_N"])), q, k, v, do, lse, delta, dk, dv,
            *_bhl_strides(q), *_bhl_strides(k), *_bhl_strides(v), *_bhl_strides(do),
            *_bhl_strides(dk), *_bhl_strides(dv), H, Lq, Lk, D, scale, scale * LOG2E,
        )  # fmt: skip
    qc = ATTN_BWD_DQ.pick(key)
    qc.launch(
        (B * H, cdiv(Lq, qc.constexprs["BLOCK_M"])), q, k, v, do, lse, delta, dq,
        *_bhl_strides(q), *_bhl_strides(k), *_bhl_strides(v), *_bhl_strides(do), *_bhl_strides(dq),
        H, Lq, Lk, D, scale, scale * LOG2E,
    )  # fmt: skip


# ----------------------------------------------------------------------------- torch.library ops


def _forward_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse₂): o (B, H, Lq, D) in (B, Lq, H, D) memory order; lse₂ (B, H, Lq) fp32."""
    if q.shape[0] * q.shape[1] * q.shape[2] == 0:
        return _empty_out(q), q.new_empty(q.shape[:3], dtype=torch.float32)
    if use_triton(q, k, v):
        return _forward_triton(q, k, v, scale)
    o_ref, lse = _forward_ref(q, k, v, scale)
    return _empty_out(q).copy_(o_ref), lse


_attention_fwd_op = torch.library.custom_op("fastdiff::attention_fwd", _forward_impl, mutates_args=())


@_attention_fwd_op.register_fake
def _(q, k, v, scale):
    return _empty_out(q), q.new_empty(q.shape[:3], dtype=torch.float32)


def _backward_impl(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), each laid out like ``torch.empty_like`` of its input."""
    if q.shape[0] * q.shape[1] * q.shape[2] == 0:
        return torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if use_triton(do, q, k, v):
        return _backward_triton(do, q, k, v, o, lse, scale)
    grads = _backward_ref(do, q, k, v, o, lse, scale)
    return tuple(torch.empty_like(x).copy_(g) for x, g in zip((q, k, v), grads))


_attention_bwd_op = torch.library.custom_op("fastdiff::attention_bwd", _backward_impl, mutates_args=())


@_attention_bwd_op.register_fake
def _(do, q, k, v, o, lse, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = _attention_bwd_call(do, q, k, v, o, lse, ctx.scale)
    return dq, dk, dv, None


_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


_attention_fwd_call = Op(_attention_fwd_op, _forward_impl, _setup_context, _backward)
_attention_bwd_call = Op(_attention_bwd_op, _backward_impl)


# ----------------------------------------------------------------------------- public API


def _validate(q, k, v, scale) -> float:
    for name, x in (("q", q), ("k", k), ("v", v)):
        _checks.check_float(name, x)
        _checks.check_ndim(name, x, 4, " (B, H, L, D)")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {x.dtype}")
        _checks.check_device(name, x, q.device, "q")
        if x.shape[:2] != q.shape[:2]:
            raise ValueError(
                f"{name} must have q's batch and heads {tuple(q.shape[:2])} in (B, H, L, D), got shape {tuple(x.shape)}"
            )
        if x.shape[3] != q.shape[3]:
            raise ValueError(f"{name} must have q's head dim {q.shape[3]}, got shape {tuple(x.shape)}")
    D = q.shape[3]
    if D not in HEAD_DIMS:
        raise ValueError(f"q's head dim (last dimension) must be one of {HEAD_DIMS}, got {D}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"v must have as many tokens as k ({k.shape[2]}), got shape {tuple(v.shape)}")
    if k.shape[2] == 0:
        raise ValueError(f"k must hold at least one token (softmax over no keys is undefined), got {tuple(k.shape)}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        # The kernels index tokens within one (batch, head) with 32-bit offsets.
        if x.shape[2] * max(abs(x.stride(2)), D) >= 2**31:
            raise ValueError(
                f"{name} is too long for 32-bit token offsets: shape {tuple(x.shape)}, strides {x.stride()}"
            )
    if scale is None:
        return 1.0 / math.sqrt(D)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite positive number, got {scale!r}")
    return float(scale)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """softmax(scale · q kᵀ) v per (batch, head): fused, never storing the score matrix.

    q: (B, H, Lq, D); k, v: (B, H, Lk, D) — the layout of
    `torch.nn.functional.scaled_dot_product_attention`; Lq and Lk independent (≥ 1 key),
    D in {32, 40, 64, 80, 96, 128, 160}; fp16/bf16 (fp32 accepted, slower); any strides
    with a unit-stride head dim.  ``scale`` defaults to 1/sqrt(D).  Differentiable in
    q, k and v.  Returns (B, H, Lq, D) in q's dtype, stored as (B, Lq, H, D).
    """
    scale = _validate(q, k, v, scale)
    return attention_unchecked(q, k, v, scale=scale)


def attention_unchecked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float) -> torch.Tensor:
    """`attention` without its argument checks, for a caller that made them once (a model's layer
    whose shapes are fixed at construction): ``scale`` is the float `attention` would resolve
    (1/sqrt(D) by default).  Arguments `attention` would refuse give undefined results."""
    return _attention_fwd_call(q, k, v, scale)[0]


# ----------------------------------------------------------------------------- launch tables


def _tiles_tag(t: Tiles) -> str:
    return f"{t.block_m}x{t.block_n}w{t.num_warps}s{t.num_stages}"


def _launch_tables() -> tuple[LaunchTable, ...]:
    """The four kernels' tables, keyed by (arch, dtype, head dim) (+ which of dK/dV a pass computes),
    built from the config tables above; head dims sharing a BLOCK_D and a config share one case."""
    scalars = {"H": "i32", "Lq": "i32", "Lk": "i32", "head_dim": "i32"}

    def strides(**tensors):  # tensor name -> name of its token axis
        return {f"stride_{t}_{a}": "i32" for t, tok in tensors.items() for a in ("b", "h", tok)}

    shared: dict[tuple, KernelCase] = {}

    def case(label, fn, sig, cx, tiles, mma, archs):
        sig = sig | {c: "constexpr" for c in cx}
        key = (fn, tuple(sorted(cx.items())), tuple(sig.values()), tiles.num_warps, tiles.num_stages, archs)
        if key not in shared:
            shared[key] = KernelCase(label, fn, sig, cx, tiles.num_warps, tiles.num_stages, mma, archs)
        return shared[key]

    fwd, pre, dkdv, dq = {}, {}, {}, {}
    for arch in ARCHS:
        for dt, code in DTYPE_CODES.items():
            for D in HEAD_DIMS:
                if dt == "fp32":  # one fp32 table for every architecture
                    cfg, archs, table = CONFIGS_FP32[_block_d(D)], ARCHS, "any"
                else:
                    cfg, archs, table = CONFIGS_16BIT[arch][D], (arch,), f"sm{arch}"
                mma = dt != "fp32"  # 16-bit tiles must reach the tensor cores (HGMMA on sm_90)
                bd = _block_d(D)
                prec = "ieee" if dt == "fp32" else "tf32"  # true fp32 FMA for fp32; 16-bit inputs ignore it
                tag = f"{table},{dt},bd{bd}"
                ins = {n: f"*{dt}" for n in ("Q", "K", "V")}
                key = (arch, code, D)

                t = cfg.fwd
                sig = ins | {"O": f"*{dt}", "LSE": "*fp32"} | strides(q="m", k="n", v="n", o="m")
                sig |= scalars | {"qk_scale": "fp32"}
                cx = {"BLOCK_D": bd, "BLOCK_M": t.block_m, "BLOCK_N": t.block_n, "DOT_PRECISION": prec}
                fwd[key] = case(f"attention_fwd[{tag},{_tiles_tag(t)}]", _attn_fwd_kernel, sig, cx, t, mma, archs)

                grads = ins | {"DO": f"*{dt}", "LSE": "*fp32", "DELTA": "*fp32"}
                t = cfg.bwd_kv
                sig = grads | {"DK": f"*{dt}", "DV": f"*{dt}"} | strides(q="m", k="n", v="n", do="m", dk="n", dv="n")
                sig |= scalars | {"sm_scale": "fp32", "qk_scale": "fp32"}
                for dk, dv in ((1, 0), (0, 1)) if cfg.split_dkdv else ((1, 1),):
                    cx = {"BLOCK_D": bd, "BLOCK_M": t.block_m, "BLOCK_N": t.block_n, "DOT_PRECISION": prec,
                          "COMPUTE_DK": bool(dk), "COMPUTE_DV": bool(dv)}  # fmt: skip
                    which = "dkdv" if dk and dv else ("dk" if dk else "dv")
                    label = f"attention_bwd_{which}[{tag},{_tiles_tag(t)}]"
                    dkdv[key + (dk, dv)] = case(label, _attn_bwd_dkdv_kernel, sig, cx, t, mma, archs)

                t = cfg.bwd_q
                sig = grads | {"DQ": f"*{dt}"} | strides(q="m", k="n", v="n", do="m", dq="m") | scalars
                sig |= {"sm_scale": "fp32", "qk_scale": "fp32"}
                cx = {"BLOCK_D": bd, "BLOCK_M": t.block_m, "BLOCK_N": t.block_n, "DOT_PRECISION": prec}
                dq[key] = case(f"attention_bwd_dq[{tag},{_tiles_tag(t)}]", _attn_bwd_dq_kernel, sig, cx, t, mma, archs)

                sig = {"O": f"*{dt}", "DO": f"*{dt}", "DELTA": "*fp32"} | strides(o="m", do="m")
                sig |= {"H": "i32", "Lq": "i32", "head_dim": "i32"}
                cx = {"BLOCK_D": bd, "BLOCK_M": cfg.pre_block_m}
                label = f"attention_bwd_pre[{dt},bd{bd},m{cfg.pre_block_m}]"
                pre[key] = case(label, _attn_bwd_preprocess_kernel, sig, cx, PRE_TILES, False, ARCHS)
    fields = ("arch", "dtype", "head_dim")
    return (
        LaunchTable("attention_fwd", fields, fwd),
        LaunchTable("attention_bwd_pre", fields, pre),
        LaunchTable("attention_bwd_dkdv", fields + ("compute_dk", "compute_dv"), dkdv),
        LaunchTable("attention_bwd_dq", fields, dq),
    )


LAUNCH_TABLES = _launch_tables() if HAS_TRITON else ()
ATTN_FWD, ATTN_BWD_PRE, ATTN_BWD_DKDV, ATTN_BWD_DQ = LAUNCH_TABLES or (None,) * 4
