"""The host path: loops check their arguments once and call the ops' unchecked entries, which
give the public ops' numbers bit for bit; the layout test that every op runs; the host
benchmark's output.  (The sampling loop's and the UNet's own tests are in test_samplers.py
and test_unet.py.)"""
import json

import pytest
import torch

from fastdiff import samplers
from fastdiff.apps import inpaint as ip
from fastdiff.ops import _backend, _layout, noising, use_backend
from fastdiff.schedule import make_schedule, timesteps

from fastdiff.ops import fused_step as step_mod


def toy_model(x, t):
    tt = t.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
    return 0.7 * torch.tanh(1.1 * x + 0.002 * tt) + 0.3 * torch.sin(0.5 * x.roll(1, -1))


def guided_model(x, t):
    B = x.shape[0] // 2
    return torch.cat([toy_model(x[:B], t[:B]), 1.5 * toy_model(x[B:], t[B:]) + 0.2])


# ----------------------------------------------------------------------------- the RePaint loop


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "ddpm"])
def test_repaint_loop_checks_once_and_keeps_its_numbers(sampler, monkeypatch):
    """RePaint's jumps run the sampler's evaluations: no step goes through the op's own checks, and
    the samples are the checked loop's, bit for bit (the multistep history reset included)."""
    schedule = make_schedule("scaled_linear", 1000)
    make = samplers.dpmpp_2m_plan if sampler == "dpmpp_2m" else samplers.ddpm_plan
    plan = make(schedule, timesteps(5, 1000, "trailing"))
    seeds = torch.randint(0, 2**62, (2,))
    x_T = samplers.initial_noise(seeds, (2, 3, 5, 4))
    known, mask = torch.randn(2, 3, 5, 4), (torch.rand(2, 1, 5, 4) < 0.5).float()
    kw = dict(known=known, mask=mask, guidance_scale=3.0, resample=1, jump=2)
    with use_backend("reference"), monkeypatch.context() as checked:
        # the same loop with every step through the public op and its checks
        calls = []
        checked.setattr(samplers, "sampler_step_unchecked", lambda *a, **k: calls.append(1) or step_mod.sampler_step(*a, **k))
        expected = ip.repaint_sample(guided_model, x_T, seeds, plan, schedule, **kw)
    assert len(calls) > len(plan)  # every evaluation, and the jumps' repeats
    with use_backend("reference"):

        def refuse(*args, **kwargs):
            raise AssertionError("a RePaint step went through sampler_step's own checks")

        monkeypatch.setattr(step_mod, "_validate", refuse)
        got = ip.repaint_sample(guided_model, x_T, seeds, plan, schedule, **kw)
    assert torch.equal(got, expected)


def test_repaint_loop_checks_its_arguments():
    schedule = make_schedule("scaled_linear", 1000)
    plan = samplers.ddim_plan(schedule, timesteps(3, 1000))
    seeds = torch.arange(2)
    x_T = samplers.initial_noise(seeds, (2, 3, 5, 4))
    with pytest.raises(ValueError, match="known"):
        ip.repaint_sample(toy_model, x_T, seeds, plan, schedule, known=x_T[:, :2], mask=torch.ones(2, 1, 5, 4))


# ----------------------------------------------------------------------------- unchecked entries


def test_noising_unchecked_entries_equal_the_public_ones():
    """q_sample, training_target and diffusion_loss (value and gradient) through their unchecked entries."""
    acp = make_schedule("cosine", 100).alphas_cumprod.float()
    x0, t = torch.randn(3, 2, 5, 7), torch.randint(0, 100, (3,))
    draws = [torch.Generator().manual_seed(11) for _ in range(2)]
    assert all(map(torch.equal, noising.q_sample(x0, t, acp, generator=draws[0]),
                   noising.q_sample_unchecked(x0, t, acp, generator=draws[1])))  # fmt: skip
    noise = torch.randn_like(x0)
    for prediction in noising.PREDICTIONS:
        public = noising.training_target(x0, t, acp, noise, prediction=prediction)
        unchecked = noising.training_target_unchecked(x0, t, acp, noise, prediction=prediction)
        assert all(map(torch.equal, public, unchecked))
    weight = torch.rand(3, dtype=torch.float64)
    grads = []
    for loss in (noising.diffusion_loss, noising.diffusion_loss_unchecked):
        pred = x0.clone().requires_grad_()
        value = loss(pred, noise.half(), weight)
        value.backward()
        grads.append((value.detach(), pred.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_attention_checks_each_call_signature_once(monkeypatch):
    """`attention` validates a call signature (types, shapes, strides, dtypes, devices) on its first call
    only; the scale is checked on every call, and a signature that differs in anything the checks read
    (here k's dtype) is validated afresh."""
    from fastdiff.ops import flash_attention as attn_mod
    from fastdiff.ops.launch_tables import Plans

    checks = []
    real = attn_mod._validate
    monkeypatch.setattr(attn_mod, "_checked_plans", Plans())
    monkeypatch.setattr(attn_mod, "_validate", lambda *args: checks.append(args) or real(*args))
    q, k = torch.randn(1, 2, 5, 32), torch.randn(1, 2, 3, 32)
    with use_backend("reference"):
        first = attn_mod.attention(q, k, k)
        assert len(checks) == 1
        assert torch.equal(attn_mod.attention(q.clone(), k.clone(), k.clone()), first)
        assert torch.equal(attn_mod.attention(q, k, k, scale=32**-0.5), first)
        assert len(checks) == 1
        for scale, exc in ((float("nan"), ValueError), (0.0, ValueError), (True, TypeError), ("x", TypeError)):
            with pytest.raises(exc, match="scale"):
                attn_mod.attention(q, k, k, scale=scale)
        assert attn_mod.attention(q, k, k, scale=1).dtype == q.dtype  # an int scale is accepted, as a float
        with pytest.raises(TypeError, match="k must have q's dtype"):
            attn_mod.attention(q, k.half(), k.half())
    assert len(checks) == 2


# ----------------------------------------------------------------------------- layouts


def _layout_by_view(x: torch.Tensor) -> str | None:
    """sample_layout's rule written with a view: contiguous, or channels-last (C moved last is contiguous)."""
    if x.is_contiguous():
        return "contiguous"
    if x.ndim >= 3 and x.stride(1) == 1 and x.movedim(1, -1).is_contiguous():
        return "channels_last"
    return None


def test_sample_layout_reads_strides_as_the_view_rule():
    """Random shapes (sizes 1 included, where any stride is allowed), permutations and slices."""
    g = torch.Generator().manual_seed(torch.seed() % 2**32)
    seen = set()
    for _ in range(400):
        ndim = int(torch.randint(1, 6, (), generator=g))
        shape = [int(s) for s in torch.randint(1, 4, (ndim,), generator=g)]
        x = torch.empty(shape).permute(*torch.randperm(ndim, generator=g).tolist())
        if ndim > 1 and bool(torch.rand((), generator=g) < 0.3):
            x = x.movedim(1, -1).contiguous().movedim(-1, 1)  # channels-last storage
        if bool(torch.rand((), generator=g) < 0.2):
            x = x[..., ::2]
        got = _layout.sample_layout(x)
        assert got == _layout_by_view(x), (tuple(x.shape), x.stride())
        seen.add(got)
    assert seen == {"contiguous", "channels_last", None}


# ----------------------------------------------------------------------------- the benchmark


def test_host_overhead_prints_its_rows_as_json(capsys):
    """``--json``: a list of {"name", "us"} with the torch.add baseline and every op's rows (a few calls)."""
    from benchmarks import host_overhead

    host_overhead.main(["--json", "--calls", "2", "--repeats", "1"])
    rows = json.loads(capsys.readouterr().out)
    names = [r["name"] for r in rows]
    assert all(set(r) == {"name", "us"} and r["us"] > 0 for r in rows)
    assert any("torch.add" in n for n in names) and "F.group_norm fwd" in names
    for op in ("group_norm_silu", "attention", "q_sample", "training_target", "diffusion_loss", "sampler_step"):
        for entry in (op, op + "_unchecked"):
            assert any(n.startswith(entry + " ") for n in names), entry
    assert host_overhead.AUTOGRAD_FLOOR in names
    assert sum("fwd+bwd" in n for n in names) == 8  # GN, attention and the loss, twice each; F.group_norm; x * 2
    assert step_mod.use_triton is _backend.use_triton  # the kernels are back in place


def test_host_overhead_refuses_bad_counts(capsys):
    from benchmarks import host_overhead

    with pytest.raises(SystemExit) as exit_:
        host_overhead.main(["--calls", "0"])
    assert exit_.value.code == 2 and "--calls" in capsys.readouterr().err
