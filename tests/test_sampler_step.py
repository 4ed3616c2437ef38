"""The fused sampler step: kernel vs reference vs float64 math, guidance rescale, inpainting, noise, errors."""
import math

import pytest
import torch

from conftest import DTYPES, real_size, rel_err
from fastdiff.ops import _backend, use_backend
from fastdiff.ops.philox import randn_like_philox, step_keys
from fastdiff.ops.fused_step import (
    COEFFICIENTS,
    NUM_COEFFICIENTS,
    _sampler_step_call,
    guided_output_ref,
    sampler_step,
    sampler_step_ref,
    step_coefficients,
)


def random_coeffs(batch: int | None = None) -> torch.Tensor:
    """Coefficients of a plausible size (fresh each run); (K,) or (B, K) fp32."""
    shape = (NUM_COEFFICIENTS,) if batch is None else (batch, NUM_COEFFICIENTS)
    return torch.empty(shape).uniform_(-1.5, 1.5)


def make_inputs(shape, dtype, device, *, out_dtype=None, guidance=False, rescale=False, clip=False, multistep=False,
                noise=False, inpaint=None, per_image=False, channels_last=False):  # fmt: skip
    """(args, kwargs) of one sampler_step call with fresh random tensors."""
    out_dtype = out_dtype or dtype
    B = shape[0]

    def rnd(dt):
        t = torch.randn(shape, device=device).to(dt)
        return t.contiguous(memory_format=torch.channels_last) if channels_last else t

    x = rnd(dtype)
    kw = dict(return_x0=True, step=int(torch.randint(0, 2**40, ())))
    if guidance:
        kw.update(uncond_output=rnd(out_dtype), guidance_scale=float(torch.empty(()).uniform_(1.0, 9.0)))
        if rescale:
            kw["guidance_rescale"] = float(torch.rand(()))
    if clip:
        kw["clip_x0"] = 0.8
    if multistep:
        kw["x0_prev"] = rnd(dtype)
    if noise or inpaint:
        kw["seeds"] = torch.randint(-(2**62), 2**62, (B,), device=device)
        kw["add_noise"] = noise
    if inpaint:
        kw["known"] = rnd(dtype)
        mshape = (B, 1, *shape[2:]) if inpaint == "per_pixel" else shape
        kw["mask"] = torch.rand(mshape, device=device).round().to(dtype)  # binary, as inpainting masks are
    coeffs = random_coeffs(B if per_image else None).to(device)
    return (x, rnd(out_dtype), coeffs), kw


CONFIGS = {
    "plain": dict(),
    "cfg": dict(guidance=True),
    "cfg-rescale": dict(guidance=True, rescale=True),
    "multistep-clip-noise": dict(multistep=True, clip=True, noise=True),
    "inpaint": dict(inpaint="full"),
    "everything": dict(guidance=True, rescale=True, clip=True, multistep=True, noise=True, inpaint="per_pixel"),
    "per-image-coeffs": dict(guidance=True, noise=True, per_image=True),
}
SHAPES = [(1, 3, 5, 7), (3, 2, 33, 17), (2, 1, 1030)]
REAL_SHAPES = [real_size((8, 4, 64, 64), id="sd-latents"), real_size((4, 3, 256, 256), id="pixels-256")]


def assert_faithful(name, out, exact):
    """Each element is within one unit of ``out``'s precision of the float64 result (one of its two
    neighbours in that dtype), plus fp32's own rounding of O(100)-sized intermediate terms (w·(o_c − o_u)).
    One unit, not half: Triton's interpreter truncates fp32 → bf16 where GPUs round to nearest."""
    err = (out.double() - exact).abs()
    bound = torch.finfo(out.dtype).eps * exact.abs() + 3e-5
    worst = (err - bound).max()
    assert torch.isfinite(out).all() and worst <= 0, f"{name}: off by {err.max():.2e} (bound exceeded by {worst:.2e})"


def reference64(args, kw):
    """The reference run in float64 on the same (rounded) inputs: the 'exact' answer."""
    up = lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
    x, out, coeffs = (up(a) for a in args)
    kw = {k: up(v) for k, v in kw.items() if k != "return_x0"}
    uncond = kw.pop("uncond_output", None)
    return sampler_step_ref(x, out, coeffs, uncond, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("shape", SHAPES + REAL_SHAPES)
def test_kernel_matches_reference(shape, config, dtype, device, poisoned_alloc):
    if not _backend.HAS_TRITON:
        pytest.skip("triton not importable")
    opts = CONFIGS[config]
    if opts.get("inpaint") == "per_pixel" and len(shape) < 3:
        opts = {**opts, "inpaint": "full"}
    args, kw = make_inputs(shape, dtype, device, **opts)
    with use_backend("triton" if device == "cuda" else "auto"):
        x_next, x0 = sampler_step(*args, **kw)
    with use_backend("reference"):
        r_next, r0 = sampler_step(*args, **kw)
    e_next, e0 = reference64(args, kw)
    assert x_next.dtype == dtype and x_next.shape == args[0].shape
    for name, out, ref, exact in (("x_next", x_next, r_next, e_next), ("x0", x0, r0, e0)):
        assert_faithful(f"reference {name}", ref, exact)
        assert_faithful(f"kernel {name}", out, exact)
    if dtype == torch.float32:
        torch.testing.assert_close(x_next, r_next, rtol=1e-5, atol=1e-5)


def test_channels_last_and_mixed_dtypes(device, poisoned_alloc):
    """fp32 state with a bf16 model output; channels_last state with contiguous model output."""
    shape = (2, 3, 9, 11)
    args, kw = make_inputs(shape, torch.float32, device, out_dtype=torch.bfloat16, guidance=True, rescale=True,
                           noise=True, inpaint="per_pixel", channels_last=True)  # fmt: skip
    args = (args[0], args[1].contiguous(), args[2])  # model output in another layout than x
    x_next, _ = sampler_step(*args, **kw)
    with use_backend("reference"):
        r_next, _ = sampler_step(*args, **kw)
    assert x_next.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x_next, r_next, rtol=1e-5, atol=1e-5)


def test_reference_matches_float64_formulas():
    """The reference (fp32) against the step's equations written out independently in float64."""
    B, shape = 3, (3, 4, 6, 5)
    x, o_c, o_u, x0_prev, known = (torch.randn(shape, dtype=torch.float64) for _ in range(5))
    mask = torch.rand(B, 1, 6, 5).round().double()
    seeds = torch.randint(0, 2**62, (B,))
    c = {n: float(v) for n, v in zip(COEFFICIENTS, random_coeffs())}
    w, phi, r, step = 6.5, 0.7, 0.9, 11

    g = o_u + w * (o_c - o_u)
    std = lambda t: t.flatten(1).std(1).view(B, 1, 1, 1)  # noqa: E731
    g = phi * g * std(o_c) / std(g) + (1 - phi) * g
    x0 = (c["x0_from_x"] * x + c["x0_from_out"] * g).clamp(-r, r)
    eps = c["eps_from_x"] * x + c["eps_from_out"] * g
    z = randn_like_philox(step_keys(seeds, torch.tensor(step)), (B, 2 * 4 * 6 * 5)).double()
    z, z_known = z[:, :120].reshape(shape), z[:, 120:].reshape(shape)
    want = c["x"] * x + c["x0"] * x0 + c["eps"] * eps + c["x0_prev"] * x0_prev + c["noise"] * z
    want = mask * want + (1 - mask) * (c["known"] * known + c["known_noise"] * z_known)

    f = lambda t: t.float()  # noqa: E731
    with use_backend("reference"):
        got, got_x0 = sampler_step(
            f(x), f(o_c), torch.tensor(list(c.values())), uncond_output=f(o_u), guidance_scale=w,
            guidance_rescale=phi, clip_x0=r, x0_prev=f(x0_prev), return_x0=True, seeds=seeds, step=step,
            add_noise=True, known=f(known), mask=f(mask),
        )  # fmt: skip
    assert rel_err(got, want) < 1e-6
    assert rel_err(got_x0, x0) < 1e-6


def test_guidance_rescale_matches_diffusers():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    o_c, o_u = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    w, phi = 7.5, 0.7
    guided = o_u + w * (o_c - o_u)
    want = rescale_noise_cfg(guided, o_c, guidance_rescale=phi)
    assert rel_err(guided_output_ref(o_c, o_u, w, phi), want) < 1e-6


def test_rescale_statistics_survive_a_large_mean(device):
    """Chunked mean/M2, not raw sums of squares: with mean ≫ std (300 vs 0.01) the kernel's rescale is
    as accurate as the two-pass torch.std reference; a one-pass Σx² − n·mean² would lose every digit."""
    shape = (2, 3, 9001)  # 27003 elements: 27 chunks of 1024, the last one short
    o_c = (torch.randn(shape) * 0.01 + 300.0).to(device)
    o_u = (torch.randn(shape) * 0.01 + 300.0).to(device)
    x = torch.zeros(shape, device=device)
    coeffs = step_coefficients(x0_from_out=1.0, x0=1.0).float().to(device)
    kw = dict(uncond_output=o_u, guidance_scale=3.0, guidance_rescale=1.0)
    out, _ = sampler_step(x, o_c, coeffs, **kw)
    with use_backend("reference"):
        ref, _ = sampler_step(x, o_c, coeffs, **kw)
    exact = guided_output_ref(o_c.double(), o_u.double(), 3.0, 1.0)
    assert rel_err(out, exact) <= 2 * rel_err(ref, exact) + 1e-6


@pytest.mark.parametrize("dtype", DTYPES)
def test_known_region_is_exact(dtype, device):
    """With the last step's blend (known·1 + z'·0) the known region is the known image, bit for bit."""
    shape = (2, 3, 7, 13)
    args, kw = make_inputs(shape, dtype, device, guidance=True, noise=True, inpaint="per_pixel")
    coeffs = args[2].clone()
    coeffs[COEFFICIENTS.index("known")] = 1.0
    coeffs[COEFFICIENTS.index("known_noise")] = 0.0
    x_next, _ = sampler_step(args[0], args[1], coeffs, **kw)
    keep = (kw["mask"] == 0).expand(shape)
    assert keep.any() and (~keep).any()
    assert torch.equal(x_next[keep], kw["known"][keep])


def test_noise_is_per_image_and_standard_normal(device):
    """Image b's noise depends on its seed only; z and z' are independent N(0, 1)."""
    shape = (3, 2, 19, 23)
    seeds = torch.randint(-(2**62), 2**62, (3,), device=device)
    zeros = torch.zeros(shape, device=device)
    noise_only = step_coefficients(noise=1.0, known_noise=1.0).float().to(device)
    mask = torch.ones(shape, device=device)
    z, _ = sampler_step(zeros, zeros, noise_only, seeds=seeds, step=5, add_noise=True, known=zeros, mask=mask)
    alone, _ = sampler_step(zeros[:1], zeros[:1], noise_only, seeds=seeds[1:2], step=5, add_noise=True,
                            known=zeros[:1], mask=mask[:1])  # fmt: skip
    torch.testing.assert_close(z[1:2], alone, rtol=0, atol=0)
    other_step, _ = sampler_step(zeros, zeros, noise_only, seeds=seeds, step=6, add_noise=True)
    assert not torch.equal(other_step, z)
    z_known, _ = sampler_step(zeros, zeros, noise_only, seeds=seeds, step=5, known=zeros, mask=0 * mask)
    n = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(n) and abs(z.std().item() - 1) < 5 / math.sqrt(n)
    corr = ((z - z.mean()) * (z_known - z_known.mean())).mean() / (z.std() * z_known.std())
    assert abs(corr.item()) < 5 / math.sqrt(n)


def test_registered_op_checks():
    """Schema, fake (meta) kernel and dispatch of the torch.library op (reference path)."""
    args, kw = make_inputs((2, 3, 4, 5), torch.float32, "cpu", guidance=True, rescale=True, noise=True,
                           multistep=True, inpaint="per_pixel")  # fmt: skip
    x, out, coeffs = args
    op_args = (x, out, coeffs, kw["uncond_output"], kw["x0_prev"], kw["seeds"], kw["known"], kw["mask"],
               kw["guidance_scale"], kw["guidance_rescale"], None, kw["step"], True, True)  # fmt: skip
    with use_backend("reference"):
        torch.library.opcheck(_sampler_step_call.registered, op_args, test_utils=("test_schema", "test_faketensor"))


def test_step_coefficients():
    v = step_coefficients(x0=2.0, noise=0.5)
    assert v.dtype == torch.float64 and v.shape == (NUM_COEFFICIENTS,)
    assert v[COEFFICIENTS.index("x0")] == 2.0 and v[COEFFICIENTS.index("noise")] == 0.5 and v.abs().sum() == 2.5
    with pytest.raises(ValueError, match="x_0"):
        step_coefficients(x_0=1.0)


def test_errors_name_the_argument():
    x = torch.randn(2, 3, 4, 5)
    c = random_coeffs()
    seeds = torch.zeros(2, dtype=torch.int64)
    cases = [
        (TypeError, "x must", dict(x=x.double())),
        (ValueError, "x must", dict(x=torch.randn(2))),
        (ValueError, "x must not be empty", dict(x=torch.randn(0, 3), out=torch.randn(0, 3))),
        (ValueError, "model_output", dict(out=torch.randn(2, 3, 4, 6))),
        (TypeError, "model_output", dict(out=x.long())),
        (ValueError, "coeffs", dict(coeffs=torch.zeros(5))),
        (ValueError, "coeffs", dict(coeffs=torch.zeros(3, NUM_COEFFICIENTS))),
        (TypeError, "coeffs", dict(coeffs=torch.zeros(NUM_COEFFICIENTS, dtype=torch.int64))),
        (ValueError, "uncond_output", dict(uncond_output=torch.randn(1, 3, 4, 5))),
        (TypeError, "uncond_output", dict(uncond_output=x.half())),
        (ValueError, "guidance_rescale", dict(uncond_output=x, guidance_rescale=1.5)),
        (ValueError, "guidance_scale must be finite, got nan", dict(uncond_output=x, guidance_scale=float("nan"))),
        (ValueError, "guidance_scale must be finite, got inf", dict(uncond_output=x, guidance_scale=float("inf"))),
        (ValueError, "guidance_rescale", dict(guidance_rescale=0.5)),
        (ValueError, "clip_x0", dict(clip_x0=-1.0)),
        (ValueError, "x0_prev", dict(x0_prev=torch.randn(2, 3))),
        (ValueError, "step", dict(step=-1)),
        (ValueError, "step", dict(step=1.5)),
        (ValueError, "seeds", dict(add_noise=True)),
        (TypeError, "seeds", dict(add_noise=True, seeds=seeds.int())),
        (ValueError, "seeds", dict(add_noise=True, seeds=seeds[:1])),
        (ValueError, "mask", dict(known=x, seeds=seeds)),
        (ValueError, "mask", dict(known=x, mask=torch.ones(2, 3, 1, 1), seeds=seeds)),
        (ValueError, "known", dict(known=torch.randn(2, 3), mask=torch.ones(2, 3), seeds=seeds)),
        (ValueError, "seeds", dict(known=x, mask=torch.ones(2, 1, 4, 5))),
    ]
    for exc, match, over in cases:
        args = dict(x=x, out=x, coeffs=c)
        args.update({k: over.pop(k) for k in ("x", "out", "coeffs") if k in over})
        with pytest.raises(exc, match=match):
            sampler_step(args["x"], args["out"], args["coeffs"], **over)
