r"""One fused denoising step: guidance, prediction conversion, sampler update, noise, inpainting blend.

Every sampler in ``fastdiff.samplers`` (DDPM, DDIM, Euler, Euler-ancestral, DPM-Solver++(2M),
Heun) updates the state x_t → x_next by a *linear combination* whose scalar coefficients come
from the schedule.  This op does the per-element work of one such step in one pass over memory;
the sampler only chooses the coefficients.  Notation: the state is always variance-preserving,
x_t = α_t·x_0 + σ_t·ε with α_t = sqrt(ᾱ_t), σ_t = sqrt(1 − ᾱ_t) (Ho et al. 2020, Eq. 4).

1. Classifier-free guidance (Ho & Salimans 2022, Eq. 6), on the raw model output o:

       o = o_u + w·(o_c − o_u)

   with optional guidance rescale φ (Lin et al. 2023, Sec. 3.4 / Alg. 2), per sample:

       o ← φ·o·std(o_c)/std(o) + (1 − φ)·o            (std over a sample, Bessel-corrected)

2. Prediction conversion, linear in (x_t, o) — the sampler picks the coefficients for the
   model's parametrisation (ε: x̂0 = (x − σo)/α, ε̂ = o;  x0: x̂0 = o, ε̂ = (x − αo)/σ;
   v (Salimans & Ho 2022): x̂0 = αx − σo, ε̂ = σx + αo):

       x̂0 = p_x·x_t + p_o·o,        ε̂ = q_x·x_t + q_o·o

   then optionally x̂0 ← clamp(x̂0, −r, r) (Ho et al. 2020's clipping; ε̂ is *not* re-derived,
   as in Song et al.'s DDIM and diffusers).

3. The update, with z ~ N(0, I) drawn in-kernel:

       x_next = a·x_t + b·x̂0 + c·ε̂ + d·x̂0_prev + e·z

   x̂0_prev is the previous evaluation's x̂0 (multistep solvers and Heun's corrector), and the
   op can write this step's x̂0 for the next one.

4. Inpainting blend (the "replacement" method, Lugmayr et al. 2022 without resampling), with
   ``mask`` = 1 where the image is repainted and 0 where it is known (diffusers' convention):

       x_next ← m·x_next + (1 − m)·(α_next·known + σ_next·z')

   z' ~ N(0, I) is a second in-kernel draw, independent of z.  When α_next = 1 and
   σ_next = 0 (the last step) the known region of the result *is* ``known``, bit for bit.

Coefficients: one fp32 vector of ``len(COEFFICIENTS)`` per step — shape (K,), or (B, K) for a
different step per image — read by the kernel from device memory, so a sampling loop never
synchronises with the host and can be captured in a CUDA graph.

Noise: Philox keyed per image by ``step_keys(seeds, step)`` (see ``philox``); z uses
element offsets 0 … N−1 (N = elements per image, logical NCHW order), z' offsets N … 2N−1.
An image's noise therefore depends only on its seed and the step index, never on the batch
it was drawn in, and the reference path draws exactly the same numbers as the kernel.

Cost: one kernel reads x_t, o_c (and o_u, x̂0_prev, known, mask when used) and writes x_next
(and x̂0 when asked).  Guidance *rescale* needs each sample's std of o_c and o before any
element can be written — a reduction — so it adds a statistics kernel in front that reads
o_c and o_u once more (per-chunk mean and centred sum of squares of the values shifted by the
sample's first value, merged with Chan et al. 1979's formula in the main kernel: no atomics,
deterministic, accurate in fp32 when a sample's mean is large against its std).  With rescale a step therefore moves
the model outputs twice; without it, every tensor exactly once.

Precision: everything in fp32 inside; x_next and x̂0 are stored in x_t's dtype.
"""
from __future__ import annotations

import math
from dataclasses import astuple, dataclass, fields
from typing import NamedTuple, Optional

import torch

from fastdiff.ops import _aot, _backend, tensor_checks
from fastdiff.ops._backend import HAS_TRITON, cdiv, define_op, use_triton
from fastdiff.ops.launch_tables import DTYPE_CODES, KernelCase, LaunchTable, Plans, aligned_rows, divisible_key, dtype_code
from fastdiff.ops.launch_tables import dtype_name
from fastdiff.ops.philox import KEY_STRIDE, randn_like_philox, step_keys
from fastdiff.ops._layout import match_layout, sample_layout

# Names of the per-step coefficients, in the order the kernel reads them.
COEFFICIENTS = (
    "x0_from_x",  # p_x: x̂0 = p_x·x_t + p_o·o
    "x0_from_out",  # p_o
    "eps_from_x",  # q_x: ε̂ = q_x·x_t + q_o·o
    "eps_from_out",  # q_o
    "x",  # a: x_next = a·x_t + b·x̂0 + c·ε̂ + d·x̂0_prev + e·z
    "x0",  # b
    "eps",  # c
    "x0_prev",  # d
    "noise",  # e
    "known",  # α_next: the known image re-noised to the output's noise level ...
    "known_noise",  # σ_next: ... α_next·known + σ_next·z'
)
NUM_COEFFICIENTS = len(COEFFICIENTS)
INDEX = {name: i for i, name in enumerate(COEFFICIENTS)}  # a coefficient's position in a vector


def coefficient_index(name: str) -> int:
    """The position of coefficient ``name`` in a coefficient vector (see COEFFICIENTS)."""
    if name not in INDEX:
        raise ValueError(f"unknown coefficient name {name!r}; known names: {COEFFICIENTS}")
    return INDEX[name]

# Guidance-rescale statistics: each sample is cut into at most this many chunks.
MAX_CHUNKS = 64
# Offsets above 2^31 would wrap Philox's int32 counter arithmetic (z' uses N … 2N−1).
MAX_NUMEL_PER_SAMPLE = 2**30


def step_coefficients(**values: float) -> torch.Tensor:
    """A (K,) float64 coefficient vector from named values; names not given are 0.

    >>> step_coefficients(x0_from_x=1.0, x0_from_out=-0.5, x0=1.0)  # x_next = x̂0 = x − 0.5·o
    """
    unknown = set(values) - set(COEFFICIENTS)
    if unknown:
        raise ValueError(f"unknown coefficient name(s) {sorted(unknown)}; known names: {COEFFICIENTS}")
    vec = torch.zeros(NUM_COEFFICIENTS, dtype=torch.float64)
    for name, value in values.items():
        vec[INDEX[name]] = float(value)
    return vec


# ----------------------------------------------------------------------------- reference


def guided_output_ref(
    out_c: torch.Tensor, out_u: torch.Tensor | None, guidance_scale: float, guidance_rescale: float
) -> torch.Tensor:
    """o = o_u + w(o_c − o_u), rescaled by φ (Lin et al. 2023, Alg. 2); at least fp32."""
    ct = torch.promote_types(out_c.dtype, torch.float32)
    o_c = out_c.to(ct)
    if out_u is None:
        return o_c
    o_u = out_u.to(ct)
    o = o_u + guidance_scale * (o_c - o_u)
    if guidance_rescale > 0:
        dims = tuple(range(1, o.ndim))
        ratio = o_c.std(dim=dims, keepdim=True) / o.std(dim=dims, keepdim=True)
        o = guidance_rescale * (o * ratio) + (1 - guidance_rescale) * o
    return o


def step_noise_ref(seeds: torch.Tensor, step: int, shape: tuple[int, ...], count: int) -> list[torch.Tensor]:
    """The kernel's draws for one step: [z] (count=1) or [z, z'] (count=2), fp32, logical order."""
    B = shape[0]
    n = 1
    for s in shape[1:]:
        n *= s
    keys = step_keys(seeds, torch.tensor(step, dtype=torch.int64))
    flat = randn_like_philox(keys, (B, count * n), seeds.device)
    return [flat[:, i * n : (i + 1) * n].reshape(shape) for i in range(count)]


def sampler_step_ref(
    x: torch.Tensor, model_output: torch.Tensor, coeffs: torch.Tensor, uncond_output: torch.Tensor | None = None,
    guidance_scale: float = 1.0, guidance_rescale: float = 0.0, clip_x0: float | None = None,
    x0_prev: torch.Tensor | None = None, seeds: torch.Tensor | None = None, step: int = 0, add_noise: bool = False,
    known: torch.Tensor | None = None, mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Reference (x_next, x̂0), both in x's dtype; math in fp32 (fp64 for fp64 inputs)."""
    ct = torch.promote_types(x.dtype, torch.float32)
    k = coeffs.to(ct).reshape(-1, NUM_COEFFICIENTS)  # (1 or B, K)
    bcast = (k.shape[0],) + (1,) * (x.ndim - 1)

    def cf(name: str) -> torch.Tensor:
        return k[:, INDEX[name]].reshape(bcast)

    xf = x.to(ct)
    o = guided_output_ref(model_output, uncond_output, guidance_scale, guidance_rescale).to(ct)
    x0 = cf("x0_from_x") * xf + cf("x0_from_out") * o
    eps = cf("eps_from_x") * xf + cf("eps_from_out") * o
    if clip_x0 is not None:
        x0 = x0.clamp(-clip_x0, clip_x0)
    x_next = cf("x") * xf + cf("x0") * x0 + cf("eps") * eps
    if x0_prev is not None:
        x_next = x_next + cf("x0_prev") * x0_prev.to(ct)
    inpaint = known is not None
    if add_noise or inpaint:
        z, *z_known = step_noise_ref(seeds, step, tuple(x.shape), 2 if inpaint else 1)
        if add_noise:
            x_next = x_next + cf("noise") * z.to(ct)
        if inpaint:
            m = mask.to(ct)
            renoised = cf("known") * known.to(ct) + cf("known_noise") * z_known[0].to(ct)
            x_next = m * x_next + (1 - m) * renoised
    return x_next.to(x.dtype), x0.to(x.dtype)


# ----------------------------------------------------------------------------- kernels

if HAS_TRITON:
    import triton
    import triton.language as tl

    from fastdiff.ops.philox import nchw_offsets, philox_normal, sample_block

    # Where the kernel reads each coefficient in a vector: compile-time constants, by name.
    K_X0_FROM_X = tl.constexpr(INDEX["x0_from_x"])
    K_X0_FROM_OUT = tl.constexpr(INDEX["x0_from_out"])
    K_EPS_FROM_X = tl.constexpr(INDEX["eps_from_x"])
    K_EPS_FROM_OUT = tl.constexpr(INDEX["eps_from_out"])
    K_X = tl.constexpr(INDEX["x"])
    K_X0 = tl.constexpr(INDEX["x0"])
    K_EPS = tl.constexpr(INDEX["eps"])
    K_X0_PREV = tl.constexpr(INDEX["x0_prev"])
    K_NOISE = tl.constexpr(INDEX["noise"])
    K_KNOWN = tl.constexpr(INDEX["known"])
    K_KNOWN_NOISE = tl.constexpr(INDEX["known_noise"])

    # N may be specialised (cases for N a multiple of 16: vector loads) and chunk always is (a
    # multiple of STATS_BLOCK); other integers never are, as in the compiled library (see launch_tables).
    @triton.jit(do_not_specialize=["num_chunks"])
    def _guidance_stats_kernel(
        OUT_C,  # (B, N) conditional model output
        OUT_U,  # (B, N) unconditional model output
        STATS,  # (B, num_chunks, 4) fp32 out: [mean, M2] of o_c, then of the guided o, per chunk (shifted)
        N,  # elements per sample
        num_chunks,
        chunk,  # elements per chunk (a multiple of BLOCK); the last chunk may be shorter
        guidance_scale,
        BLOCK: tl.constexpr,
    ):
        p = tl.program_id(0)
        b = tl.program_id(1)
        row = b.to(tl.int64) * N
        start = p * chunk
        end = tl.minimum(start + chunk, N)
        # Statistics of (value − the sample's first value): shifted data keep the means small, and
        # running (count, mean, M2) merged tile by tile with Chan et al.'s formula never form a
        # raw sum of squares — both matter in fp32 when a sample's mean is large against its std.
        shift_c = tl.load(OUT_C + row).to(tl.float32)
        shift_u = tl.load(OUT_U + row).to(tl.float32)
        shift_g = shift_u + guidance_scale * (shift_c - shift_u)
        n = 0.0
        mean_c = 0.0
        m2_c = 0.0
        mean_g = 0.0
        m2_g = 0.0
        for off in tl.range(start, end, BLOCK):
            offs = off + tl.arange(0, BLOCK)
            inside = offs < end
            o_c = tl.load(OUT_C + row + offs, mask=inside, other=0.0).to(tl.float32)
            o_u = tl.load(OUT_U + row + offs, mask=inside, other=0.0).to(tl.float32)
            o_g = tl.where(inside, o_u + guidance_scale * (o_c - o_u) - shift_g, 0.0)
            o_c = tl.where(inside, o_c - shift_c, 0.0)
            n_t = tl.minimum(end - off, BLOCK).to(tl.float32)
            t_mean_c = tl.sum(o_c, axis=0) / n_t
            t_mean_g = tl.sum(o_g, axis=0) / n_t
            d_c = tl.where(inside, o_c - t_mean_c, 0.0)
            d_g = tl.where(inside, o_g - t_mean_g, 0.0)
            t_m2_c = tl.sum(d_c * d_c, axis=0)
            t_m2_g = tl.sum(d_g * d_g, axis=0)
            n_new = n + n_t
            delta_c = t_mean_c - mean_c
            delta_g = t_mean_g - mean_g
            mean_c += delta_c * n_t / n_new
            mean_g += delta_g * n_t / n_new
            m2_c += t_m2_c + delta_c * delta_c * n * n_t / n_new
            m2_g += t_m2_g + delta_g * delta_g * n * n_t / n_new
            n = n_new
        out = STATS + (b * num_chunks + p) * 4
        tl.store(out + 0, mean_c)
        tl.store(out + 1, m2_c)
        tl.store(out + 2, mean_g)
        tl.store(out + 3, m2_g)

    # `step` changes every call: never specialised on its value (no recompiles, no constexpr 1).
    @triton.jit(do_not_specialize=["C", "S", "stride_coef_b", "num_chunks", "chunk", "step"])
    def _sampler_step_kernel(
        X,  # (B, N) x_t
        OUT_C,  # (B, N) model output: conditional, or the only one
        OUT_U,  # (B, N) unconditional model output (GUIDANCE)
        STATS,  # (B, num_chunks, 4) fp32 chunk statistics (RESCALE)
        COEF,  # (B or 1, K) fp32 step coefficients, order of COEFFICIENTS
        X0_PREV,  # (B, N) previous x̂0 (MULTISTEP)
        SEEDS,  # (B,) int64 per-image seeds (NOISE or INPAINT)
        KNOWN,  # (B, N) known image (INPAINT)
        MASK,  # (B, N), or (B, S) when MASK_PER_PIXEL: 1 = repaint, 0 = known (INPAINT)
        X_NEXT,  # (B, N) out
        X0_OUT,  # (B, N) out: x̂0 after clipping (WRITE_X0)
        N,  # elements per sample
        C,  # channels (MASK_PER_PIXEL / CHANNELS_LAST)
        S,  # spatial elements per channel (MASK_PER_PIXEL / CHANNELS_LAST)
        stride_coef_b,  # 0 (one coefficient vector) or K (one per image)
        num_chunks,  # RESCALE
        chunk,  # RESCALE
        step,  # denoising step index: Philox key = seed + step·KEY_STRIDE
        guidance_scale,
        guidance_rescale,
        clip,
        GUIDANCE: tl.constexpr,
        RESCALE: tl.constexpr,
        CLIP: tl.constexpr,
        MULTISTEP: tl.constexpr,
        WRITE_X0: tl.constexpr,
        NOISE: tl.constexpr,
        INPAINT: tl.constexpr,
        MASK_PER_PIXEL: tl.constexpr,
        CHANNELS_LAST: tl.constexpr,
        KEY_MULT: tl.constexpr,
        MAX_CHUNKS_: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        b, offs, inside, row = sample_block(N, BLOCK)
        coef = COEF + b * stride_coef_b
        x = tl.load(X + row + offs, mask=inside).to(tl.float32)
        o = tl.load(OUT_C + row + offs, mask=inside).to(tl.float32)
        if GUIDANCE:
            o_u = tl.load(OUT_U + row + offs, mask=inside).to(tl.float32)
            o = o_u + guidance_scale * (o - o_u)
            if RESCALE:
                # Merge the chunk statistics of this sample (Chan et al. 1979): every program
                # redoes this tiny reduction instead of paying a third launch.
                ci = tl.arange(0, MAX_CHUNKS_)
                cin = ci < num_chunks
                n_p = tl.where(cin, tl.minimum(N - ci * chunk, chunk), 0).to(tl.float32)
                st = STATS + (b * num_chunks + ci) * 4
                mean_c_p = tl.load(st + 0, mask=cin, other=0.0)
                m2_c_p = tl.load(st + 1, mask=cin, other=0.0)
                mean_g_p = tl.load(st + 2, mask=cin, other=0.0)
                m2_g_p = tl.load(st + 3, mask=cin, other=0.0)
                n_all = tl.sum(n_p, axis=0)
                mean_c = tl.sum(n_p * mean_c_p, axis=0) / n_all
                mean_g = tl.sum(n_p * mean_g_p, axis=0) / n_all
                dc = mean_c_p - mean_c
                dg = mean_g_p - mean_g
                m2_c = tl.sum(m2_c_p + n_p * dc * dc, axis=0)
                m2_g = tl.sum(m2_g_p + n_p * dg * dg, axis=0)
                # std(o_c)/std(o): Bessel's N−1 cancels in the ratio
                ratio = tl.sqrt(m2_c / m2_g)
                o = o * (guidance_rescale * ratio + (1.0 - guidance_rescale))
        x0 = tl.load(coef + K_X0_FROM_X) * x + tl.load(coef + K_X0_FROM_OUT) * o
        eps = tl.load(coef + K_EPS_FROM_X) * x + tl.load(coef + K_EPS_FROM_OUT) * o
        if CLIP:
            x0 = tl.minimum(tl.maximum(x0, -clip), clip)
        x_next = tl.load(coef + K_X) * x + tl.load(coef + K_X0) * x0 + tl.load(coef + K_EPS) * eps
        if MULTISTEP:
            x_next += tl.load(coef + K_X0_PREV) * tl.load(X0_PREV + row + offs, mask=inside).to(tl.float32)
        if NOISE or INPAINT:
            key = tl.load(SEEDS + b) + step.to(tl.int64) * KEY_MULT  # int64 wrap-around, as step_keys
            logical = nchw_offsets(offs, C, S, CHANNELS_LAST)
        if NOISE:
            x_next += tl.load(coef + K_NOISE) * philox_normal(key, logical)
        if INPAINT:
            if MASK_PER_PIXEL:
                if CHANNELS_LAST:
                    m_offs = offs // C
                else:
                    m_offs = offs % S
                m = tl.load(MASK + b.to(tl.int64) * S + m_offs, mask=inside).to(tl.float32)
            else:
                m = tl.load(MASK + row + offs, mask=inside).to(tl.float32)
            known = tl.load(KNOWN + row + offs, mask=inside).to(tl.float32)
            renoised = tl.load(coef + K_KNOWN) * known + tl.load(coef + K_KNOWN_NOISE) * philox_normal(key, N + logical)
            x_next = m * x_next + (1.0 - m) * renoised
        tl.store(X_NEXT + row + offs, x_next.to(X_NEXT.dtype.element_ty), mask=inside)
        if WRITE_X0:
            tl.store(X0_OUT + row + offs, x0.to(X0_OUT.dtype.element_ty), mask=inside)


# Elementwise config: 512 elements per program, 4 warps, 4 elements per thread.  (8 per
# thread made ptxas of triton 3.6 spill around the Philox rounds on sm_90.)
BLOCK = 512
NUM_WARPS = 4
# Statistics kernel: one program walks a chunk in tiles of STATS_BLOCK.
STATS_BLOCK = 1024
STATS_WARPS = 4


def _chunking(N: int) -> tuple[int, int]:
    """(num_chunks ≤ MAX_CHUNKS, chunk) with chunk a multiple of STATS_BLOCK covering N."""
    per = -(-N // MAX_CHUNKS)
    chunk = -(-per // STATS_BLOCK) * STATS_BLOCK
    return -(-N // chunk), chunk


# ----------------------------------------------------------------------------- launch plans


class _Tensors(NamedTuple):
    """One step's tensors, in the registered op's order (`_sampler_step_impl`)."""

    x: torch.Tensor
    model_output: torch.Tensor
    coeffs: torch.Tensor
    uncond_output: Optional[torch.Tensor]
    x0_prev: Optional[torch.Tensor]
    seeds: Optional[torch.Tensor]
    known: Optional[torch.Tensor]
    mask: Optional[torch.Tensor]


class _Options(NamedTuple):
    """One step's numbers and switches, in the registered op's order (after its tensors)."""

    guidance_scale: float
    guidance_rescale: float
    clip_x0: Optional[float]
    step: int
    add_noise: bool
    return_x0: bool

    def flags(self) -> tuple[bool, bool, bool, bool]:
        """What a launch plan depends on: (rescale, clip, noise, write x̂0)."""
        return self.guidance_rescale > 0, self.clip_x0 is not None, self.add_noise, self.return_x0


def _options(guidance_scale, guidance_rescale, clip_x0, step, add_noise, return_x0) -> _Options:
    """The options as the op takes them: floats, an optional float, bools."""
    return _Options(
        float(guidance_scale), float(guidance_rescale), None if clip_x0 is None else float(clip_x0), step,
        bool(add_noise), bool(return_x0),
    )  # fmt: skip


def _step_prepared(t: _Tensors) -> _Tensors:
    """The tensors as the kernels read them: x contiguous unless it is channels-last, the (B, ...)
    tensors in x's layout (a per-pixel mask dense), the coefficients as dense fp32, dense seeds."""
    x = t.x if sample_layout(t.x) is not None else t.x.contiguous()
    known, mask = t.known, t.mask
    if known is not None:
        known = match_layout(known, x)
        mask = mask.contiguous() if mask.shape != x.shape else match_layout(mask, x)
    return _Tensors(
        x, match_layout(t.model_output, x), t.coeffs.to(torch.float32).contiguous(),
        None if t.uncond_output is None else match_layout(t.uncond_output, x),
        None if t.x0_prev is None else match_layout(t.x0_prev, x), None if t.seeds is None else t.seeds.contiguous(),
        known, mask,
    )  # fmt: skip


class _StepPlan:
    """The launches of one sampler-step call signature (see `launch_tables.Plans`)."""

    __slots__ = ("copies", "code", "out_code", "sizes", "per_sample_coeffs", "per_pixel", "channels_last",
                 "rescale", "chunks", "case_key")  # fmt: skip

    def __init__(self, t: _Tensors, flags: tuple[bool, bool, bool, bool]):
        rescale, clip, noise, write_x0 = flags
        prepared = _step_prepared(t)
        self.copies = any(a is not b for a, b in zip(prepared, t))
        x, out_c, coeffs = prepared.x, prepared.model_output, prepared.coeffs
        guided, inpaint = t.uncond_output is not None, t.known is not None
        B = x.shape[0]
        N = x.numel() // B
        C = x.shape[1] if x.ndim > 1 else 1
        self.code, self.out_code, self.sizes = dtype_code(x.dtype), dtype_code(out_c.dtype), (B, C, N // C)
        self.per_sample_coeffs = int(coeffs.ndim == 2)
        self.per_pixel = int(inpaint and t.mask.shape != x.shape)
        self.channels_last = int(sample_layout(x) == "channels_last")
        self.rescale = int(guided and rescale)
        self.chunks = _chunking(N)
        step_flags = StepFlags(
            guidance=guided, rescale=bool(self.rescale), clip=clip, multistep=t.x0_prev is not None,
            write_x0=write_x0, noise=noise, inpaint=inpaint, mask_per_pixel=bool(self.per_pixel),
            channels_last=bool(self.channels_last),
        )  # fmt: skip
        self.case_key = (self.code, self.out_code, step_flags.bits(), divisible_key(N))


_step_plans = Plans()


def _step_plan(t: _Tensors, flags: tuple[bool, bool, bool, bool]) -> _StepPlan:
    """The plan of a call (computed on the first call of its signature); ``flags``: `_Options.flags`."""
    x, known = t.x, t.known
    key = (
        x.shape, x.stride(), x.dtype, x.get_device(), t.model_output.dtype, t.model_output.stride(),
        None if t.uncond_output is None else t.uncond_output.stride(), t.coeffs.dtype, t.coeffs.shape,
        t.coeffs.stride(), None if t.x0_prev is None else t.x0_prev.stride(),
        None if t.seeds is None else t.seeds.stride(),
        None if known is None else (known.stride(), t.mask.shape, t.mask.stride()), flags,
    )  # fmt: skip
    plan = _step_plans.get(key)
    if plan is None:
        plan = _step_plans.remember(key, _StepPlan(t, flags))
    return plan


# ----------------------------------------------------------------------------- launcher


def _sampler_step_triton(t: _Tensors, o: _Options, plan: _StepPlan | None = None):
    """(x_next, x̂0 or None).  ``plan``: the call's, with the tensors it prepared; computed here (and the
    tensors prepared) when not given."""
    if plan is None:
        plan = _step_plan(t, o.flags())
        if plan.copies:
            t = _step_prepared(t)
    x, out_c, coeffs, out_u, x0_prev, seeds, known, mask = t
    x_next = torch.empty_like(x)
    x0_out = torch.empty_like(x) if o.return_x0 else None
    B, C, S = plan.sizes
    num_chunks, chunk = plan.chunks
    clip = 0.0 if o.clip_x0 is None else o.clip_x0
    stream = _aot.target(x)
    if stream is not None:
        stats, hold = _aot.scratch(x, stream, B * num_chunks * 4) if plan.rescale else (0, None)
        if _aot.launch(
            "sampler_step",
            plan.code, plan.out_code, x.data_ptr(), out_c.data_ptr(), 0 if out_u is None else out_u.data_ptr(),
            coeffs.data_ptr(), plan.per_sample_coeffs, 0 if x0_prev is None else x0_prev.data_ptr(),
            0 if seeds is None else seeds.data_ptr(), 0 if known is None else known.data_ptr(),
            0 if mask is None else mask.data_ptr(), plan.per_pixel, x_next.data_ptr(),
            0 if x0_out is None else x0_out.data_ptr(), stats, B, C, S, plan.channels_last, int(o.add_noise),
            o.step, o.guidance_scale, o.guidance_rescale, clip, stream,
        ):  # fmt: skip
            return x_next, x0_out
    N = C * S
    stats = torch.empty(B, num_chunks, 4, device=x.device, dtype=torch.float32) if plan.rescale else None
    if plan.rescale:
        STEP_STATS.pick((plan.out_code, plan.case_key[-1])).launch(
            (num_chunks, B), out_c, out_u, stats, N, num_chunks, chunk, o.guidance_scale
        )
    case = STEP.pick(plan.case_key)
    if case is None:  # a combination not shipped: JIT only
        flags, n16 = StepFlags.of(plan.case_key[2]), plan.case_key[3]
        case = _step_case(dtype_name(x.dtype), dtype_name(out_c.dtype), flags, n16)
    case.launch(
        (cdiv(N, BLOCK), B), x, out_c, out_u if out_u is not None else out_c, x_next if stats is None else stats,
        coeffs, x0_prev if x0_prev is not None else x, seeds if seeds is not None else coeffs,
        known if known is not None else x, mask if mask is not None else x, x_next,
        x_next if x0_out is None else x0_out, N, C, S, NUM_COEFFICIENTS * plan.per_sample_coeffs, num_chunks,
        chunk, int(o.step), o.guidance_scale, o.guidance_rescale, clip,
    )  # fmt: skip
    return x_next, x0_out


# ----------------------------------------------------------------------------- torch.library op


def _sampler_step_impl(
    x: torch.Tensor, model_output: torch.Tensor, coeffs: torch.Tensor, uncond_output: Optional[torch.Tensor],
    x0_prev: Optional[torch.Tensor], seeds: Optional[torch.Tensor], known: Optional[torch.Tensor],
    mask: Optional[torch.Tensor], guidance_scale: float, guidance_rescale: float, clip_x0: Optional[float], step: int,
    add_noise: bool, return_x0: bool, plan: Optional[_StepPlan] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:  # fmt: skip
    """(x_next, x̂0 or None): the eager path allocates nothing it does not return.  ``plan``: an eager
    call's, with the tensors it prepared."""
    if use_triton(x):
        x_next, x0 = _sampler_step_triton(
            _Tensors(x, model_output, coeffs, uncond_output, x0_prev, seeds, known, mask),
            _Options(guidance_scale, guidance_rescale, clip_x0, step, add_noise, return_x0), plan,
        )  # fmt: skip
    else:
        x_next, x0 = sampler_step_ref(
            x, model_output, coeffs, uncond_output, guidance_scale, guidance_rescale, clip_x0, x0_prev, seeds,
            step, add_noise, known, mask,
        )  # fmt: skip
    return x_next, (x0 if return_x0 else None)


def _sampler_step_fake(x, model_output, coeffs, uncond_output, x0_prev, seeds, known, mask, guidance_scale, guidance_rescale,
      clip_x0, step, add_noise, return_x0):  # fmt: skip
    return torch.empty_like(x), (torch.empty_like(x) if return_x0 else x.new_empty(0))


# no backward: the step is never differentiated
_sampler_step_call = define_op(
    "fastdiff::sampler_step", _sampler_step_impl, _sampler_step_fake, eager_only=("plan",),
    returns=tuple[torch.Tensor, torch.Tensor], empty=lambda x, *_: x.new_empty(0),
)  # fmt: skip


# ----------------------------------------------------------------------------- public API


def _like(t, x: torch.Tensor) -> bool:
    """Whether `_check_like` passes, from as few reads as it can."""
    return type(t) is torch.Tensor and t.dtype in tensor_checks.FLOAT_DTYPES and t.shape == x.shape and t.device == x.device


def _check_like(name: str, t, x: torch.Tensor) -> None:
    tensor_checks.check_float(name, t)
    tensor_checks.check_shape(name, t, tuple(x.shape), " (the shape of x)")
    tensor_checks.check_device(name, t, x.device, "x")


def check_step_arguments(
    x: torch.Tensor,
    *,
    guided: bool,
    guidance_scale: float,
    guidance_rescale: float,
    clip_x0: float | None,
    seeds: torch.Tensor | None,
    add_noise: bool,
    known: torch.Tensor | None,
    mask: torch.Tensor | None,
) -> None:
    """The checks of `sampler_step`'s arguments that a sampling loop keeps from step to step.

    A loop makes them once, before its first step, with ``x`` its initial state, ``guided``
    whether it passes an ``uncond_output`` and ``add_noise`` whether any step draws noise;
    then it checks each step's model output (`check_model_output`) and calls
    `sampler_step_unchecked`.  The coefficients, x̂0_prev and the step index are the loop's own.
    """
    tensor_checks.check_float("x", x)
    tensor_checks.check_min_ndim("x", x, 2, " (B, ...)")
    B = x.shape[0]
    N = x.numel() // B if B else 0
    if B == 0 or N == 0:
        raise ValueError(f"x must not be empty, got shape {tuple(x.shape)}")
    if N > MAX_NUMEL_PER_SAMPLE:
        raise ValueError(f"x must have at most {MAX_NUMEL_PER_SAMPLE} elements per sample, got {N}")
    if not isinstance(guidance_scale, (int, float)):
        raise TypeError(f"guidance_scale must be a float, got {type(guidance_scale).__name__}")
    if not math.isfinite(guidance_scale):  # NaN/inf would make every output element NaN
        raise ValueError(f"guidance_scale must be finite, got {guidance_scale!r}")
    if not isinstance(guidance_rescale, (int, float)) or not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale must be a float in [0, 1], got {guidance_rescale!r}")
    if guidance_rescale > 0:
        if not guided:
            raise ValueError("guidance_rescale > 0 needs uncond_output (it rescales the guided prediction)")
        if N < 2:
            raise ValueError(f"guidance_rescale needs at least 2 elements per sample (a std), got x {tuple(x.shape)}")
    if clip_x0 is not None and (not isinstance(clip_x0, (int, float)) or not clip_x0 > 0):
        raise ValueError(f"clip_x0 must be None or a float > 0, got {clip_x0!r}")
    if add_noise or known is not None:
        if seeds is None:
            raise ValueError("seeds (B,) int64 is required when add_noise=True or known is given")
        tensor_checks.check_tensor("seeds", seeds)
        if seeds.dtype != torch.int64:
            raise TypeError(f"seeds must be an int64 tensor, got {seeds.dtype}")
        tensor_checks.check_shape("seeds", seeds, (B,), " (one seed per image)")
        tensor_checks.check_device("seeds", seeds, x.device, "x")
    if (known is None) != (mask is None):
        raise ValueError("known and mask go together: give both (inpainting) or neither")
    if known is not None:
        _check_like("known", known, x)
        tensor_checks.check_float("mask", mask)
        tensor_checks.check_device("mask", mask, x.device, "x")
        per_pixel = (B, 1, *x.shape[2:])
        if tuple(mask.shape) not in (tuple(x.shape), per_pixel):
            raise ValueError(
                f"mask must have shape {tuple(x.shape)} (x's) or {per_pixel} (one value per pixel), "
                f"got {tuple(mask.shape)}"
            )


def check_model_output(x: torch.Tensor, model_output, uncond_output=None) -> None:
    """The checks of the model's output(s) against the state ``x``: a loop makes them at every
    step, because the model is the caller's code."""
    if _like(model_output, x) and (uncond_output is None or _like(uncond_output, x)
                                   and uncond_output.dtype == model_output.dtype):  # fmt: skip
        return  # the common case in a few reads; the checks below say what is wrong otherwise
    _check_like("model_output", model_output, x)
    if uncond_output is not None:
        _check_like("uncond_output", uncond_output, x)
        if uncond_output.dtype != model_output.dtype:
            raise TypeError(
                f"uncond_output must have model_output's dtype {model_output.dtype}, got {uncond_output.dtype}"
            )


def _validate(t: _Tensors, guidance_scale, guidance_rescale, clip_x0, step, add_noise) -> None:
    """`sampler_step`'s checks, on the numbers as the caller gave them."""
    x, model_output, coeffs, uncond_output, x0_prev, seeds, known, mask = t
    check_step_arguments(
        x, guided=uncond_output is not None, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
        clip_x0=clip_x0, seeds=seeds, add_noise=add_noise, known=known, mask=mask,
    )  # fmt: skip
    check_model_output(x, model_output, uncond_output)
    tensor_checks.check_float("coeffs", coeffs, (torch.float32, torch.float64))
    tensor_checks.check_device("coeffs", coeffs, x.device, "x")
    B = x.shape[0]
    if tuple(coeffs.shape) not in ((NUM_COEFFICIENTS,), (B, NUM_COEFFICIENTS)):
        raise ValueError(
            f"coeffs must have shape ({NUM_COEFFICIENTS},) or ({B}, {NUM_COEFFICIENTS}) (see COEFFICIENTS), "
            f"got {tuple(coeffs.shape)}"
        )
    if x0_prev is not None:
        _check_like("x0_prev", x0_prev, x)
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < 2**62:
        raise ValueError(f"step must be an int in [0, 2**62), got {step!r}")


def sampler_step(
    x: torch.Tensor,
    model_output: torch.Tensor,
    coeffs: torch.Tensor,
    *,
    uncond_output: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    guidance_rescale: float = 0.0,
    clip_x0: float | None = None,
    x0_prev: torch.Tensor | None = None,
    return_x0: bool = False,
    seeds: torch.Tensor | None = None,
    step: int = 0,
    add_noise: bool = False,
    known: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One fused denoising step; returns ``(x_next, x0_hat)`` (``x0_hat`` None unless ``return_x0``).

    x: (B, ...) state x_t, fp32/fp16/bf16, contiguous or channels_last; outputs keep its
    dtype and layout.  model_output: (B, ...) the (conditional) model output, any float dtype.
    coeffs: (K,) or (B, K) fp32 on x's device, named by ``COEFFICIENTS`` (build with
    `step_coefficients`).  uncond_output: the unconditional output — turns classifier-free
    guidance on (for diffusers' (2B, ...) batch, ``uncond, cond = out.chunk(2)``; the halves are
    views, nothing is copied).  guidance_rescale: φ in [0, 1].  clip_x0: clamp x̂0 to
    [−clip_x0, clip_x0].  x0_prev: the previous x̂0 (coefficient "x0_prev").  seeds (B,) int64
    and step: the Philox keys of the noise drawn when ``add_noise`` (coefficient "noise") or
    when inpainting.  known, mask: inpainting; mask (B, ...) or (B, 1, ...) with 1 = repaint.
    """
    out = _cpp_step(x, model_output, coeffs, uncond_output, x0_prev, seeds, known, mask, guidance_scale,
                    guidance_rescale, clip_x0, step, add_noise, return_x0, True)  # fmt: skip
    if out is not None:
        return out
    t = _Tensors(x, model_output, coeffs, uncond_output, x0_prev, seeds, known, mask)
    # the numbers are checked on every call, by type first (a signature cannot hold them)
    if (
        type(guidance_scale) is not float or not -math.inf < guidance_scale < math.inf
        or type(guidance_rescale) is not float or not 0.0 <= guidance_rescale <= 1.0
        or not (clip_x0 is None or type(clip_x0) is float and clip_x0 > 0) or type(step) is not int
        or not 0 <= step < 2**62 or (add_noise is not True and add_noise is not False)
    ):  # fmt: skip
        _validate(t, guidance_scale, guidance_rescale, clip_x0, step, add_noise)
    o = _options(guidance_scale, guidance_rescale, clip_x0, step, add_noise, return_x0)
    if _backend.traced(x):
        _validate(t, guidance_scale, guidance_rescale, clip_x0, step, add_noise)
        return _step(None, t, o)
    try:
        plan = _checked_step_plans.get(_checked_key(t, o))
    except AttributeError:  # an argument that is not a tensor
        plan = None
    if plan is None:
        _validate(t, guidance_scale, guidance_rescale, clip_x0, step, add_noise)
        plan = _checked_step_plans.remember(_checked_key(t, o), _StepPlan(t, o.flags()))
    return _step(plan, t, o)


_checked_step_plans = Plans()


def _checked_key(t: _Tensors, o: _Options) -> tuple:
    """The signature of a `sampler_step` call as its checks read it (types, shapes, dtypes, strides,
    devices of the tensors; which options are on): the tensors are checked once per signature."""
    x, out_c, coeffs, out_u, x0_prev, seeds, known, mask = t
    return (
        o.flags(), type(x), x.dtype, x.shape, x.stride(), x.device,
        type(out_c), out_c.dtype, out_c.shape, out_c.stride(), out_c.device,
        type(coeffs), coeffs.dtype, coeffs.shape, coeffs.stride(), coeffs.device,
        None if out_u is None else (type(out_u), out_u.dtype, out_u.shape, out_u.stride(), out_u.device),
        None if x0_prev is None else (type(x0_prev), x0_prev.dtype, x0_prev.shape, x0_prev.stride(), x0_prev.device),
        None if seeds is None else (type(seeds), seeds.dtype, seeds.shape, seeds.stride(), seeds.device),
        None if known is None else (type(known), known.dtype, known.shape, known.stride(), known.device),
        None if mask is None else (type(mask), mask.dtype, mask.shape, mask.stride(), mask.device),
    )  # fmt: skip


def coefficient_rows(coeffs: torch.Tensor, device) -> torch.Tensor:
    """A plan's (E, K) step coefficients as fp32 on ``device``, every row starting 16-byte aligned.

    The kernels read a row of coefficients through a pointer they assume aligned (the AOT
    library refuses others); rows of K = 11 floats packed back to back are not, so each row
    is padded to 12 in one allocation.  A loop passes ``rows[i]`` to `sampler_step` as is.
    """
    rows = aligned_rows(coeffs.shape[0], tuple(coeffs.shape[1:]), device, torch.float32)
    return rows.copy_(coeffs)


def sampler_step_unchecked(
    x: torch.Tensor, model_output: torch.Tensor, coeffs: torch.Tensor, *, uncond_output: torch.Tensor | None = None,
    guidance_scale: float = 1.0, guidance_rescale: float = 0.0, clip_x0: float | None = None,
    x0_prev: torch.Tensor | None = None, return_x0: bool = False, seeds: torch.Tensor | None = None, step: int = 0,
    add_noise: bool = False, known: torch.Tensor | None = None, mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """`sampler_step` without its argument checks, for a sampling loop that made them once
    (`check_step_arguments`) and checks each model output (`check_model_output`).  Arguments
    `sampler_step` would refuse give undefined results."""
    out = _cpp_step(x, model_output, coeffs, uncond_output, x0_prev, seeds, known, mask, guidance_scale,
                    guidance_rescale, clip_x0, step, add_noise, return_x0, False)  # fmt: skip
    if out is not None:
        return out
    t = _Tensors(x, model_output, coeffs, uncond_output, x0_prev, seeds, known, mask)
    o = _options(guidance_scale, guidance_rescale, clip_x0, step, add_noise, return_x0)
    return _step(None if _backend.traced(x) else _step_plan(t, o.flags()), t, o)


def _cpp_step(*args):
    """`_aot.eager.sampler_step` (the C++ entry) on these arguments: (x_next, x̂0 or None), or None where the
    Python path takes the call (always while torch.compile traces it)."""
    return None if torch.compiler.is_compiling() else _aot.eager.sampler_step(*args)


def _eager_plan(
    x, model_output, coeffs, uncond_output, x0_prev, seeds, known, mask, guidance_scale, guidance_rescale, clip_x0,
    step, add_noise, return_x0, checked,
) -> tuple[int, ...] | None:  # fmt: skip
    """The plan of `_aot.eager.sampler_step`'s signature (checked first when ``checked``): the library's
    numbers, then the chunks of the guidance statistics (their scratch)."""
    t = _Tensors(x, model_output, coeffs, uncond_output, x0_prev, seeds, known, mask)
    o = _options(guidance_scale, guidance_rescale, clip_x0, step, add_noise, return_x0)
    if checked:
        _validate(t, guidance_scale, guidance_rescale, clip_x0, step, add_noise)
    plan = _step_plan(t, o.flags())
    if plan.copies:
        return None
    return (plan.code, plan.out_code, plan.per_sample_coeffs, plan.per_pixel, *plan.sizes, plan.channels_last,
            plan.rescale, plan.chunks[0])  # fmt: skip


_aot.set_planner("sampler_step", _eager_plan)


def _step(plan: _StepPlan | None, t: _Tensors, o: _Options):
    """The op on ``t`` and ``o``, through the registered op when traced (``plan`` None)."""
    if plan is None:
        return _sampler_step_call(*t, *o)
    if plan.copies:
        t = _step_prepared(t)
    if use_triton(t.x):  # what the op's implementation would do, without unpacking t and o again
        return _sampler_step_triton(t, o, plan)
    return _sampler_step_call.eager(*t, *o, plan)


# ----------------------------------------------------------------------------- launch tables


@dataclass(frozen=True)
class StepFlags:
    """The step kernel's compile-time options, in the kernel's order."""

    guidance: bool = False
    rescale: bool = False
    clip: bool = False
    multistep: bool = False
    write_x0: bool = False
    noise: bool = False
    inpaint: bool = False
    mask_per_pixel: bool = False
    channels_last: bool = False

    def bits(self) -> int:
        """The flags as one integer key (bit i = the i-th field)."""
        return sum(int(v) << i for i, v in enumerate(astuple(self)))

    @classmethod
    def of(cls, bits: int) -> "StepFlags":
        """The flags of a key (the inverse of `bits`)."""
        return cls(*(bool(bits >> i & 1) for i in range(len(fields(cls)))))

    def tag(self) -> str:
        return ",".join(f.name for f in fields(self) if getattr(self, f.name)) or "plain"


_SHIPPED_STEPS = (  # the flag combinations the samplers use, plus every option at once
    StepFlags(),  # DDIM
    StepFlags(noise=True),  # DDPM, Euler ancestral
    StepFlags(write_x0=True),  # the first step of a multistep solver
    StepFlags(multistep=True, write_x0=True),  # DPM-Solver++(2M), Heun's corrector
    StepFlags(guidance=True),
    StepFlags(guidance=True, noise=True),
    StepFlags(guidance=True, write_x0=True),
    StepFlags(guidance=True, multistep=True, write_x0=True),
    StepFlags(*[True] * 9),
)


def _step_case(x_dt: str, out_dt: str, flags: StepFlags, n16: int) -> KernelCase:
    """The step kernel for a pair of dtype names ("fp32", ...) and options (N a multiple of 16 when ``n16``)."""
    sig = {
        "X": f"*{x_dt}", "OUT_C": f"*{out_dt}", "OUT_U": f"*{out_dt}", "STATS": "*fp32", "COEF": "*fp32",
        "X0_PREV": f"*{x_dt}", "SEEDS": "*i64", "KNOWN": f"*{x_dt}", "MASK": f"*{x_dt}", "X_NEXT": f"*{x_dt}",
        "X0_OUT": f"*{x_dt}", "N": "i32", "C": "i32", "S": "i32", "stride_coef_b": "i32", "num_chunks": "i32",
        "chunk": "i32", "step": "i32", "guidance_scale": "fp32", "guidance_rescale": "fp32", "clip": "fp32",
    }  # fmt: skip
    cx = {f.name.upper(): getattr(flags, f.name) for f in fields(flags)}
    cx.update(KEY_MULT=KEY_STRIDE, MAX_CHUNKS_=MAX_CHUNKS, BLOCK=BLOCK)
    sig.update({n: "constexpr" for n in cx})
    dts = x_dt if x_dt == out_dt else f"{x_dt} state,{out_dt} out"
    name = f"sampler_step[{dts},{flags.tag()}{',n16' if n16 else ''}]"
    return KernelCase(name, _sampler_step_kernel, sig, cx, NUM_WARPS, divisible=("N",) if n16 else ())


def _launch_tables() -> tuple[LaunchTable, LaunchTable]:
    """Every dtype with the shipped options, N a multiple of 16 or not; and fp32 state with bf16
    model output (DDIM and DPM-Solver++).  Other combinations compile on demand (JIT only)."""
    steps, stats = {}, {}
    for dt, code in DTYPE_CODES.items():
        for n16 in (0, 1):
            for flags in _SHIPPED_STEPS:
                steps[(code, code, flags.bits(), n16)] = _step_case(dt, dt, flags, n16)
            stats[(code, n16)] = KernelCase(
                f"sampler_step_stats[{dt}{',n16' if n16 else ''}]", _guidance_stats_kernel,
                {"OUT_C": f"*{dt}", "OUT_U": f"*{dt}", "STATS": "*fp32", "N": "i32", "num_chunks": "i32",
                 "chunk": "i32", "guidance_scale": "fp32", "BLOCK": "constexpr"},
                {"BLOCK": STATS_BLOCK}, STATS_WARPS, divisible=("N", "chunk") if n16 else ("chunk",),
            )  # fmt: skip
    for flags in (StepFlags(), StepFlags(multistep=True, write_x0=True)):
        key = (DTYPE_CODES["fp32"], DTYPE_CODES["bf16"], flags.bits(), 1)
        steps[key] = _step_case("fp32", "bf16", flags, 1)
    fields_ = ("x_dtype", "out_dtype", "flags", "n16")
    return LaunchTable("sampler_step", fields_, steps), LaunchTable("sampler_step_stats", ("dtype", "n16"), stats)


LAUNCH_TABLES = _launch_tables() if HAS_TRITON else ()
STEP, STEP_STATS = LAUNCH_TABLES or (None, None)
