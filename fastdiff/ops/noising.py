r"""Fused forward process (noising), training targets and the weighted diffusion loss.

Math (Ho et al. 2020, Eq. 4; Salimans & Ho 2022 for v; Hang et al. 2023 for min-SNR):

    x_t    = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε,        ε ~ N(0, I)
    target = ε                                   (ε-prediction)
           = sqrt(ᾱ_t)·ε − sqrt(1 − ᾱ_t)·x_0       (v-prediction)
           = x_0                                 (sample prediction)
    loss   = (1/B) Σ_b w_b · (1/N) Σ_i (pred_bi − target_bi)²
    ∂loss/∂pred_bi = 2·w_b·(pred_bi − target_bi) / (B·N)

    SNR_t = ᾱ_t / (1 − ᾱ_t);  min-SNR-γ weight w = min(SNR, γ)/SNR (ε), min(SNR, γ)/(SNR + 1) (v),
    min(SNR, γ) (x_0).  For ε we use the equal form γ / max(SNR, γ): finite at SNR = 0, the last
    step of a zero-terminal-SNR schedule, where min(SNR, γ)/SNR is 0/0.

One kernel reads x_0 (and ε unless it draws it), and writes x_t, ε (when drawn)
and v (when asked): one pass over memory.  Noise drawn in-kernel is Philox keyed
by one int64 per sample (drawn from the torch generator) and addressed by the
element's logical NCHW index, so it does not depend on batch or memory layout and
equals the reference path's noise (see ``philox``).

Precision: ᾱ in fp32, all arithmetic in fp32, outputs in x_0's dtype.  Drawn noise
is rounded to that dtype *before* x_t is formed, so the returned (x_t, ε) pair is
exactly consistent.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastdiff.ops import _aot, _backend, tensor_checks
from fastdiff.ops._backend import HAS_TRITON, cdiv, define_op, use_triton
from fastdiff.ops.launch_tables import DTYPE_CODES, KernelCase, LaunchTable, Plans, divisible_key, dtype_code
from fastdiff.ops._layout import match_layout, sample_layout
from fastdiff.ops.philox import randn_like_philox

PREDICTIONS = ("epsilon", "v", "sample")


# ----------------------------------------------------------------------------- reference


def _coefficients(t: torch.Tensor, alphas_cumprod: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sqrt(ᾱ_t), sqrt(1 − ᾱ_t) in fp32, shaped (B, 1, ...) to broadcast over a sample.

    A timestep outside the schedule gives NaN, as in the kernel (no out-of-bounds read on a GPU).
    """
    T = alphas_cumprod.shape[0]
    t = t.long()
    valid = (t >= 0) & (t < T)
    abar = alphas_cumprod.to(torch.float32)[t.clamp(0, T - 1)]
    abar = torch.where(valid, abar, torch.full_like(abar, float("nan"))).view(-1, *([1] * (ndim - 1)))
    return abar.sqrt(), (1 - abar).sqrt()


def draw_noise_ref(keys: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The noise the kernel draws for ``keys``, rounded to ``like``'s dtype."""
    return randn_like_philox(keys, tuple(like.shape), like.device).to(like.dtype)


def noising_ref(
    x0: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, noise: torch.Tensor, want_v: bool = False
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Reference x_t (and v target): fp32 math, outputs in x0's dtype.  Differentiable."""
    a, s = _coefficients(t, alphas_cumprod, x0.ndim)
    x0f, nf = x0.float(), noise.float()
    x_t = (a * x0f + s * nf).to(x0.dtype)
    v = (a * nf - s * x0f).to(x0.dtype) if want_v else None
    return x_t, v


def weighted_mse_ref(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """(1/B) Σ_b w_b · mean_i (pred − target)², in fp32 (w_b = 1 without ``weight``).  Differentiable."""
    per_sample = (pred.float() - target.float()).pow(2).reshape(len(pred), -1).mean(1)  # (B,) too
    return (per_sample if weight is None else weight.float() * per_sample).mean()


# ----------------------------------------------------------------------------- kernels

if HAS_TRITON:
    import triton
    import triton.language as tl

    from fastdiff.ops.philox import nchw_offsets, philox_normal, sample_block

    # N may be specialised (the launch table has cases for N a multiple of 16: vector loads);
    # the other integers never are, as in the compiled library (see launch_tables).
    @triton.jit(do_not_specialize=["C", "S", "NUM_T"])
    def _q_sample_kernel(
        X0,  # (B, N) x_0, one sample per row of memory
        T,  # (B,) int timesteps
        ACP,  # (num_timesteps,) fp32 ᾱ
        NOISE,  # (B, N) ε: read, or written when DRAW
        KEYS,  # (B,) int64 Philox keys (DRAW only)
        XT,  # (B, N) out: x_t
        V,  # (B, N) out: v target (V_TARGET only)
        N,  # elements per sample
        C,  # channels (CHANNELS_LAST only)
        S,  # spatial elements per channel (CHANNELS_LAST only)
        NUM_T,  # schedule length: a timestep outside [0, NUM_T) reads nothing and gives NaN
        DRAW: tl.constexpr,
        V_TARGET: tl.constexpr,
        CHANNELS_LAST: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        b, offs, mask, row = sample_block(N, BLOCK)
        tb = tl.load(T + b)
        abar = tl.load(ACP + tb, mask=(tb >= 0) & (tb < NUM_T), other=float("nan"))
        a = tl.sqrt(abar)
        s = tl.sqrt(1.0 - abar)
        x0 = tl.load(X0 + row + offs, mask=mask).to(tl.float32)
        if DRAW:
            eps = philox_normal(tl.load(KEYS + b), nchw_offsets(offs, C, S, CHANNELS_LAST))
            eps = eps.to(NOISE.dtype.element_ty)
            tl.store(NOISE + row + offs, eps, mask=mask)
            eps = eps.to(tl.float32)
        else:
            eps = tl.load(NOISE + row + offs, mask=mask).to(tl.float32)
        tl.store(XT + row + offs, (a * x0 + s * eps).to(XT.dtype.element_ty), mask=mask)
        if V_TARGET:
            tl.store(V + row + offs, (a * eps - s * x0).to(V.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["num_blocks"])
    def _sq_err_partial_kernel(
        PRED,  # (B, N)
        TARGET,  # (B, N)
        WEIGHT,  # (B,) fp32 (HAS_WEIGHT)
        PARTIAL,  # (B, num_blocks) fp32 out: w_b/(B·N) · Σ (pred − target)² over one block
        N,
        num_blocks,
        inv_count,  # 1 / (B·N)
        HAS_WEIGHT: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        b = tl.program_id(1)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        row = b.to(tl.int64) * N
        d = tl.load(PRED + row + offs, mask=mask).to(tl.float32) - tl.load(TARGET + row + offs, mask=mask).to(
            tl.float32
        )
        scale = inv_count
        if HAS_WEIGHT:
            scale = scale * tl.load(WEIGHT + b)
        tl.store(PARTIAL + b * num_blocks + pid, scale * tl.sum(d * d, axis=0))

    @triton.jit(do_not_specialize=["count"])
    def _sum_kernel(
        PARTIAL,  # (count,) fp32
        OUT,  # () fp32 out: Σ PARTIAL, always added in the same order (deterministic)
        count,
        BLOCK: tl.constexpr,
    ):
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, count, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            acc += tl.load(PARTIAL + offs, mask=offs < count, other=0.0)
        tl.store(OUT, tl.sum(acc, axis=0))

    @triton.jit
    def _sq_err_backward_kernel(
        GRAD,  # () fp32 upstream gradient of the loss
        PRED,  # (B, N)
        TARGET,  # (B, N)
        WEIGHT,  # (B,) fp32 (HAS_WEIGHT)
        DPRED,  # (B, N) out
        N,
        inv_count,  # 1 / (B·N)
        HAS_WEIGHT: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        b, offs, mask, row = sample_block(N, BLOCK)
        scale = 2.0 * tl.load(GRAD) * inv_count
        if HAS_WEIGHT:
            scale = scale * tl.load(WEIGHT + b)
        d = tl.load(PRED + row + offs, mask=mask).to(tl.float32) - tl.load(TARGET + row + offs, mask=mask).to(
            tl.float32
        )
        tl.store(DPRED + row + offs, (scale * d).to(DPRED.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launch tables

# Elementwise config: 16-byte loads per thread at fp32 x 4 warps; enough work per program.
BLOCK = 1024
NUM_WARPS = 4
SUM_BLOCK = 1024  # partials added per step by the loss's final sum


def _elementwise_tables() -> tuple[LaunchTable, ...]:
    """q_sample, the loss's partial sums and its backward, for every dtype and flag; each twice:
    N a multiple of 16 (vector loads) or not."""
    q_sample, partial, backward = {}, {}, {}
    for dt, code in DTYPE_CODES.items():
        for n16 in (0, 1):
            div = ("N",) if n16 else ()
            tag = f"{dt}{',n16' if n16 else ''}"
            for draw, v, cl in ((0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0), (1, 0, 1), (1, 1, 1)):
                name = f"q_sample[{tag},{'draw' if draw else 'given'}{',v' if v else ''}{',cl' if cl else ''}]"
                sig = {
                    "X0": f"*{dt}", "T": "*i64", "ACP": "*fp32", "NOISE": f"*{dt}", "KEYS": "*i64",
                    "XT": f"*{dt}", "V": f"*{dt}", "N": "i32", "C": "i32", "S": "i32", "NUM_T": "i32",
                    "DRAW": "constexpr", "V_TARGET": "constexpr", "CHANNELS_LAST": "constexpr", "BLOCK": "constexpr",
                }  # fmt: skip
                cx = {"DRAW": bool(draw), "V_TARGET": bool(v), "CHANNELS_LAST": bool(cl), "BLOCK": BLOCK}
                case = KernelCase(name, _q_sample_kernel, sig, cx, NUM_WARPS, divisible=div)
                q_sample[(code, draw, v, cl, n16)] = case
            for w in (0, 1):
                wtag = f"{tag}{',weight' if w else ''}"
                partial[(code, w, n16)] = KernelCase(
                    f"sq_err_partial[{wtag}]", _sq_err_partial_kernel,
                    {"PRED": f"*{dt}", "TARGET": f"*{dt}", "WEIGHT": "*fp32", "PARTIAL": "*fp32", "N": "i32",
                     "num_blocks": "i32", "inv_count": "fp32", "HAS_WEIGHT": "constexpr", "BLOCK": "constexpr"},
                    {"HAS_WEIGHT": bool(w), "BLOCK": BLOCK}, NUM_WARPS, divisible=div,
                )  # fmt: skip
                backward[(code, w, n16)] = KernelCase(
                    f"sq_err_backward[{wtag}]", _sq_err_backward_kernel,
                    {"GRAD": "*fp32", "PRED": f"*{dt}", "TARGET": f"*{dt}", "WEIGHT": "*fp32", "DPRED": f"*{dt}",
                     "N": "i32", "inv_count": "fp32", "HAS_WEIGHT": "constexpr", "BLOCK": "constexpr"},
                    {"HAS_WEIGHT": bool(w), "BLOCK": BLOCK}, NUM_WARPS, divisible=div,
                )  # fmt: skip
    total = KernelCase(
        "sum", _sum_kernel, {"PARTIAL": "*fp32", "OUT": "*fp32", "count": "i32", "BLOCK": "constexpr"},
        {"BLOCK": SUM_BLOCK}, NUM_WARPS,
    )  # fmt: skip
    return (
        LaunchTable("q_sample", ("dtype", "draw", "v_target", "channels_last", "n16"), q_sample),
        LaunchTable("sq_err_partial", ("dtype", "has_weight", "n16"), partial),
        LaunchTable("sum", (), {(): total}),
        LaunchTable("sq_err_backward", ("dtype", "has_weight", "n16"), backward),
    )


LAUNCH_TABLES = _elementwise_tables() if HAS_TRITON else ()
Q_SAMPLE, SQ_ERR_PARTIAL, SUM, SQ_ERR_BACKWARD = LAUNCH_TABLES or (None,) * 4


# ----------------------------------------------------------------------------- launch plans


def _noising_prepared(x0, t, acp, noise):
    """The arguments as the kernel reads them: x0 contiguous unless it is channels-last, given noise in
    x0's dtype and layout, int64 timesteps (one kernel for int32 and int64) and fp32 ᾱ, both dense."""
    if sample_layout(x0) is None:
        x0 = x0.contiguous()
    if noise is not None:
        noise = match_layout(noise if noise.dtype == x0.dtype else noise.to(x0.dtype), x0)
    return x0, t.to(torch.int64).contiguous(), acp.to(torch.float32).contiguous(), noise


class _NoisingPlan:
    """The launch of one noising call signature (see `launch_tables.Plans`)."""

    __slots__ = ("copies", "code", "sizes", "channels_last", "num_timesteps", "launches")

    def __init__(self, x0, t, acp, noise):
        prepared = _noising_prepared(x0, t, acp, noise)
        self.copies = any(a is not b for a, b in zip(prepared, (x0, t, acp, noise)))
        x0 = prepared[0]
        B = x0.shape[0]
        N = x0.numel() // B if B else 0
        C = x0.shape[1] if x0.ndim > 1 else 1
        self.code, self.sizes, self.num_timesteps = dtype_code(x0.dtype), (B, C, N // C if C else 0), acp.shape[0]
        self.channels_last = int(sample_layout(x0) == "channels_last")
        self.launches = x0.numel() > 0


_noising_plans, _checked_noising_plans = Plans(), Plans()


def _noising_plan(x0, t, acp, noise) -> _NoisingPlan:
    key = (
        x0.shape, x0.stride(), x0.dtype, x0.get_device(), t.dtype, t.stride(), acp.dtype, acp.shape, acp.stride(),
        None if noise is None else (noise.dtype, noise.stride()),
    )  # fmt: skip
    plan = _noising_plans.get(key)
    if plan is None:
        plan = _noising_plans.remember(key, _NoisingPlan(x0, t, acp, noise))
    return plan


def _checked_noising_plan(x0, t, acp, noise) -> _NoisingPlan | None:
    """The plan of a noising call whose arguments `q_sample` accepts (checked once per signature, which
    holds what the checks read); raises as `_validate` otherwise.  None when traced."""
    if _backend.traced(x0):
        _validate(x0, t, acp, noise)
        return None
    try:
        key = (
            x0.shape, x0.stride(), x0.dtype, x0.device, type(t), t.dtype, t.shape, t.stride(), t.device, type(acp),
            acp.dtype, acp.shape, acp.stride(), acp.device,
            None if noise is None else (type(noise), noise.dtype, noise.shape, noise.stride(), noise.device),
        )  # fmt: skip
    except AttributeError:  # an argument that is not a tensor
        key = None
    plan = _checked_noising_plans.get(key)
    if plan is None:
        _validate(x0, t, acp, noise)
        plan = _checked_noising_plans.remember(key, _NoisingPlan(x0, t, acp, noise))
    return plan


class _LossPlan:
    """The launches of one diffusion-loss call signature (see `launch_tables.Plans`)."""

    __slots__ = ("copies", "code", "sizes", "blocks", "case_key")

    def __init__(self, pred, target, weight):
        prepared = _loss_prepared(pred, target, weight)
        self.copies = any(a is not b for a, b in zip(prepared, (pred, target, weight)))
        pred = prepared[0]
        B = pred.shape[0]
        N = pred.numel() // B
        self.code, self.sizes, self.blocks = dtype_code(pred.dtype), (B, N), cdiv(N, BLOCK)
        self.case_key = (self.code, int(weight is not None), divisible_key(N))


def _loss_prepared(pred, target, weight):
    """The arguments as the loss kernels read them: pred contiguous unless it is channels-last, target in
    pred's dtype and layout, the weights (a constant) as dense fp32."""
    if sample_layout(pred) is None:
        pred = pred.contiguous()
    target = match_layout(target if target.dtype == pred.dtype else target.to(pred.dtype), pred)
    if weight is not None:
        weight = weight.to(torch.float32).contiguous()
    return pred, target, weight


_loss_plans = Plans()


def _loss_plan(pred, target, weight) -> _LossPlan:
    key = (
        pred.shape, pred.stride(), pred.dtype, target.dtype, target.stride(),
        None if weight is None else (weight.dtype, weight.stride()),
    )  # fmt: skip
    plan = _loss_plans.get(key)
    if plan is None:
        plan = _loss_plans.remember(key, _LossPlan(pred, target, weight))
    return plan


# ----------------------------------------------------------------------------- launchers


def _noising_triton(x0, t, acp, noise, keys, want_v, plan: _NoisingPlan | None = None):
    """(x_t, drawn noise or None, v or None).  ``plan``: the call's, with the arguments it prepared;
    computed here (and the arguments prepared) when not given."""
    if plan is None:
        plan = _noising_plan(x0, t, acp, noise)
        if plan.copies:
            x0, t, acp, noise = _noising_prepared(x0, t, acp, noise)
    draw = noise is None
    x_t = torch.empty_like(x0)
    if draw:
        noise = torch.empty_like(x0)
    v = torch.empty_like(x0) if want_v else None
    if not plan.launches:
        return x_t, (noise if draw else None), v
    B, C, S = plan.sizes
    stream = _aot.target(x0)
    if stream is not None:
        if _aot.launch(
            "q_sample",
            plan.code, x0.data_ptr(), t.data_ptr(), acp.data_ptr(), plan.num_timesteps, noise.data_ptr(),
            keys.data_ptr() if draw else 0, x_t.data_ptr(), v.data_ptr() if want_v else 0, B, C, S,
            plan.channels_last, stream,
        ):  # fmt: skip
            return x_t, (noise if draw else None), v
    # the layout only changes where drawn noise goes: given noise is read in memory order
    N = C * S
    case = Q_SAMPLE.pick((plan.code, int(draw), int(want_v), plan.channels_last if draw else 0, divisible_key(N)))
    case.launch(
        (cdiv(N, BLOCK), B), x0, t, acp, noise, keys if draw else t, x_t, x_t if v is None else v, N, C, S,
        plan.num_timesteps,
    )  # fmt: skip
    return x_t, (noise if draw else None), v


def _weighted_mse_triton(pred, target, weight, plan: _LossPlan):
    """The loss in two launches: weighted per-block sums, then their sum in a fixed order (deterministic)."""
    B, N = plan.sizes
    loss = torch.empty((), device=pred.device, dtype=torch.float32)
    stream = _aot.target(pred)
    if stream is not None:
        partial, hold = _aot.scratch(pred, stream, B * plan.blocks)  # fully written by the first launch
        if _aot.launch(
            "diffusion_loss_fwd",
            plan.code, pred.data_ptr(), target.data_ptr(), 0 if weight is None else weight.data_ptr(),
            loss.data_ptr(), partial, B, N, stream,
        ):  # fmt: skip
            return loss
    partial = torch.empty(B * plan.blocks, device=pred.device, dtype=torch.float32)
    SQ_ERR_PARTIAL.pick(plan.case_key).launch(
        (plan.blocks, B), pred, target, pred if weight is None else weight, partial, N, plan.blocks, 1.0 / (B * N)
    )
    SUM.pick(()).launch((1,), partial, loss, B * plan.blocks)
    return loss


def _sq_err_backward_triton(grad, pred, target, weight, plan: _LossPlan):
    B, N = plan.sizes
    dpred = torch.empty_like(pred)
    if grad.dtype != torch.float32 or grad.data_ptr() % 16:  # e.g. a view into a stack of losses
        grad = torch.empty((), device=grad.device, dtype=torch.float32).copy_(grad)
    stream = _aot.target(pred)
    if stream is not None:
        if _aot.launch(
            "diffusion_loss_bwd",
            plan.code, grad.data_ptr(), pred.data_ptr(), target.data_ptr(), 0 if weight is None else weight.data_ptr(),
            dpred.data_ptr(), B, N, stream,
        ):  # fmt: skip
            return dpred
    SQ_ERR_BACKWARD.pick(plan.case_key).launch(
        (cdiv(N, BLOCK), B), grad, pred, target, pred if weight is None else weight, dpred, N, 1.0 / (B * N)
    )
    return dpred


# ----------------------------------------------------------------------------- torch.library ops


def _noising_impl(
    x0: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, noise: Optional[torch.Tensor],
    keys: Optional[torch.Tensor], want_v: bool, plan: Optional[_NoisingPlan] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:  # fmt: skip
    """(x_t, drawn noise or None, v or None): the eager path allocates nothing it does not return.
    ``plan``: an eager call's, with the arguments it prepared."""
    if not _backend.dry_run_active():  # in dry run the tensors stand for a GPU's, whose values are not read
        tensor_checks.check_timesteps("t", t, alphas_cumprod.shape[0])
    if use_triton(x0):
        return _noising_triton(x0, t, alphas_cumprod, noise, keys, want_v, plan)
    drawn = draw_noise_ref(keys, x0) if noise is None else None
    x_t, v = noising_ref(x0, t, alphas_cumprod, drawn if noise is None else noise, want_v)
    return x_t, drawn, v


def _noising_fake(x0, t, alphas_cumprod, noise, keys, want_v):
    drawn = torch.empty_like(x0) if noise is None else x0.new_empty(0)
    return torch.empty_like(x0), drawn, (torch.empty_like(x0) if want_v else x0.new_empty(0))


def _weighted_mse_impl(
    pred: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor], plan: Optional[_LossPlan] = None
) -> torch.Tensor:
    """``plan``: an eager call's, with the arguments it prepared."""
    if use_triton(pred):
        if plan is None:
            plan = _loss_plan(pred, target, weight)
            if plan.copies:
                pred, target, weight = _loss_prepared(pred, target, weight)
        return _weighted_mse_triton(pred, target, weight, plan)
    return weighted_mse_ref(pred, target, weight)


def _weighted_mse_fake(pred, target, weight):
    return pred.new_empty((), dtype=torch.float32)


def _weighted_mse_backward_impl(
    grad: torch.Tensor,
    pred: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    plan: Optional[_LossPlan] = None,
) -> torch.Tensor:
    if use_triton(pred):
        return _sq_err_backward_triton(grad, pred, target, weight, plan or _loss_plan(pred, target, weight))
    B, N = pred.shape[0], pred.numel() // pred.shape[0]
    w = 1.0 if weight is None else weight.view(-1, *([1] * (pred.ndim - 1)))
    return (2.0 * grad * w * (pred.float() - target.float()) / (B * N)).to(pred.dtype)


def _weighted_mse_backward_fake(grad, pred, target, weight):
    return torch.empty_like(pred)


def _mse_setup_context(ctx, inputs, output):
    pred, target, weight, *plan = inputs  # and an eager call's plan
    ctx.save_for_backward(pred, target, weight)
    ctx.target_needs_grad, ctx.plan = target.requires_grad, plan


def _mse_backward(ctx, grad):
    pred, target, weight = ctx.saved_tensors
    if ctx.plan:  # an eager call: no dispatcher, and the forward's plan
        dpred = _weighted_mse_backward_impl(grad, pred, target, weight, ctx.plan[0])
    else:
        dpred = _weighted_mse_backward_call(grad, pred, target, weight)
    dtarget = -dpred.to(target.dtype) if ctx.target_needs_grad else None
    return (dpred, dtarget, None, None) if ctx.plan else (dpred, dtarget, None)


# no backward: q_sample with gradients runs the reference math
_noising_call = define_op(
    "fastdiff::noising", _noising_impl, _noising_fake, eager_only=("plan",),
    returns=tuple[torch.Tensor, torch.Tensor, torch.Tensor], empty=lambda x0, *_: x0.new_empty(0),
)  # fmt: skip
_weighted_mse_call = define_op(
    "fastdiff::weighted_mse", _weighted_mse_impl, _weighted_mse_fake, eager_only=("plan",),
    setup_context=_mse_setup_context, backward=_mse_backward,
)  # fmt: skip
_weighted_mse_backward_call = define_op(
    "fastdiff::weighted_mse_backward", _weighted_mse_backward_impl, _weighted_mse_backward_fake, eager_only=("plan",)
)


# ----------------------------------------------------------------------------- public API


def _validate(x0, t, alphas_cumprod, noise) -> None:
    tensor_checks.check_float("x0", x0)
    tensor_checks.check_min_ndim("x0", x0, 1, " (B, ...)")
    tensor_checks.check_int("t", t)
    tensor_checks.check_ndim("t", t, 1, " (B,)")
    if t.shape[0] != x0.shape[0]:
        raise ValueError(f"t must have one timestep per sample: shape ({x0.shape[0]},), got {tuple(t.shape)}")
    tensor_checks.check_device("t", t, x0.device, "x0")
    tensor_checks.check_float("alphas_cumprod", alphas_cumprod, (torch.float32, torch.float64))
    tensor_checks.check_ndim("alphas_cumprod", alphas_cumprod, 1, " (num_timesteps,)")
    tensor_checks.check_device("alphas_cumprod", alphas_cumprod, x0.device, "x0")
    if noise is not None:
        tensor_checks.check_float("noise", noise)
        tensor_checks.check_shape("noise", noise, tuple(x0.shape), " (the shape of x0)")
        tensor_checks.check_device("noise", noise, x0.device, "x0")


def _validate_keys(keys, x0, noise, generator) -> None:
    if noise is not None or generator is not None:
        raise ValueError("keys draws the noise: give keys, noise or generator, not two of them")
    tensor_checks.check_tensor("keys", keys)
    if keys.dtype != torch.int64:
        raise TypeError(f"keys must be an int64 tensor, got {keys.dtype}")
    tensor_checks.check_shape("keys", keys, (x0.shape[0],), " (one key per sample)")
    tensor_checks.check_device("keys", keys, x0.device, "x0")
    if not keys.is_contiguous():
        raise ValueError("keys must be contiguous")


def draw_keys(batch: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """One int64 Philox key per sample, drawn from ``generator`` (or torch's default)."""
    if generator is None:  # drawn where it is used: no copy (a same-device .to() still costs a dispatch)
        return torch.randint(0, 2**62, (batch,), device=device, dtype=torch.int64)
    keys = torch.randint(0, 2**62, (batch,), generator=generator, device=generator.device, dtype=torch.int64)
    return keys.to(device, non_blocking=True)


def _noising(x0, t, alphas_cumprod, noise, generator, want_v, plan, keys=None):
    """`q_sample` and `training_target` after their checks: (x_t, noise, v or None).  ``plan``: the
    call's (`_noising_plan`), None when traced; ``keys``: the Philox keys to draw the noise from
    (else drawn from ``generator``)."""
    if noise is not None and noise.dtype != x0.dtype:
        noise = noise.to(x0.dtype)
    needs_grad = torch.is_grad_enabled() and (x0.requires_grad or (noise is not None and noise.requires_grad))
    if needs_grad:
        # The kernel has no backward: differentiate through the reference math.
        tensor_checks.check_timesteps("t", t, alphas_cumprod.shape[0])
        if noise is None:
            noise = draw_noise_ref(draw_keys(x0.shape[0], x0.device, generator) if keys is None else keys, x0)
        x_t, v = noising_ref(x0, t, alphas_cumprod, noise, want_v)
        return x_t, noise, v
    if noise is None and keys is None:
        keys = draw_keys(x0.shape[0], x0.device, generator)
    if plan is None:
        x_t, drawn, v = _noising_call(x0, t, alphas_cumprod, noise, keys, want_v)
    elif plan.copies:
        x_t, drawn, v = _noising_call.eager(*_noising_prepared(x0, t, alphas_cumprod, noise), keys, want_v, plan)
    else:
        x_t, drawn, v = _noising_call.eager(x0, t, alphas_cumprod, noise, keys, want_v, plan)
    return x_t, (drawn if noise is None else noise), (v if want_v else None)


def _unchecked_plan(x0, t, alphas_cumprod, noise) -> _NoisingPlan | None:
    return None if _backend.traced(x0) else _noising_plan(x0, t, alphas_cumprod, noise)


def q_sample(
    x0: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    noise: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise ``x0`` to timesteps ``t``: returns ``(x_t, noise)``.

    x0: (B, ...) fp32/fp16/bf16, contiguous or channels_last; t: (B,) int64 in
    [0, T); alphas_cumprod: (T,) fp32/fp64 on x0's device.  With ``noise=None`` the
    kernel draws N(0, I) noise itself from ``generator`` and returns it.
    """
    return _noised(x0, t, alphas_cumprod, noise, generator, None, False, True)[:2]


def q_sample_unchecked(
    x0: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, noise: torch.Tensor | None = None, *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """`q_sample` without its argument checks, for a loop that made them once.  Arguments
    `q_sample` would refuse give undefined results."""
    return _noised(x0, t, alphas_cumprod, noise, generator, None, False, False)[:2]


def _noised(x0, t, alphas_cumprod, noise, generator, keys, want_v: bool, checked: bool):
    """(x_t, noise, v or None) for `q_sample`, `training_target` and their unchecked entries (the public
    function's checks made when ``checked``): through the C++ entry where it takes the call."""
    if generator is None and not torch.compiler.is_compiling():
        out = _aot.eager.noising(x0, t, alphas_cumprod, noise, keys, want_v, checked)
        if out is not None:
            return out
    plan = _call_plan(x0, t, alphas_cumprod, noise, generator, keys, checked)
    return _noising(x0, t, alphas_cumprod, noise, generator, want_v, plan, keys)


def _call_plan(x0, t, alphas_cumprod, noise, generator, keys, checked: bool) -> _NoisingPlan | None:
    """The plan of a noising call (None when traced), the public function's checks made first when ``checked``."""
    if not checked:
        return _unchecked_plan(x0, t, alphas_cumprod, noise)
    plan = _checked_noising_plan(x0, t, alphas_cumprod, noise)
    if keys is not None:
        _validate_keys(keys, x0, noise, generator)
    return plan


def training_target(
    x0: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    noise: torch.Tensor | None = None,
    *,
    prediction: str = "epsilon",
    generator: torch.Generator | None = None,
    keys: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass for a training step: ``(x_t, noise, target)``.

    ``prediction``: "epsilon" (target = noise), "v" (target = sqrt(ᾱ)ε − sqrt(1−ᾱ)x0,
    written by the same kernel) or "sample" (target = x0).  ``keys``: (B,) int64 Philox keys
    on x0's device to draw the noise from (`draw_keys`), instead of drawing them from
    ``generator``: e.g. each rank's rows of the keys of a global batch, so that a distributed
    step draws the noise one process would (``draw_noise_ref(keys, x0)`` is that noise).
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    noised = _noised(x0, t, alphas_cumprod, noise, generator, keys, prediction == "v", True)
    return _with_target(noised, x0, prediction)


def training_target_unchecked(
    x0: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, noise: torch.Tensor | None = None, *,
    prediction: str = "epsilon", generator: torch.Generator | None = None, keys: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """`training_target` without its argument checks, for a training loop that made them once.
    Arguments `training_target` would refuse give undefined results."""
    noised = _noised(x0, t, alphas_cumprod, noise, generator, keys, prediction == "v", False)
    return _with_target(noised, x0, prediction)


def _with_target(noised, x0, prediction):
    """(x_t, noise, v or None) → (x_t, noise, the target of ``prediction``)."""
    x_t, noise, v = noised
    return x_t, noise, noise if prediction == "epsilon" else v if prediction == "v" else x0


def _eager_noising_plan(x0, t, alphas_cumprod, noise, keys, want_v, checked) -> tuple[int, ...] | None:
    """The plan of `_aot.eager.noising`'s signature (checked first when ``checked``): the library's numbers."""
    plan = _call_plan(x0, t, alphas_cumprod, noise, None, keys, checked)
    if plan.copies or not plan.launches:
        return None
    return (plan.code, plan.num_timesteps, *plan.sizes, plan.channels_last)


_aot.set_planner("noising", _eager_noising_plan)


def min_snr_weight(
    t: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float = 5.0, prediction: str = "epsilon"
) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023), (B,) fp32, finite at SNR = 0."""
    tensor_checks.check_int("t", t)
    tensor_checks.check_device("t", t, alphas_cumprod.device, "alphas_cumprod")
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma!r}")
    abar = alphas_cumprod.double()[t.long()]
    snr = abar / (1 - abar)  # +inf at ᾱ = 1 is fine: every form below has a finite limit
    if prediction == "epsilon":
        w = gamma / torch.clamp(snr, min=gamma)
    elif prediction == "v":
        w = torch.clamp(snr, max=gamma) / (snr + 1)
    else:
        w = torch.clamp(snr, max=gamma)
    return w.float()


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Fused weighted MSE: (1/B) Σ_b w_b · mean_i (pred − target)², fp32 scalar.

    The forward reads pred and target once (per-block sums, then one small program adds them
    in a fixed order: deterministic, no atomics); the backward is one pass.  ``weight`` (B,) is
    treated as a constant (no gradient), e.g. `min_snr_weight`.
    """
    if not torch.compiler.is_compiling():
        loss = _aot.eager.diffusion_loss(pred, target, weight, True)
        if loss is not None:
            return loss
    if _backend.traced(pred):
        _validate_loss(pred, target, weight)
        return _diffusion_loss(pred, target, weight, None)
    try:
        key = (
            pred.shape, pred.dtype, pred.device, type(target), target.shape, target.device,
            None if weight is None else (type(weight), weight.dtype, weight.shape, weight.device),
        )  # fmt: skip
    except AttributeError:  # an argument that is not a tensor
        key = None
    if key not in _checked_losses:  # the checks read only what the key holds: made once per signature
        _validate_loss(pred, target, weight)
        _checked_losses.remember(key, True)
    return _diffusion_loss(pred, target, weight, _loss_plan(pred, target, weight))


_checked_losses = Plans()


def _validate_loss(pred, target, weight) -> None:
    tensor_checks.check_float("pred", pred)
    tensor_checks.check_tensor("target", target)
    tensor_checks.check_min_ndim("pred", pred, 1, " (B, ...)")
    tensor_checks.check_shape("target", target, tuple(pred.shape), " (the shape of pred)")
    tensor_checks.check_device("target", target, pred.device, "pred")
    B = pred.shape[0]
    if weight is not None:
        tensor_checks.check_float("weight", weight, (torch.float32, torch.float64, torch.float16, torch.bfloat16))
        tensor_checks.check_shape("weight", weight, (B,), " (one weight per sample)")
        tensor_checks.check_device("weight", weight, pred.device, "pred")
    if B == 0 or pred.numel() == 0:
        raise ValueError(f"pred must not be empty, got shape {tuple(pred.shape)}")


def diffusion_loss_unchecked(
    pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """`diffusion_loss` without its argument checks, for a training loop that made them once.
    Arguments `diffusion_loss` would refuse give undefined results."""
    if not torch.compiler.is_compiling():
        loss = _aot.eager.diffusion_loss(pred, target, weight, False)
        if loss is not None:
            return loss
    plan = None if _backend.traced(pred) else _loss_plan(pred, target, weight)
    return _diffusion_loss(pred, target, weight, plan)


def _eager_loss_plan(pred, target, weight, checked) -> tuple[int, ...] | None:
    """The plan of `_aot.eager.diffusion_loss`'s signature (checked first when ``checked``): the library's
    numbers, then the floats of the per-block sums (their scratch)."""
    if checked:
        _validate_loss(pred, target, weight)
    plan = _loss_plan(pred, target, weight)
    if plan.copies:
        return None
    B, N = plan.sizes
    return (plan.code, B, N, B * plan.blocks)


_aot.set_planner("diffusion_loss", _eager_loss_plan, _weighted_mse_backward_impl)


def _diffusion_loss(pred, target, weight, plan):
    if weight is not None and weight.requires_grad:
        weight = weight.detach()
    if plan is None:  # traced
        return _weighted_mse_call(*_loss_prepared(pred, target, weight))
    if plan.copies:
        pred, target, weight = _loss_prepared(pred, target, weight)
    return _weighted_mse_call.eager(pred, target, weight, plan)
