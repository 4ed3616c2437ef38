"""Property-based tests: every op over its documented domain, every sampler over random schedules.

Where this file sits in how a kernel is proven (docs/ops.md): each op's test file compares the
kernel with its float64 reference on chosen cases (odd sizes, every dtype, the model's layouts,
real sizes on a GPU); this file lets hypothesis draw what those files pin.  It draws shapes
(small and odd, as the kernels run in Triton's interpreter), dtypes, memory layouts
(channels-last, permuted axes, padded rows, strided views, slices of one fused projection), the
optional inputs, and a torch seed for the values, so that a failing example replays from
hypothesis' report alone.

* Ops: q_sample / training_target (and their gradients), diffusion_loss (and its gradients),
  attention and group_norm_silu (forward and every gradient), sampler_step (x_next and x̂0), each
  kernel against its float64 reference at the tolerance of the op's own test file, with every
  allocation NaN-poisoned (`poisoned_alloc`) so that an element no program writes fails.
* Samplers: random schedules (or random β), samplers, predictions and descending timesteps:
  the DDPM and DDIM updates equal the papers' closed forms; driven by the exact denoiser of
  Gaussian data, every state a plan steps through has the forward marginal's mean, and its
  variance where the update is exact in law (closed-form algebra on the plan's coefficients);
  and the loop's samples follow the exact law of the plan's affine-Gaussian chain.
* Schedules and spacings: what every plan assumes of them (β in (0, 1], ᾱ decreasing, N
  distinct timesteps in [0, T − 1]).

Each property was seen to fail on a kernel, reference path or plan broken by 0.1–1 % (a
coefficient, a scale, a noise level, an element left unwritten), with two blind spots, each held
elsewhere: the attention and GroupNorm bounds are twice PyTorch's error against the float64
oracle, so a wrong oracle widens them (test_attention and test_group_norm check the oracles
against PyTorch); and a wrong Heun corrector weight is invisible to the Gaussian laws (its term
has mean and variance 0 for point-mass data), which test_samplers' diffusers comparison holds.

Bounded: conftest's profiles draw 12 examples a test (36 for the host-only algebra), without
shrinking; CI's profile is derandomized, so CI runs the same examples every time.  To soak or
shrink a failure: ``pytest --hypothesis-profile=thorough tests/test_properties.py``.
"""
import functools
import math

import pytest
import torch
from hypothesis import assume, example, given, reject, settings
from hypothesis import strategies as st

from conftest import DTYPES, rel_err
from fastdiff import ops, samplers
from fastdiff.ops import group_norm as gn
from fastdiff.ops import noising, use_backend
from fastdiff.schedule import SCHEDULES, SPACINGS, Schedule, continuous_timesteps, make_schedule, solver_timesteps
from fastdiff.schedule import timesteps
from test_attention import HEAD_DIMS, _check_against_float64
from test_group_norm import channels_last, tolerance, torch_chain
from test_group_norm import make_inputs as norm_inputs
from test_noising import TOL, _float64_math
from test_sampler_step import make_inputs as step_inputs
from test_sampler_step import reference64
from test_samplers import D, abar_at, chain_law, check_moments, exact_model, gaussian_problem, seeds_for, step_mod

FLOAT_DTYPES = st.sampled_from(DTYPES)
PLANS = {
    "ddpm": samplers.ddpm_plan,
    "ddim": samplers.ddim_plan,
    "euler": samplers.euler_plan,
    "euler_ancestral": samplers.euler_ancestral_plan,
    "dpmpp_2m": samplers.dpmpp_2m_plan,
    "heun": samplers.heun_plan,
}


# ----------------------------------------------------------------------------- strategies


def seed_torch(data) -> None:
    """Tensor values from a torch seed that hypothesis draws: the example replays from its report."""
    torch.manual_seed(data.draw(st.integers(0, 2**32 - 1), label="torch seed"))


@st.composite
def shapes(draw, min_ndim: int, max_ndim: int = 5, max_numel: int = 3000):
    """(B, ...): 1–3 samples of at most ``max_numel`` elements, each side drawn from what the others leave."""
    shape, room = [draw(st.integers(1, 3))], max_numel
    for _ in range(draw(st.integers(min_ndim, max_ndim)) - 1):
        shape.append(draw(st.integers(1, max(1, min(room, 70)))))
        room //= shape[-1]
    return tuple(shape)


def layouts(ndim: int, dense_only: bool = False):
    """Memory layouts of a (B, C, ...) tensor: NC…, N…C (channels-last), or a non-dense view."""
    names = ["contiguous"] + (["channels_last"] if ndim >= 3 else []) + ([] if dense_only else ["strided"])
    return st.sampled_from(names)


def in_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x``'s values in ``layout``; "strided" is every other element of a NaN-filled buffer (last dim)."""
    if layout == "channels_last":
        return channels_last(x)
    if layout == "strided":
        buf = torch.full((*x.shape[:-1], 2 * x.shape[-1]), float("nan"), dtype=x.dtype, device=x.device)
        return buf[..., ::2].copy_(x)
    return x.contiguous()


@st.composite
def schedule_args(draw):
    """make_schedule's arguments: any kind and length, a β range of its own or the default, zero terminal SNR or not."""
    args = dict(kind=draw(st.sampled_from(SCHEDULES)), zero_terminal_snr=draw(st.booleans()))
    if args["kind"] != "cosine" and draw(st.booleans()):
        args.update(beta_start=draw(st.floats(1e-5, 2e-3)), beta_end=draw(st.floats(5e-3, 3e-2)))
    # the linear default β, scaled by 1000/T, pass 1 below T = 20: test_every_schedule_is_a_diffusion
    shortest = 20 if args["kind"] == "linear" and "beta_end" not in args else 2
    args["num_timesteps"] = draw(st.integers(shortest, 1000))
    return args


@st.composite
def plan_args(draw, name: str, num_timesteps: int, max_steps: int = 30):
    """A plan's arguments for sampler ``name``: a prediction, options, and any descending timesteps.

    DDPM and DDIM index ᾱ with integers; the σ-space samplers interpolate σ and also get
    quarter steps, fractional but never a hair apart (DPM-Solver++'s multistep weight h/h_prev
    grows without bound as a step shrinks, past what an fp32 loop can follow).
    """
    per_step = 1 if name in ("ddpm", "ddim") else 4
    ts = draw(st.lists(st.integers(0, per_step * (num_timesteps - 1)), min_size=1, max_size=max_steps, unique=True))
    ts = torch.tensor(sorted(ts, reverse=True))
    args = dict(timesteps=ts if per_step == 1 else ts.double() / per_step)
    args["prediction"] = draw(st.sampled_from(samplers.PREDICTIONS))
    if name == "ddpm":
        args["variance"] = draw(st.sampled_from(samplers.VARIANCES))
    if name == "ddim":
        args.update(eta=draw(st.floats(0, 1)), final_alpha_one=draw(st.booleans()))
    return args


def build_plan(name: str, schedule, **args) -> samplers.Plan:
    """The plan, or hypothesis' reject() where the sampler refuses by design (ε-prediction at ᾱ = 0)."""
    try:
        return PLANS[name](schedule, **args)
    except ValueError as err:
        if "undefined" not in str(err):
            raise
        reject()


def output_and_grads(fn, leaves, cast, upstream):
    """``fn`` on fresh copies of ``leaves`` cast by ``cast`` (None stays None): its output, and the
    gradients of the copies for the output gradient ``upstream``."""
    ls = [None if t is None else cast(t.detach()).requires_grad_() for t in leaves]
    out = fn(*ls)
    return out.detach(), torch.autograd.grad(out, [t for t in ls if t is not None], upstream.to(out.dtype))


def same(t: torch.Tensor) -> torch.Tensor:
    return t


# ----------------------------------------------------------------------------- noising


@given(data=st.data())
def test_noising_matches_float64(data, device, poisoned_alloc):
    """q_sample and training_target: x_t and the target within one output rounding of float64 math,
    and their gradients for x0 and the noise in closed form.

    Noise given (any float dtype, any layout) or drawn in the kernel (the reference path's draw,
    and x_t formed from it as returned); any schedule and timesteps; t int64 or int32, ᾱ fp32 or
    fp64.  A dense x0 keeps its layout.
    """
    seed_torch(data)
    draw = data.draw
    shape = draw(shapes(min_ndim=1), label="shape")
    dtype = draw(FLOAT_DTYPES, label="dtype")
    x0_layout = draw(layouts(len(shape)), label="x0 layout")
    x0 = in_layout(torch.randn(shape, device=device).to(dtype), x0_layout)
    acp_dtype = draw(st.sampled_from([torch.float32, torch.float64]), label="ᾱ dtype")
    acp = make_schedule(**draw(schedule_args(), label="schedule")).alphas_cumprod.to(device, acp_dtype)
    t = draw(st.lists(st.integers(0, len(acp) - 1), min_size=shape[0], max_size=shape[0]), label="t")
    t = torch.tensor(t, device=device, dtype=draw(st.sampled_from([torch.int64, torch.int32]), label="t dtype"))
    prediction = draw(st.sampled_from([None, *noising.PREDICTIONS]), label="prediction (None: q_sample)")
    op = ops.q_sample if prediction is None else functools.partial(ops.training_target, prediction=prediction)

    if draw(st.booleans(), label="noise given"):
        noise = torch.randn(shape, device=device).to(draw(FLOAT_DTYPES, label="noise dtype"))
        noise = in_layout(noise, draw(layouts(len(shape)), label="noise layout"))
        x_t, eps, *target = op(x0, t, acp, noise)
        assert torch.equal(eps, noise.to(dtype))
    else:
        key = draw(st.integers(0, 2**63 - 1), label="generator seed")
        x_t, eps, *target = op(x0, t, acp, generator=torch.Generator(device).manual_seed(key))
        with use_backend("reference"):
            ref_eps = op(x0, t, acp, generator=torch.Generator(device).manual_seed(key))[1]
        assert eps.dtype == dtype and rel_err(eps, ref_eps) < TOL[dtype]
    with use_backend("reference"):
        ref_x_t, _, *ref_target = op(x0, t, acp, eps)
    x_t64, v64 = _float64_math(x0, t, acp.float(), eps)  # the ᾱ the op reads: fp32 (its precision policy)

    def assert_close(out, ref, exact):
        """test_noising's TOL, plus twice the fp32 reference path's own error: large where the two
        terms cancel (x_t ≈ 0 in a sample of one element), tiny elsewhere."""
        assert out.dtype == dtype and rel_err(out, exact) < TOL[dtype] + 2 * rel_err(ref, exact)

    assert_close(x_t, ref_x_t, x_t64)
    if x0_layout != "strided":
        assert x_t.stride() == x0.stride()
    if prediction is not None:
        assert_close(target[0], ref_target[0], {"epsilon": eps, "v": v64, "sample": x0}[prediction])

    # Backward (through the reference math: the kernel has none), for x_t and the target together:
    # x_t = a·x0 + s·ε and v = a·ε − s·x0 (a = sqrt(ᾱ_t), s = sqrt(1 − ᾱ_t)) give, for output
    # gradients g and h, ∂x0 = a·g − s·h (v) or a·g + h (x0 target), ∂ε = s·g + a·h (v) or s·g + h (ε).
    noise = eps.to(draw(FLOAT_DTYPES, label="differentiated noise dtype"))
    leaves = [x0.detach().requires_grad_(), noise.requires_grad_()]
    outs = op(*leaves[:1], t, acp, leaves[1])
    outs = outs[:1] + outs[2:]  # x_t and the target (the returned noise is the leaf, cast)
    ups = [torch.randn(shape, device=device).to(dtype) for _ in outs]
    grads = torch.autograd.grad(outs, leaves, ups, allow_unused=True)
    a = acp.double()[t.long()].view(-1, *[1] * (len(shape) - 1))
    a, s = a.sqrt(), (1 - a).sqrt()
    g, h = ups[0].double(), (ups[1].double() if len(ups) > 1 else torch.zeros(shape, dtype=torch.float64))
    want_x0 = a * g + {None: 0, "epsilon": 0, "v": -s * h, "sample": h}[prediction]
    want_eps = s * g + {None: 0, "epsilon": h, "v": a * h, "sample": 0}[prediction]
    for leaf, got, want in zip(leaves, grads, (want_x0, want_eps)):
        assert got.dtype == leaf.dtype and rel_err(got, want) < TOL[leaf.dtype] + TOL[dtype]


@given(data=st.data())
def test_diffusion_loss_matches_float64(data, device, poisoned_alloc):
    """The weighted MSE and both gradients against float64, at test_noising's bounds, for pred and
    target in any layouts and a weight of any float dtype (or none)."""
    seed_torch(data)
    draw = data.draw
    shape = draw(shapes(min_ndim=1), label="shape")
    dtype = draw(FLOAT_DTYPES, label="dtype")
    pred, target = (
        in_layout(torch.randn(shape, device=device).to(dtype), draw(layouts(len(shape)), label=f"{name} layout"))
        for name in ("pred", "target")
    )
    weight_dtype = draw(st.sampled_from([None, *DTYPES, torch.float64]), label="weight dtype")
    weight = None if weight_dtype is None else (torch.rand(shape[0], device=device) + 0.5).to(weight_dtype)
    w64 = torch.ones(shape[0], dtype=torch.float64, device=device) if weight is None else weight.double()
    g = torch.rand((), device=device) + 0.5

    def weighted_mse(w):  # the loss written out
        return lambda p, q: (w * (p - q).pow(2).reshape(len(p), -1).mean(1)).mean()

    loss, grads = output_and_grads(lambda p, q: ops.diffusion_loss(p, q, weight), (pred, target), same, g)
    loss64, grads64 = output_and_grads(weighted_mse(w64), (pred, target), torch.Tensor.double, g)
    # PyTorch in the inputs' dtype: its gradients fall into fp16's subnormals as ours do (test_noising)
    _, grads_pt = output_and_grads(weighted_mse(w64.to(dtype)), (pred, target), same, g)
    assert loss.dtype == torch.float32 and rel_err(loss, loss64) < 1e-5
    for ours, exact, theirs in zip(grads, grads64, grads_pt):
        assert ours.dtype == dtype and rel_err(ours, exact) < max(TOL[dtype], 2 * rel_err(theirs, exact))


@given(shape=shapes(min_ndim=1))
@example(shape=(3,))
def test_diffusion_loss_reference_path_matches_float64(shape):
    pred, target = torch.randn(shape), torch.randn(shape)
    with use_backend("reference"):
        loss = ops.diffusion_loss(pred, target)
    assert rel_err(loss, (pred.double() - target.double()).pow(2).mean()) < 1e-5


# ----------------------------------------------------------------------------- attention

# Padding after each D-row: none, a 16-byte-aligned 8 elements (read in place), or 3 (copied).
ROW_PADS = st.sampled_from([0, 8, 3])


@given(data=st.data())
def test_attention_matches_float64(data, device, poisoned_alloc):
    """Forward and every gradient within test_attention's bound (twice PyTorch's own low-precision
    error, plus a floor) for any batch, heads, lengths, head dim, dtype and scale, with q, k, v
    stored with their (B, H, L) axes in any order, rows padded, or as views of one qkv (self-)
    or kv (cross-attention) projection.

    bf16 is drawn only where the kernels run compiled.  Triton's interpreter casts fp32 → bf16
    by truncation (a GPU rounds to nearest): every rounding of P, dS and the outputs doubles
    and is biased, and at a few score entries per head the kernel's error reached 4× PyTorch's
    round-to-nearest error (B = 1, H = 2, Lq = Lk = 2) — the bound measures the interpreter
    there, not the kernel.  fp16 takes the same code paths (2-byte elements, the same alignment
    rules); test_attention holds bf16 in the interpreter at its larger shapes."""
    seed_torch(data)
    draw = data.draw
    B, H = draw(st.integers(1, 2), label="batch"), draw(st.integers(1, 3), label="heads")
    Lq = draw(st.integers(1, 70), label="Lq")
    self_attention = draw(st.booleans(), label="self-attention")
    Lk = Lq if self_attention else draw(st.integers(1, 70), label="Lk")
    D = draw(st.sampled_from(HEAD_DIMS), label="D")
    dtype = draw(st.sampled_from(DTYPES if device == "cuda" else [torch.float32, torch.float16]), label="dtype")
    scale = draw(st.none() | st.floats(0.02, 1.0), label="scale")

    def stored(L, what):
        """One of q, k, v: memory holding its (B, H, L) axes in a drawn order, each D-row padded."""
        order = draw(st.permutations(range(3)), label=f"{what} memory order of (B, H, L)")
        dims = (B, H, L)
        leaf = torch.randn(*(dims[i] for i in order), D + draw(ROW_PADS, label=f"{what} row padding"))
        return leaf.to(device, dtype), lambda t: [t[..., :D].permute(*(order.index(i) for i in range(3)), 3)]

    def projection(L, n, what):
        """(B, L, n, H, D + pad): the output of one Linear that makes q, k, v (n = 3) or k, v (n = 2)."""
        leaf = torch.randn(B, L, n, H, D + draw(ROW_PADS, label=f"{what} row padding"))
        return leaf.to(device, dtype), lambda t: list(t[..., :D].permute(2, 0, 3, 1, 4).unbind(0))

    fused = draw(st.booleans(), label="fused projection")
    if fused and self_attention:
        parts = [projection(Lq, 3, "qkv")]
    elif fused:
        parts = [stored(Lq, "q"), projection(Lk, 2, "kv")]
    else:
        parts = [stored(Lq, "q"), stored(Lk, "k"), stored(Lk, "v")]
    leaves = [leaf for leaf, _ in parts]

    def views(ls):
        return [x for leaf, (_, view) in zip(ls, parts) for x in view(leaf)]

    # one key: dq and dk are zero but for rounding, no relative error is defined (test_attention)
    _check_against_float64(leaves, views, scale=scale, check_grads=Lk > 1)


# ----------------------------------------------------------------------------- group norm


@given(data=st.data())
def test_group_norm_silu_matches_float64(data, device, poisoned_alloc):
    """Forward and the gradients of x, weight, bias, scale and shift within test_group_norm's bound
    (twice PyTorch's own low-precision error, plus a floor), for any groups, channels per group and
    spatial dims, each optional input present or not and in any float dtype, SiLU on or off, x and
    dy in any layout, and scale/shift as the two halves of one (B, 2C) projection."""
    seed_torch(data)
    draw = data.draw
    G = draw(st.integers(1, 8), label="groups")
    C = G * draw(st.integers(1, 8), label="channels per group")
    B, *spatial = draw(shapes(min_ndim=1, max_ndim=4, max_numel=2000 // C), label="batch, spatial dims")
    assume(B * math.prod(spatial) > 1)  # PyTorch's group_norm, the yardstick, wants two values per channel
    shape = (B, C, *spatial)
    dtype = draw(FLOAT_DTYPES, label="dtype")
    param_dtype = draw(FLOAT_DTYPES, label="weight/bias/scale/shift dtype")
    x, *params = norm_inputs(shape, "wbss", dtype, device, param_dtype=param_dtype)
    x_layout = draw(layouts(len(shape)), label="x layout")
    x = in_layout(x, x_layout)
    present = [draw(st.booleans(), label=f"{name} given") for name in ("weight", "bias", "scale", "shift")]
    w, b, sc, sh = (p if keep else None for p, keep in zip(params, present))
    silu = draw(st.booleans(), label="silu")
    eps = draw(st.floats(1e-6, 1e-2), label="eps")
    if sc is not None and sh is not None and draw(st.booleans(), label="scale, shift halves of one projection"):
        leaves = [x, w, b, torch.cat([sc, sh], 1)]
        split = lambda ls: (*ls[:3], *ls[3].chunk(2, 1))  # noqa: E731
    else:
        leaves, split = [x, w, b, sc, sh], tuple
    dy = in_layout(torch.randn(shape, device=device).to(dtype), draw(layouts(len(shape)), label="dy layout"))

    def fused(x, w, b, sc, sh):
        return ops.group_norm_silu(x, G, w, b, eps, scale=sc, shift=sh, silu=silu)

    def reference(x, w, b, sc, sh):
        return gn.group_norm_silu_ref(x, G, w, b, eps, scale=sc, shift=sh, silu=silu)

    def eager(x, *params):  # what a user writes in eager PyTorch: the parameters cast to x's dtype
        return torch_chain(x, G, *(p if p is None else p.to(x.dtype) for p in params), silu=silu, eps=eps)

    y, grads = output_and_grads(lambda *ls: fused(*split(ls)), leaves, same, dy)
    exact, grads64 = output_and_grads(lambda *ls: reference(*split(ls)), leaves, torch.Tensor.double, dy)
    low, grads_low = output_and_grads(lambda *ls: eager(*split(ls)), leaves, same, dy)
    assert y.dtype == dtype and rel_err(y, exact) <= tolerance(rel_err(low, exact), dtype)
    if x_layout != "strided":
        assert y.stride() == x.stride()
    for leaf, ours, want, theirs in zip([t for t in leaves if t is not None], grads, grads64, grads_low):
        assert ours.dtype == leaf.dtype
        if leaf is x and C // G * math.prod(spatial) == 1:
            continue  # a group of one element: dx is zero but for rounding, no relative error is defined
        assert rel_err(ours, want) <= tolerance(rel_err(theirs, want), dtype)


# ----------------------------------------------------------------------------- sampler step


@given(data=st.data())
def test_sampler_step_matches_float64(data, device, poisoned_alloc):
    """x_next and x̂0 against the float64 reference, each element within one unit of x's precision
    plus fp32's rounding of the intermediate terms (test_sampler_step's bound), for coefficients at random or from any sampler's plan (one step, or a different
    step per image), each option on or off (guidance and its rescale, clipping, x̂0_prev, noise, the
    inpainting blend with a full or per-pixel mask), x contiguous or channels-last and every other
    input in any layout, model outputs in their own dtype.  Outputs keep x's layout."""
    seed_torch(data)
    draw = data.draw
    shape = draw(shapes(min_ndim=2, max_numel=1500), label="shape")
    dtype = draw(FLOAT_DTYPES, label="x dtype")
    guidance = draw(st.booleans(), label="guidance")
    opts = dict(
        out_dtype=draw(FLOAT_DTYPES, label="model output dtype"),
        guidance=guidance,
        rescale=guidance and math.prod(shape[1:]) > 1 and draw(st.booleans(), label="guidance rescale"),
        clip=draw(st.booleans(), label="clip x̂0"),
        inpaint=draw(st.sampled_from([None, "full"] + (["per_pixel"] if len(shape) >= 3 else [])), label="mask"),
        per_image=draw(st.booleans(), label="coefficients per image"),
    )
    source = draw(st.sampled_from(["random", *PLANS]), label="coefficients")
    if source == "random":
        opts.update(noise=draw(st.booleans(), label="noise"), multistep=draw(st.booleans(), label="x̂0_prev"))
    else:  # one of the plan's evaluations, or one per image, with the options it uses
        schedule = make_schedule(**draw(schedule_args(), label="schedule"))
        plan = build_plan(source, schedule, **draw(plan_args(source, schedule.num_timesteps), label="plan"))
        n_rows = shape[0] if opts["per_image"] else 1
        rows = draw(st.lists(st.integers(0, len(plan) - 1), min_size=n_rows, max_size=n_rows), label="plan rows")
        opts.update(noise=any(plan.add_noise[i] for i in rows), multistep=any(plan.reads_x0[i] for i in rows))
    (x, out, coeffs), kw = step_inputs(shape, dtype, device, **opts)
    if source != "random":
        coeffs = plan.coeffs[rows].to(device, torch.float32).reshape(coeffs.shape)
    x = in_layout(x, draw(layouts(len(shape), dense_only=True), label="x layout"))
    args = (x, in_layout(out, draw(layouts(len(shape)), label="model_output layout")), coeffs)
    for name in ("uncond_output", "x0_prev", "known", "mask"):
        if name in kw:
            kw[name] = in_layout(kw[name], draw(layouts(len(shape)), label=f"{name} layout"))

    e_next, e0 = reference64(args, kw)
    # Plan coefficients reach 1/α ≈ 2·10⁴ (a cosine schedule's t = T − 1): on inputs that no model
    # made, x̂0 can leave fp16's range, in the kernel and the reference alike.
    assume(max(e_next.abs().max(), e0.abs().max()) < torch.finfo(dtype).max)
    x_next, x0 = ops.sampler_step(*args, **kw)
    with use_backend("reference"):  # its fp32 math, not rounded to x's dtype
        r_next, r0 = ops.sampler_step(*map(to_fp32, args), **{k: to_fp32(v) for k, v in kw.items()})
    for name, out, ref32, exact in (("x_next", x_next, r_next, e_next), ("x0", x0, r0, e0)):
        assert out.dtype == dtype and out.stride() == x.stride()
        # assert_faithful's 3e-5 for fp32's rounding of terms of O(100), plus that rounding as measured
        # on this draw: plan coefficients reach 1/α ≈ 2·10⁴, where x̂0 = x/α − (σ/α)·o rounds by ~10⁻³.
        assert_faithful_within(name, out, exact, 3e-5 + 2 * (ref32.double() - exact).abs().max().item())


def to_fp32(t):
    return t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def assert_faithful_within(name, out, exact, rounding):
    """test_sampler_step.assert_faithful (each element within one unit of out's precision of the float64
    result) with ``rounding`` as its allowance for fp32's rounding of the intermediate terms."""
    err = (out.double() - exact).abs()
    worst = (err - torch.finfo(out.dtype).eps * exact.abs() - rounding).max()
    assert torch.isfinite(out).all() and worst <= 0, f"{name}: off by {err.max():.2e} (bound exceeded by {worst:.2e})"


# ----------------------------------------------------------------------------- samplers


@given(data=st.data())
def test_samplers_keep_the_exact_gaussian_law(data):
    """Any schedule, sampler, prediction and descending timesteps: 4 × 5000 draws of the loop, driven
    by the exact denoiser of Gaussian data, have the exact mean and covariance of the plan's
    affine-Gaussian chain (within 5 standard errors: test_samplers.check_moments)."""
    seed_torch(data)
    schedule = make_schedule(**data.draw(schedule_args(), label="schedule"))
    name = data.draw(st.sampled_from(sorted(PLANS)), label="sampler")
    args = data.draw(plan_args(name, schedule.num_timesteps), label="plan")
    plan = build_plan(name, schedule, **args)
    mu, cov = gaussian_problem()
    seeds = seeds_for(4)
    model = exact_model(mu, cov, schedule, args["prediction"])
    with use_backend("reference"):
        x = samplers.sample(model, samplers.initial_noise(seeds, (4, D, 5000)), seeds, plan)
    check_moments(x, *chain_law(plan, mu, cov, schedule, args["prediction"]))


# Host-only properties (float64 algebra on the plans, no sampling): many examples cost little.
HOST_ONLY = settings(max_examples=3 * settings().max_examples)
COEF = {name: i for i, name in enumerate(step_mod.COEFFICIENTS)}


def update_map(row: torch.Tensor) -> tuple[float, float, float, float]:
    """(A, B, d, e) of one evaluation's update x' = A·x_t + B·o + d·x̂0_prev + e·z, composed from its
    coefficient row (prediction conversion, then the update; no clipping)."""
    c = {name: float(row[i]) for name, i in COEF.items()}
    A = c["x"] + c["x0"] * c["x0_from_x"] + c["eps"] * c["eps_from_x"]
    B = c["x0"] * c["x0_from_out"] + c["eps"] * c["eps_from_out"]
    return A, B, c["x0_prev"], c["noise"]


@st.composite
def random_betas(draw):
    """Any β_t in [1e-4, 0.3], T from 2 to 60: no named schedule, no monotonicity."""
    T = draw(st.integers(2, 60), label="T")
    return Schedule(torch.tensor(draw(st.lists(st.floats(1e-4, 0.3), min_size=T, max_size=T), label="β"), dtype=torch.float64))


def descending(draw, T: int, max_steps: int = 30) -> torch.Tensor:
    ts = draw(st.lists(st.integers(0, T - 1), min_size=1, max_size=max_steps, unique=True), label="timesteps")
    return torch.tensor(sorted(ts, reverse=True))


@HOST_ONLY
@given(data=st.data())
def test_ddpm_and_ddim_steps_are_their_closed_forms(data):
    """For random β and timesteps, each DDPM and DDIM update, composed from the plan's coefficient
    row, is the paper's closed form: DDPM in ε form (Ho et al. 2020, Alg. 2 / Eq. 11, on the strided
    α_t = ᾱ_t/ᾱ'), or through the posterior mean in x̂0 (Eq. 7) for x0- and v-prediction; DDIM
    (Song et al. 2021, Eq. 12 with σ_η of Eq. 16); and DDIM at η = 1 is DDPM with β̃ (Sec. 4.1)."""
    schedule = data.draw(random_betas())
    ts = descending(data.draw, schedule.num_timesteps)
    prediction = data.draw(st.sampled_from(samplers.PREDICTIONS), label="prediction")
    variance = data.draw(st.sampled_from(samplers.VARIANCES), label="DDPM variance")
    eta = data.draw(st.floats(0, 1), label="η")
    acp = schedule.alphas_cumprod.tolist()
    ddpm = samplers.ddpm_plan(schedule, ts, variance=variance, prediction=prediction)
    ddim = samplers.ddim_plan(schedule, ts, eta=eta, prediction=prediction)
    ddim_1 = samplers.ddim_plan(schedule, ts, eta=1.0, prediction=prediction)
    ddpm_small = samplers.ddpm_plan(schedule, ts, variance="fixed_small", prediction=prediction)

    def as_map(x0_of, eps_of):
        """(A, B) of a linear function of (x_t, o), given x̂0 and ε̂ as (x, o) coefficient pairs."""
        return lambda a_x0, a_eps: (a_x0 * x0_of[0] + a_eps * eps_of[0], a_x0 * x0_of[1] + a_eps * eps_of[1])

    for i, t in enumerate(ts.tolist()):
        last = i == len(ts) - 1
        ab, ab_next = acp[t], 1.0 if last else acp[int(ts[i + 1])]
        a, s = math.sqrt(ab), math.sqrt(1 - ab)
        x0_of, eps_of = {  # x̂0 and ε̂ as (coefficient of x_t, coefficient of o)
            "epsilon": ((1 / a, -s / a), (0.0, 1.0)),
            "sample": ((0.0, 1.0), (1 / s, -a / s)),
            "v": ((a, -s), (s, a)),
        }[prediction]
        alpha, beta = ab / ab_next, 1 - ab / ab_next  # the strided step
        tilde = (1 - ab_next) / (1 - ab) * beta
        e = 0.0 if last else math.sqrt(beta if variance == "fixed_large" else max(tilde, 1e-20))
        if prediction == "epsilon":  # Eq. 11: x' = (x − β/sqrt(1 − ᾱ)·ε)/sqrt(α) + e·z
            want_ddpm = (1 / math.sqrt(alpha), -beta / (s * math.sqrt(alpha)), 0.0, e)
        else:  # Eq. 7: x' = sqrt(ᾱ')β/(1 − ᾱ)·x̂0 + sqrt(α)(1 − ᾱ')/(1 − ᾱ)·x_t + e·z
            k0, kx = math.sqrt(ab_next) * beta / (1 - ab), math.sqrt(alpha) * (1 - ab_next) / (1 - ab)
            want_ddpm = (k0 * x0_of[0] + kx, k0 * x0_of[1], 0.0, e)
        sig = eta * math.sqrt((1 - ab_next) / (1 - ab) * beta)
        # Eq. 12: x' = sqrt(ᾱ')·x̂0 + sqrt(1 − ᾱ' − σ²)·ε̂ + σ·z
        A, B = as_map(x0_of, eps_of)(math.sqrt(ab_next), math.sqrt(max(1 - ab_next - sig * sig, 0.0)))
        want_ddim = (A, B, 0.0, sig)
        for plan, want in ((ddpm, want_ddpm), (ddim, want_ddim), (ddim_1, update_map(ddpm_small.coeffs[i]))):
            got = update_map(plan.coeffs[i])
            scale = max(map(abs, want)) + 1
            assert all(abs(g - w) <= 1e-10 * scale for g, w in zip(got, want)), (plan.name, i, got, want)
            assert plan.add_noise[i] == (want[3] != 0)


def gaussian_laws(name: str, plan, schedule, ts: torch.Tensor, prediction: str, mu: float, var0: float,
                  last_abar: float = 1.0):
    """Scalar data x0 ~ N(μ, var0) and the exact model (E[x0 | x_t], E[ε | x_t] or E[v | x_t]):
    for each evaluation of ``plan``, the exact (mean, variance) of the state it returns and the
    ᾱ of the noise level it lands on.  The loop's state is (x, k), k the kept x̂0; each
    evaluation maps it affinely and adds e·z, so the law is propagated in closed form, float64,
    from the exact marginal N(sqrt(ᾱ)μ, ᾱ·var0 + 1 − ᾱ) at the first timestep."""
    integer = name in ("ddpm", "ddim")
    acp = schedule.alphas_cumprod.tolist()

    def abar(t):  # the samplers' ᾱ at a timestep: indexed, or from σ interpolated in t
        return acp[int(t)] if integer else abar_at(float(t), schedule)

    # Where each evaluation lands: the next timestep (``last_abar`` after the last); Heun's corrector
    # lands where its predictor did.
    lands, e = [], 0
    for i in range(len(ts)):
        lands.append(last_abar if i == len(ts) - 1 else abar(ts[i + 1]))
        e += 1
        if name == "heun" and e < len(plan) and plan.reads_x0[e]:
            lands.append(lands[-1])
            e += 1
    assert len(lands) == len(plan)

    ab0 = abar(plan.timesteps[0])
    m = torch.tensor([math.sqrt(ab0) * mu, 0.0], dtype=torch.float64)
    P = torch.tensor([[ab0 * var0 + 1 - ab0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    out = []
    for i in range(len(plan)):
        ab = abar(plan.timesteps[i])
        a, s, V = math.sqrt(ab), math.sqrt(1 - ab), ab * var0 + 1 - ab
        # the exact model: x0* = μ + a·var0/V·(x − aμ), ε* = s/V·(x − aμ), v* = a·ε* − s·x0*
        x0_lin, eps_lin = (a * var0 / V, mu - a * a * var0 / V * mu), (s / V, -s * a * mu / V)
        G, g = {
            "epsilon": eps_lin,
            "sample": x0_lin,
            "v": (a * eps_lin[0] - s * x0_lin[0], a * eps_lin[1] - s * x0_lin[1]),
        }[prediction]
        c = {n: float(plan.coeffs[i, j]) for n, j in COEF.items()}
        H, h = c["x0_from_x"] + c["x0_from_out"] * G, c["x0_from_out"] * g  # x̂0 = H·x + h
        E, f = c["eps_from_x"] + c["eps_from_out"] * G, c["eps_from_out"] * g  # ε̂ = E·x + f
        M = torch.tensor(
            [[c["x"] + c["x0"] * H + c["eps"] * E, c["x0_prev"] if plan.reads_x0[i] else 0.0],
             [H, 0.0] if plan.keeps_x0[i] else [0.0, 1.0]],
            dtype=torch.float64,
        )  # fmt: skip
        const = torch.tensor([c["x0"] * h + c["eps"] * f, h if plan.keeps_x0[i] else 0.0], dtype=torch.float64)
        m = M @ m + const
        P = M @ P @ M.T + torch.diag(torch.tensor([c["noise"] ** 2, 0.0], dtype=torch.float64))
        out.append((m[0].item(), P[0, 0].item(), lands[i]))
    return out


@HOST_ONLY
@given(data=st.data())
def test_exact_denoiser_keeps_the_forward_marginals(data):
    """Any schedule, sampler, prediction and descending timesteps, driven by the exact denoiser of
    Gaussian data N(μ, s²) from the exact marginal at the first timestep: after every evaluation
    the state's law is the forward process' marginal where the evaluation lands, in closed form.

    * Its mean is sqrt(ᾱ)·μ for any s²: each update is unbiased given an unbiased x̂0.
    * Its variance is ᾱ·s² + 1 − ᾱ where the update is exact in law: for point-mass data (s² = 0)
      every sampler but DDPM with β (x̂0 = μ is then exact and each update moves the noise to
      the next level's σ: DDIM's σ_η² + (1 − ᾱ' − σ_η²), DDPM's β̃, Euler's σ'/σ), and DDPM with β
      for N(μ, 1) (Ho et al. 2020, Sec. 3.2), but on its last step, which drops the noise.
    """
    draw = data.draw
    schedule = make_schedule(**draw(schedule_args(), label="schedule"))
    mu, var0 = draw(st.floats(-2, 2), label="μ"), draw(st.floats(0, 2), label="s²")
    for name in PLANS:  # every sampler on each drawn schedule
        args = draw(plan_args(name, schedule.num_timesteps), label=f"{name} plan")
        try:
            plan = PLANS[name](schedule, **args)
        except ValueError as err:  # ε-prediction at ᾱ = 0, refused by design
            assert "undefined" in str(err)
            continue
        fixed_large = args.get("variance") == "fixed_large"
        exact_var0 = 1.0 if fixed_large else 0.0
        last_abar = 1.0 if args.get("final_alpha_one", True) else float(schedule.alphas_cumprod[0])
        for s2 in (exact_var0, var0):
            laws = gaussian_laws(name, plan, schedule, args["timesteps"], args["prediction"], mu, s2, last_abar)
            for i, (mean, var, ab) in enumerate(laws):
                want = math.sqrt(ab) * mu
                assert abs(mean - want) <= 1e-9 * (1 + abs(mu)), (name, s2, i, mean, want)
                if s2 == exact_var0 and not (fixed_large and i == len(plan) - 1):
                    assert abs(var - (ab * s2 + 1 - ab)) <= 1e-9, (name, s2, i, var, ab * s2 + 1 - ab)


@given(kind=st.sampled_from(SCHEDULES), num_timesteps=st.integers(2, 1000), zero_terminal_snr=st.booleans())
@example(kind="linear", num_timesteps=10, zero_terminal_snr=False)
def test_every_schedule_is_a_diffusion(kind, num_timesteps, zero_terminal_snr):
    """β in (0, 1], ᾱ strictly decreasing from below 1 to ≥ 0 (0 exactly with zero terminal SNR)."""
    s = make_schedule(kind, num_timesteps, zero_terminal_snr=zero_terminal_snr)
    acp = s.alphas_cumprod
    assert ((s.betas > 0) & (s.betas <= 1)).all() and (acp[1:] < acp[:-1]).all()
    assert acp[0] < 1 and acp[-1] >= 0 and (acp[-1] == 0) == zero_terminal_snr


@given(st.integers(2, 1000).flatmap(lambda T: st.tuples(st.just(T), st.integers(1, T))), st.sampled_from(SPACINGS))
@example((1000, 61), "trailing")
@example((10, 10), "leading")
def test_every_spacing_gives_the_steps_asked_for(sizes, spacing):
    """N strictly decreasing timesteps in [0, T − 1] from each spacing function (the solvers'
    leading and linspace spacings place N + 1 points, so they take N < T and refuse N = T)."""
    T, N = sizes
    solver_takes_it = N < T or spacing == "trailing"
    if not solver_takes_it:
        with pytest.raises(ValueError, match="num_steps must be < "):
            solver_timesteps(N, T, spacing)
    for fn in (timesteps, continuous_timesteps) + ((solver_timesteps,) if solver_takes_it else ()):
        t = fn(N, T, spacing)
        assert t.shape == (N,) and (t[1:] < t[:-1]).all() and t.min() >= 0 and t.max() <= T - 1, fn.__name__
