"""Samplers: trajectories against diffusers' schedulers, the exact Gaussian posterior, inpainting, seeds.

Sampler-level tests run on the PyTorch reference of the fused step (fast, many samples);
`test_loop_runs_the_kernel` runs one short loop through the Triton kernel (interpreter on CPU).
"""
import math

import numpy as np
import pytest
import torch

from fastdiff import samplers
from fastdiff.ops import _backend, use_backend
from fastdiff.ops.fused_step import step_noise_ref

from fastdiff.ops import fused_step as step_mod
from fastdiff.schedule import make_schedule

diffusers = pytest.importorskip("diffusers")

T = 1000
SHAPE = (2, 3, 5, 4)  # (B, C, H, W): small and odd


@pytest.fixture
def reference():
    with use_backend("reference"):
        yield


def toy_model(x, t):
    """A deterministic, smooth, t-dependent stand-in for a network; t is () or (B,)."""
    tt = torch.as_tensor(t, dtype=torch.float64).reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    # the roll couples neighbouring pixels, so that a known region steers the repainted one
    return 0.7 * torch.tanh(1.1 * x + 0.002 * tt) + 0.3 * torch.sin(0.5 * x.roll(1, -1) - 0.004 * tt)


class Recorder:
    """Wraps a model and records every input it sees (the sampler's trajectory)."""

    def __init__(self, fn=toy_model):
        self.fn, self.inputs = fn, []

    def __call__(self, x, t):
        self.inputs.append(x.detach().clone())
        return self.fn(x, t)


def seeds_for(batch: int) -> torch.Tensor:
    return torch.randint(-(2**62), 2**62, (batch,), dtype=torch.int64)


# ----------------------------------------------------------------------------- vs diffusers

BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
PRED_NAMES = {"epsilon": "epsilon", "v": "v_prediction", "sample": "sample"}


def _ours_and_theirs(name, prediction, steps, opts):
    """(our plan, diffusers scheduler, scheduler works in σ-space, clip) for one configuration."""
    sched = make_schedule("scaled_linear", T)
    S = diffusers
    common = dict(num_train_timesteps=T, prediction_type=PRED_NAMES[prediction], **BETAS)
    clip = opts.get("clip")
    if name == "ddpm":
        theirs = S.DDPMScheduler(variance_type=opts["variance"], clip_sample=clip is not None,
                                 clip_sample_range=clip or 1.0, **common)  # fmt: skip
    elif name == "ddim":
        theirs = S.DDIMScheduler(clip_sample=clip is not None, clip_sample_range=clip or 1.0,
                                 set_alpha_to_one=opts.get("final_alpha_one", True), **common)  # fmt: skip
    elif name == "euler":
        theirs = S.EulerDiscreteScheduler(**common)
    elif name == "euler_ancestral":
        theirs = S.EulerAncestralDiscreteScheduler(**common)
    elif name == "dpmpp_2m":
        theirs = S.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, **common)
    elif name == "heun":
        theirs = S.HeunDiscreteScheduler(clip_sample=clip is not None, clip_sample_range=clip or 1.0, **common)
    theirs.set_timesteps(steps)
    ts = theirs.timesteps
    if name == "heun":  # diffusers lists the timesteps of every evaluation; the plan takes the N distinct ones
        ts = torch.cat([ts[:1], ts[1::2]])
    plan_fn = {
        "ddpm": lambda: samplers.ddpm_plan(sched, ts, variance=opts["variance"], prediction=prediction),
        "ddim": lambda: samplers.ddim_plan(sched, ts, eta=opts.get("eta", 0.0), prediction=prediction,
                                           final_alpha_one=opts.get("final_alpha_one", True)),
        "euler": lambda: samplers.euler_plan(sched, ts, prediction=prediction),
        "euler_ancestral": lambda: samplers.euler_ancestral_plan(sched, ts, prediction=prediction),
        "dpmpp_2m": lambda: samplers.dpmpp_2m_plan(sched, ts, prediction=prediction),
        "heun": lambda: samplers.heun_plan(sched, ts, prediction=prediction),
    }  # fmt: skip
    sigma_space = name in ("euler", "euler_ancestral", "heun")
    return plan_fn[name](), theirs, sigma_space, clip


CONFIGS = [
    ("ddpm", "epsilon", dict(variance="fixed_small")),
    ("ddpm", "v", dict(variance="fixed_large")),
    ("ddpm", "epsilon", dict(variance="fixed_small", clip=1.0)),
    ("ddpm", "sample", dict(variance="fixed_large")),
    ("ddim", "epsilon", dict(eta=0.0)),
    ("ddim", "v", dict(eta=0.0, final_alpha_one=False)),
    ("ddim", "epsilon", dict(eta=0.6, clip=1.5)),
    ("ddim", "sample", dict(eta=1.0)),
    ("euler", "epsilon", {}),
    ("euler", "v", {}),
    ("euler_ancestral", "epsilon", {}),
    ("euler_ancestral", "v", {}),
    ("dpmpp_2m", "epsilon", {}),
    ("dpmpp_2m", "v", {}),
    ("dpmpp_2m", "sample", {}),
    ("heun", "epsilon", {}),
    ("heun", "v", {}),
]


@pytest.mark.parametrize("name,prediction,opts", CONFIGS, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CONFIGS])
def test_matches_diffusers(name, prediction, opts, reference, monkeypatch):
    steps = 10
    plan, theirs, sigma_space, clip = _ours_and_theirs(name, prediction, steps, opts)
    seeds = seeds_for(SHAPE[0])
    x_T = samplers.initial_noise(seeds, SHAPE)
    ours = Recorder()
    x_ours = samplers.sample(ours, x_T, seeds, plan, clip_x0=clip)

    # diffusers, fed the noise our sampler drew at each evaluation (same Philox keys)
    noises = [step_noise_ref(seeds, i, SHAPE, 1)[0] for i in range(len(plan))]
    calls = iter(range(len(plan)))
    module = type(theirs).__module__
    monkeypatch.setattr(f"{module}.randn_tensor", lambda *a, **k: noises[next(calls)], raising=False)
    sample = x_T.clone()
    if sigma_space:  # x̃ = x/α: diffusers' Euler-type schedulers keep the σ-space state
        sample = sample * math.sqrt(1 + float(theirs.sigmas[0]) ** 2)
    rec = Recorder()
    for i, t in enumerate(theirs.timesteps):
        out = rec(theirs.scale_model_input(sample, t), t)
        kwargs = {}
        if name == "ddim" and opts.get("eta", 0.0) > 0:
            kwargs = dict(eta=opts["eta"], variance_noise=noises[i])
        sample = theirs.step(out, t, sample, **kwargs).prev_sample

    assert len(ours.inputs) == len(rec.inputs)
    for i, (a, b) in enumerate(zip(ours.inputs, rec.inputs)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), f"model input {i}: max diff {(a - b).abs().max():.2e}"
    err = (x_ours - sample).abs().max().item()
    assert err < 2e-5 * max(1.0, sample.abs().max().item()), f"final sample differs by {err:.2e}"


# ----------------------------------------------------------------------------- exact Gaussian
#
# Data x0 ~ N(μ, Σ).  x_t = a·x0 + s·ε (a = sqrt(ᾱ), s = sqrt(1 − ᾱ)) is N(aμ, ᾱΣ + (1 − ᾱ)I), and
#     ε*(x_t) = E[ε | x_t] = Cov(ε, x_t)·Cov(x_t)⁻¹·(x_t − aμ) = s·(ᾱΣ + (1 − ᾱ)I)⁻¹·(x_t − aμ),
# the exact ε-predictor; x0* = (x_t − s·ε*)/a and v* = a·ε* − s·x0*.  Each is affine in x_t, so
# a sampler driven by it is an affine-Gaussian chain whose output law can also be computed
# exactly.  Two tests together prove the end-to-end claim:
#   1. the samples the loop draws follow the chain's exact law, within sampling error;
#   2. the chain's law converges to N(μ, Σ) as the steps get finer.

D = 3


def gaussian_problem():
    """Data x0 ~ N(μ, Σ) in D dimensions, Σ well conditioned with eigenvalues in [0.1, 2]."""
    mu = torch.randn(D, dtype=torch.float64) * 0.7
    q, _ = torch.linalg.qr(torch.randn(D, D, dtype=torch.float64))
    evals = torch.empty(D, dtype=torch.float64).uniform_(0.1, 2.0)
    return mu, q @ torch.diag(evals) @ q.T


def abar_at(t: float, schedule) -> float:
    """ᾱ at a (fractional) timestep: 1/(1 + σ(t)²) with σ interpolated linearly, as the samplers do."""
    sig = schedule.sigmas.numpy()
    s_t = float(np.interp(t, np.arange(len(sig)), sig))
    return 1.0 / (1.0 + s_t * s_t)


def exact_affine(mu, cov, abar, prediction):
    """(G, g) with the exact prediction = G·x_t + g, float64."""
    a, s = math.sqrt(abar), math.sqrt(1 - abar)
    eye = torch.eye(D, dtype=torch.float64)
    A = torch.linalg.inv(abar * cov + (1 - abar) * eye)
    G_eps, g_eps = s * A, -s * a * (A @ mu)
    if prediction == "epsilon":
        return G_eps, g_eps
    # x0* = E[x0 | x_t] = μ + a·Σ·A·(x_t − aμ), which is (x_t − s·ε*)/a but defined at ᾱ = 0
    G_x0, g_x0 = a * cov @ A, mu - a * a * (cov @ A @ mu)
    if prediction == "sample":
        return G_x0, g_x0
    return a * G_eps - s * G_x0, a * g_eps - s * g_x0


def exact_model(mu, cov, schedule, prediction):
    """model(x, t) for samples laid out along dim 2 of x = (B, D, M)."""

    def model(x, t):
        G, g = exact_affine(mu, cov, abar_at(float(t.reshape(-1)[0]), schedule), prediction)
        out = torch.einsum("ij,bjm->bim", G, x.double()) + g.view(1, D, 1)
        return out.to(x.dtype)

    return model


def chain_law(plan, mu, cov, schedule, prediction, exact_prior=False):
    """Exact mean and covariance of the plan's output under the exact model.

    From x_T ~ N(0, I) (what the loop is given), or with ``exact_prior`` from the true marginal
    N(aμ, ᾱΣ + (1 − ᾱ)I) at the first timestep — without the prior's mismatch (ᾱ_T > 0), which
    is the schedule's bias, not the sampler's.  The loop's state is (x, k), k the kept x̂0;
    each evaluation maps it affinely and adds e·z.
    """
    eye, zero = torch.eye(D, dtype=torch.float64), torch.zeros(D, D, dtype=torch.float64)
    m = torch.zeros(2 * D, dtype=torch.float64)
    P = torch.block_diag(eye, zero)
    if exact_prior:
        abar = abar_at(float(plan.timesteps[0]), schedule)
        m[:D] = math.sqrt(abar) * mu
        P[:D, :D] = abar * cov + (1 - abar) * eye
    idx = {n: i for i, n in enumerate(step_mod.COEFFICIENTS)}
    for i in range(len(plan)):
        c = {n: float(plan.coeffs[i, j]) for n, j in idx.items()}
        G, g = exact_affine(mu, cov, abar_at(float(plan.timesteps[i]), schedule), prediction)
        H, h = c["x0_from_x"] * eye + c["x0_from_out"] * G, c["x0_from_out"] * g  # x̂0 = H·x + h
        E, e = c["eps_from_x"] * eye + c["eps_from_out"] * G, c["eps_from_out"] * g  # ε̂ = E·x + e
        Mx = c["x"] * eye + c["x0"] * H + c["eps"] * E
        Mk = c["x0_prev"] * eye if plan.reads_x0[i] else zero
        top = torch.cat([Mx, Mk], 1)
        bottom = torch.cat([H, zero], 1) if plan.keeps_x0[i] else torch.cat([zero, eye], 1)
        M = torch.cat([top, bottom], 0)
        const = torch.cat([c["x0"] * h + c["eps"] * e, h if plan.keeps_x0[i] else torch.zeros(D, dtype=torch.float64)])
        m = M @ m + const
        P = M @ P @ M.T + torch.block_diag(c["noise"] ** 2 * eye, zero)
    return m[:D], P[:D, :D]


def check_moments(x, mean, cov):
    """Sample mean and covariance of x (B, D, M) within 5 standard errors of the law N(mean, cov)."""
    pts = x.double().permute(0, 2, 1).reshape(-1, D)
    n = pts.shape[0]
    var = torch.diagonal(cov)
    mean_tol = 5 * (var / n).sqrt()
    got = pts.mean(0)
    assert ((got - mean).abs() <= mean_tol).all(), f"mean {got.tolist()} vs {mean.tolist()} (tol {mean_tol.tolist()})"
    cov_tol = 5 * ((var[:, None] * var[None, :] + cov**2) / n).sqrt()
    emp = torch.cov(pts.T)
    assert ((emp - cov).abs() <= cov_tol).all(), f"covariance\n{emp}\nvs\n{cov}\n(tol {cov_tol})"


GAUSS = [
    ("ddpm", "epsilon", lambda s, ts: samplers.ddpm_plan(s, ts)),
    ("ddpm-large", "v", lambda s, ts: samplers.ddpm_plan(s, ts, variance="fixed_large", prediction="v")),
    ("ddim", "epsilon", lambda s, ts: samplers.ddim_plan(s, ts)),
    ("ddim-eta", "sample", lambda s, ts: samplers.ddim_plan(s, ts, eta=0.7, prediction="sample")),
    ("euler", "v", lambda s, ts: samplers.euler_plan(s, ts, prediction="v")),
    ("euler_ancestral", "epsilon", lambda s, ts: samplers.euler_ancestral_plan(s, ts)),
    ("dpmpp_2m", "epsilon", lambda s, ts: samplers.dpmpp_2m_plan(s, ts)),
    ("dpmpp_2m", "sample", lambda s, ts: samplers.dpmpp_2m_plan(s, ts, prediction="sample")),
    ("heun", "v", lambda s, ts: samplers.heun_plan(s, ts, prediction="v")),
]
GAUSS_IDS = [f"{g[0]}-{g[1]}" for g in GAUSS]


@pytest.mark.parametrize("name,prediction,make_plan", GAUSS, ids=GAUSS_IDS)
def test_gaussian_samples_follow_the_chain(name, prediction, make_plan, reference):
    """20000 samples drawn by the loop have the chain's exact mean and covariance."""
    from fastdiff.schedule import timesteps

    sched = make_schedule("linear", T)
    mu, cov = gaussian_problem()
    plan = make_plan(sched, timesteps(25, T, "trailing"))
    seeds = seeds_for(4)
    x = samplers.sample(exact_model(mu, cov, sched, prediction), samplers.initial_noise(seeds, (4, D, 5000)),
                        seeds, plan)  # fmt: skip
    check_moments(x, *chain_law(plan, mu, cov, sched, prediction))


@pytest.mark.parametrize("name,prediction,make_plan", GAUSS, ids=GAUSS_IDS)
def test_gaussian_chain_converges_to_the_data(name, prediction, make_plan):
    """The sampler's exact output law approaches N(μ, Σ) as the steps get finer (from the exact
    prior): with all 1000 timesteps it is within 2% of Σ and 1e-3 of μ, and finer is closer."""
    from fastdiff.schedule import timesteps

    sched = make_schedule("linear", T)
    mu, cov = gaussian_problem()
    errs = []
    for steps in (50, 200, 1000):
        plan = make_plan(sched, timesteps(steps, T, "trailing"))
        mean, c = chain_law(plan, mu, cov, sched, prediction, exact_prior=True)
        errs.append((((c - cov).abs().max() / cov.abs().max()).item(), (mean - mu).abs().max().item()))
    assert errs[-1][0] < 0.02 and errs[-1][1] < 1e-3, errs
    for (coarse, _), (fine, _) in zip(errs, errs[1:]):
        assert fine < coarse or fine < 1e-4, errs


# Worst relative covariance error over 21500 random problems: 0.31, 0.16, 0.12 (medians
# 0.23, 0.06, 0.006); a Heun corrector at s ≈ 2·10⁴ is off by about 38.
@pytest.mark.parametrize("name,tol", [("euler", 0.5), ("dpmpp_2m", 0.25), ("heun", 0.2)])
def test_sigma_space_samplers_start_from_a_huge_noise_level(name, tol):
    """A cosine schedule's t = T − 1 is s ≈ 2·10⁴: the exact output law of 10 steps from x_T ~ N(0, I)
    is still close to the data (Heun's corrector would amplify x̂0 differences ~1000× there)."""
    from fastdiff.pipelines import make_plan

    sched = make_schedule("cosine", T)
    assert float(sched.sigmas[-1]) > 1e4
    mu, cov = gaussian_problem()
    mean, c = chain_law(make_plan(name, sched, 10, "v"), mu, cov, sched, "v")
    assert ((c - cov).abs().max() / cov.abs().max()).item() < tol  # first order (Euler) is the loosest
    assert (mean - mu).abs().max().item() < 1e-3


def test_gaussian_check_has_power(reference):
    """The moment check rejects samples from a slightly different chain (schedule β × 1.3)."""
    from fastdiff.schedule import Schedule, timesteps

    sched = make_schedule("linear", T)
    mu, cov = gaussian_problem()
    plan = samplers.ddim_plan(sched, timesteps(25, T, "trailing"))
    wrong = samplers.ddim_plan(Schedule(sched.betas * 1.3), timesteps(25, T, "trailing"))
    seeds = seeds_for(4)
    model = exact_model(mu, cov, sched, "epsilon")
    x = samplers.sample(model, samplers.initial_noise(seeds, (4, D, 5000)), seeds, wrong)
    with pytest.raises(AssertionError):
        check_moments(x, *chain_law(plan, mu, cov, sched, "epsilon"))


def test_loop_runs_the_kernel(monkeypatch, device):
    """One short loop through the Triton kernel: it runs at every step, agrees with the reference
    loop, and its samples follow the chain's law within this smaller sample's error."""
    from fastdiff.schedule import timesteps

    calls = []
    real = step_mod._sampler_step_triton

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    sched = make_schedule("linear", T)
    mu, cov = gaussian_problem()
    plan = samplers.ddpm_plan(sched, timesteps(20, T, "trailing")).to(device)
    seeds = seeds_for(2).to(device)
    x_T = samplers.initial_noise(seeds, (2, D, 300))
    exact = exact_model(mu, cov, sched, "epsilon")  # float64 on the CPU

    def model(x, t):
        return exact(x.cpu(), t.cpu()).to(x.device)

    monkeypatch.setattr(step_mod, "_sampler_step_triton", spy)
    x_kernel = samplers.sample(model, x_T, seeds, plan)
    assert len(calls) == len(plan)
    with use_backend("reference"):
        x_ref = samplers.sample(model, x_T, seeds, plan)
    assert x_kernel.device == x_T.device
    assert torch.allclose(x_kernel, x_ref, rtol=1e-4, atol=1e-4)
    check_moments(x_kernel.cpu(), *chain_law(plan, mu, cov, sched, "epsilon"))


# ----------------------------------------------------------------------------- guidance, inpainting, seeds


def guided_pair(x, t):
    """(2B, ...) output of a toy conditional model: unconditional half first."""
    B = x.shape[0] // 2
    return torch.cat([toy_model(x[:B], t[:B]), 1.5 * toy_model(x[B:], t[B:] + 10) + 0.2])


@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_guidance_in_the_loop(rescale, reference):
    """sample(guidance_scale=w) equals an unguided loop whose model does the guidance itself."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    sched = make_schedule("scaled_linear", T)
    from fastdiff.schedule import timesteps

    plan = samplers.dpmpp_2m_plan(sched, timesteps(8, T, "leading"))
    seeds = seeds_for(SHAPE[0])
    x_T = samplers.initial_noise(seeds, SHAPE)
    w = 4.0

    def pre_guided(x, t):
        out = guided_pair(torch.cat([x, x]), torch.cat([t, t]))
        u, c = out.chunk(2)
        g = u + w * (c - u)
        return rescale_noise_cfg(g, c, guidance_rescale=rescale) if rescale else g

    a = samplers.sample(guided_pair, x_T, seeds, plan, guidance_scale=w, guidance_rescale=rescale)
    b = samplers.sample(pre_guided, x_T, seeds, plan)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


INPAINT_PLANS = {
    "ddpm": lambda s, ts: samplers.ddpm_plan(s, ts),
    "ddim": lambda s, ts: samplers.ddim_plan(s, ts, eta=0.5, final_alpha_one=False),
    "euler": lambda s, ts: samplers.euler_plan(s, ts),
    "euler_ancestral": lambda s, ts: samplers.euler_ancestral_plan(s, ts),
    "dpmpp_2m": lambda s, ts: samplers.dpmpp_2m_plan(s, ts, prediction="v"),
    "heun": lambda s, ts: samplers.heun_plan(s, ts),
}


@pytest.mark.parametrize("name", list(INPAINT_PLANS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inpainting_keeps_the_known_region(name, dtype, reference):
    from fastdiff.schedule import timesteps

    sched = make_schedule("scaled_linear", T)
    plan = INPAINT_PLANS[name](sched, timesteps(6, T, "trailing"))
    seeds = seeds_for(SHAPE[0])
    x_T = samplers.initial_noise(seeds, SHAPE, dtype)
    known = torch.randn(SHAPE).to(dtype)
    mask = (torch.rand(SHAPE[0], 1, *SHAPE[2:]) < 0.5).to(dtype)  # 1 = repaint
    x = samplers.sample(toy_model, x_T, seeds, plan, known=known, mask=mask)
    keep = (mask == 0).expand(SHAPE)
    assert torch.equal(x[keep], known[keep])
    free = samplers.sample(toy_model, x_T, seeds, plan)
    assert not torch.equal(x[~keep], free[~keep])  # the known region steered the repainted one


def test_inpainting_through_the_kernel():
    """The known region is exact through the kernel too (interpreter on CPU)."""
    from fastdiff.schedule import timesteps

    sched = make_schedule("scaled_linear", T)
    plan = samplers.euler_ancestral_plan(sched, timesteps(3, T, "trailing"))
    seeds = seeds_for(SHAPE[0])
    x_T = samplers.initial_noise(seeds, SHAPE, torch.float16)
    known = torch.randn(SHAPE).half()
    mask = (torch.rand(SHAPE) < 0.5).half()
    x = samplers.sample(toy_model, x_T, seeds, plan, known=known, mask=mask)
    keep = mask == 0
    assert torch.equal(x[keep], known[keep])


def test_each_image_reproducible_alone(reference):
    """Image b depends only on seeds[b]: the same in a batch of 3 as alone."""
    from fastdiff.schedule import timesteps

    sched = make_schedule("scaled_linear", T)
    plan = samplers.euler_ancestral_plan(sched, timesteps(5, T, "trailing"))
    seeds = seeds_for(3)
    shape = (3, 2, 7, 3)
    known = torch.randn(shape)
    mask = (torch.rand(3, 1, 7, 3) < 0.5).float()
    batch = samplers.sample(
        guided_pair, samplers.initial_noise(seeds, shape), seeds, plan, known=known, mask=mask,
        guidance_scale=3.0, guidance_rescale=0.5,
    )  # fmt: skip
    one = samplers.sample(
        guided_pair, samplers.initial_noise(seeds[1:2], (1, *shape[1:])), seeds[1:2], plan, known=known[1:2],
        mask=mask[1:2], guidance_scale=3.0, guidance_rescale=0.5,
    )  # fmt: skip
    assert torch.equal(batch[1:2], one)
    other = samplers.initial_noise(seeds[:1] + 1, (1, *shape[1:]))
    assert not torch.equal(other, samplers.initial_noise(seeds[:1], (1, *shape[1:])))


def test_plan_is_device_ready():
    """The loop reads coefficients from a device tensor: a prepared plan is used as is."""
    from fastdiff.schedule import timesteps

    plan = samplers.ddim_plan(make_schedule("linear", T), timesteps(4, T)).to("cpu")
    assert plan.coeffs.dtype == torch.float32 and plan.coeffs.shape == (4, step_mod.NUM_COEFFICIENTS)
    assert plan.timesteps.dtype == torch.int64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_loop_has_no_sync_and_captures_in_a_cuda_graph():
    from fastdiff.schedule import timesteps

    if _backend.INTERPRET:
        pytest.skip("the interpreter runs on CPU tensors")
    sched = make_schedule("scaled_linear", T)
    plan = samplers.dpmpp_2m_plan(sched, timesteps(6, T, "trailing")).to("cuda")
    seeds = seeds_for(2).cuda()
    x_T = samplers.initial_noise(seeds, (2, 4, 16, 16))
    known = torch.randn_like(x_T)
    mask = (torch.rand(2, 1, 16, 16, device="cuda") < 0.5).float()
    kw = dict(known=known, mask=mask, guidance_scale=5.0, guidance_rescale=0.7)
    eager = samplers.sample(guided_pair, x_T, seeds, plan, **kw)
    torch.cuda.set_sync_debug_mode("error")
    try:
        samplers.sample(guided_pair, x_T, seeds, plan, **kw)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    static_x = x_T.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        samplers.sample(guided_pair, static_x, seeds, plan, **kw)  # warm-up: compile kernels outside capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = samplers.sample(guided_pair, static_x, seeds, plan, **kw)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, eager)


# ----------------------------------------------------------------------------- checks once, unchecked steps


def checked_loop(model, x_T, seeds, plan, *, guidance_scale=None, guidance_rescale=0.0, clip_x0=None, known=None,
                 mask=None):  # fmt: skip
    """`samplers.sample` as it was before it checked its arguments once: every step through the
    public op, which checks them all again."""
    plan = plan.to(x_T.device)
    if mask is not None:
        mask = mask.to(x_T.dtype)
    guided, B = guidance_scale is not None, x_T.shape[0]
    x, x0 = x_T, None
    for i in range(len(plan)):
        t = plan.timesteps[i].expand(2 * B if guided else B)
        out_u, out_c = model(torch.cat([x, x]), t).chunk(2) if guided else (None, model(x, t))
        x, x0 = step_mod.sampler_step(
            x, out_c, plan.coeffs[i], uncond_output=out_u, guidance_scale=guidance_scale if guided else 1.0,
            guidance_rescale=guidance_rescale, clip_x0=clip_x0, x0_prev=x0 if plan.reads_x0[i] else None,
            return_x0=plan.keeps_x0[i], seeds=seeds, step=i, add_noise=plan.add_noise[i],
            known=known if plan.blends[i] else None, mask=mask if plan.blends[i] else None,
        )  # fmt: skip
    return x


def loop_case(name: str, dtype=torch.float32):
    """A plan and `sample`'s arguments that use every path of the fused step between them."""
    from fastdiff.schedule import timesteps

    sched = make_schedule("scaled_linear", T)
    seeds = seeds_for(SHAPE[0])
    x_T = samplers.initial_noise(seeds, SHAPE, dtype)
    known = torch.randn(SHAPE).to(dtype)
    if name == "ddpm":  # noise, guidance with rescale, per-pixel inpainting mask
        plan = samplers.ddpm_plan(sched, timesteps(4, T, "trailing"))
        mask = (torch.rand(SHAPE[0], 1, *SHAPE[2:]) < 0.5).float()  # converted to x's dtype once
        return guided_pair, x_T, seeds, plan, dict(guidance_scale=3.0, guidance_rescale=0.5, known=known, mask=mask)
    if name == "dpmpp_2m":  # the previous x̂0, clipping
        plan = samplers.dpmpp_2m_plan(sched, timesteps(4, T, "leading"), prediction="v")
        return toy_model, x_T, seeds, plan, dict(clip_x0=1.0)
    plan = samplers.heun_plan(sched, timesteps(3, T, "trailing"))  # x̂0 kept for the corrector, blends after it
    mask = (torch.rand(SHAPE) < 0.5).to(dtype)
    return toy_model, x_T, seeds, plan, dict(guidance_scale=None, known=known, mask=mask)


@pytest.mark.parametrize("name", ["ddpm", "dpmpp_2m", "heun"])
def test_loop_equals_the_checked_loop(name, reference):
    """The loop's unchecked steps give the checked loop's samples, bit for bit."""
    model, x_T, seeds, plan, kw = loop_case(name)
    assert torch.equal(samplers.sample(model, x_T, seeds, plan, **kw), checked_loop(model, x_T, seeds, plan, **kw))


def test_loop_equals_the_checked_loop_through_the_kernel():
    """Also where the step runs the Triton kernel (the interpreter on a CPU)."""
    model, x_T, seeds, plan, kw = loop_case("ddpm", torch.bfloat16)
    assert torch.equal(samplers.sample(model, x_T, seeds, plan, **kw), checked_loop(model, x_T, seeds, plan, **kw))


@pytest.mark.parametrize("name", ["ddpm", "heun"])
def test_loop_checks_its_arguments_once(name, monkeypatch, reference):
    """`sample` checks its arguments once and each model output per evaluation; its steps never
    go through the op's own checks."""
    model, x_T, seeds, plan, kw = loop_case(name)
    calls = {"arguments": 0, "outputs": 0}

    def counted(key, fn):
        def spy(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)

        return spy

    def refuse(*args, **kwargs):
        raise AssertionError("a loop step went through sampler_step's own checks")

    monkeypatch.setattr(samplers, "check_step_arguments", counted("arguments", samplers.check_step_arguments))
    monkeypatch.setattr(samplers, "check_model_output", counted("outputs", samplers.check_model_output))
    monkeypatch.setattr(step_mod, "_validate", refuse)
    monkeypatch.setattr(step_mod, "sampler_step", refuse)
    samplers.sample(model, x_T, seeds, plan, **kw)
    assert calls == {"arguments": 1, "outputs": len(plan)}


@pytest.mark.parametrize("name", ["ddpm", "dpmpp_2m", "heun"])
def test_step_runs_the_plan(name, reference):
    """`samplers.step` over i = 0 … E − 1 from (x_T, None) is `sample`, bit for bit; a replaced
    row and noise key are the op's own update with that row and key."""
    model, x_T, seeds, plan, kw = loop_case(name)
    loop = samplers.prepare_loop(model, x_T, seeds, plan, **kw)
    x, x0 = x_T, None
    for i in range(len(plan)):
        x, x0 = samplers.step(loop, i, x, x0)
    assert torch.equal(x, samplers.sample(model, x_T, seeds, plan, **kw))
    assert x0 is None  # the last evaluation keeps no x̂0

    i = int(torch.randint(len(plan), ()))  # any evaluation, with a fresh row and a key the plan never uses
    row = plan.coeffs[i].to(torch.float32) * (1 + torch.rand(plan.coeffs.shape[1]))
    key = int(torch.randint(len(plan), 2**20, ()))
    x_i = torch.randn_like(x_T)
    x0_prev = torch.randn_like(x_T) if plan.reads_x0[i] else None
    got = samplers.step(loop, i, x_i, x0_prev, coeffs=row, key=key)
    guided, B = loop.guidance_scale is not None, x_T.shape[0]
    t = plan.timesteps[i].expand(2 * B if guided else B)
    out_u, out_c = model(torch.cat([x_i, x_i]), t).chunk(2) if guided else (None, model(x_i, t))
    blend = plan.blends[i]
    want = step_mod.sampler_step(
        x_i, out_c, row, uncond_output=out_u, guidance_scale=kw.get("guidance_scale") or 1.0,
        guidance_rescale=kw.get("guidance_rescale", 0.0), clip_x0=kw.get("clip_x0"), x0_prev=x0_prev,
        return_x0=plan.keeps_x0[i], seeds=seeds, step=key, add_noise=plan.add_noise[i],
        known=kw.get("known") if blend else None, mask=loop.mask if blend else None,
    )  # fmt: skip
    assert torch.equal(got[0], want[0])
    assert (got[1] is None) == (want[1] is None) and (got[1] is None or torch.equal(got[1], want[1]))
    default = samplers.step(loop, i, x_i, x0_prev)
    assert not torch.equal(default[0], got[0])  # the row (and, where the step draws noise, the key) matter


def test_loop_checks_each_model_output(reference):
    """A model whose output goes wrong after the first evaluation is caught at that evaluation."""
    model, x_T, seeds, plan, kw = loop_case("dpmpp_2m")
    seen = []

    def drifting(x, t):
        seen.append(1)
        return toy_model(x, t) if len(seen) < 3 else toy_model(x, t)[:, :2]

    with pytest.raises(ValueError, match="model_output"):
        samplers.sample(drifting, x_T, seeds, plan, **kw)
    assert len(seen) == 3


# ----------------------------------------------------------------------------- bad input


def test_plan_errors():
    from fastdiff.schedule import timesteps

    sched = make_schedule("linear", T)
    ts = timesteps(10, T)
    with pytest.raises(ValueError, match="prediction"):
        samplers.ddim_plan(sched, ts, prediction="eps")
    with pytest.raises(ValueError, match="eta"):
        samplers.ddim_plan(sched, ts, eta=1.5)
    with pytest.raises(ValueError, match="variance"):
        samplers.ddpm_plan(sched, ts, variance="learned")
    with pytest.raises(ValueError, match="timesteps"):
        samplers.ddim_plan(sched, ts.flip(0))
    with pytest.raises(ValueError, match="timesteps"):
        samplers.euler_plan(sched, torch.tensor([1000.0, 10.0]))
    with pytest.raises(TypeError, match="timesteps"):
        samplers.ddpm_plan(sched, ts.double())
    with pytest.raises(TypeError, match="timesteps"):
        samplers.ddpm_plan(sched, [999, 0])
    zt = make_schedule("linear", T, zero_terminal_snr=True)
    with pytest.raises(ValueError, match="undefined"):  # ε-prediction at ᾱ = 0
        samplers.ddim_plan(zt, timesteps(10, T, "trailing"))
    samplers.ddim_plan(zt, timesteps(10, T, "trailing"), prediction="v")  # v is fine there


def test_sample_errors(reference):
    from fastdiff.schedule import timesteps

    plan = samplers.ddim_plan(make_schedule("linear", T), timesteps(3, T))
    seeds = seeds_for(2)
    x = torch.randn(2, 3, 4)
    with pytest.raises(TypeError, match="seeds"):
        samplers.sample(toy_model, x, seeds.int(), plan)
    with pytest.raises(ValueError, match="seeds"):
        samplers.sample(toy_model, x, seeds[:1], plan)
    with pytest.raises(TypeError, match="plan"):
        samplers.sample(toy_model, x, seeds, "ddim")
    with pytest.raises(TypeError, match="x_T"):
        samplers.sample(toy_model, x.double(), seeds, plan)
    with pytest.raises(ValueError, match="guidance_rescale"):
        samplers.sample(toy_model, x, seeds, plan, guidance_rescale=0.5)
    for bad in (float("nan"), float("-inf")):  # every image would be NaN: black once saved
        with pytest.raises(ValueError, match="guidance_scale must be finite"):
            samplers.sample(toy_model, x, seeds, plan, guidance_scale=bad)
    with pytest.raises(ValueError, match="mask"):
        samplers.sample(toy_model, x, seeds, plan, known=x)
    with pytest.raises(ValueError, match="model"):
        samplers.sample(lambda x, t: toy_model(x[:2], t[:2]), x, seeds, plan, guidance_scale=2.0)
    with pytest.raises(ValueError, match="model_output"):
        samplers.sample(lambda x, t: x[:, :2], x, seeds, plan)
    with pytest.raises(ValueError, match="seeds"):
        samplers.initial_noise(seeds, (3, 4))
