"""q_sample, training_target, min_snr_weight and diffusion_loss: kernel vs reference vs float64."""
import math

import pytest
import torch

import fastdiff
from fastdiff import ops
from fastdiff.ops import noising
from fastdiff.schedule import make_schedule
from tests.conftest import DTYPES, real_size, rel_err

# Shapes that are not multiples of the kernel's block; one sample, odd sizes, 1-D samples.
SHAPES = [(1, 1), (3, 5, 7, 9), (2, 3, 17, 33), (5, 1031), (2, 4, 3, 5, 6)]
REAL_SHAPES = [real_size((64, 4, 64, 64), id="sd-latents"), real_size((8, 3, 256, 256), id="pixels-256")]
# x_t is one fused multiply-add in fp32 rounded once to the output dtype: allow one
# output-dtype rounding step (relative).
TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _schedule(device, T=1000, ztsnr=False):
    return make_schedule("scaled_linear", T, zero_terminal_snr=ztsnr).alphas_cumprod.to(device, torch.float32)


def _inputs(shape, dtype, device, channels_last=False, T=1000):
    x0 = torch.randn(shape, device=device).to(dtype)
    if channels_last:
        x0 = x0.to(memory_format=torch.channels_last if x0.ndim == 4 else torch.channels_last_3d)
    t = torch.randint(0, T, (shape[0],), device=device)
    return x0, t


def _float64_math(x0, t, acp, noise):
    abar = acp.double()[t].view(-1, *([1] * (x0.ndim - 1)))
    x_t = abar.sqrt() * x0.double() + (1 - abar).sqrt() * noise.double()
    v = abar.sqrt() * noise.double() - (1 - abar).sqrt() * x0.double()
    return x_t, v


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_matches_float64_math(dtype):
    acp = _schedule("cpu")
    x0, t = _inputs((4, 3, 11, 13), dtype, "cpu")
    noise = torch.randn_like(x0)
    x_t, v = noising.noising_ref(x0, t, acp, noise, want_v=True)
    x_t64, v64 = _float64_math(x0, t, acp, noise)
    assert x_t.dtype == dtype and v.dtype == dtype
    assert rel_err(x_t, x_t64) < TOL[dtype]
    assert rel_err(v, v64) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + REAL_SHAPES)
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_kernel_matches_reference_given_noise(shape, dtype, prediction, device, poisoned_alloc):
    acp = _schedule(device)
    x0, t = _inputs(shape, dtype, device)
    noise = torch.randn(shape, device=device).to(dtype)
    x_t, n, target = ops.training_target(x0, t, acp, noise, prediction=prediction)
    ref_x_t, ref_v = noising.noising_ref(x0, t, acp, noise, want_v=True)
    assert n is noise
    assert x_t.dtype == dtype and x_t.shape == x0.shape
    assert rel_err(x_t, ref_x_t) < TOL[dtype]
    if prediction == "v":
        assert rel_err(target, ref_v) < TOL[dtype]
    else:
        assert target is noise


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,channels_last", [
    ((3, 5, 7, 9), False), ((2, 6, 5, 3), True), ((2, 3, 4, 5, 3), True),
    real_size((16, 4, 64, 64), False, id="sd-latents"), real_size((4, 3, 256, 256), True, id="pixels-256-cl"),
])  # fmt: skip
def test_kernel_draws_the_reference_noise(shape, dtype, channels_last, device, poisoned_alloc):
    """In-kernel Philox noise equals the reference's, for contiguous and channels_last."""
    acp = _schedule(device)
    x0, t = _inputs(shape, dtype, device, channels_last)
    x_t, noise, v = ops.training_target(
        x0, t, acp, prediction="v", generator=torch.Generator(device).manual_seed(7)
    )  # fmt: skip
    with fastdiff.use_backend("reference"):
        rx_t, rnoise, rv = ops.training_target(
            x0, t, acp, prediction="v", generator=torch.Generator(device).manual_seed(7)
        )  # fmt: skip
    assert x_t.stride() == x0.stride(), "the output keeps the input's memory layout"
    assert noise.dtype == dtype
    # Box-Muller in fp32: the kernel's and torch's log/cos differ by an ulp, which
    # can move a value across one rounding step of the output dtype.
    assert rel_err(noise, rnoise) < TOL[dtype]
    assert rel_err(x_t, rx_t) < TOL[dtype]
    assert rel_err(v, rv) < TOL[dtype]
    # The returned pair is consistent: x_t is formed from the noise as returned.
    ref_x_t, ref_v = noising.noising_ref(x0, t, acp, noise, want_v=True)
    assert rel_err(x_t, ref_x_t) < TOL[dtype]
    assert rel_err(v, ref_v) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_given_keys_draw_the_reference_noise_of_those_keys(dtype, device, poisoned_alloc):
    """training_target(keys=...) draws draw_noise_ref(keys, x0), and rows of a batch's keys draw
    those rows' noise (a distributed rank's share of a global batch)."""
    acp = _schedule(device)
    x0, t = _inputs((4, 3, 5, 7), dtype, device)
    keys = noising.draw_keys(4, device, torch.Generator(device).manual_seed(3))
    x_t, noise, target = ops.training_target(x0, t, acp, prediction="v", keys=keys)
    assert rel_err(noise, noising.draw_noise_ref(keys, x0)) < TOL[dtype]
    ref_x_t, ref_v = noising.noising_ref(x0, t, acp, noise, want_v=True)
    assert rel_err(x_t, ref_x_t) < TOL[dtype] and rel_err(target, ref_v) < TOL[dtype]
    _, rows, _ = ops.training_target(x0[1:3], t[1:3], acp, keys=keys[1:3])
    assert torch.equal(rows, noise[1:3])
    with pytest.raises(ValueError, match="keys"):
        ops.training_target(x0, t, acp, keys=keys, generator=torch.Generator(device))
    with pytest.raises(TypeError, match="keys.*int64"):
        ops.training_target(x0, t, acp, keys=keys.float())
    with pytest.raises(ValueError, match="keys.*shape"):
        ops.training_target(x0, t, acp, keys=keys[:3])


def test_noise_does_not_depend_on_memory_layout(device):
    acp = _schedule(device)
    x0, t = _inputs((2, 5, 6, 7), torch.float32, device)
    _, n_contig = ops.q_sample(x0, t, acp, generator=torch.Generator(device).manual_seed(3))
    _, n_cl = ops.q_sample(
        x0.to(memory_format=torch.channels_last), t, acp, generator=torch.Generator(device).manual_seed(3)
    )  # fmt: skip
    torch.testing.assert_close(n_contig, n_cl, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["kernel", "reference"])
def test_noise_statistics_and_reproducibility(backend, device):
    acp = _schedule(device)
    shape = (4, 3, 32, 32) if backend == "kernel" else (16, 4, 64, 64)
    x0, t = _inputs(shape, torch.float32, device)
    ctx = fastdiff.use_backend("reference") if backend == "reference" else fastdiff.use_backend("auto")
    with ctx:
        _, a = ops.q_sample(x0, t, acp, generator=torch.Generator(device).manual_seed(11))
        _, b = ops.q_sample(x0, t, acp, generator=torch.Generator(device).manual_seed(11))
        _, c = ops.q_sample(x0, t, acp, generator=torch.Generator(device).manual_seed(12))
    assert torch.equal(a, b), "same generator state must give the same noise"
    assert not torch.equal(a, c)
    n = a.numel()
    assert abs(a.mean().item()) < 5 / math.sqrt(n)
    assert abs(a.std().item() - 1) < 5 / math.sqrt(n)
    flat = a.flatten(1)
    # independent across samples: correlation of sample 0 with each other sample ~ N(0, 1/m)
    m = flat.shape[1]
    for j in range(1, flat.shape[0]):
        corr = torch.corrcoef(torch.stack([flat[0], flat[j]]))[0, 1].item()
        assert abs(corr) < 5 / math.sqrt(m)
    # and across neighbouring elements inside a sample
    lag = torch.corrcoef(torch.stack([flat[0, :-1], flat[0, 1:]]))[0, 1].item()
    assert abs(lag) < 5 / math.sqrt(m)
    # fourth moment of a Gaussian is 3: catches a uniform or otherwise wrong distribution
    assert abs(a.pow(4).mean().item() - 3) < 0.25


def test_sample_prediction_target_is_x0(device):
    acp = _schedule(device)
    x0, t = _inputs((2, 3, 5, 5), torch.float32, device)
    _, _, target = ops.training_target(x0, t, acp, prediction="sample")
    assert target is x0


def test_zero_terminal_snr_last_step(device):
    """At ᾱ = 0: x_t is pure noise, v = −x0, and min-SNR weights stay finite."""
    acp = _schedule(device, ztsnr=True)
    x0, _ = _inputs((2, 3, 4, 5), torch.float32, device)
    t = torch.full((2,), 999, device=device)
    x_t, noise, v = ops.training_target(x0, t, acp, prediction="v")
    torch.testing.assert_close(x_t, noise)
    torch.testing.assert_close(v, -x0)
    for prediction in noising.PREDICTIONS:
        w = ops.min_snr_weight(torch.arange(1000), acp.cpu(), 5.0, prediction)
        assert torch.isfinite(w).all(), prediction


@pytest.mark.parametrize("prediction", noising.PREDICTIONS)
def test_min_snr_weight_matches_definition(prediction):
    acp = _schedule("cpu")
    t = torch.randint(0, 1000, (64,))
    gamma = 5.0
    snr = acp.double()[t] / (1 - acp.double()[t])
    expected = {
        "epsilon": torch.minimum(snr, torch.tensor(gamma)) / snr,
        "v": torch.minimum(snr, torch.tensor(gamma)) / (snr + 1),
        "sample": torch.minimum(snr, torch.tensor(gamma)),
    }[prediction]
    torch.testing.assert_close(ops.min_snr_weight(t, acp, gamma, prediction), expected.float())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 5, 7, 9), (2, 1031), real_size((32, 4, 64, 64), id="sd-latents")])
def test_loss_kernel_matches_reference_forward_and_backward(shape, dtype, device, poisoned_alloc):
    pred = torch.randn(shape, device=device).to(dtype).requires_grad_()
    target = torch.randn(shape, device=device).to(dtype).requires_grad_()
    weight = torch.rand(shape[0], device=device) + 0.5
    loss = ops.diffusion_loss(pred, target, weight)
    g = torch.rand((), device=device) + 0.5
    (loss * g).backward()

    pred64 = pred.detach().double().requires_grad_()
    target64 = target.detach().double().requires_grad_()
    loss64 = noising.weighted_mse_ref(pred64, target64, weight.double())
    # weighted_mse_ref accumulates in fp32 by design; redo it in float64 for the oracle
    loss64 = (weight.double() * (pred64 - target64).pow(2).flatten(1).mean(1)).mean()
    (loss64 * g.double()).backward()
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert rel_err(loss.detach(), loss64.detach()) < 1e-5
    assert pred.grad.dtype == dtype
    # At real sizes the gradient 2·w·(pred − target)/(B·N) falls into fp16's subnormals, where
    # PyTorch's own autograd loses precision too: allow twice its error where that is larger.
    pred_pt, target_pt = pred.detach().clone().requires_grad_(), target.detach().clone().requires_grad_()
    loss_pt = (weight.to(dtype) * (pred_pt - target_pt).pow(2).flatten(1).mean(1)).mean()
    (loss_pt * g.to(dtype)).backward()
    for ours, exact, theirs in ((pred.grad, pred64.grad, pred_pt.grad), (target.grad, target64.grad, target_pt.grad)):
        assert rel_err(ours, exact) < max(TOL[dtype], 2 * rel_err(theirs, exact))


def test_loss_default_weight_is_plain_mse(device):
    pred, target = torch.randn(3, 4, 5, device=device), torch.randn(3, 4, 5, device=device)
    torch.testing.assert_close(ops.diffusion_loss(pred, target), torch.nn.functional.mse_loss(pred, target))


def test_gradient_flows_through_q_sample():
    """x0 that requires grad takes the differentiable reference: ∂x_t/∂x0 = sqrt(ᾱ_t), ∂x_t/∂ε = sqrt(1−ᾱ_t)."""
    acp = _schedule("cpu")
    x0 = torch.randn(2, 3, 4, 4, requires_grad=True)
    noise = torch.randn(2, 3, 4, 4, requires_grad=True)
    t = torch.tensor([10, 900])
    x_t, _ = ops.q_sample(x0, t, acp, noise)
    x_t.sum().backward()
    abar = acp[t].view(2, 1, 1, 1).expand_as(x0)
    torch.testing.assert_close(x0.grad, abar.sqrt())
    torch.testing.assert_close(noise.grad, (1 - abar).sqrt())


def test_bad_inputs_name_the_argument():
    acp = _schedule("cpu")
    x0 = torch.randn(2, 3, 4, 4)
    t = torch.tensor([0, 999])
    with pytest.raises(ValueError, match=r"\bt\b.*\[0, 999\]"):
        ops.q_sample(x0, torch.tensor([0, 1000]), acp)
    with pytest.raises(ValueError, match=r"\bt\b"):
        ops.q_sample(x0, torch.tensor([-1, 3]), acp)
    with pytest.raises(TypeError, match=r"\bt\b.*int64"):
        ops.q_sample(x0, t.float(), acp)
    with pytest.raises(ValueError, match=r"\bt\b.*one timestep per sample"):
        ops.q_sample(x0, torch.tensor([1, 2, 3]), acp)
    with pytest.raises(ValueError, match="alphas_cumprod.*device"):
        ops.q_sample(x0, t, acp.to("meta"))
    with pytest.raises(TypeError, match="x0"):
        ops.q_sample(torch.ones(2, 3, dtype=torch.int64), t, acp)
    with pytest.raises(ValueError, match="noise.*shape"):
        ops.q_sample(x0, t, acp, torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match="prediction"):
        ops.training_target(x0, t, acp, prediction="score")
    with pytest.raises(ValueError, match="target.*shape"):
        ops.diffusion_loss(x0, x0[:1])
    with pytest.raises(ValueError, match="weight"):
        ops.diffusion_loss(x0, x0, torch.ones(3))


def test_out_of_range_timestep_reads_nothing_and_gives_nan(device, poisoned_alloc):
    """On a GPU the range is not checked on the host (a sync): the kernel and reference guard the index."""
    acp = _schedule(device)
    x0 = torch.randn(3, 2, 5, 7, device=device)
    t = torch.tensor([5, 1000, -1], device=device)
    x_t, _, v = noising._noising_triton(x0, t, acp, None, noising.draw_keys(3, device), True)
    ref_x_t, ref_v = noising.noising_ref(x0, t, acp, torch.randn_like(x0), True)
    for out in (x_t, v, ref_x_t, ref_v):
        assert torch.isfinite(out[0]).all() and torch.isnan(out[1:]).all()


def test_no_graph_break_under_torch_compile():
    acp = _schedule("cpu")

    def step(x0, t, noise, pred):
        x_t, _, target = ops.training_target(x0, t, acp, noise, prediction="v")
        return ops.diffusion_loss(pred + x_t, target, ops.min_snr_weight(t, acp, 5.0, "v"))

    x0 = torch.randn(2, 3, 4, 4)
    args = (x0, torch.tensor([3, 500]), torch.randn_like(x0), torch.randn_like(x0))
    explanation = torch._dynamo.explain(step)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
