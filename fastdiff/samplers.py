r"""Sampling loops: DDPM, DDIM, Euler, Euler-ancestral, DPM-Solver++(2M), Heun.

A sampler is split in two small pure pieces:

* a *plan* — ``ddpm_plan``, ``ddim_plan``, ``euler_plan``, ``euler_ancestral_plan``,
  ``dpmpp_2m_plan``, ``heun_plan`` — computed once, in float64 on the host, from the schedule
  and an explicit, descending timestep sequence (``fastdiff.schedule.timesteps`` or your own).
  It unrolls the sampler into model evaluations: for each, the timestep given to the model
  and the coefficient vector of the fused update (``fastdiff.ops.sampler_step``), plus which
  evaluations draw noise, keep or read the previous x̂0, and blend the inpainting region;
* `sample`, one loop for every sampler: call the model, then ``fastdiff.ops.sampler_step`` — the only
  per-element work of a step.  The loop checks its arguments once (`prepare_loop`); each
  evaluation (`step`) then checks only the model's output and calls the op's unchecked
  entry.  An application with its own loop (RePaint's jumps in ``apps.inpaint``) runs the same
  evaluations through `step`.

The state is always variance-preserving, x_t = α_t·x_0 + σ_t·ε (α_t = sqrt(ᾱ_t),
σ_t = sqrt(1 − ᾱ_t)), and the model is always called as ``model(x_t, t)``: the σ-space
samplers (Euler, Heun; Karras et al. 2022) are written in this space, so the model never needs
k-diffusion's input scaling x/sqrt(1 + s²).  Below, s = σ_t/α_t is the EDM/k-diffusion noise
level and x̃ = x/α the σ-space state; a primed symbol belongs to the next noise level.

Plan coefficients are moved to the device once (`Plan.to`); the loop then reads them from
device memory and never synchronises with the host, so the whole loop can be captured in a
CUDA graph (build the plan with ``.to(device)`` and the x0 state buffers before capture).

Seeds: each image's noise is keyed by its own int64 seed and the evaluation index, so an
image is reproducible alone, whatever batch it was drawn in.  `initial_noise` draws x_T
from the same seeds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from fastdiff.ops import tensor_checks
from fastdiff.ops.philox import randn_like_philox, step_keys
from fastdiff.ops.fused_step import NUM_COEFFICIENTS, check_model_output, check_step_arguments, coefficient_rows
from fastdiff.ops.fused_step import sampler_step_unchecked, step_coefficients
from fastdiff.schedule import Schedule, sigmas_at

PREDICTIONS = ("epsilon", "sample", "v")
VARIANCES = ("fixed_small", "fixed_large")

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # model(x_t (B, ...), t (B,)) -> output (B, ...)


@dataclass(frozen=True)
class Plan:
    """A sampler unrolled into E model evaluations; everything `sample` needs, precomputed."""

    name: str  # the sampler, for messages
    timesteps: torch.Tensor  # (E,) timestep given to the model at each evaluation (int64 or float)
    coeffs: torch.Tensor  # (E, K) step coefficients, order of ops.fused_step.COEFFICIENTS
    add_noise: tuple[bool, ...]  # (E,) the evaluation's update draws fresh noise z
    reads_x0: tuple[bool, ...]  # (E,) the update uses the previous evaluation's x̂0
    keeps_x0: tuple[bool, ...]  # (E,) the evaluation's x̂0 is kept for the next one
    blends: tuple[bool, ...]  # (E,) inpainting blend after this evaluation

    def __len__(self) -> int:
        return self.timesteps.shape[0]

    def to(self, device) -> "Plan":
        """The plan with fp32 coefficients in aligned rows (and the timesteps) on ``device``: one copy, before the loop."""
        ts = self.timesteps if not self.timesteps.is_floating_point() else self.timesteps.to(torch.float32)
        return Plan(
            self.name, ts.to(device), coefficient_rows(self.coeffs, device), self.add_noise,
            self.reads_x0, self.keeps_x0, self.blends,
        )  # fmt: skip


# ----------------------------------------------------------------------------- helpers


def initial_noise(seeds: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x_T ~ N(0, I) of ``shape`` = (B, ...), image b from ``seeds[b]`` (key of step −1, unused by the loop)."""
    tensor_checks.check_int("seeds", seeds)
    if tuple(seeds.shape) != (shape[0],):
        raise ValueError(f"seeds must have shape ({shape[0]},) (one per image), got {tuple(seeds.shape)}")
    keys = step_keys(seeds.to(torch.int64), torch.tensor(-1, dtype=torch.int64))
    return randn_like_philox(keys, tuple(shape), seeds.device).to(dtype)


def _prediction(prediction: str, alpha: float, sigma: float) -> dict[str, float]:
    """x̂0 and ε̂ as linear functions of (x_t, o) for the model's parametrisation (VP α, σ)."""
    if (prediction == "epsilon" and alpha == 0) or (prediction == "sample" and sigma == 0):
        raise ValueError(
            f"{prediction}-prediction is undefined at ᾱ = {0 if alpha == 0 else 1} (it divides by "
            f"{'α' if alpha == 0 else 'σ'}); use v-prediction with a zero-terminal-SNR schedule"
        )
    if prediction == "epsilon":  # Ho et al. 2020, Eq. 15
        return dict(x0_from_x=1 / alpha, x0_from_out=-sigma / alpha, eps_from_out=1.0)
    if prediction == "sample":
        return dict(x0_from_out=1.0, eps_from_x=1 / sigma, eps_from_out=-alpha / sigma)
    # v = α·ε − σ·x0 (Salimans & Ho 2022, Sec. 4)
    return dict(x0_from_x=alpha, x0_from_out=-sigma, eps_from_x=sigma, eps_from_out=alpha)


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def _check_timesteps(timesteps, schedule: Schedule, integer: bool) -> torch.Tensor:
    tensor_checks.check_tensor("timesteps", timesteps)
    tensor_checks.check_ndim("timesteps", timesteps, 1, " (N,)")
    if timesteps.numel() == 0:
        raise ValueError("timesteps must not be empty")
    if integer and timesteps.is_floating_point():
        raise TypeError(f"timesteps must be integers for this sampler (it indexes ᾱ), got {timesteps.dtype}")
    ts = timesteps.detach().cpu()
    T = schedule.num_timesteps
    if float(ts.min()) < 0 or float(ts.max()) > T - 1:
        raise ValueError(f"timesteps must lie in [0, {T - 1}], got values in [{float(ts.min())}, {float(ts.max())}]")
    if ts.numel() > 1 and not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError("timesteps must be strictly decreasing (from noise to data)")
    return ts


def vp_alpha_sigma(s: float) -> tuple[float, float]:
    """(α, σ) of the VP state at EDM noise level s: α = 1/sqrt(1 + s²), σ = s·α (α = 0 at s = ∞)."""
    if math.isinf(s):
        return 0.0, 1.0
    alpha = 1 / math.sqrt(1 + s * s)
    return alpha, s * alpha


def _finish(name, timesteps, rows, add_noise, reads_x0, keeps_x0, blends) -> Plan:
    coeffs = torch.stack(rows)
    if not bool(torch.isfinite(coeffs).all()):
        bad = int((~torch.isfinite(coeffs)).any(1).nonzero()[0])
        raise ValueError(
            f"{name}: the step coefficients at evaluation {bad} are not finite (timestep "
            f"{timesteps[bad].item()}); ε- or x0-prediction is undefined where ᾱ is 0 or 1 — use v-prediction"
        )
    return Plan(name, timesteps, coeffs, tuple(add_noise), tuple(reads_x0), tuple(keeps_x0), tuple(blends))


def _known(alpha_next: float, sigma_next: float, last: bool) -> dict[str, float]:
    # The last evaluation returns the sample itself: blend the clean known image there.
    return dict(known=1.0, known_noise=0.0) if last else dict(known=alpha_next, known_noise=sigma_next)


# ----------------------------------------------------------------------------- plans


def ddpm_plan(
    schedule: Schedule, timesteps: torch.Tensor, *, variance: str = "fixed_small", prediction: str = "epsilon"
) -> Plan:
    """Ancestral DDPM (Ho et al. 2020, Alg. 2) over any decreasing subsequence of timesteps.

    With ᾱ' the next timestep's (1 after the last), ᾱ_t/ᾱ' the strided α and β = 1 − ᾱ_t/ᾱ':
        x' = sqrt(ᾱ')·β/(1−ᾱ_t)·x̂0 + sqrt(ᾱ_t/ᾱ')·(1−ᾱ')/(1−ᾱ_t)·x_t + sqrt(v)·z     (Eq. 6, 7)
        v  = (1−ᾱ')/(1−ᾱ_t)·β  ("fixed_small", β̃)   or   β  ("fixed_large")
    The last step returns the posterior mean (z = 0, Alg. 2).
    """
    _check_prediction(prediction)
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
    ts = _check_timesteps(timesteps, schedule, integer=True)
    acp = schedule.alphas_cumprod.tolist()
    N = ts.shape[0]
    rows, noise = [], []
    for i in range(N):
        last = i == N - 1
        ab = acp[int(ts[i])]
        ab_next = 1.0 if last else acp[int(ts[i + 1])]
        beta = 1 - ab / ab_next
        var = max((1 - ab_next) / (1 - ab) * beta, 1e-20) if variance == "fixed_small" else beta
        e = 0.0 if last else math.sqrt(var)
        rows.append(
            step_coefficients(
                **_prediction(prediction, math.sqrt(ab), math.sqrt(1 - ab)),
                x=math.sqrt(ab / ab_next) * (1 - ab_next) / (1 - ab),
                x0=math.sqrt(ab_next) * beta / (1 - ab),
                noise=e,
                **_known(math.sqrt(ab_next), math.sqrt(1 - ab_next), last),
            )
        )
        noise.append(e != 0.0)
    return _finish("ddpm", ts, rows, noise, [False] * N, [False] * N, [True] * N)


def ddim_plan(
    schedule: Schedule,
    timesteps: torch.Tensor,
    *,
    eta: float = 0.0,
    prediction: str = "epsilon",
    final_alpha_one: bool = True,
    prev_timesteps: torch.Tensor | None = None,
) -> Plan:
    """DDIM (Song et al. 2021, Eq. 12 and 16):

        σ_η = η·sqrt((1−ᾱ')/(1−ᾱ_t))·sqrt(1 − ᾱ_t/ᾱ')
        x'  = sqrt(ᾱ')·x̂0 + sqrt(1 − ᾱ' − σ_η²)·ε̂ + σ_η·z

    η = 0 is the deterministic sampler, η = 1 DDPM-like.  ᾱ' is that of the next timestep,
    or of ``prev_timesteps[i]`` when given (diffusers' DDIMScheduler lands on t − ⌊T/N⌋,
    which is not the next timestep when N does not divide T).  After the last timestep, or
    at a negative ``prev_timesteps`` entry, ᾱ' = 1 (``final_alpha_one``) or ᾱ_0 (Stable
    Diffusion's ``set_alpha_to_one=False``).
    """
    _check_prediction(prediction)
    if not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be a float in [0, 1], got {eta!r}")
    ts = _check_timesteps(timesteps, schedule, integer=True)
    acp = schedule.alphas_cumprod.tolist()
    N = ts.shape[0]
    lands = [int(t) for t in ts[1:]] + [-1] if prev_timesteps is None else [int(t) for t in prev_timesteps]
    if len(lands) != N or max(lands) >= schedule.num_timesteps:
        raise ValueError(f"prev_timesteps must be {N} timesteps below {schedule.num_timesteps}, got {lands}")
    rows, noise = [], []
    for i in range(N):
        last = i == N - 1
        ab = acp[int(ts[i])]
        ab_next = acp[lands[i]] if lands[i] >= 0 else (1.0 if final_alpha_one else acp[0])
        std = eta * math.sqrt((1 - ab_next) / (1 - ab) * (1 - ab / ab_next))
        rows.append(
            step_coefficients(
                **_prediction(prediction, math.sqrt(ab), math.sqrt(1 - ab)),
                x0=math.sqrt(ab_next),
                eps=math.sqrt(max(1 - ab_next - std * std, 0.0)),
                noise=std,
                **_known(math.sqrt(ab_next), math.sqrt(1 - ab_next), last),
            )
        )
        noise.append(std != 0.0)
    return _finish("ddim", ts, rows, noise, [False] * N, [False] * N, [True] * N)


def _sigma_sequence(schedule: Schedule, timesteps: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """Timesteps (kept as given) and their EDM noise levels s (interpolated), with s = 0 appended."""
    ts = _check_timesteps(timesteps, schedule, integer=False)
    return ts, sigmas_at(ts, schedule).tolist() + [0.0]


def euler_plan(schedule: Schedule, timesteps: torch.Tensor, *, prediction: str = "epsilon") -> Plan:
    """Euler's method on the probability-flow ODE dx̃/ds = (x̃ − x̂0)/s (Karras et al. 2022, Alg. 1 without churn).

        x̃' = x̃ + (s' − s)·(x̃ − x̂0)/s    ⇔    x' = (σ'/σ)·x_t + (α' − σ'·α/σ)·x̂0     (VP state)

    Fractional timesteps are allowed: s is interpolated linearly in t, as diffusers does.
    """
    _check_prediction(prediction)
    ts, s = _sigma_sequence(schedule, timesteps)
    N = ts.shape[0]
    rows = []
    for i in range(N):
        last = i == N - 1
        (al, sg), (al_n, sg_n) = vp_alpha_sigma(s[i]), vp_alpha_sigma(s[i + 1])
        rows.append(
            step_coefficients(
                **_prediction(prediction, al, sg), x=sg_n / sg, x0=al_n - sg_n * al / sg, **_known(al_n, sg_n, last)
            )
        )
    return _finish("euler", ts, rows, [False] * N, [False] * N, [False] * N, [True] * N)


def euler_ancestral_plan(schedule: Schedule, timesteps: torch.Tensor, *, prediction: str = "epsilon") -> Plan:
    """Euler-ancestral (k-diffusion ``sample_euler_ancestral``, η = 1): an Euler step down to s_down,
    then fresh noise back up to s':

        s_up = sqrt(s'²·(s² − s'²)/s²),  s_down = sqrt(s'² − s_up²)
        x̃' = x̃ + (s_down − s)·(x̃ − x̂0)/s + s_up·z
    In the VP state: x' = α'·(s_down/s)/α·x_t + α'·(1 − s_down/s)·x̂0 + α'·s_up·z.
    """
    _check_prediction(prediction)
    ts, s = _sigma_sequence(schedule, timesteps)
    N = ts.shape[0]
    rows, noise = [], []
    for i in range(N):
        last = i == N - 1
        (al, sg), (al_n, sg_n) = vp_alpha_sigma(s[i]), vp_alpha_sigma(s[i + 1])
        ratio_sq = 0.0 if math.isinf(s[i]) else s[i + 1] ** 2 / s[i] ** 2
        s_up = math.sqrt(s[i + 1] ** 2 * (1 - ratio_sq))
        s_down = math.sqrt(max(s[i + 1] ** 2 - s_up**2, 0.0))
        rows.append(
            step_coefficients(
                **_prediction(prediction, al, sg),
                x=al_n * s_down / sg,  # α'·(s_down/s)/α, finite at s = ∞
                x0=al_n * (1 - s_down / s[i]),
                noise=al_n * s_up,
                **_known(al_n, sg_n, last),
            )
        )
        noise.append(s_up != 0.0)
    return _finish("euler_ancestral", ts, rows, noise, [False] * N, [False] * N, [True] * N)


def dpmpp_2m_plan(schedule: Schedule, timesteps: torch.Tensor, *, prediction: str = "epsilon") -> Plan:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Alg. 2, midpoint form as in diffusers).

    λ = log(α/σ), h = λ' − λ, r = h_prev/h, D1 = (x̂0 − x̂0_prev)/r:
        x' = (σ'/σ)·x_t − α'·(e^{−h} − 1)·(x̂0 + D1/2)
    First order (DPM-Solver++(1) = DDIM) on the first step and on the last, which goes to
    s = 0 and returns x̂0 (diffusers' ``final_sigmas_type="zero"``, ``lower_order_final``).
    """
    _check_prediction(prediction)
    ts, s = _sigma_sequence(schedule, timesteps)
    N = ts.shape[0]
    lam = [math.log(a / g) if a > 0 and g > 0 else (math.inf if g == 0 else -math.inf)
           for a, g in map(vp_alpha_sigma, s)]  # fmt: skip
    rows, reads = [], []
    for i in range(N):
        last = i == N - 1
        (al, sg), (al_n, sg_n) = vp_alpha_sigma(s[i]), vp_alpha_sigma(s[i + 1])
        pred = _prediction(prediction, al, sg)
        if last:  # s' = 0: x' = x̂0
            rows.append(step_coefficients(**pred, x0=1.0, **_known(al_n, sg_n, last)))
            reads.append(False)
            continue
        h = lam[i + 1] - lam[i]
        phi = -al_n * math.expm1(-h)  # −α'(e^{−h} − 1) > 0
        if i == 0:
            rows.append(step_coefficients(**pred, x=sg_n / sg, x0=phi, **_known(al_n, sg_n, last)))
            reads.append(False)
        else:
            r = (lam[i] - lam[i - 1]) / h
            rows.append(
                step_coefficients(
                    **pred, x=sg_n / sg, x0=phi * (1 + 0.5 / r), x0_prev=-phi * 0.5 / r, **_known(al_n, sg_n, last)
                )
            )
            reads.append(True)
    keeps = [i < N - 1 for i in range(N)]
    return _finish("dpmpp_2m", ts, rows, [False] * N, reads, keeps, [True] * N)


HEUN_MAX_NOISE = 80.0  # Heun corrects only steps starting at s <= this (EDM's σ_max)


def heun_plan(schedule: Schedule, timesteps: torch.Tensor, *, prediction: str = "epsilon") -> Plan:
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1 without churn): 2N − 1 evaluations.

    Predictor (Euler, keeps D = x̂0):  x̃_mid = x̃ + (s' − s)·(x̃ − D)/s
    Corrector at s' with D' = x̂0(x_mid): x̃' = x̃ + (s' − s)·(d + d')/2, d = (x̃ − D)/s, d' = (x̃_mid − D')/s'.
    Since d = (x̃_mid − D)/s', this is x̃' = x̃_mid + (s' − s)/(2s')·(D − D'), linear in
    (x_mid, D', D): the corrector is one fused step on x_mid reading the predictor's x̂0.
    The last step, to s' = 0, is Euler alone, and so is a step that starts above
    ``HEUN_MAX_NOISE`` (s = 80, EDM's σ_max): there the corrector's weight (s − s')/2s'
    multiplies the difference of two x̂0 estimates by up to hundreds (a cosine schedule's
    t = T − 1 is s ≈ 10⁴), and the trapezoid rule in s, which assumes d varies slowly over
    [s', s], does not hold.  Inpainting blends after each corrector only (blending x_mid
    would break the corrector's algebra).
    """
    _check_prediction(prediction)
    ts, s = _sigma_sequence(schedule, timesteps)
    N = ts.shape[0]
    model_t, rows, reads, keeps, blends = [], [], [], [], []
    for i in range(N):
        last = i == N - 1
        (al, sg), (al_n, sg_n) = vp_alpha_sigma(s[i]), vp_alpha_sigma(s[i + 1])
        model_t.append(ts[i])
        rows.append(
            step_coefficients(
                **_prediction(prediction, al, sg), x=sg_n / sg, x0=al_n - sg_n * al / sg, **_known(al_n, sg_n, last)
            )
        )
        euler_only = last or s[i] > HEUN_MAX_NOISE
        reads.append(False)
        keeps.append(not euler_only)
        blends.append(euler_only)
        if euler_only:
            continue
        k = al_n * (s[i + 1] - s[i]) / (2 * s[i + 1])
        model_t.append(ts[i + 1])
        rows.append(
            step_coefficients(
                **_prediction(prediction, al_n, sg_n), x=1.0, x0=-k, x0_prev=k, **_known(al_n, sg_n, False)
            )
        )
        reads.append(True)
        keeps.append(False)
        blends.append(True)
    E = len(rows)
    return _finish("heun", torch.stack(model_t), rows, [False] * E, reads, keeps, blends)


# ----------------------------------------------------------------------------- the loop


def _validate_sample(x_T, seeds, plan, guidance_scale, guidance_rescale, known, mask) -> None:
    tensor_checks.check_float("x_T", x_T)
    tensor_checks.check_min_ndim("x_T", x_T, 2, " (B, ...)")
    tensor_checks.check_tensor("seeds", seeds)
    if seeds.dtype != torch.int64:
        raise TypeError(f"seeds must be an int64 tensor, got {seeds.dtype}")
    tensor_checks.check_shape("seeds", seeds, (x_T.shape[0],), " (one seed per image)")
    tensor_checks.check_device("seeds", seeds, x_T.device, "x_T")
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a Plan (from ddim_plan, euler_plan, ...), got {type(plan).__name__}")
    if plan.coeffs.shape[1:] != (NUM_COEFFICIENTS,):
        raise ValueError(f"plan.coeffs must have shape (E, {NUM_COEFFICIENTS}), got {tuple(plan.coeffs.shape)}")
    if guidance_scale is not None and not isinstance(guidance_scale, (int, float)):
        raise TypeError(f"guidance_scale must be None or a float, got {type(guidance_scale).__name__}")
    if guidance_rescale and guidance_scale is None:
        raise ValueError("guidance_rescale needs guidance_scale (classifier-free guidance)")
    if (known is None) != (mask is None):
        raise ValueError("known and mask go together: give both (inpainting) or neither")


@dataclass(frozen=True, eq=False)
class Loop:
    """What every evaluation of a sampling loop reads besides its state: made once, checked, by
    `prepare_loop`; each evaluation is then `step`."""

    model: Model
    plan: Plan  # on the state's device, fp32 coefficients
    seeds: torch.Tensor  # (B,) int64
    guidance_scale: float | None  # None: no classifier-free guidance
    guidance_rescale: float
    clip_x0: float | None
    known: torch.Tensor | None  # inpainting: the known image and the mask (in the state's dtype)
    mask: torch.Tensor | None
    model_t: tuple[torch.Tensor, ...]  # per evaluation, the model's t: (B,) or (2B,) under guidance
    coeffs: tuple[torch.Tensor, ...]  # per evaluation, its (K,) row of plan.coeffs


def prepare_loop(
    model: Model,
    x_T: torch.Tensor,
    seeds: torch.Tensor,
    plan: Plan,
    *,
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
    clip_x0: float | None = None,
    known: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> Loop:
    """Check `sample`'s arguments (all but the model's outputs, checked per evaluation) and put what
    the evaluations read on x_T's device, once."""
    _validate_sample(x_T, seeds, plan, guidance_scale, guidance_rescale, known, mask)
    device, B = x_T.device, x_T.shape[0]
    if plan.coeffs.device != device or plan.coeffs.dtype != torch.float32:
        plan = plan.to(device)
    if isinstance(mask, torch.Tensor) and mask.dtype != x_T.dtype and mask.is_floating_point():
        mask = mask.to(x_T.dtype)
    guided = guidance_scale is not None
    check_step_arguments(
        x_T, guided=guided, guidance_scale=guidance_scale if guided else 1.0, guidance_rescale=guidance_rescale,
        clip_x0=clip_x0, seeds=seeds, add_noise=any(plan.add_noise), known=known, mask=mask,
    )  # fmt: skip
    model_t = tuple(t.expand(2 * B if guided else B) for t in plan.timesteps.unbind(0))
    coeffs = plan.coeffs.unbind(0)
    return Loop(model, plan, seeds, guidance_scale, guidance_rescale, clip_x0, known, mask, model_t, coeffs)


def step(
    loop: Loop, i: int, x: torch.Tensor, x0: torch.Tensor | None = None, *, coeffs: torch.Tensor | None = None,
    key: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Evaluation ``i`` of ``loop.plan`` from the state x_t (B, ...): ``(x_next, x0)``.

    One model call and one fused update (`fastdiff.ops.sampler_step`, unchecked: `prepare_loop`
    checked everything but the model's output, which is checked here, the model being the
    caller's code).  With c = the plan's row i, ô the (guided) model output and z ~ N(0, I)
    keyed by (seed_b, key):

        x̂0 = c.x0_from_x·x_t + c.x0_from_out·ô        ε̂ = c.eps_from_x·x_t + c.eps_from_out·ô
        x̂0 ← clamp(x̂0, −clip_x0, clip_x0)            (with ``clip_x0``)
        x'  = c.x·x_t + c.x0·x̂0 + c.x0_prev·x̂0_prev + c.eps·ε̂ + c.noise·z
        x'  ← m·x' + (1 − m)·(c.known·x_known + c.known_noise·z')     (inpainting, where the plan blends)

    x0: the x̂0 the previous evaluation returned, read where ``plan.reads_x0[i]`` (DPM-Solver++'s
    history, Heun's corrector); the returned x0 is this evaluation's x̂0 where ``plan.keeps_x0[i]``,
    else None.  Running i = 0 … E − 1 from (x_T, None) is `sample`.  ``coeffs`` and ``key`` replace
    the row (K,) and the noise's step key (default i) for a loop that revisits evaluations (RePaint's
    jumps, `fastdiff.apps.inpaint`): every key must be used once per image for the draws to be fresh.
    """
    plan, guided = loop.plan, loop.guidance_scale is not None
    t = loop.model_t[i]
    if guided:
        out = loop.model(torch.cat([x, x]), t)
        if out.shape[0] != t.shape[0]:
            raise ValueError(f"model must return (2B, ...) = ({t.shape[0]}, ...) under guidance, got {tuple(out.shape)}")
        out_u, out_c = out.chunk(2)
    else:
        out_u, out_c = None, loop.model(x, t)
    check_model_output(x, out_c, out_u)
    blend = plan.blends[i]
    return sampler_step_unchecked(
        x, out_c, loop.coeffs[i] if coeffs is None else coeffs, uncond_output=out_u,
        guidance_scale=loop.guidance_scale if guided else 1.0, guidance_rescale=loop.guidance_rescale,
        clip_x0=loop.clip_x0, x0_prev=x0 if plan.reads_x0[i] else None, return_x0=plan.keeps_x0[i],
        seeds=loop.seeds, step=i if key is None else key, add_noise=plan.add_noise[i],
        known=loop.known if blend else None, mask=loop.mask if blend else None,
    )  # fmt: skip


def sample(
    model: Model,
    x_T: torch.Tensor,
    seeds: torch.Tensor,
    plan: Plan,
    *,
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
    clip_x0: float | None = None,
    known: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run ``plan`` from x_T (B, ...) and return the sample (x's dtype).

    model(x, t) -> prediction of the plan's type; t is a (B,) tensor of the plan's timesteps.
    guidance_scale: classifier-free guidance; the model is then called on the doubled batch
    ``cat([x, x])`` and must return (2B, ...) with the *unconditional* half first (diffusers'
    convention).  guidance_rescale: φ of Lin et al. 2023.  clip_x0: clamp x̂0 to [−r, r].
    known, mask: inpainting — mask (B, ...) or (B, 1, ...) is 1 where the image is repainted;
    the returned image equals ``known`` where mask is 0.  seeds (B,) int64: one per image.
    """
    loop = prepare_loop(
        model, x_T, seeds, plan, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, clip_x0=clip_x0,
        known=known, mask=mask,
    )  # fmt: skip
    x, x0 = x_T, None
    for i in range(len(loop.plan)):
        x, x0 = step(loop, i, x, x0)
    return x
