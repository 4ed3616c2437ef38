"""The benchmark set as pytest-benchmark tests, at tiny shapes: ``pytest tests/test_benchmarks.py``.

One test per (op, implementation) of ``benchmarks/`` — the noising ops, GroupNorm+SiLU,
attention, the sampler step, the patched diffusers UNet and a short sampling loop — each
against its eager PyTorch baseline, grouped per op in pytest-benchmark's table.  On a
GPU (``FASTDIFF_BACKEND=auto``) "fastdiff" is the Triton kernels; on a CPU it is the ops'
PyTorch reference path (``extra_info["path"]`` says which), so the timings there only
prove the set runs.  The shapes are the full benchmarks' in miniature; the real numbers
come from ``fastdiff bench``.  Without pytest-benchmark the module is skipped.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("pytest_benchmark")

import fastdiff  # noqa: E402
from fastdiff import ops  # noqa: E402
from fastdiff.ops.sampler_step import step_coefficients  # noqa: E402

from conftest import kernel_device  # noqa: E402

IMPLS = ["fastdiff", "eager"]
ROUNDS = dict(rounds=3, iterations=1, warmup_rounds=1)


def _path() -> str:
    return "triton" if kernel_device() == "cuda" else "reference"


def run_bench(benchmark, impl: str, fns: dict):
    """Time ``fns[impl]``; fastdiff on its kernel (GPU) or reference (CPU) path."""
    fn = fns[impl]
    benchmark.extra_info["path"] = _path() if impl == "fastdiff" else "pytorch"
    with fastdiff.use_backend("auto" if _path() == "triton" else "reference"):
        return benchmark.pedantic(fn, **ROUNDS)


def _sync(fn):
    """Wait for the device, so the timer sees the work and not the launch."""
    if kernel_device() != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


# ----------------------------------------------------------------------------- ops


@pytest.mark.benchmark(group="q_sample")
@pytest.mark.parametrize("impl", IMPLS)
def test_q_sample(benchmark, impl):
    dev = kernel_device()
    x0, noise = torch.randn(2, 4, 17, 19, device=dev), torch.randn(2, 4, 17, 19, device=dev)
    t, acp = torch.tensor([3, 900], device=dev), torch.linspace(0.999, 0.01, 1000, device=dev)

    def eager():
        a = acp[t].view(-1, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    fns = {"fastdiff": _sync(lambda: ops.q_sample(x0, t, acp, noise)[0]), "eager": _sync(eager)}
    out = run_bench(benchmark, impl, fns)
    assert out.shape == x0.shape


@pytest.mark.benchmark(group="diffusion_loss.fwd+bwd")
@pytest.mark.parametrize("impl", IMPLS)
def test_diffusion_loss(benchmark, impl):
    dev = kernel_device()
    pred = torch.randn(2, 4, 17, 19, device=dev, requires_grad=True)
    target = torch.randn(2, 4, 17, 19, device=dev)

    def fused():
        ops.diffusion_loss(pred, target).backward()

    def eager():
        F.mse_loss(pred, target).backward()

    run_bench(benchmark, impl, {"fastdiff": _sync(fused), "eager": _sync(eager)})
    assert pred.grad is not None


@pytest.mark.benchmark(group="group_norm_silu.fwd+bwd")
@pytest.mark.parametrize("impl", IMPLS)
def test_group_norm_silu(benchmark, impl):
    dev = kernel_device()
    x = torch.randn(2, 64, 9, 11, device=dev, requires_grad=True)
    w, b = torch.randn(64, device=dev), torch.randn(64, device=dev)
    scale, shift = 0.1 * torch.randn(2, 64, device=dev), 0.1 * torch.randn(2, 64, device=dev)

    def fused():
        ops.group_norm_silu(x, 8, w, b, scale=scale, shift=shift).sum().backward()

    def eager():
        h = F.group_norm(x, 8, w, b) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        F.silu(h).sum().backward()

    run_bench(benchmark, impl, {"fastdiff": _sync(fused), "eager": _sync(eager)})
    assert x.grad is not None


@pytest.mark.benchmark(group="attention.fwd+bwd")
@pytest.mark.parametrize("impl", IMPLS)
def test_attention(benchmark, impl):
    dev = kernel_device()
    dtype = torch.float16 if dev == "cuda" else torch.float32
    q = torch.randn(1, 2, 77, 40, device=dev, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(1, 2, 33, 40, device=dev, dtype=dtype, requires_grad=True) for _ in range(2))

    def fused():
        ops.attention(q, k, v).sum().backward()

    def sdpa():
        F.scaled_dot_product_attention(q, k, v).sum().backward()

    run_bench(benchmark, impl, {"fastdiff": _sync(fused), "eager": _sync(sdpa)})
    assert q.grad is not None


COEFFS = dict(x0_from_x=1.2, x0_from_out=-0.4, eps_from_out=1.0, x0=0.9, eps=0.3)


@pytest.mark.benchmark(group="sampler_step")
@pytest.mark.parametrize("impl", IMPLS)
def test_sampler_step(benchmark, impl):
    dev = kernel_device()
    x, o_c, o_u = (torch.randn(2, 4, 17, 19, device=dev) for _ in range(3))
    coeffs = step_coefficients(**COEFFS).float().to(dev)

    def eager():
        o = o_u + 3.0 * (o_c - o_u)
        x0 = COEFFS["x0_from_x"] * x + COEFFS["x0_from_out"] * o
        return COEFFS["x0"] * x0 + COEFFS["eps"] * (COEFFS["eps_from_out"] * o)

    fns = {"fastdiff": _sync(lambda: ops.sampler_step(x, o_c, coeffs, uncond_output=o_u, guidance_scale=3.0)[0]),
           "eager": _sync(eager)}  # fmt: skip
    assert run_bench(benchmark, impl, fns).shape == x.shape


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def unets():
    """A tiny diffusers UNet2DConditionModel: (patched, unpatched) copies, same weights."""
    diffusers = pytest.importorskip("diffusers")
    patch = pytest.importorskip("fastdiff.patch")
    torch.manual_seed(0)
    dtype = torch.float16 if kernel_device() == "cuda" else torch.float32
    plain = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), norm_num_groups=32, layers_per_block=1, sample_size=8, in_channels=4,
        out_channels=4, cross_attention_dim=32, attention_head_dim=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).to(kernel_device(), dtype).eval()  # fmt: skip
    fused = copy.deepcopy(plain)
    patch.patch(fused)
    return {"fastdiff": fused, "eager": plain}


@pytest.mark.benchmark(group="diffusers_unet")
@pytest.mark.parametrize("impl", IMPLS)
def test_diffusers_unet(benchmark, impl, unets):
    dev, dtype = kernel_device(), unets["eager"].dtype
    x, t, ctx = torch.randn(1, 4, 8, 8, device=dev, dtype=dtype), torch.tensor([500], device=dev), torch.randn(
        1, 8, 32, device=dev, dtype=dtype
    )
    fns = {name: _sync(torch.no_grad()(lambda m=m: m(x, t, ctx).sample)) for name, m in unets.items()}
    assert run_bench(benchmark, impl, fns).shape == x.shape


@pytest.mark.benchmark(group="sampling_loop")
@pytest.mark.parametrize("impl", IMPLS)
def test_sampling_loop(benchmark, impl, unets):
    """Two guided steps: the UNet on [x; x] and the step update (fused, or diffusers-style eager)."""
    dev, dtype = kernel_device(), unets["eager"].dtype
    x_T = torch.randn(1, 4, 8, 8, device=dev, dtype=dtype)
    ctx = torch.randn(2, 8, 32, device=dev, dtype=dtype)
    coeffs = step_coefficients(**COEFFS).float().to(dev)
    model = unets[impl]

    @torch.no_grad()
    def loop():
        x = x_T
        for t in (700, 300):
            o_u, o_c = model(torch.cat([x, x]), torch.tensor([t, t], device=dev), ctx).sample.chunk(2)
            if impl == "fastdiff":
                x, _ = ops.sampler_step(x, o_c, coeffs, uncond_output=o_u, guidance_scale=3.0)
            else:
                o = o_u + 3.0 * (o_c - o_u)
                x = COEFFS["x0"] * (COEFFS["x0_from_x"] * x + COEFFS["x0_from_out"] * o) + COEFFS["eps"] * o
        return x

    assert run_bench(benchmark, impl, {impl: _sync(loop)}).shape == x_T.shape


# ----------------------------------------------------------------------------- the `fastdiff bench` command


def test_fastdiff_bench_writes_json_report_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    import json

    from fastdiff.bench import main

    assert main(["--only", "diffusers_unet", "--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "diffusers_unet.json").read_text())
    assert data["environment"]["gpu"] == (kernel_device() == "cuda") and data["rows"]
    assert all(row["items_per_s"] > 0 for row in data["rows"])
    report = (tmp_path / "report.md").read_text()
    assert "## diffusers_unet" in report and "| images/s |" in report
    if kernel_device() != "cuda":
        assert "CPU reference path only" in report
    plots = list((tmp_path / "plots").glob("diffusers_unet-*.png"))
    assert plots and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)
    assert f"plots/{plots[0].name}" in report


def test_fastdiff_bench_reports_a_failing_entry(tmp_path, monkeypatch):
    from benchmarks import run

    from fastdiff.bench import main

    def broken(name, quick, bandwidth, out_dir=None):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(run, "run_entry", broken)
    assert main(["--only", "noising", "--out", str(tmp_path)]) == 1
    assert "- `noising`: RuntimeError: out of memory" in (tmp_path / "report.md").read_text()
