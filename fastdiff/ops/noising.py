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
equals the reference path's noise (see ``_philox``).

Precision: ᾱ in fp32, all arithmetic in fp32, outputs in x_0's dtype.  Drawn noise
is rounded to that dtype *before* x_t is formed, so the returned (x_t, ε) pair is
exactly consistent.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastdiff.ops import _checks
from fastdiff.ops._backend import HAS_TRITON, Op, cdiv, use_triton
from fastdiff.ops._layout import match_layout, sample_layout
from fastdiff.ops._philox import randn_like_philox

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


def weighted_mse_ref(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(1/B) Σ_b w_b · mean_i (pred − target)², in fp32.  Differentiable."""
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    return (weight.float() * per_sample).mean()


# ----------------------------------------------------------------------------- kernels

if HAS_TRITON:
    import triton
    import triton.language as tl

    from fastdiff.ops._philox import philox_normal

    @triton.jit
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
        b = tl.program_id(1)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        row = b.to(tl.int64) * N
        tb = tl.load(T + b)
        abar = tl.load(ACP + tb, mask=(tb >= 0) & (tb < NUM_T), other=float("nan"))
        a = tl.sqrt(abar)
        s = tl.sqrt(1.0 - abar)
        x0 = tl.load(X0 + row + offs, mask=mask).to(tl.float32)
        if DRAW:
            if CHANNELS_LAST:
                # memory order is (spatial, C); noise is addressed by the NCHW index
                logical = (offs % C) * S + offs // C
            else:
                logical = offs
            eps = philox_normal(tl.load(KEYS + b), logical)
            eps = eps.to(NOISE.dtype.element_ty)
            tl.store(NOISE + row + offs, eps, mask=mask)
            eps = eps.to(tl.float32)
        else:
            eps = tl.load(NOISE + row + offs, mask=mask).to(tl.float32)
        tl.store(XT + row + offs, (a * x0 + s * eps).to(XT.dtype.element_ty), mask=mask)
        if V_TARGET:
            tl.store(V + row + offs, (a * eps - s * x0).to(V.dtype.element_ty), mask=mask)

    @triton.jit
    def _sq_err_partial_kernel(
        PRED,  # (B, N)
        TARGET,  # (B, N)
        PARTIAL,  # (B, num_blocks) fp32 out: Σ (pred − target)² over one block
        N,
        num_blocks,
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
        tl.store(PARTIAL + b * num_blocks + pid, tl.sum(d * d, axis=0))

    @triton.jit
    def _sq_err_backward_kernel(
        GRAD,  # () fp32 upstream gradient of the loss
        PRED,  # (B, N)
        TARGET,  # (B, N)
        WEIGHT,  # (B,) fp32
        DPRED,  # (B, N) out
        N,
        inv_count,  # 1 / (B·N)
        BLOCK: tl.constexpr,
    ):
        b = tl.program_id(1)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        row = b.to(tl.int64) * N
        scale = 2.0 * tl.load(GRAD) * tl.load(WEIGHT + b) * inv_count
        d = tl.load(PRED + row + offs, mask=mask).to(tl.float32) - tl.load(TARGET + row + offs, mask=mask).to(
            tl.float32
        )
        tl.store(DPRED + row + offs, (scale * d).to(DPRED.dtype.element_ty), mask=mask)


# Elementwise config: 16-byte loads per thread at fp32 x 4 warps; enough work per program.
BLOCK = 1024
NUM_WARPS = 4


# ----------------------------------------------------------------------------- launchers


def _noising_triton(x0, t, acp, noise, keys, want_v):
    t = t.to(torch.int64)  # one kernel specialisation for int32 and int64 timesteps
    layout = sample_layout(x0)
    if layout is None:
        x0, layout = x0.contiguous(), "contiguous"
    B = x0.shape[0]
    N = x0.numel() // B if B else 0
    C = x0.shape[1] if x0.ndim > 1 else 1
    S = N // C if C else 0
    x_t = torch.empty_like(x0)
    draw = noise is None
    noise_buf = torch.empty_like(x0) if draw else match_layout(noise, x0)
    v = torch.empty_like(x0) if want_v else x_t  # unused pointer when not want_v
    if x0.numel():
        grid = (cdiv(N, BLOCK), B)
        _q_sample_kernel[grid](
            x0, t, acp.to(torch.float32), noise_buf, keys if draw else t, x_t, v, N, C, S, acp.shape[0],
            DRAW=draw, V_TARGET=want_v, CHANNELS_LAST=layout == "channels_last", BLOCK=BLOCK,
            num_warps=NUM_WARPS,
        )  # fmt: skip
    return x_t, (noise_buf if draw else None), (v if want_v else None)


def _sq_err_sum_triton(pred, target):
    B = pred.shape[0]
    N = pred.numel() // B
    nblk = cdiv(N, BLOCK)
    partial = torch.empty(B, nblk, device=pred.device, dtype=torch.float32)
    _sq_err_partial_kernel[(nblk, B)](pred, target, partial, N, nblk, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return partial.sum(1)


def _sq_err_backward_triton(grad, pred, target, weight):
    B = pred.shape[0]
    N = pred.numel() // B
    dpred = torch.empty_like(pred)
    grid = (cdiv(N, BLOCK), B)
    _sq_err_backward_kernel[grid](
        grad.to(torch.float32).reshape(()), pred, target, weight, dpred, N, 1.0 / (B * N), BLOCK=BLOCK,
        num_warps=NUM_WARPS,
    )  # fmt: skip
    return dpred


# ----------------------------------------------------------------------------- torch.library ops


def _noising_impl(
    x0: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    noise: Optional[torch.Tensor],
    keys: Optional[torch.Tensor],
    want_v: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, drawn noise or empty, v or empty)."""
    _checks.check_timesteps("t", t, alphas_cumprod.shape[0])
    if use_triton(x0):
        x_t, drawn, v = _noising_triton(x0, t, alphas_cumprod, noise, keys, want_v)
    else:
        drawn = draw_noise_ref(keys, x0) if noise is None else None
        x_t, v = noising_ref(x0, t, alphas_cumprod, drawn if noise is None else noise, want_v)
    # Absent outputs are fresh empty tensors: custom ops may not return aliases.
    return x_t, (x0.new_empty(0) if drawn is None else drawn), (x0.new_empty(0) if v is None else v)


_noising_op = torch.library.custom_op("fastdiff::noising", _noising_impl, mutates_args=())


@_noising_op.register_fake
def _(x0, t, alphas_cumprod, noise, keys, want_v):
    drawn = torch.empty_like(x0) if noise is None else x0.new_empty(0)
    return torch.empty_like(x0), drawn, (torch.empty_like(x0) if want_v else x0.new_empty(0))


def _weighted_mse_impl(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if use_triton(pred):
        per_sample = _sq_err_sum_triton(pred, target) / (pred.numel() // pred.shape[0])
        return (weight * per_sample).mean()
    return weighted_mse_ref(pred, target, weight)


_weighted_mse_op = torch.library.custom_op("fastdiff::weighted_mse", _weighted_mse_impl, mutates_args=())


@_weighted_mse_op.register_fake
def _(pred, target, weight):
    return pred.new_empty((), dtype=torch.float32)


def _weighted_mse_backward_impl(
    grad: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    if use_triton(pred):
        return _sq_err_backward_triton(grad, pred, target, weight)
    B, N = pred.shape[0], pred.numel() // pred.shape[0]
    w = weight.view(-1, *([1] * (pred.ndim - 1)))
    return (2.0 * grad * w * (pred.float() - target.float()) / (B * N)).to(pred.dtype)


_weighted_mse_backward_op = torch.library.custom_op(
    "fastdiff::weighted_mse_backward", _weighted_mse_backward_impl, mutates_args=()
)


@_weighted_mse_backward_op.register_fake
def _(grad, pred, target, weight):
    return torch.empty_like(pred)


def _mse_setup_context(ctx, inputs, output):
    pred, target, weight = inputs
    ctx.save_for_backward(pred, target, weight)
    ctx.target_needs_grad = target.requires_grad


def _mse_backward(ctx, grad):
    pred, target, weight = ctx.saved_tensors
    dpred = _weighted_mse_backward_call(grad, pred, target, weight)
    dtarget = -dpred.to(target.dtype) if ctx.target_needs_grad else None
    return dpred, dtarget, None


_weighted_mse_op.register_autograd(_mse_backward, setup_context=_mse_setup_context)
_noising_call = Op(_noising_op, _noising_impl)  # no backward: q_sample with gradients runs the reference math
_weighted_mse_call = Op(_weighted_mse_op, _weighted_mse_impl, _mse_setup_context, _mse_backward)
_weighted_mse_backward_call = Op(_weighted_mse_backward_op, _weighted_mse_backward_impl)


# ----------------------------------------------------------------------------- public API


def _validate(x0, t, alphas_cumprod, noise) -> None:
    _checks.check_float("x0", x0)
    _checks.check_min_ndim("x0", x0, 1, " (B, ...)")
    _checks.check_int("t", t)
    _checks.check_ndim("t", t, 1, " (B,)")
    if t.shape[0] != x0.shape[0]:
        raise ValueError(f"t must have one timestep per sample: shape ({x0.shape[0]},), got {tuple(t.shape)}")
    _checks.check_device("t", t, x0.device, "x0")
    _checks.check_float("alphas_cumprod", alphas_cumprod, (torch.float32, torch.float64))
    _checks.check_ndim("alphas_cumprod", alphas_cumprod, 1, " (num_timesteps,)")
    _checks.check_device("alphas_cumprod", alphas_cumprod, x0.device, "x0")
    if noise is not None:
        _checks.check_float("noise", noise)
        _checks.check_shape("noise", noise, tuple(x0.shape), " (the shape of x0)")
        _checks.check_device("noise", noise, x0.device, "x0")


def draw_keys(batch: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """One int64 Philox key per sample, drawn from ``generator`` (or torch's default)."""
    if generator is None:  # drawn where it is used: no copy (a same-device .to() still costs a dispatch)
        return torch.randint(0, 2**62, (batch,), device=device, dtype=torch.int64)
    keys = torch.randint(0, 2**62, (batch,), generator=generator, device=generator.device, dtype=torch.int64)
    return keys.to(device, non_blocking=True)


def _noising(x0, t, alphas_cumprod, noise, generator, want_v):
    """`q_sample` and `training_target` after their checks: (x_t, noise, v or None)."""
    if noise is not None and noise.dtype != x0.dtype:
        noise = noise.to(x0.dtype)
    needs_grad = torch.is_grad_enabled() and (x0.requires_grad or (noise is not None and noise.requires_grad))
    if needs_grad:
        # The kernel has no backward: differentiate through the reference math.
        _checks.check_timesteps("t", t, alphas_cumprod.shape[0])
        if noise is None:
            noise = draw_noise_ref(draw_keys(x0.shape[0], x0.device, generator), x0)
        x_t, v = noising_ref(x0, t, alphas_cumprod, noise, want_v)
        return x_t, noise, v
    keys = draw_keys(x0.shape[0], x0.device, generator) if noise is None else None
    x_t, drawn, v = _noising_call(x0, t, alphas_cumprod, noise, keys, want_v)
    return x_t, (drawn if noise is None else noise), (v if want_v else None)


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
    _validate(x0, t, alphas_cumprod, noise)
    return q_sample_unchecked(x0, t, alphas_cumprod, noise, generator=generator)


def q_sample_unchecked(
    x0: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    noise: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`q_sample` without its argument checks, for a loop that made them once.  Arguments
    `q_sample` would refuse give undefined results."""
    x_t, noise, _ = _noising(x0, t, alphas_cumprod, noise, generator, want_v=False)
    return x_t, noise


def training_target(
    x0: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    noise: torch.Tensor | None = None,
    *,
    prediction: str = "epsilon",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass for a training step: ``(x_t, noise, target)``.

    ``prediction``: "epsilon" (target = noise), "v" (target = sqrt(ᾱ)ε − sqrt(1−ᾱ)x0,
    written by the same kernel) or "sample" (target = x0).
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    _validate(x0, t, alphas_cumprod, noise)
    return training_target_unchecked(x0, t, alphas_cumprod, noise, prediction=prediction, generator=generator)


def training_target_unchecked(
    x0: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    noise: torch.Tensor | None = None,
    *,
    prediction: str = "epsilon",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`training_target` without its argument checks, for a training loop that made them once.
    Arguments `training_target` would refuse give undefined results."""
    x_t, noise, v = _noising(x0, t, alphas_cumprod, noise, generator, want_v=prediction == "v")
    target = {"epsilon": noise, "v": v, "sample": x0}[prediction]
    return x_t, noise, target


def min_snr_weight(
    t: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float = 5.0, prediction: str = "epsilon"
) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023), (B,) fp32, finite at SNR = 0."""
    _checks.check_int("t", t)
    _checks.check_device("t", t, alphas_cumprod.device, "alphas_cumprod")
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

    Forward and backward are one pass each.  ``weight`` (B,) is treated as a
    constant (no gradient), e.g. `min_snr_weight`.
    """
    _checks.check_float("pred", pred)
    _checks.check_tensor("target", target)
    _checks.check_min_ndim("pred", pred, 1, " (B, ...)")
    _checks.check_shape("target", target, tuple(pred.shape), " (the shape of pred)")
    _checks.check_device("target", target, pred.device, "pred")
    B = pred.shape[0]
    if weight is not None:
        _checks.check_float("weight", weight, (torch.float32, torch.float64, torch.float16, torch.bfloat16))
        _checks.check_shape("weight", weight, (B,), " (one weight per sample)")
        _checks.check_device("weight", weight, pred.device, "pred")
    if B == 0 or pred.numel() == 0:
        raise ValueError(f"pred must not be empty, got shape {tuple(pred.shape)}")
    return diffusion_loss_unchecked(pred, target, weight)


def diffusion_loss_unchecked(
    pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """`diffusion_loss` without its argument checks, for a training loop that made them once.
    Arguments `diffusion_loss` would refuse give undefined results."""
    if weight is None:
        weight = torch.ones(pred.shape[0], device=pred.device, dtype=torch.float32)
    if sample_layout(pred) is None:
        pred = pred.contiguous()
    target = match_layout(target.to(pred.dtype) if target.dtype != pred.dtype else target, pred)
    weight = weight.detach()
    return _weighted_mse_call(pred, target, weight if weight.dtype == torch.float32 else weight.float())


# ----------------------------------------------------------------------------- audit


def audit_cases():
    from fastdiff.audit import KernelCase

    cases = []
    for dt in ("fp32", "fp16", "bf16"):
        for draw in (False, True):
            for v in (False, True):
                for cl in (False, True) if draw else (False,):
                    name = f"q_sample[{dt},{'draw' if draw else 'given'}{',v' if v else ''}{',cl' if cl else ''}]"
                    sig = {
                        "X0": f"*{dt}", "T": "*i64", "ACP": "*fp32", "NOISE": f"*{dt}", "KEYS": "*i64",
                        "XT": f"*{dt}", "V": f"*{dt}", "N": "i32", "C": "i32", "S": "i32", "NUM_T": "i32",
                        "DRAW": "constexpr", "V_TARGET": "constexpr", "CHANNELS_LAST": "constexpr", "BLOCK": "constexpr",
                    }  # fmt: skip
                    cx = {"DRAW": draw, "V_TARGET": v, "CHANNELS_LAST": cl, "BLOCK": BLOCK}
                    cases.append(KernelCase(name, _q_sample_kernel, sig, cx, NUM_WARPS))
        cases.append(
            KernelCase(
                f"sq_err_partial[{dt}]",
                _sq_err_partial_kernel,
                {"PRED": f"*{dt}", "TARGET": f"*{dt}", "PARTIAL": "*fp32", "N": "i32", "num_blocks": "i32",
                 "BLOCK": "constexpr"},
                {"BLOCK": BLOCK},
                NUM_WARPS,
            )
        )  # fmt: skip
        cases.append(
            KernelCase(
                f"sq_err_backward[{dt}]",
                _sq_err_backward_kernel,
                {"GRAD": "*fp32", "PRED": f"*{dt}", "TARGET": f"*{dt}", "WEIGHT": "*fp32", "DPRED": f"*{dt}",
                 "N": "i32", "inv_count": "fp32", "BLOCK": "constexpr"},
                {"BLOCK": BLOCK},
                NUM_WARPS,
            )
        )  # fmt: skip
    return cases
