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

Head dims as two column blocks.  tl.arange needs powers of two, and padding D to the
next one (40 → 64, 80 → 128, 160 → 256) spends 60 % more tensor-core work on zeros.
Split the head dim instead, D = D₀ + D₁ with D₀ = 2^⌊log2 D⌋ and D₁ the next power of
two ≥ D − D₀ but at least 16 (tl.dot's smallest K and N), or D₁ = 0:

    32 = 32,  40 → 32 + 16 (48),  64 = 64,  80 = 64 + 16,  96 = 64 + 32,  128 = 128,  160 = 128 + 32

A dot product is a sum over coordinates, so it splits over any partition of them, and a
matrix product's column blocks are the products with the column blocks of its right
factor.  With q = [q⁽⁰⁾ | q⁽¹⁾] (likewise k, v, o, dO, dQ, dK, dV):

    s_ij  = τ (q⁽⁰⁾_i·k⁽⁰⁾_j + q⁽¹⁾_i·k⁽¹⁾_j)          dP_ij = dO⁽⁰⁾_i·v⁽⁰⁾_j + dO⁽¹⁾_i·v⁽¹⁾_j
    o⁽ᶜ⁾_i = Σ_j P_ij v⁽ᶜ⁾_j,   dV⁽ᶜ⁾_j = Σ_i P_ij dO⁽ᶜ⁾_i,   dQ⁽ᶜ⁾_i = τ Σ_j dS_ij k⁽ᶜ⁾_j,   dK⁽ᶜ⁾_j = τ Σ_i dS_ij q⁽ᶜ⁾_i

for c = 0, 1: the score matmuls run twice (K = D₀ and K = D₁, into one accumulator), the
output matmuls once per block.  The tensor cores do 48/80/96/160 columns of work for
D = 40/80/96/160 instead of 64/128/128/256: 25 %, 37.5 %, 25 %, 37.5 % less.  Only
40's second block is padded (columns 40..47 load as zeros and are never stored).

Short keys (Lk ≤ BLOCK_N of the short case: 128 in fp16/bf16, as for SD's 77 text
tokens; 32 in fp32 up to D = 64; the 16-bit backward only up to D = 80 (64 on sm_80),
whose fp32 dK and dV accumulators of 128 keys still fit in registers).  A program holds every key, so the
forward needs no online softmax:
m = max_j s_ij is the row's true maximum and

    P_ij = exp(s_ij − m_i) / ℓ_i,   ℓ_i = Σ_j exp(s_ij − m_i),   o_i = Σ_j P_ij v_j,   L_i = m_i + log ℓ_i

(FlashAttention-2's recurrence after its first step: m' = max(−∞, ·), α = exp(−∞) = 0;
nothing to rescale).  K and V are read into on-chip memory once per program, and each
program steps through query blocks pid, pid + P, pid + 2P, ... with P programs per
(batch, head), P = min(⌈Lq / BLOCK_M⌉, ⌈2·#SMs / (B·H)⌉): two programs per SM, each
loading the next query block while it computes this one.  The backward's program holds
every key too, so the dQ of its query rows is complete, and δ_i = Σ_d dO_id O_id comes
from the O and dO rows it reads anyway (no preprocess kernel).  Its keys' gradients are
partial sums over its own queries,

    dV⁽ᵖ⁾_j = Σ_{i ∈ p} P_ij dO_i,   dK⁽ᵖ⁾_j = Σ_{i ∈ p} dS_ij q_i,   dV_j = Σ_p dV⁽ᵖ⁾_j,   dK_j = τ Σ_p dK⁽ᵖ⁾_j

written in fp32 to a (2, P, B·H, Lk, D) scratch and added in the order p = 0, 1, ...
by a reduce kernel: every SM works even when B·H is small (SD's cross-attention at
batch 2 has 16 (batch, head) pairs and 4096 queries; the long path's dK/dV kernel
gives it B·H·⌈77/BLOCK_N⌉ programs), and the result does not depend on timing.

Small grids.  When B·H·⌈Lq/BLOCK_M⌉ < #SMs (SD's 256- and 1024-token levels at batch
2), the forward and dQ kernels take BLOCK_M = 64 tiles instead of 128 where the table
has them: twice the programs, the same math.  64 rows is the smallest wgmma tile (one
warpgroup's M), so this is as far as tiles can shrink on sm_90 without leaving the
tensor cores; a split over keys with a combine pass would add a launch and a round
trip of fp32 partials for at most ⌈Lk/BLOCK_N⌉ (4 at 256 tokens) times the programs.

Hopper.  On sm_90 the matmuls lower to wgmma (HGMMA) and the loads to cp.async, software
pipelined num_stages deep.  The forward with TMA=True reads Q, K and V through in-kernel
tensor descriptors instead (the tensor memory accelerator: asynchronous bulk copies,
no address arithmetic or masks).  Its descriptors live in global scratch that Triton's
JIT allocates per launch, which the compiled library does not do: the TMA cases are
JIT-only candidates, in the tables for the audit, picked for D = 64/128 only where the
tuning sweep measured them faster (``_tuned.py``).  No kernel here asks for warp
specialization (``tl.range(..., warp_specialize=True)``): on Hopper that is still to try.

Precision: inputs fp16/bf16 (or fp32, for tests); the score and output matmuls run on
tensor cores with fp32 accumulation; softmax statistics, δ and all gradient
accumulators are fp32; outputs are stored in the input dtype.  P and dS are rounded
to the input dtype before their matmuls (as in FlashAttention).  For fp32 inputs the
matmuls use input_precision="ieee" (true fp32 FMA, not TF32), so fp32 results hold
fp32 tolerances; that path is for testing, not speed.

Layout: (B, H, L, D) as in `torch.nn.functional.scaled_dot_product_attention`; any
strides, as long as the head dim is the unit-stride one (q/k/v slices of a fused qkv
projection are read in place).  The output is stored in (B, Lq, H, D) memory order and
returned as a (B, H, Lq, D) view, so merging heads afterwards is free.

Paths, and what a GPU run should measure (docs/benchmarks.md, "Attention paths"):

    long keys, large grid     attention_fwd / _bwd_pre, _dkdv, _dq    D=64/128 at 16k tokens: TFLOP/s
    long keys, small grid     ..._fwd, _bwd_dq with 64-row tiles      SD self-attention at batch 2
    short keys                attention_fwd_short, _bwd_short, _reduce SD cross-attention (77 tokens)
    TMA (JIT, tuned only)     attention_fwd_tma                       the sweep's fwd rows at D=64/128
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from fastdiff.ops import _aot, _backend, tensor_checks, _tuned
from fastdiff.ops._backend import HAS_TRITON, INTERPRET, cdiv, define_op, use_triton
from fastdiff.ops.launch_tables import ARCHS, DTYPE_CODES, KernelCase, LaunchTable, Plans, device_arch, device_sms
from fastdiff.ops.launch_tables import dtype_code

HEAD_DIMS = (32, 40, 64, 80, 96, 128, 160)
LOG2E = 1.4426950408889634
HAS_TENSOR_DESCRIPTORS = False  # set below where Triton has them


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


def _stride_args(**tensors: str) -> list[str]:
    """The stride arguments of the kernels' (B, H, L, D) tensors, named by tensor and token axis:
    ``_stride_args(q="m")`` is ["stride_q_b", "stride_q_h", "stride_q_m"] (the head dim is unit-stride)."""
    return [f"stride_{t}_{axis}" for t, token in tensors.items() for axis in ("b", "h", token)]


_SIZES = ["H", "Lq", "Lk", "head_dim"]  # the kernels' size arguments

# Every (rows, D) tile is addressed as base + row·stride + d with a unit-stride head
# dim, in two column blocks (the docstring's D = D₀ + D₁; `_load_rows`).  The launcher
# guarantees 16-byte aligned rows (data pointer and token/head/batch strides), and the
# kernels say so with `tl.multiple_of(ptrs, [1, 16])`: the compiler then issues 16-byte
# vector loads and asynchronous (pipelined) copies even for head dim 40, whose row
# stride (80 bytes) is not a multiple of Triton's own 16-element specialisation.

if HAS_TRITON:
    import triton
    import triton.language as tl

    # Triton's interpreter multiplies the raw bit patterns of bf16 operands in tl.dot
    # (it stores bf16 as uint16); under the interpreter bf16 tiles are widened to fp32
    # first, which is exact for the products.  Compiled kernels never take this branch.
    _WIDEN_BF16_DOT = tl.constexpr(INTERPRET)

    # In-kernel tensor descriptors (TMA on sm_90): tl.make_tensor_descriptor and the
    # allocator for their global scratch, both public since Triton 3.4.
    HAS_TENSOR_DESCRIPTORS = hasattr(tl, "make_tensor_descriptor") and hasattr(triton, "set_allocator")

    @triton.jit
    def _dot(a, b, acc, DOT_PRECISION: tl.constexpr):
        """acc + a @ b accumulated in fp32 (tensor cores for fp16/bf16 tiles); acc None: a @ b."""
        if _WIDEN_BF16_DOT and a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    @triton.jit
    def _dot_t(a0, a1, b0, b1, BLOCK_D1: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """a bᵀ over the head dim, summed over its two column blocks: (rows of a, rows of b) in fp32."""
        s = _dot(a0, tl.trans(b0), None, DOT_PRECISION)
        if BLOCK_D1 > 0:
            s = _dot(a1, tl.trans(b1), s, DOT_PRECISION)
        return s

    @triton.jit
    def _dot_cols(a, b0, b1, acc0, acc1, BLOCK_D1: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """(acc₀ + a b₀, acc₁ + a b₁): a times each column block of the right factor (acc None: a bᶜ)."""
        c0 = _dot(a, b0, acc0, DOT_PRECISION)
        c1 = c0
        if BLOCK_D1 > 0:
            c1 = _dot(a, b1, acc1, DOT_PRECISION)
        return c0, c1

    @triton.jit
    def _zeros_cols(ROWS: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr):
        """fp32 zeros for the two column blocks of ROWS rows (the second is the first when BLOCK_D1 is 0)."""
        z0 = tl.zeros([ROWS, BLOCK_D0], tl.float32)
        z1 = z0
        if BLOCK_D1 > 0:
            z1 = tl.zeros([ROWS, BLOCK_D1], tl.float32)
        return z0, z1

    @triton.jit
    def _batch_head(H):
        """(b·H + h, b, h) of this program: batch·heads on the grid's x axis (no 65535 limit), b, h as int64."""
        bh = tl.program_id(0)
        return bh, (bh // H).to(tl.int64), (bh % H).to(tl.int64)

    @triton.jit
    def _load_rows(base, rows, row_ok, stride, head_dim, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr):
        """The (rows, head_dim) tile at base + row·stride + d as its column blocks (x₀, x₁).

        x₀ holds columns [0, BLOCK_D0), all real (BLOCK_D0 ≤ head_dim); x₁ the next BLOCK_D1,
        zero past head_dim (x₁ is x₀ again when BLOCK_D1 is 0: never read).  Rows not ok are zero.
        """
        cols = tl.arange(0, BLOCK_D0)
        x0 = tl.load(tl.multiple_of(base + rows[:, None] * stride + cols[None, :], [1, 16]), mask=row_ok[:, None],
                     other=0.0)  # fmt: skip
        x1 = x0
        if BLOCK_D1 > 0:
            cols = BLOCK_D0 + tl.arange(0, BLOCK_D1)
            # D is a multiple of 8: the padding mask is constant over 8 lanes (16-byte vectors).
            col_ok = tl.max_constancy(cols < head_dim, [8])
            x1 = tl.load(tl.multiple_of(base + rows[:, None] * stride + cols[None, :], [1, 16]),
                         mask=row_ok[:, None] & col_ok[None, :], other=0.0)  # fmt: skip
        return x0, x1

    @triton.jit
    def _store_rows(base, rows, row_ok, stride, head_dim, x0, x1, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr):
        """Stores the column blocks (x₀, x₁) of a (rows, head_dim) tile in base's dtype (`_load_rows`' layout)."""
        cols = tl.arange(0, BLOCK_D0)
        tl.store(tl.multiple_of(base + rows[:, None] * stride + cols[None, :], [1, 16]),
                 x0.to(base.dtype.element_ty), mask=row_ok[:, None])  # fmt: skip
        if BLOCK_D1 > 0:
            cols = BLOCK_D0 + tl.arange(0, BLOCK_D1)
            col_ok = tl.max_constancy(cols < head_dim, [8])
            tl.store(tl.multiple_of(base + rows[:, None] * stride + cols[None, :], [1, 16]),
                     x1.to(base.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])  # fmt: skip

    @triton.jit
    def _store_output(O, LSE, rows, row_ok, stride_o_m, head_dim, acc0, acc1, m_i, l_i,
                      BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr):  # fmt: skip
        """The forward's epilogue: o = acc / ℓ in O's dtype and lse₂ = m + log2 ℓ."""
        # ℓ ≥ 1 in every row (its max term is exp2(0)); the guard only keeps the
        # division finite should that invariant ever break.
        l_i = tl.where(l_i > 0.0, l_i, 1.0)
        _store_rows(O, rows, row_ok, stride_o_m, head_dim, acc0 / l_i[:, None], acc1 / l_i[:, None], BLOCK_D0,
                    BLOCK_D1)  # fmt: skip
        tl.store(LSE + rows, m_i + tl.log2(l_i), mask=row_ok)

    @triton.jit
    def _online_softmax_step(qk, key_ok, m_i, l_i, qk_scale, RAGGED):
        """One key block of the online softmax: (p, α, m', ℓ') from the raw scores qk (docstring, forward)."""
        if RAGGED:  # only the last block is ragged: a uniform branch
            # -inf before the max: padded keys never raise m nor add to ℓ.
            qk = tl.where(key_ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)  # finite: each block holds a real key
        p = tl.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)

    # Integers are never specialised (see launch_tables): the kernels' pointer hints carry the alignment.
    @triton.jit(do_not_specialize=_stride_args(q="m", k="n", v="n", o="m") + _SIZES)
    def _attn_fwd_kernel(
        Q,  # (B, H, Lq, D)
        K,  # (B, H, Lk, D)
        V,  # (B, H, Lk, D)
        O,  # (B, H, Lq, D) out
        LSE,  # (B, H, Lq) fp32 out: base-2 log-sum-exp of each score row
        stride_q_b, stride_q_h, stride_q_m,
        stride_k_b, stride_k_h, stride_k_n,
        stride_v_b, stride_v_h, stride_v_n,
        stride_o_b, stride_o_h, stride_o_m,
        H, Lq, Lk, head_dim,  # head_dim = D, a multiple of 8
        qk_scale,  # τ · log2(e)
        BLOCK_D0: tl.constexpr,  # the head dim's column blocks: D₀ = 2^⌊log2 D⌋ ...
        BLOCK_D1: tl.constexpr,  # ... and D₁ ≥ D − D₀ (0, 16 or 32)
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        TMA: tl.constexpr,  # Q, K, V through tensor descriptors (one column block; Triton ≥ 3.4)
    ):
        bh, b, h = _batch_head(H)
        pid_m = tl.program_id(1)
        rows_q = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        q_ok = rows_q < Lq
        Q += b * stride_q_b + h * stride_q_h
        K += b * stride_k_b + h * stride_k_h
        V += b * stride_v_b + h * stride_v_h
        if TMA:
            # On sm_90 the tensor memory accelerator copies each tile to shared memory
            # asynchronously: no address registers, no masks (rows past L arrive as zeros).
            tl.static_assert(BLOCK_D1 == 0)
            q_desc = tl.make_tensor_descriptor(Q, shape=[Lq, head_dim], strides=[stride_q_m, 1],
                                               block_shape=[BLOCK_M, BLOCK_D0])  # fmt: skip
            k_desc = tl.make_tensor_descriptor(K, shape=[Lk, head_dim], strides=[stride_k_n, 1],
                                               block_shape=[BLOCK_N, BLOCK_D0])  # fmt: skip
            v_desc = tl.make_tensor_descriptor(V, shape=[Lk, head_dim], strides=[stride_v_n, 1],
                                               block_shape=[BLOCK_N, BLOCK_D0])  # fmt: skip
            q0 = q_desc.load([pid_m * BLOCK_M, 0])
            q1 = q0
        else:
            q0, q1 = _load_rows(Q, rows_q, q_ok, stride_q_m, head_dim, BLOCK_D0, BLOCK_D1)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc0, acc1 = _zeros_cols(BLOCK_M, BLOCK_D0, BLOCK_D1)
        for start_n in range(0, Lk, BLOCK_N):
            rows = start_n + tl.arange(0, BLOCK_N)
            key_ok = rows < Lk
            if TMA:
                k0 = k_desc.load([start_n, 0])
                k1 = k0
            else:
                k0, k1 = _load_rows(K, rows, key_ok, stride_k_n, head_dim, BLOCK_D0, BLOCK_D1)
            qk = _dot_t(q0, q1, k0, k1, BLOCK_D1, DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
            p, alpha, m_i, l_i = _online_softmax_step(qk, key_ok, m_i, l_i, qk_scale, start_n + BLOCK_N > Lk)
            if TMA:
                v0 = v_desc.load([start_n, 0])
                v1 = v0
            else:
                v0, v1 = _load_rows(V, rows, key_ok, stride_v_n, head_dim, BLOCK_D0, BLOCK_D1)
            acc0, acc1 = _dot_cols(p.to(v0.dtype), v0, v1, acc0 * alpha[:, None], acc1 * alpha[:, None], BLOCK_D1,
                                   DOT_PRECISION)  # fmt: skip

        O += b * stride_o_b + h * stride_o_h
        _store_output(O, LSE + bh.to(tl.int64) * Lq, rows_q, q_ok, stride_o_m, head_dim, acc0, acc1, m_i, l_i,
                      BLOCK_D0, BLOCK_D1)  # fmt: skip

    @triton.jit(do_not_specialize=_stride_args(q="m", k="n", v="n", o="m") + _SIZES)
    def _attn_fwd_short_kernel(
        Q,  # (B, H, Lq, D)
        K,  # (B, H, Lk, D), Lk ≤ BLOCK_N
        V,  # (B, H, Lk, D)
        O,  # (B, H, Lq, D) out
        LSE,  # (B, H, Lq) fp32 out: base-2 log-sum-exp of each score row
        stride_q_b, stride_q_h, stride_q_m,
        stride_k_b, stride_k_h, stride_k_n,
        stride_v_b, stride_v_h, stride_v_n,
        stride_o_b, stride_o_h, stride_o_m,
        H, Lq, Lk, head_dim,  # head_dim = D, a multiple of 8
        qk_scale,  # τ · log2(e)
        BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,  # the head dim's column blocks D₀ + D₁
        BLOCK_M: tl.constexpr,  # queries per step of a program's loop
        BLOCK_N: tl.constexpr,  # every key: Lk ≤ BLOCK_N
        DOT_PRECISION: tl.constexpr,
    ):
        # One program per (batch·head, slice of query blocks): K and V are read once into
        # on-chip memory, then the program steps through query blocks pid_m, pid_m + P, ...
        bh, b, h = _batch_head(H)
        pid_m = tl.program_id(1)
        keys = tl.arange(0, BLOCK_N)
        key_ok = keys < Lk
        k0, k1 = _load_rows(K + b * stride_k_b + h * stride_k_h, keys, key_ok, stride_k_n, head_dim, BLOCK_D0, BLOCK_D1)
        v0, v1 = _load_rows(V + b * stride_v_b + h * stride_v_h, keys, key_ok, stride_v_n, head_dim, BLOCK_D0, BLOCK_D1)
        Q += b * stride_q_b + h * stride_q_h
        O += b * stride_o_b + h * stride_o_h
        LSE += bh.to(tl.int64) * Lq
        for start_m in range(pid_m * BLOCK_M, Lq, tl.num_programs(1) * BLOCK_M):
            rows = start_m + tl.arange(0, BLOCK_M)
            q_ok = rows < Lq
            q0, q1 = _load_rows(Q, rows, q_ok, stride_q_m, head_dim, BLOCK_D0, BLOCK_D1)
            qk = tl.where(key_ok[None, :], _dot_t(q0, q1, k0, k1, BLOCK_D1, DOT_PRECISION), float("-inf"))
            # Every key is in this block: m is the row's true max, nothing to rescale.
            m_i = tl.max(qk, 1) * qk_scale
            p = tl.exp2(qk * qk_scale - m_i[:, None])
            acc0, acc1 = _dot_cols(p.to(v0.dtype), v0, v1, None, None, BLOCK_D1, DOT_PRECISION)
            _store_output(O, LSE, rows, q_ok, stride_o_m, head_dim, acc0, acc1, m_i, tl.sum(p, 1), BLOCK_D0, BLOCK_D1)

    @triton.jit(do_not_specialize=_stride_args(o="m", do="m") + ["H", "Lq", "head_dim"])
    def _attn_bwd_preprocess_kernel(
        O,  # (B, H, Lq, D)
        DO,  # (B, H, Lq, D)
        DELTA,  # (B, H, Lq) fp32 out: δ_i = Σ_d dO_id O_id
        stride_o_b, stride_o_h, stride_o_m,
        stride_do_b, stride_do_h, stride_do_m,
        H,
        Lq,
        head_dim,  # D, a multiple of 8
        BLOCK_D: tl.constexpr,  # next power of two ≥ head_dim (masked lanes move no bytes)
        BLOCK_M: tl.constexpr,
    ):
        bh, b, h = _batch_head(H)
        pid_m = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_m < Lq)[:, None] & tl.max_constancy(offs_d < head_dim, [8])[None, :]
        o_ptrs = O + b * stride_o_b + h * stride_o_h + offs_m[:, None] * stride_o_m + offs_d[None, :]
        do_ptrs = DO + b * stride_do_b + h * stride_do_h + offs_m[:, None] * stride_do_m + offs_d[None, :]
        o = tl.load(tl.multiple_of(o_ptrs, [1, 16]), mask=mask, other=0.0).to(tl.float32)
        do = tl.load(tl.multiple_of(do_ptrs, [1, 16]), mask=mask, other=0.0).to(tl.float32)
        tl.store(DELTA + bh.to(tl.int64) * Lq + offs_m, tl.sum(o * do, 1), mask=offs_m < Lq)

    @triton.jit
    def _grad_scores_t(k0, k1, v0, v1, q0, q1, do0, do1, lse, delta, key_ok, qk_scale, MASK_KEYS: tl.constexpr,
                       BLOCK_D1: tl.constexpr, DOT_PRECISION: tl.constexpr):  # fmt: skip
        """(Pᵀ, dSᵀ) of a (keys, queries) block from the saved lse₂ and δ (docstring, backward), fp32.

        lse = +inf on padded queries makes their columns exactly 0 (their q, dO and δ load as 0):
        they add nothing to dK or dV.  A padded key's row may overflow (exp2(0 − lse)); MASK_KEYS
        zeroes those rows, needed where dSᵀ also feeds dQ.
        """
        p_t = tl.exp2(_dot_t(k0, k1, q0, q1, BLOCK_D1, DOT_PRECISION) * qk_scale - lse[None, :])
        if MASK_KEYS:
            p_t = tl.where(key_ok[:, None], p_t, 0.0)
        return p_t, p_t * (_dot_t(v0, v1, do0, do1, BLOCK_D1, DOT_PRECISION) - delta[None, :])

    @triton.jit(do_not_specialize=_stride_args(q="m", k="n", v="n", do="m", dk="n", dv="n") + _SIZES)
    def _attn_bwd_dkdv_kernel(
        Q,  # (B, H, Lq, D)
        K,  # (B, H, Lk, D)
        V,  # (B, H, Lk, D)
        DO,  # (B, H, Lq, D)
        LSE,  # (B, H, Lq) fp32, base 2
        DELTA,  # (B, H, Lq) fp32
        DK,  # (B, H, Lk, D) out
        DV,  # (B, H, Lk, D) out
        stride_q_b, stride_q_h, stride_q_m,
        stride_k_b, stride_k_h, stride_k_n,
        stride_v_b, stride_v_h, stride_v_n,
        stride_do_b, stride_do_h, stride_do_m,
        stride_dk_b, stride_dk_h, stride_dk_n,
        stride_dv_b, stride_dv_h, stride_dv_n,
        H, Lq, Lk, head_dim,  # head_dim = D, a multiple of 8
        sm_scale, qk_scale,  # τ and τ · log2(e)
        BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,  # the head dim's column blocks D₀ + D₁
        BLOCK_M: tl.constexpr,  # queries per iteration
        BLOCK_N: tl.constexpr,  # keys per program
        DOT_PRECISION: tl.constexpr,
        COMPUTE_DK: tl.constexpr,  # one accumulator per launch halves the registers
        COMPUTE_DV: tl.constexpr,  # (head dim 160 runs two launches)
    ):
        bh, b, h = _batch_head(H)
        pid_n = tl.program_id(1)
        keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        key_ok = keys < Lk
        k0, k1 = _load_rows(K + b * stride_k_b + h * stride_k_h, keys, key_ok, stride_k_n, head_dim, BLOCK_D0, BLOCK_D1)
        v0, v1 = _load_rows(V + b * stride_v_b + h * stride_v_h, keys, key_ok, stride_v_n, head_dim, BLOCK_D0, BLOCK_D1)
        Q += b * stride_q_b + h * stride_q_h
        DO += b * stride_do_b + h * stride_do_h
        LSE += bh.to(tl.int64) * Lq
        DELTA += bh.to(tl.int64) * Lq

        dk0, dk1 = _zeros_cols(BLOCK_N, BLOCK_D0, BLOCK_D1)
        dv0, dv1 = dk0, dk1
        for start_m in range(0, Lq, BLOCK_M):
            rows = start_m + tl.arange(0, BLOCK_M)
            q_ok = rows < Lq
            q0, q1 = _load_rows(Q, rows, q_ok, stride_q_m, head_dim, BLOCK_D0, BLOCK_D1)
            lse = tl.load(LSE + rows, mask=q_ok, other=float("inf"))
            delta = tl.load(DELTA + rows, mask=q_ok, other=0.0)
            do0, do1 = _load_rows(DO, rows, q_ok, stride_do_m, head_dim, BLOCK_D0, BLOCK_D1)
            # a pass without dK leaves dSᵀ (and δ's load) unused: the compiler drops them
            p_t, ds_t = _grad_scores_t(k0, k1, v0, v1, q0, q1, do0, do1, lse, delta, key_ok, qk_scale, False,
                                       BLOCK_D1, DOT_PRECISION)  # fmt: skip
            if COMPUTE_DV:
                dv0, dv1 = _dot_cols(p_t.to(do0.dtype), do0, do1, dv0, dv1, BLOCK_D1, DOT_PRECISION)
            if COMPUTE_DK:
                dk0, dk1 = _dot_cols(ds_t.to(q0.dtype), q0, q1, dk0, dk1, BLOCK_D1, DOT_PRECISION)

        if COMPUTE_DK:
            DK += b * stride_dk_b + h * stride_dk_h
            _store_rows(DK, keys, key_ok, stride_dk_n, head_dim, dk0 * sm_scale, dk1 * sm_scale, BLOCK_D0, BLOCK_D1)
        if COMPUTE_DV:
            DV += b * stride_dv_b + h * stride_dv_h
            _store_rows(DV, keys, key_ok, stride_dv_n, head_dim, dv0, dv1, BLOCK_D0, BLOCK_D1)

    @triton.jit
    def _grad_scores(q0, q1, k0, k1, v0, v1, do0, do1, lse, delta, key_ok, qk_scale,
                     BLOCK_D1: tl.constexpr, DOT_PRECISION: tl.constexpr):  # fmt: skip
        """(P, dS) of a (queries, keys) block from the saved lse₂ and δ (docstring, backward), fp32."""
        p = tl.exp2(_dot_t(q0, q1, k0, k1, BLOCK_D1, DOT_PRECISION) * qk_scale - lse[:, None])
        # A padded key scores 0 and exp2(0 − lse) may overflow: select, never multiply.
        p = tl.where(key_ok[None, :], p, 0.0)
        return p, p * (_dot_t(do0, do1, v0, v1, BLOCK_D1, DOT_PRECISION) - delta[:, None])

    @triton.jit(do_not_specialize=_stride_args(q="m", k="n", v="n", do="m", dq="m") + _SIZES)
    def _attn_bwd_dq_kernel(
        Q,  # (B, H, Lq, D)
        K,  # (B, H, Lk, D)
        V,  # (B, H, Lk, D)
        DO,  # (B, H, Lq, D)
        LSE,  # (B, H, Lq) fp32, base 2
        DELTA,  # (B, H, Lq) fp32
        DQ,  # (B, H, Lq, D) out
        stride_q_b, stride_q_h, stride_q_m,
        stride_k_b, stride_k_h, stride_k_n,
        stride_v_b, stride_v_h, stride_v_n,
        stride_do_b, stride_do_h, stride_do_m,
        stride_dq_b, stride_dq_h, stride_dq_m,
        H, Lq, Lk, head_dim,  # head_dim = D, a multiple of 8
        sm_scale, qk_scale,  # τ and τ · log2(e)
        BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,  # the head dim's column blocks D₀ + D₁
        BLOCK_M: tl.constexpr,  # queries per program
        BLOCK_N: tl.constexpr,  # keys per iteration
        DOT_PRECISION: tl.constexpr,
    ):
        bh, b, h = _batch_head(H)
        pid_m = tl.program_id(1)
        rows_q = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        q_ok = rows_q < Lq
        q0, q1 = _load_rows(Q + b * stride_q_b + h * stride_q_h, rows_q, q_ok, stride_q_m, head_dim, BLOCK_D0, BLOCK_D1)
        do0, do1 = _load_rows(DO + b * stride_do_b + h * stride_do_h, rows_q, q_ok, stride_do_m, head_dim, BLOCK_D0,
                              BLOCK_D1)  # fmt: skip
        lse = tl.load(LSE + bh.to(tl.int64) * Lq + rows_q, mask=q_ok, other=float("inf"))
        delta = tl.load(DELTA + bh.to(tl.int64) * Lq + rows_q, mask=q_ok, other=0.0)
        K += b * stride_k_b + h * stride_k_h
        V += b * stride_v_b + h * stride_v_h

        dq0, dq1 = _zeros_cols(BLOCK_M, BLOCK_D0, BLOCK_D1)
        for start_n in range(0, Lk, BLOCK_N):
            rows = start_n + tl.arange(0, BLOCK_N)
            key_ok = rows < Lk
            k0, k1 = _load_rows(K, rows, key_ok, stride_k_n, head_dim, BLOCK_D0, BLOCK_D1)
            v0, v1 = _load_rows(V, rows, key_ok, stride_v_n, head_dim, BLOCK_D0, BLOCK_D1)
            _, ds = _grad_scores(q0, q1, k0, k1, v0, v1, do0, do1, lse, delta, key_ok, qk_scale, BLOCK_D1,
                                 DOT_PRECISION)  # fmt: skip
            dq0, dq1 = _dot_cols(ds.to(k0.dtype), k0, k1, dq0, dq1, BLOCK_D1, DOT_PRECISION)

        DQ += b * stride_dq_b + h * stride_dq_h
        _store_rows(DQ, rows_q, q_ok, stride_dq_m, head_dim, dq0 * sm_scale, dq1 * sm_scale, BLOCK_D0, BLOCK_D1)

    @triton.jit(do_not_specialize=_stride_args(q="m", k="n", v="n", o="m", do="m", dq="m") + _SIZES)
    def _attn_bwd_short_kernel(
        Q,  # (B, H, Lq, D)
        K,  # (B, H, Lk, D), Lk ≤ BLOCK_N
        V,  # (B, H, Lk, D)
        O,  # (B, H, Lq, D)
        DO,  # (B, H, Lq, D)
        LSE,  # (B, H, Lq) fp32, base 2
        DQ,  # (B, H, Lq, D) out
        PARTIAL,  # (2, P, B·H, Lk, D) fp32 out: each program's Σ dSᵀq and Σ Pᵀ dO
        stride_q_b, stride_q_h, stride_q_m,
        stride_k_b, stride_k_h, stride_k_n,
        stride_v_b, stride_v_h, stride_v_n,
        stride_o_b, stride_o_h, stride_o_m,
        stride_do_b, stride_do_h, stride_do_m,
        stride_dq_b, stride_dq_h, stride_dq_m,
        H, Lq, Lk, head_dim,  # head_dim = D, a multiple of 8
        sm_scale, qk_scale,  # τ and τ · log2(e)
        BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,  # the head dim's column blocks D₀ + D₁
        BLOCK_M: tl.constexpr,  # queries per step of a program's loop
        BLOCK_N: tl.constexpr,  # every key: Lk ≤ BLOCK_N
        DOT_PRECISION: tl.constexpr,
    ):
        # One program per (batch·head, slice of query blocks), holding every key: its dQ rows
        # are complete (no other program touches them) and δ comes from its own O and dO
        # rows; its dK, dV over its queries go to PARTIAL, summed by the reduce kernel.
        bh, b, h = _batch_head(H)
        part = tl.program_id(1)
        keys = tl.arange(0, BLOCK_N)
        key_ok = keys < Lk
        k0, k1 = _load_rows(K + b * stride_k_b + h * stride_k_h, keys, key_ok, stride_k_n, head_dim, BLOCK_D0, BLOCK_D1)
        v0, v1 = _load_rows(V + b * stride_v_b + h * stride_v_h, keys, key_ok, stride_v_n, head_dim, BLOCK_D0, BLOCK_D1)
        Q += b * stride_q_b + h * stride_q_h
        O += b * stride_o_b + h * stride_o_h
        DO += b * stride_do_b + h * stride_do_h
        DQ += b * stride_dq_b + h * stride_dq_h
        LSE += bh.to(tl.int64) * Lq

        dk0, dk1 = _zeros_cols(BLOCK_N, BLOCK_D0, BLOCK_D1)
        dv0, dv1 = dk0, dk1
        for start_m in range(part * BLOCK_M, Lq, tl.num_programs(1) * BLOCK_M):
            rows = start_m + tl.arange(0, BLOCK_M)
            q_ok = rows < Lq
            q0, q1 = _load_rows(Q, rows, q_ok, stride_q_m, head_dim, BLOCK_D0, BLOCK_D1)
            do0, do1 = _load_rows(DO, rows, q_ok, stride_do_m, head_dim, BLOCK_D0, BLOCK_D1)
            o0, o1 = _load_rows(O, rows, q_ok, stride_o_m, head_dim, BLOCK_D0, BLOCK_D1)
            delta = tl.sum(do0.to(tl.float32) * o0.to(tl.float32), 1)
            if BLOCK_D1 > 0:
                delta += tl.sum(do1.to(tl.float32) * o1.to(tl.float32), 1)
            lse = tl.load(LSE + rows, mask=q_ok, other=float("inf"))
            # keys as the rows (the dK/dV kernel's orientation: its registers), dQ from dSᵀ transposed
            p_t, ds_t = _grad_scores_t(k0, k1, v0, v1, q0, q1, do0, do1, lse, delta, key_ok, qk_scale, True,
                                       BLOCK_D1, DOT_PRECISION)  # fmt: skip
            p_t, ds_t = p_t.to(do0.dtype), ds_t.to(q0.dtype)
            ds = tl.trans(ds_t)
            dv0, dv1 = _dot_cols(p_t, do0, do1, dv0, dv1, BLOCK_D1, DOT_PRECISION)
            dk0, dk1 = _dot_cols(ds_t, q0, q1, dk0, dk1, BLOCK_D1, DOT_PRECISION)
            dq0, dq1 = _dot_cols(ds, k0, k1, None, None, BLOCK_D1, DOT_PRECISION)
            _store_rows(DQ, rows, q_ok, stride_dq_m, head_dim, dq0 * sm_scale, dq1 * sm_scale, BLOCK_D0, BLOCK_D1)

        # rows of head_dim fp32 (32-byte multiples): PARTIAL[0, part, bh] = Σ dSᵀq, PARTIAL[1, part, bh] = Σ Pᵀ dO
        BH = tl.num_programs(0).to(tl.int64)
        slab = Lk.to(tl.int64) * head_dim
        dk_part = PARTIAL + (part * BH + bh) * slab
        _store_rows(dk_part, keys, key_ok, head_dim, head_dim, dk0, dk1, BLOCK_D0, BLOCK_D1)
        _store_rows(dk_part + tl.num_programs(1) * BH * slab, keys, key_ok, head_dim, head_dim, dv0, dv1, BLOCK_D0,
                    BLOCK_D1)  # fmt: skip

    @triton.jit(do_not_specialize=_stride_args(dk="n", dv="n") + ["H", "Lk", "head_dim", "parts"])
    def _attn_bwd_short_reduce_kernel(
        PARTIAL,  # (2, parts, B·H, Lk, D) fp32
        DK,  # (B, H, Lk, D) out: τ Σ_p PARTIAL[0, p]
        DV,  # (B, H, Lk, D) out: Σ_p PARTIAL[1, p]
        stride_dk_b, stride_dk_h, stride_dk_n,
        stride_dv_b, stride_dv_h, stride_dv_n,
        H,
        Lk,
        head_dim,  # D, a multiple of 8
        parts,  # P: programs per (batch, head) of the short backward
        sm_scale,  # τ
        BLOCK: tl.constexpr,  # elements of one (Lk, D) slab per program
    ):
        # grid (B·H, 2, ⌈Lk·D / BLOCK⌉): axis 1 picks dK or dV.  The partials are added in a
        # fixed order, so the gradients do not depend on timing (no atomics).
        bh = tl.program_id(0)
        which = tl.program_id(1)
        slab = Lk * head_dim  # < 2**31: the launcher's 32-bit token offsets
        offs = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < slab
        BH = tl.num_programs(0).to(tl.int64)
        # slabs of Lk·D fp32, D a multiple of 8: every slab starts 32-byte aligned
        src = tl.multiple_of(PARTIAL + (which * parts * BH + bh) * slab, 16)
        acc = tl.load(src + offs, mask=ok, other=0.0)
        for part in range(1, parts):
            acc += tl.load(tl.multiple_of(src + part * BH * slab, 16) + offs, mask=ok, other=0.0)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        key = offs // head_dim
        col = offs - key * head_dim
        if which == 0:
            dk_ptrs = DK + b * stride_dk_b + h * stride_dk_h + key * stride_dk_n + col
            tl.store(dk_ptrs, (acc * sm_scale).to(DK.dtype.element_ty), mask=ok)
        else:
            dv_ptrs = DV + b * stride_dv_b + h * stride_dv_h + key * stride_dv_n + col
            tl.store(dv_ptrs, acc.to(DV.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class Tiles:
    """One kernel's launch configuration."""

    block_m: int  # query rows: per program (forward, dq) or per iteration (dk/dv) or per step (short paths)
    block_n: int  # key rows: per iteration (forward, dq), per program (dk/dv), every key (short paths)
    num_warps: int
    num_stages: int  # software-pipelining depth of the loads in the main loop
    tma: bool = False  # forward only: Q, K, V through tensor descriptors (TMA on sm_90); Triton's JIT only


@dataclass(frozen=True)
class AttnConfig:
    """The tiles of every attention kernel for one (architecture, head dim, dtype class).

    Each Tiles field is a *role* the launcher picks by the call's shape (`Tables`), and the unit
    the tuning sweep replaces (``scripts/tune_kernels.py``, `tuning_candidates`).
    """

    fwd: Tiles
    bwd_kv: Tiles  # dk/dv: block_n keys per program (the wgmma M dimension: ≥ 64)
    bwd_q: Tiles  # dq: block_m queries per program (the wgmma M dimension: ≥ 64)
    fwd_small: Tiles | None = None  # forward when B·H·⌈Lq / fwd.block_m⌉ < #SMs (small grids)
    bwd_q_small: Tiles | None = None  # dq likewise
    fwd_short: Tiles | None = None  # forward when Lk ≤ block_n: every key in one block
    bwd_short: Tiles | None = None  # backward likewise (dq, and dK, dV partials)
    pre_block_m: int = 128  # rows of the δ preprocess
    pre_warps: int = 4  # its warps
    split_dkdv: bool = False  # dK and dV in two launches (one accumulator each; recomputes P)


ROLES = ("fwd", "fwd_small", "fwd_short", "bwd_kv", "bwd_q", "bwd_q_small", "bwd_short")

# fp16/bf16 tables, keyed by head dim.  Every tile feeding tl.dot has M ≥ 64 and
# num_warps ≥ 4, so on sm_90 the matmuls lower to wgmma (HGMMA), with one exception: the
# short backward's dQ product has M = block_m = 32 (mma.sync; its other four products have
# M = 128 keys), and its 64-row tiles are tuning candidates.  Head dims sharing a config
# still compile apart (their column blocks differ).
# sm_80: every tile but head dim 160's dK pass and the short paths' fits the 99 KB of
# shared memory of sm_86/sm_89 as well as the A100's 163 KB.
# Head dim 160 splits dK and dV into two launches: both fp32 accumulators of a 64×160
# key block do not fit beside the rest without spilling.
# Short paths: 128 keys per block, the largest tile whose fp32 dK and dV accumulators
# (128 × D each) fit in registers up to D = 80 on sm_90 and D = 64 on sm_80 (SD's
# cross-attention has 77 tokens); past that (D = 96 spills 40 bytes on sm_90, D = 80
# 8 bytes on sm_80) the backward with short keys takes the long path.  On sm_80, head dim
# 96's dK/dV and 160's dQ take 8 warps and 16-key steps: the tiles of 128/256 columns
# spilled once the head dim became 64 + 32 and 128 + 32 columns.
_T = Tiles
PRE_TILES = _T(0, 0, 4, 1)  # the δ preprocess: one pass, nothing to pipeline
REDUCE_TILES = _T(0, 1024, 4, 1)  # the short backward's sum of partials: block_n elements per program
_SM90_D32 = AttnConfig(fwd=_T(128, 64, 4, 3), bwd_kv=_T(32, 128, 4, 3), bwd_q=_T(128, 64, 4, 3),
                       fwd_small=_T(64, 64, 4, 3), bwd_q_small=_T(64, 64, 4, 3),
                       fwd_short=_T(128, 128, 4, 2), bwd_short=_T(32, 128, 4, 2))  # fmt: skip
_SM90_D64 = AttnConfig(fwd=_T(128, 128, 8, 3), bwd_kv=_T(32, 128, 8, 3), bwd_q=_T(128, 64, 8, 3),
                       fwd_small=_T(64, 128, 4, 3), bwd_q_small=_T(64, 64, 4, 3),
                       fwd_short=_T(128, 128, 8, 2), bwd_short=_T(32, 128, 8, 2))  # fmt: skip
_SM90_D128 = AttnConfig(fwd=_T(128, 64, 8, 3), bwd_kv=_T(32, 64, 4, 3), bwd_q=_T(64, 64, 4, 3),
                        fwd_small=_T(64, 64, 4, 3), fwd_short=_T(128, 128, 8, 2))  # fmt: skip
_SM90_D80 = dataclasses.replace(_SM90_D128, bwd_short=_T(32, 128, 8, 2))
_SM90_D160 = AttnConfig(fwd=_T(64, 64, 8, 2), bwd_kv=_T(32, 64, 8, 2), bwd_q=_T(64, 32, 8, 2), split_dkdv=True,
                        fwd_short=_T(64, 128, 8, 2))  # fmt: skip
_SM80_D64 = AttnConfig(fwd=_T(128, 64, 4, 3), bwd_kv=_T(32, 128, 8, 3), bwd_q=_T(128, 64, 8, 3),
                       fwd_small=_T(64, 64, 4, 3), bwd_q_small=_T(64, 64, 4, 3),
                       fwd_short=_T(64, 128, 4, 2), bwd_short=_T(32, 128, 8, 2))  # fmt: skip
_SM80_D128 = AttnConfig(fwd=_T(128, 64, 8, 2), bwd_kv=_T(32, 64, 4, 3), bwd_q=_T(64, 64, 4, 2),
                        fwd_small=_T(64, 64, 4, 2), fwd_short=_T(64, 128, 8, 2))  # fmt: skip
_SM80_D96 = dataclasses.replace(_SM80_D128, bwd_kv=_T(32, 64, 8, 3))
_SM80_D160 = AttnConfig(fwd=_T(128, 32, 8, 1), bwd_kv=_T(32, 64, 8, 2), bwd_q=_T(64, 16, 8, 1), split_dkdv=True,
                        fwd_short=_T(64, 128, 8, 1))  # fmt: skip
_SM90 = {32: _SM90_D32, 40: _SM90_D64, 64: _SM90_D64, 80: _SM90_D80, 96: _SM90_D128, 128: _SM90_D128, 160: _SM90_D160}
# sm_100 (B200): Hopper's tiles (the same 228 KB of shared memory and register file per SM) until the
# tuning sweep measures on one; Triton lowers their matmuls to tcgen05.mma (the audit checks it).  Two
# changes for the audit's spill check (ptxas of triton 3.9 for sm_100a, which also packs fp32 math in
# pairs): the δ preprocess takes 64 rows and 8 warps (128 rows spilled 32 to 320 bytes with 4 warps, and
# 16 to 32 at head dims 40/64 with 8), and head dim 32's short backward 8 warps (4 spilled 8 bytes).
_SM100 = {D: dataclasses.replace(cfg, pre_block_m=64, pre_warps=8) for D, cfg in _SM90.items()}
_SM100[32] = dataclasses.replace(_SM100[32], bwd_short=_T(32, 128, 8, 2))
CONFIGS_16BIT: dict[int, dict[int, AttnConfig]] = {
    100: _SM100,
    90: _SM90,
    80: {32: _SM90_D32, 40: _SM80_D64, 64: _SM80_D64, 80: _SM80_D128, 96: _SM80_D96, 128: _SM80_D128, 160: _SM80_D160},
}

# fp32 (tests): true-fp32 matmuls run on FMA units with operands in registers, so
# tiles are small; one table for every architecture.  Two stages: with one, ptxas moves
# the FMA dot's operands to local memory.  Short paths up to 32 keys and D = 64 (K, V and
# the dK, dV accumulators of every key stay in registers; the backward spills at D = 80 on
# sm_80, the forward at D = 128 on sm_90).  The audit's spill check shaped the rest: head
# dim 64's forward, 96's forward and dQ and 160's dQ take 8 warps (4 spilled 8 bytes).
_F32_D40 = AttnConfig(_T(32, 32, 4, 2), _T(16, 32, 4, 2), _T(32, 32, 4, 2), pre_block_m=64,
                      fwd_short=_T(16, 32, 4, 2), bwd_short=_T(16, 32, 4, 2))  # fmt: skip
_F32_D64 = dataclasses.replace(_F32_D40, fwd=_T(32, 32, 8, 2))
_F32_D128 = AttnConfig(_T(32, 16, 4, 2), _T(16, 32, 4, 2), _T(32, 16, 4, 2), pre_block_m=32)
_F32_D96 = dataclasses.replace(_F32_D128, fwd=_T(32, 16, 8, 2), bwd_q=_T(32, 16, 8, 2))
_F32_D160 = AttnConfig(_T(16, 16, 4, 2), _T(16, 16, 4, 2), _T(16, 16, 8, 2), pre_block_m=16)
CONFIGS_FP32: dict[int, AttnConfig] = {32: _F32_D40, 40: _F32_D40, 64: _F32_D64, 80: _F32_D128, 96: _F32_D96,
                                       128: _F32_D128, 160: _F32_D160}  # fmt: skip

MIN_DOT = 16  # tl.dot's smallest K and N


def column_blocks(head_dim: int) -> tuple[int, int]:
    """(D₀, D₁): the head dim as a power of two and a second block of at least `MIN_DOT` columns (0: none)."""
    d0 = 1 << (head_dim.bit_length() - 1)
    rest = head_dim - d0
    return d0, 0 if rest == 0 else max(MIN_DOT, 1 << (rest - 1).bit_length())


def _block_d(head_dim: int) -> int:
    """The head dim rounded up to a power of two (not triton.next_power_of_2: ~5 µs a call on the host)."""
    return 1 << (head_dim - 1).bit_length()


def configs_with(tuned: dict) -> dict[int, dict[int, AttnConfig]]:
    """`CONFIGS_16BIT` with the sweep's measured winners (``_tuned.TUNED["attention"]``) in place:
    ``{"sm90": {"128": {"fwd": {"tiles": [m, n, warps, stages], "tma": bool, ...}}}}``."""
    out = {arch: dict(per_dim) for arch, per_dim in CONFIGS_16BIT.items()}
    for arch_name, per_dim in tuned.items():
        arch = int(arch_name.removeprefix("sm"))
        for dim, roles in per_dim.items():
            # a TMA winner falls back to the same tiles without TMA where Triton has no tensor descriptors
            changes = {role: Tiles(*entry["tiles"], tma=entry.get("tma", False) and HAS_TENSOR_DESCRIPTORS)
                       for role, entry in roles.items()}  # fmt: skip
            out[arch][int(dim)] = dataclasses.replace(out[arch][int(dim)], **changes)
    return out


def _device_index(x: torch.Tensor) -> int | None:
    return x.device.index if x.is_cuda else None


# ----------------------------------------------------------------------------- launch tables and plans

SHORT_PROGRAMS_PER_SM = 2  # short paths: programs per SM (each holds K and V on chip)


def short_programs(BH: int, q_blocks: int, num_sms: int) -> int:
    """Programs per (batch, head) of a short path: enough for `SHORT_PROGRAMS_PER_SM` on every
    SM, at most one per query block (a program steps through the rest)."""
    return max(1, min(q_blocks, cdiv(SHORT_PROGRAMS_PER_SM * num_sms, BH)))


class Launch(NamedTuple):
    role: str  # the config field it comes from (`ROLES`), or "pre" / "reduce"
    case: KernelCase
    grid: tuple[int, ...]


class BackwardPlan(NamedTuple):
    launches: tuple[Launch, ...]
    short: bool  # the short path: one kernel for dq and dK, dV partials, then their reduction
    scratch_floats: int  # fp32 scratch: the short path's partials (2, P, B·H, Lk, D), else δ (B·H·Lq)


def _tiles_tag(t: Tiles) -> str:
    return f"{t.block_m}x{t.block_n}w{t.num_warps}s{t.num_stages}"


def _dims_tag(head_dim: int) -> str:
    d0, d1 = column_blocks(head_dim)
    return f"d{d0}+{d1}" if d1 else f"d{d0}"


class Tables:
    """The launch tables built from one set of configs, and the launches each call shape gets.

    Plans are cached per shape: after the first call a launch costs a dict lookup.  The module's
    tables come from `CONFIGS_16BIT` with the tuned winners (`TABLES`); the tuning sweep builds
    others with one role replaced (`with_tiles`).
    """

    def __init__(self, configs16: dict[int, dict[int, AttnConfig]], configs32: dict[int, AttnConfig]):
        self.configs16, self.configs32 = configs16, configs32
        (self.fwd, self.fwd_short, self.fwd_tma, self.pre, self.dkdv, self.dq, self.bwd_short,
         self.reduce) = self.tables = _launch_tables(configs16, configs32)  # fmt: skip
        self.forward_plan = functools.lru_cache(maxsize=4096)(self._forward_plan)
        self.backward_plan = functools.lru_cache(maxsize=4096)(self._backward_plan)

    def with_tiles(self, arch: int, head_dim: int, role: str, tiles: Tiles) -> Tables:
        """These tables with one 16-bit role replaced (a tuning candidate)."""
        configs = {a: dict(per_dim) for a, per_dim in self.configs16.items()}
        configs[arch][head_dim] = dataclasses.replace(configs[arch][head_dim], **{role: tiles})
        return Tables(configs, self.configs32)

    def _forward_plan(self, key: tuple[int, int, int], BH: int, Lq: int, Lk: int, num_sms: int) -> Launch:
        short = _short_case(self.fwd_short, key, Lk)
        if short is not None:
            return Launch("fwd_short", short, (BH, short_programs(BH, cdiv(Lq, short.constexprs["BLOCK_M"]), num_sms)))
        return _query_blocks(self.fwd, key, "fwd", BH, Lq, num_sms)

    def _backward_plan(self, key: tuple[int, int, int], BH: int, Lq: int, Lk: int, num_sms: int) -> BackwardPlan:
        short = _short_case(self.bwd_short, key, Lk)
        if short is not None:
            parts = short_programs(BH, cdiv(Lq, short.constexprs["BLOCK_M"]), num_sms)
            red = self.reduce.pick(key[1:2])
            launches = (Launch("bwd_short", short, (BH, parts)),
                        Launch("reduce", red, (BH, 2, cdiv(Lk * key[2], red.constexprs["BLOCK"]))))  # fmt: skip
            return BackwardPlan(launches, True, 2 * parts * BH * Lk * key[2])
        pre = self.pre.pick(key)
        launches = [Launch("pre", pre, (BH, cdiv(Lq, pre.constexprs["BLOCK_M"])))]
        # one launch computing dK and dV, or (head dim 160) one launch for each
        passes = [(1, 1)] if self.dkdv.pick(key + (1, 1)) is not None else [(1, 0), (0, 1)]
        for flags in passes:
            kv = self.dkdv.pick(key + flags)
            launches.append(Launch("bwd_kv", kv, (BH, cdiv(Lk, kv.constexprs["BLOCK_N"]))))
        launches.append(_query_blocks(self.dq, key, "bwd_q", BH, Lq, num_sms))
        return BackwardPlan(tuple(launches), False, BH * Lq)


def _short_case(table: LaunchTable, key: tuple[int, int, int], Lk: int) -> KernelCase | None:
    """A short path's case: where ``table`` has one for ``key`` and every key fits in its block."""
    case = table.pick(key)
    return case if case is not None and Lk <= case.constexprs["BLOCK_N"] else None


def _query_blocks(table: LaunchTable, key: tuple[int, int, int], role: str, BH: int, Lq: int, num_sms: int) -> Launch:
    """A kernel with one program per query block (forward, dQ): the default tiles, or the small-grid ones
    (role ``<role>_small``) where the table has them and B·H·⌈Lq / BLOCK_M⌉ < #SMs."""
    case, small = table.pick(key + (0,)), table.pick(key + (1,))
    if small is not None and BH * cdiv(Lq, case.constexprs["BLOCK_M"]) < num_sms:
        case, role = small, role + "_small"
    return Launch(role, case, (BH, cdiv(Lq, case.constexprs["BLOCK_M"])))


def _pre_archs(archs: tuple[int, ...], configs16, D: int, cfg: AttnConfig) -> tuple[int, ...]:
    """The archs of the δ preprocess's case for ``cfg``: every arch whose config for a head dim of the
    same BLOCK_D has the same preprocess, so that one case serves them (its 16-bit configs differ by
    arch, its fp32 one does not)."""
    if len(archs) > 1:  # fp32: one config for every arch
        return archs
    same = (cfg.pre_block_m, cfg.pre_warps)
    return tuple(a for a in ARCHS if any((c.pre_block_m, c.pre_warps) == same for d, c in configs16[a].items()
                                         if _block_d(d) == _block_d(D)))  # fmt: skip


def _launch_tables(configs16, configs32) -> tuple[LaunchTable, ...]:
    """The kernels' tables, keyed by (arch, dtype, head dim) (+ the small-grid flag, or which of
    dK/dV a pass computes), built from config tables; a case shared by several keys compiles once."""
    scalars = dict.fromkeys(_SIZES, "i32")

    def strides(**tensors):  # tensor name -> name of its token axis
        return dict.fromkeys(_stride_args(**tensors), "i32")

    shared: dict[tuple, KernelCase] = {}

    def case(label, fn, sig, cx, tiles, mma, archs, jit_only=""):
        sig = sig | {c: "constexpr" for c in cx}
        key = (fn, tuple(sorted(cx.items())), tuple(sig.values()), tiles.num_warps, tiles.num_stages, archs)
        if key not in shared:
            shared[key] = KernelCase(label, fn, sig, cx, tiles.num_warps, tiles.num_stages, mma, archs,
                                     jit_only=jit_only)  # fmt: skip
        return shared[key]

    fwd, fwd_short, fwd_tma, pre, dkdv, dq, bwd_short, reduce = {}, {}, {}, {}, {}, {}, {}, {}
    for arch in ARCHS:
        for dt, code in DTYPE_CODES.items():
            for D in HEAD_DIMS:
                if dt == "fp32":  # one fp32 table for every architecture
                    cfg, archs, table = configs32[D], ARCHS, "any"
                else:
                    cfg, archs, table = configs16[arch][D], (arch,), f"sm{arch}"
                mma = dt != "fp32"  # 16-bit tiles must reach the tensor cores (HGMMA on sm_90)
                d0, d1 = column_blocks(D)
                prec = "ieee" if dt == "fp32" else "tf32"  # true fp32 FMA for fp32; 16-bit inputs ignore it
                tag = f"{table},{dt},{_dims_tag(D)}"
                ins = {n: f"*{dt}" for n in ("Q", "K", "V")}
                key = (arch, code, D)

                def tiled(t, **more):
                    return {"BLOCK_D0": d0, "BLOCK_D1": d1, "BLOCK_M": t.block_m, "BLOCK_N": t.block_n,
                            "DOT_PRECISION": prec} | more  # fmt: skip

                sig = ins | {"O": f"*{dt}", "LSE": "*fp32"} | strides(q="m", k="n", v="n", o="m")
                sig |= scalars | {"qk_scale": "fp32"}
                for small, t in ((0, cfg.fwd), (1, cfg.fwd_small)):
                    if t is not None:
                        fwd[key + (small,)] = case(f"attention_fwd{'_tma' if t.tma else ''}[{tag},{_tiles_tag(t)}]",
                                                   _attn_fwd_kernel, sig, tiled(t, TMA=t.tma), t, mma, archs,
                                                   TMA_JIT_ONLY if t.tma else "")  # fmt: skip
                if cfg.fwd_short is not None:
                    t = cfg.fwd_short
                    label = f"attention_fwd_short[{tag},{_tiles_tag(t)}]"
                    fwd_short[key] = case(label, _attn_fwd_short_kernel, sig, tiled(t), t, mma, archs)
                if HAS_TENSOR_DESCRIPTORS and arch == 90 and dt != "fp32" and d1 == 0 and D >= 64:
                    t = dataclasses.replace(cfg.fwd, tma=True)  # the Hopper candidate: today's tiles via TMA
                    label = f"attention_fwd_tma[{tag},{_tiles_tag(t)}]"
                    fwd_tma[key] = case(label, _attn_fwd_kernel, sig, tiled(t, TMA=True), t, mma, archs, TMA_JIT_ONLY)

                grads = ins | {"DO": f"*{dt}", "LSE": "*fp32", "DELTA": "*fp32"}
                t = cfg.bwd_kv
                sig = grads | {"DK": f"*{dt}", "DV": f"*{dt}"} | strides(q="m", k="n", v="n", do="m", dk="n", dv="n")
                sig |= scalars | {"sm_scale": "fp32", "qk_scale": "fp32"}
                for dk, dv in ((1, 0), (0, 1)) if cfg.split_dkdv else ((1, 1),):
                    cx = tiled(t) | {"COMPUTE_DK": bool(dk), "COMPUTE_DV": bool(dv)}
                    which = "dkdv" if dk and dv else ("dk" if dk else "dv")
                    label = f"attention_bwd_{which}[{tag},{_tiles_tag(t)}]"
                    dkdv[key + (dk, dv)] = case(label, _attn_bwd_dkdv_kernel, sig, cx, t, mma, archs)

                sig = grads | {"DQ": f"*{dt}"} | strides(q="m", k="n", v="n", do="m", dq="m") | scalars
                sig |= {"sm_scale": "fp32", "qk_scale": "fp32"}
                for small, t in ((0, cfg.bwd_q), (1, cfg.bwd_q_small)):
                    if t is not None:
                        label = f"attention_bwd_dq[{tag},{_tiles_tag(t)}]"
                        dq[key + (small,)] = case(label, _attn_bwd_dq_kernel, sig, tiled(t), t, mma, archs)

                if cfg.bwd_short is not None:
                    t = cfg.bwd_short
                    sig = ins | {"O": f"*{dt}", "DO": f"*{dt}", "LSE": "*fp32", "DQ": f"*{dt}", "PARTIAL": "*fp32"}
                    sig |= strides(q="m", k="n", v="n", o="m", do="m", dq="m") | scalars
                    sig |= {"sm_scale": "fp32", "qk_scale": "fp32"}
                    label = f"attention_bwd_short[{tag},{_tiles_tag(t)}]"
                    bwd_short[key] = case(label, _attn_bwd_short_kernel, sig, tiled(t), t, mma, archs)

                sig = {"O": f"*{dt}", "DO": f"*{dt}", "DELTA": "*fp32"} | strides(o="m", do="m")
                sig |= {"H": "i32", "Lq": "i32", "head_dim": "i32"}
                cx = {"BLOCK_D": _block_d(D), "BLOCK_M": cfg.pre_block_m}
                t = dataclasses.replace(PRE_TILES, num_warps=cfg.pre_warps)
                pre_archs = _pre_archs(archs, configs16, D, cfg)
                only = f"sm{arch}," if len(pre_archs) == 1 else ""  # one arch's: named after its table
                warps = "" if t == PRE_TILES else f"w{t.num_warps}"
                label = f"attention_bwd_pre[{only}{dt},bd{_block_d(D)},m{cfg.pre_block_m}{warps}]"
                pre[key] = case(label, _attn_bwd_preprocess_kernel, sig, cx, t, False, pre_archs)

            sig = {"PARTIAL": "*fp32", "DK": f"*{dt}", "DV": f"*{dt}"} | strides(dk="n", dv="n")
            sig |= {"H": "i32", "Lk": "i32", "head_dim": "i32", "parts": "i32", "sm_scale": "fp32"}
            label = f"attention_bwd_reduce[any,{dt},b{REDUCE_TILES.block_n}]"
            reduce[(code,)] = case(label, _attn_bwd_short_reduce_kernel, sig, {"BLOCK": REDUCE_TILES.block_n},
                                   REDUCE_TILES, False, ARCHS)  # fmt: skip
    fields = ("arch", "dtype", "head_dim")
    return (
        LaunchTable("attention_fwd", fields + ("small_grid",), fwd),
        LaunchTable("attention_fwd_short", fields, fwd_short),
        LaunchTable("attention_fwd_tma", fields, fwd_tma),
        LaunchTable("attention_bwd_pre", fields, pre),
        LaunchTable("attention_bwd_dkdv", fields + ("compute_dk", "compute_dv"), dkdv),
        LaunchTable("attention_bwd_dq", fields + ("small_grid",), dq),
        LaunchTable("attention_bwd_short", fields, bwd_short),
        LaunchTable("attention_bwd_reduce", ("dtype",), reduce),
    )


TMA_JIT_ONLY = ("tensor descriptors need a global scratch allocation per launch, which the library does not "
                "make; Triton's JIT launches it")  # fmt: skip

if HAS_TRITON:
    TABLES = Tables(configs_with(_tuned.TUNED.get("attention", {})), CONFIGS_FP32)
    LAUNCH_TABLES = TABLES.tables
else:
    TABLES, LAUNCH_TABLES = None, ()


# ----------------------------------------------------------------------------- launchers


def _aligned_strides(shape, strides, itemsize: int) -> bool:
    """A unit-stride head dim and 16-byte multiples for the other strides (of dims longer than 1)."""
    step = 16 // itemsize
    B, H, L, _ = shape
    return (
        strides[3] == 1
        and (B == 1 or strides[0] % step == 0)
        and (H == 1 or strides[1] % step == 0)
        and (L == 1 or strides[2] % step == 0)
    )


def _aligned(x: torch.Tensor) -> bool:
    """Unit-stride head dim and 16-byte aligned rows: what the kernels' hints promise."""
    return x.data_ptr() % 16 == 0 and _aligned_strides(x.shape, x.stride(), x.element_size())


def _kernel_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when the kernels can read it in place (fused-qkv views included), else a dense copy."""
    return x if _aligned(x) else torch.empty_like(x, memory_format=torch.contiguous_format).copy_(x)


def _tma_layout(x: torch.Tensor) -> torch.Tensor:
    """A tensor descriptor also needs a 16-byte token stride where there is one token: else a dense copy."""
    return x if x.stride(2) % (16 // x.element_size()) == 0 else x.contiguous()


_tma_allocator_set = False


def _tma_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Global memory for the tensor descriptors a kernel builds (Triton's allocator hook)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _set_tma_allocator() -> None:
    global _tma_allocator_set
    if not _tma_allocator_set and not INTERPRET:
        triton.set_allocator(_tma_scratch)
        _tma_allocator_set = True


def _bhl_strides(*xs: torch.Tensor) -> list[int]:
    """The (batch, head, token) strides of each tensor in turn: the kernels' stride arguments."""
    return [s for x in xs for s in x.stride()[:3]]


def _empty_out(q: torch.Tensor) -> torch.Tensor:
    """(B, H, Lq, D) output stored in (B, Lq, H, D) order (SDPA's flash layout)."""
    B, H, Lq, D = q.shape
    return torch.empty((B, Lq, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)


def _empty_lse(q: torch.Tensor) -> torch.Tensor:
    """(B, H, Lq) fp32: the log-sum-exp₂ of each query row."""
    return q.new_empty(q.shape[:3], dtype=torch.float32)


class _Plan:
    """The launches of one call signature (see `launch_tables.Plans`): what the launchers pass besides data
    pointers, the scale and the strides of dO and O (read per call), in the library's argument order.

    ``copies``: some of q, k and v have strides the kernels do not read (`_aligned`); the plan of their
    dense copies launches.  The gradients are laid out as ``torch.empty_like`` of their inputs (as the
    fake says), which for inputs the kernels read is a layout they write (the inputs' own strides where
    they are dense, else contiguous).
    """

    __slots__ = ("copies", "scale", "rows", "empty", "code", "key", "bh", "device_index", "sizes", "out_shape",
                 "out_stride", "fwd_args", "qkv_strides", "grad_strides", "grad_args", "backward_floats")  # fmt: skip

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        itemsize = q.element_size()
        self.copies = not all(_aligned_strides(x.shape, x.stride(), itemsize) for x in (q, k, v))
        B, H, Lq, D = q.shape
        Lk = k.shape[2]
        self.scale = 1.0 / math.sqrt(D)  # `attention`'s default
        self.rows = B * H * Lq  # query rows: the log-sum-exp's floats
        self.empty = self.rows == 0
        # a dtype outside the tables only runs the reference (`attention` refuses it; the unchecked entry may not)
        self.code = dtype_code(q.dtype) if q.dtype in tensor_checks.FLOAT_DTYPES else -1
        self.device_index = _device_index(q)
        self.key = (device_arch(self.device_index), self.code, D)
        self.bh, self.sizes = B * H, (B, H, Lq, Lk, D)
        self.out_shape, self.out_stride = (B, H, Lq, D), (Lq * H * D, D, H * D, 1)  # (B, Lq, H, D) memory order
        self.qkv_strides = (*q.stride(), *k.stride(), *v.stride())
        self.fwd_args = (*self.sizes, *self.qkv_strides, *self.out_stride)
        self.grad_strides = tuple(torch.empty_like(x, device="meta").stride() for x in (q, k, v))
        self.grad_args = tuple(s for stride in self.grad_strides for s in stride)
        self.backward_floats = None  # the backward's fp32 scratch, looked up by its first library launch

    def scratch_floats(self) -> int:
        """The backward's fp32 scratch: the short path's dK/dV partials, else δ (`BackwardPlan`)."""
        if self.backward_floats is None:
            _, _, Lq, Lk, _ = self.sizes
            plan = TABLES.backward_plan(self.key, self.bh, Lq, Lk, device_sms(self.device_index))
            self.backward_floats = plan.scratch_floats
        return self.backward_floats


_plans, _checked_plans = Plans(), Plans()


def _plan(q, k, v) -> _Plan:
    """The plan of a call (computed on the first call of its signature), without checking it."""
    key = (q.shape, q.stride(), q.dtype, q.get_device(), k.shape, k.stride(), v.shape, v.stride())
    return _plans.get(key) or _plans.remember(key, _Plan(q, k, v))


def _checked_plan(q, k, v, scale) -> _Plan:
    """The plan of a call whose arguments `attention` accepts; raises as `_validate` otherwise.

    A signature is checked once: what the checks read of the tensors (types, shapes, strides, dtypes,
    devices) is part of it.  ``scale`` is checked on every call, by its caller.
    """
    try:
        key = (
            q.shape, q.stride(), q.dtype, q.device, type(k), k.shape, k.stride(), k.dtype, k.device, type(v),
            v.shape, v.stride(), v.dtype, v.device,
        )  # fmt: skip
    except AttributeError:  # k or v is not a tensor
        key = None
    return _checked_plans.get(key) or _checked_plans.remember(key, _validated_plan(q, k, v, scale))


def _validated_plan(q, k, v, scale) -> _Plan:
    """The plan of a signature not seen yet, once `_validate` accepts the call's arguments."""
    _validate(q, k, v, scale)
    return _Plan(q, k, v)


def _in_kernel_layout(q, k, v) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, _Plan]:
    """q, k and v as the kernels read them (dense copies of those they cannot read in place), and their plan."""
    q, k, v = _kernel_layout(q), _kernel_layout(k), _kernel_layout(v)
    return q, k, v, _plan(q, k, v)


def _forward_triton(
    q, k, v, scale: float, plan: _Plan, keep: bool = True, tables: Tables | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(o, lse₂) for q, k and v with strides the kernels read (``plan``'s; a view off a 16-byte boundary is
    copied here).  lse₂ is None unless ``keep`` (no backward follows: the library writes it to scratch).
    ``tables``: launch through these (a tuning candidate's) with Triton's JIT instead of the library."""
    if plan.empty:
        return _empty_out(q), _empty_lse(q) if keep else None
    q_ptr, k_ptr, v_ptr = q.data_ptr(), k.data_ptr(), v.data_ptr()
    if (q_ptr | k_ptr | v_ptr) % 16:  # a view off a 16-byte boundary (rare): dense copies, and their plan
        q, k, v, plan = _in_kernel_layout(q, k, v)
        return _forward_triton(q, k, v, scale, plan, keep, tables)
    o = q.new_empty_strided(plan.out_shape, plan.out_stride)
    lse = _empty_lse(q) if keep else None
    stream = _aot.target(q) if tables is None else None
    if stream is not None:
        lse_ptr, hold = (lse.data_ptr(), None) if keep else _aot.scratch(q, stream, plan.rows)
        if _aot.launch(
            "attention_fwd", plan.code, q_ptr, k_ptr, v_ptr, o.data_ptr(), lse_ptr, *plan.fwd_args, scale, stream
        ):
            return o, lse
    B, H, Lq, Lk, D = plan.sizes
    launch = (tables or TABLES).forward_plan(plan.key, plan.bh, Lq, Lk, device_sms(plan.device_index))
    if launch.case.jit_only:  # tensor descriptors
        _set_tma_allocator()
        q, k, v = _tma_layout(q), _tma_layout(k), _tma_layout(v)
    lse_out = lse if keep else _empty_lse(q)  # the JIT writes it to a tensor
    launch.case.launch(launch.grid, q, k, v, o, lse_out, *_bhl_strides(q, k, v, o), H, Lq, Lk, D, scale * LOG2E)
    return o, lse


def _backward_triton(
    do, q, k, v, o, lse, scale: float, plan: _Plan, tables: Tables | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) laid out as ``plan`` says, for q, k and v as in `_forward_triton` and o with strides the
    kernels read (dO is copied if it has others).  ``tables``: as in `_forward_triton`."""
    if plan.empty:
        return torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    q_ptr, k_ptr, v_ptr = q.data_ptr(), k.data_ptr(), v.data_ptr()
    if (q_ptr | k_ptr | v_ptr) % 16:  # as in `_forward_triton`
        q, k, v, plan = _in_kernel_layout(q, k, v)
        return _backward_triton(do, q, k, v, o, lse, scale, plan, tables)
    do = _kernel_layout(do)
    gq, gk, gv = plan.grad_strides
    dq, dk, dv = q.new_empty_strided(q.shape, gq), k.new_empty_strided(k.shape, gk), v.new_empty_strided(v.shape, gv)
    stream = _aot.target(q) if tables is None else None
    if stream is not None:
        # one fp32 scratch: δ for the long path, the dK/dV partials for the short one
        work, hold = _aot.scratch(q, stream, plan.scratch_floats())
        if _aot.launch(
            "attention_bwd", plan.code, do.data_ptr(), q_ptr, k_ptr, v_ptr, o.data_ptr(), lse.data_ptr(),
            dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), work, *plan.sizes, *do.stride(), *plan.qkv_strides,
            *o.stride(), *plan.grad_args, scale, work, stream,
        ):  # fmt: skip
            return dq, dk, dv
    _, _, Lq, Lk, _ = plan.sizes
    launches = (tables or TABLES).backward_plan(plan.key, plan.bh, Lq, Lk, device_sms(plan.device_index))
    _backward_jit(launches, do, q, k, v, o, lse, dq, dk, dv, scale)
    return dq, dk, dv


def _backward_jit(plan: BackwardPlan, do, q, k, v, o, lse, dq, dk, dv, scale: float) -> None:
    """The backward's launches through Triton's JIT, with fresh scratch."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    scratch = torch.empty(plan.scratch_floats, dtype=torch.float32, device=q.device)
    scales = (scale, scale * LOG2E)  # τ and τ·log2(e)
    if plan.short:
        main, red = plan.launches
        main.case.launch(main.grid, q, k, v, o, do, lse, dq, scratch, *_bhl_strides(q, k, v, o, do, dq), H, Lq, Lk, D,
                         *scales)  # fmt: skip
        red.case.launch(red.grid, scratch, dk, dv, *_bhl_strides(dk, dv), H, Lk, D, main.grid[1], scale)
        return
    pre, *passes, qc = plan.launches
    pre.case.launch(pre.grid, o, do, scratch, *_bhl_strides(o, do), H, Lq, D)
    for kv in passes:
        kv.case.launch(kv.grid, q, k, v, do, lse, scratch, dk, dv, *_bhl_strides(q, k, v, do, dk, dv), H, Lq, Lk, D,
                       *scales)  # fmt: skip
    qc.case.launch(qc.grid, q, k, v, do, lse, scratch, dq, *_bhl_strides(q, k, v, do, dq), H, Lq, Lk, D, *scales)


# ----------------------------------------------------------------------------- torch.library ops


def _forward_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    plan: Optional[_Plan] = None,
    keep: bool = True,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(o, lse₂): o (B, H, Lq, D) in (B, Lq, H, D) memory order; lse₂ (B, H, Lq) fp32, None unless ``keep``.

    Eager calls pass their ``plan``, with q, k and v in the kernels' layout (`_eager`); ``keep`` is False
    where no backward follows (inference).
    """
    if use_triton(q):
        if plan is None:  # the registered op: any layout
            q, k, v, plan = _in_kernel_layout(q, k, v)
        return _forward_triton(q, k, v, scale, plan, keep)
    if q.shape[0] * q.shape[1] * q.shape[2] == 0:
        return _empty_out(q), _empty_lse(q)
    o_ref, lse = _forward_ref(q, k, v, scale)
    return _empty_out(q).copy_(o_ref), lse


def _forward_inference(q, k, v, scale, plan):
    """An eager call that no backward follows: the log-sum-exp is not kept."""
    return _forward_impl(q, k, v, scale, plan, False)


def _forward_fake(q, k, v, scale):
    return _empty_out(q), _empty_lse(q)


def _backward_impl(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    plan: Optional[_Plan] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), each laid out like ``torch.empty_like`` of its input.

    ``plan``: the forward's, which eager calls save with it (their q, k and v are in the kernels' layout).
    """
    if plan is not None and use_triton(q):
        return _backward_triton(do, q, k, v, o, lse, scale, plan)
    if q.shape[0] * q.shape[1] * q.shape[2] == 0:
        return torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if use_triton(q):  # the registered op: the saved tensors in any layout
        grads = [torch.empty_like(x) for x in (q, k, v)]
        q, k, v, plan = _in_kernel_layout(q, k, v)
        written = _backward_triton(do, q, k, v, _kernel_layout(o), lse, scale, plan)
        return tuple(w if w.stride() == g.stride() else g.copy_(w) for g, w in zip(grads, written))
    grads = _backward_ref(do, q, k, v, o, lse, scale)
    return tuple(torch.empty_like(x).copy_(g) for x, g in zip((q, k, v), grads))


def _backward_fake(do, q, k, v, o, lse, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, scale, *plan = inputs  # and an eager call's plan
    ctx.save_for_backward(q, k, v, *output)
    ctx.scale, ctx.plan = scale, plan
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zeros for the log-sum-exp's gradient


def _backward(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    if ctx.plan:  # an eager call: no dispatcher, and the forward's plan
        return (*_backward_impl(do, q, k, v, o, lse, ctx.scale, ctx.plan[0]), None, None)
    return (*_attention_bwd_call(do, q, k, v, o, lse, ctx.scale), None)


_attention_fwd_call = define_op(
    "fastdiff::attention_fwd", _forward_impl, _forward_fake, eager_only=("plan", "keep"),
    returns=tuple[torch.Tensor, torch.Tensor], empty=lambda q, *_: _empty_lse(q), setup_context=_setup_context,
    backward=_backward, inference=_forward_inference,
)  # fmt: skip
_attention_bwd_call = define_op("fastdiff::attention_bwd", _backward_impl, _backward_fake, eager_only=("plan",))


# ----------------------------------------------------------------------------- public API


def _validate(q, k, v, scale) -> float:
    for name, x in (("q", q), ("k", k), ("v", v)):
        tensor_checks.check_float(name, x)
        tensor_checks.check_ndim(name, x, 4, " (B, H, L, D)")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {x.dtype}")
        tensor_checks.check_device(name, x, q.device, "q")
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
    return 1.0 / math.sqrt(D) if scale is None else _checked_scale(scale)


def _checked_scale(scale) -> float:
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
    if not torch.compiler.is_compiling():
        o = _aot.eager.attention(q, k, v, scale, True)
        if o is not None:
            return o
    if _backend.traced(q):
        return _attention_fwd_call(q, k, v, _validate(q, k, v, scale))[0]
    plan = _checked_plan(q, k, v, scale)
    if scale is None:
        scale = plan.scale
    elif type(scale) is not float or not 0.0 < scale < math.inf:  # the checks' fast path: a float within range
        scale = _checked_scale(scale)
    return _eager(plan, q, k, v, scale)


def attention_unchecked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float) -> torch.Tensor:
    """`attention` without its argument checks, for a caller that made them once (a model's layer
    whose shapes are fixed at construction): ``scale`` is the float `attention` would resolve
    (1/sqrt(D) by default).  Arguments `attention` would refuse give undefined results."""
    if not torch.compiler.is_compiling():
        o = _aot.eager.attention(q, k, v, scale, False)
        if o is not None:
            return o
    if _backend.traced(q):
        return _attention_fwd_call(q, k, v, scale)[0]
    return _eager(_plan(q, k, v), q, k, v, scale)


def _eager_plan(q, k, v, scale, checked) -> tuple[int, ...] | None:
    """The plan of `_aot.eager.attention`'s signature (checked first when ``checked``): the library's numbers,
    then the backward's: the gradients' strides and its scratch floats (-1: a head dim without one)."""
    plan = _checked_plan(q, k, v, scale) if checked else _plan(q, k, v)
    if plan.copies or plan.empty or plan.code < 0:
        return None
    backward = plan.scratch_floats() if plan.sizes[4] in HEAD_DIMS else -1  # -1: no backward (Python's error)
    return (plan.code, *plan.fwd_args, *plan.grad_args, backward)


_aot.set_planner("attention", _eager_plan, _backward_impl)


def _eager(plan: _Plan, q, k, v, scale: float) -> torch.Tensor:
    """The call in plain eager mode: q, k and v go to the op with strides the kernels read (copied where
    they have others, before autograd records the op, so that its backward reads the copies)."""
    if plan.copies:
        q, k, v, plan = _in_kernel_layout(q, k, v)
    return _attention_fwd_call.eager(q, k, v, scale, plan)[0]


# ----------------------------------------------------------------------------- tuning (scripts/tune_kernels.py)

# Alternatives to each role's tiles that the sweep times (fp16/bf16: fp32 is for tests); the
# tiles in force always stay among them, first.  Every 16-bit tile keeps ≥ 64 rows in each
# dot's M (one wgmma warpgroup), and the short roles keep 128 keys (the short path's reach).
_CANDIDATES = {
    "fwd": [_T(128, 64, 8, 3), _T(128, 128, 8, 3), _T(128, 64, 4, 3), _T(128, 64, 8, 4), _T(128, 128, 8, 2),
            _T(64, 64, 4, 3)],
    "fwd_small": [_T(64, 64, 4, 3), _T(64, 128, 4, 3), _T(64, 64, 4, 4), _T(64, 32, 4, 3)],
    "fwd_short": [_T(128, 128, 8, 2), _T(64, 128, 4, 2), _T(128, 128, 8, 3), _T(64, 128, 8, 3)],
    "bwd_kv": [_T(32, 64, 4, 3), _T(32, 128, 8, 3), _T(64, 64, 4, 3), _T(64, 128, 8, 3), _T(32, 64, 4, 2)],
    "bwd_q": [_T(64, 64, 4, 3), _T(128, 64, 8, 3), _T(64, 32, 4, 3), _T(128, 128, 8, 3)],
    "bwd_q_small": [_T(64, 64, 4, 3), _T(64, 32, 4, 3), _T(64, 64, 4, 2)],
    "bwd_short": [_T(64, 128, 8, 2), _T(64, 128, 4, 2), _T(128, 128, 8, 2)],
}  # fmt: skip
QUICK_CANDIDATES = 2  # alternatives per role in a quick sweep


def tuning_candidates(arch: int, head_dim: int, role: str, quick: bool = False) -> list[Tiles]:
    """The tiles the sweep times for one role of one (arch, head dim): those in force first, then the
    alternatives (the forward's first alternative on sm_90 at D = 64/128: the same tiles through TMA)."""
    current = getattr(TABLES.configs16[arch][head_dim], role)
    if current is None:
        return []
    alternatives = [t for t in _CANDIDATES[role] if t != current]
    if role == "fwd" and arch == 90 and HAS_TENSOR_DESCRIPTORS and head_dim in (64, 128):
        alternatives.insert(0, dataclasses.replace(current, tma=not current.tma))
    return [current] + alternatives[: QUICK_CANDIDATES if quick else None]


def tuning_roles(arch: int, num_sms: int, B: int, H: int, Lq: int, Lk: int, head_dim: int) -> list[tuple[str, str]]:
    """(direction, role) of every tunable launch a bf16 call of this shape makes on ``arch``."""
    key = (arch, dtype_code(torch.bfloat16), head_dim)
    fwd = TABLES.forward_plan(key, B * H, Lq, Lk, num_sms)
    bwd = TABLES.backward_plan(key, B * H, Lq, Lk, num_sms)
    roles = [("fwd", fwd.role)] + [("bwd", launch.role) for launch in bwd.launches if launch.role in ROLES]
    return list(dict.fromkeys(roles))  # head dim 160's two dK/dV passes are one role


def tuned_entry(tiles: Tiles) -> dict:
    """How `_tuned.TUNED` stores a role's tiles (`configs_with` reads it back)."""
    return {"tiles": [tiles.block_m, tiles.block_n, tiles.num_warps, tiles.num_stages], "tma": tiles.tma}


def forward_with(tables: Tables, q, k, v, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse₂) through ``tables`` with Triton's JIT: a tuning candidate (no checks, no autograd)."""
    q, k, v, plan = _in_kernel_layout(q, k, v)
    return _forward_triton(q, k, v, scale, plan, tables=tables)


def backward_with(tables: Tables, do, q, k, v, o, lse, scale: float) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv) through ``tables`` with Triton's JIT: a tuning candidate."""
    q, k, v, plan = _in_kernel_layout(q, k, v)
    return _backward_triton(do, q, k, v, _kernel_layout(o), lse, scale, plan, tables)
