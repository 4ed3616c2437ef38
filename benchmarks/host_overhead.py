"""Host cost of each op's eager path: ``python -m benchmarks.host_overhead [--json]``.

At diffusion sizes the memory-bound ops take a few µs on a GPU, so what a call costs on
the host (argument checks, allocations, autograd, dispatch, launch set-up) decides their
speed.  This measures that path on any machine, with ATen baselines from the same run:
``torch.add(a, b, out=c)`` (one native elementwise op), ``x * 2`` forward+backward (the least
a call through autograd and ``backward()`` costs) and ``F.group_norm`` on tiny tensors.  The
targets (a benchmark, never a timed test): every forward op within 4× the ``torch.add`` row,
every forward+backward within 20×.

Rows: each public op (validate + launch path), forward and, where the op has a
backward, forward+backward; each unchecked entry (``*_unchecked``: the launch path alone,
what a model or sampling loop pays per call after checking its arguments once); and two
loops: one step of `fastdiff.samplers.sample` with a trivial model, and a tiny UNet
forward (its convolutions and linears run for real on the CPU, at a size where they cost
little).

How launches are taken out: the ops run inside `fastdiff.ops.dry_run()`, the library's
dry-run switch.  Every op takes its kernel path on CPU tensors, down to the C function of
libfastdiff_kernels that validates the call, picks its launch-table case and fills the
kernel's parameters, and stops before the driver call (`cuLaunchKernel`, about 1.3 µs on
a GPU, is the only host cost left out).  Nothing is computed on the tensors.

Shapes are tiny: the host path does not depend on the size, and CPU allocations of large
blocks (mmap and page faults) say nothing about a GPU's caching allocator.  The rows are
timed in rounds, each round taking the mean over ``--calls`` calls of every row in turn,
so that a row and the ``torch.add`` baseline see the same load on a shared machine; a
row's figure is its best round.  Many short rounds (50 calls, 40 rounds) filter a loaded
machine's spikes better than a few long ones; the ratios still vary by about ±20 % from run
to run there.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import time
from typing import Callable

import torch
import torch.nn.functional as F

import fastdiff.ops

from benchmarks.harness import forward_backward

BASELINE = "torch.add(a, b, out=c)"
AUTOGRAD_FLOOR = "x * 2 fwd+bwd (autograd's floor)"
TARGETS = {"fwd": 4.0, "fwd+bwd": 20.0}  # × the torch.add row


def warm_up(fn: Callable[[], object], calls: int) -> None:
    for _ in range(min(calls, 20)):
        fn()


def mean_us(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def _op(module: str, name: str):
    """``fastdiff.ops.<module>.<name>``, or None where this version of the library has no such entry."""
    return getattr(importlib.import_module(f"fastdiff.ops.{module}"), name, None)


def _leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_() for t in tensors]


def baseline_cases() -> dict[str, Callable]:
    """ATen on tiny tensors: one elementwise op, the cheapest forward+backward autograd runs (one ATen op
    and its backward node), and GroupNorm forward and forward+backward."""
    a, b, c = torch.randn(16), torch.randn(16), torch.empty(16)
    x = torch.randn(2, 8, 4, 4)
    w, bias = torch.randn(8), torch.randn(8)
    gn_leaves = _leaves(x, w, bias)
    gn_fb = forward_backward(lambda *t: F.group_norm(t[0], 4, t[1], t[2]), gn_leaves, torch.randn_like(x))
    mul_fb = forward_backward(lambda t: torch.mul(t, 2.0), _leaves(x), torch.randn_like(x))
    return {
        BASELINE: lambda: torch.add(a, b, out=c),
        AUTOGRAD_FLOOR: mul_fb,
        "F.group_norm fwd": lambda: F.group_norm(x, 4, w, bias),
        "F.group_norm fwd+bwd": gn_fb,
    }


def _group_norm_cases(entry: str) -> dict[str, Callable]:
    gn = _op("group_norm", entry)
    if gn is None:
        return {}
    dt = torch.bfloat16
    x = torch.randn(2, 32, 6, 6, dtype=dt).to(memory_format=torch.channels_last)
    w, b, film = torch.randn(32, dtype=dt), torch.randn(32, dtype=dt), torch.randn(2, 32, dtype=dt)
    w32, b32 = w.float(), b.float()
    leaves = _leaves(x, w, b, film, film)
    fwd_bwd = forward_backward(
        lambda *t: gn(t[0], 8, t[1], t[2], scale=t[3], shift=t[4]), leaves, torch.randn_like(x)
    )
    return {
        f"{entry} fwd (bf16 γ, β, FiLM)": lambda: gn(x, 8, w, b, scale=film, shift=film),
        f"{entry} fwd (fp32 γ, β)": lambda: gn(x, 8, w32, b32),
        f"{entry} fwd+bwd": fwd_bwd,
    }


def _attention_cases(entry: str) -> dict[str, Callable]:
    attn = _op("flash_attention", entry)
    if attn is None:
        return {}
    q = torch.randn(2, 2, 9, 32, dtype=torch.bfloat16)
    scale = 32**-0.5
    leaves = _leaves(q, q, q)
    fwd_bwd = forward_backward(lambda *t: attn(*t, scale=scale), leaves, torch.randn_like(q))
    return {f"{entry} fwd": lambda: attn(q, q, q, scale=scale), f"{entry} fwd+bwd": fwd_bwd}


def _noising_cases(suffix: str) -> dict[str, Callable]:
    q_sample, target = _op("noising", "q_sample" + suffix), _op("noising", "training_target" + suffix)
    loss = _op("noising", "diffusion_loss" + suffix)
    if q_sample is None:
        return {}
    acp = torch.linspace(0.99, 0.01, 1000)
    x0, t = torch.randn(2, 4, 6, 6, dtype=torch.bfloat16), torch.randint(0, 1000, (2,))
    pred, weight = _leaves(x0)[0], torch.rand(2)
    return {
        f"q_sample{suffix} (drawn noise)": lambda: q_sample(x0, t, acp),
        f"training_target{suffix} v": lambda: target(x0, t, acp, prediction="v"),
        f"diffusion_loss{suffix} fwd": lambda: loss(pred, x0, weight),
        f"diffusion_loss{suffix} fwd+bwd": forward_backward(lambda p: loss(p, x0, weight), [pred], None),
    }


def _sampler_step_cases(entry: str) -> dict[str, Callable]:
    step = _op("fused_step", entry)
    if step is None:
        return {}
    coeffs = _op("fused_step", "step_coefficients")(x0_from_x=1.2, x0_from_out=-0.6, eps_from_out=1.0, x=0.9, x0=0.1)
    coeffs = coeffs.float()
    x = torch.randn(2, 4, 6, 6, dtype=torch.bfloat16)
    seeds = torch.arange(2)
    return {
        f"{entry} cfg + noise": lambda: step(
            x, x, coeffs, uncond_output=x, guidance_scale=7.5, seeds=seeds, step=3, add_noise=True
        )
    }


def op_cases() -> dict[str, Callable]:
    """Each op's public function and its unchecked entry, where the library has one."""
    cases = {}
    for suffix in ("", "_unchecked"):
        cases |= _group_norm_cases("group_norm_silu" + suffix)
        cases |= _attention_cases("attention" + suffix)
        cases |= _noising_cases(suffix)
        cases |= _sampler_step_cases("sampler_step" + suffix)
    return cases


def loop_cases() -> dict[str, Callable]:
    """One `samplers.sample` evaluation (guided DDIM, trivial model) and one tiny UNet forward."""
    from fastdiff import samplers
    from fastdiff.nn import UNet, UNetConfig
    from fastdiff.schedule import make_schedule, timesteps

    steps = 20
    plan = samplers.ddim_plan(make_schedule("scaled_linear", 1000), timesteps(steps, 1000), eta=1.0)
    seeds = torch.arange(2)
    x_T = torch.randn(2, 4, 6, 6)
    cfg = UNetConfig.preset("tiny", model_channels=32, context_dim=32, pooled_dim=16)
    unet = UNet(cfg).eval()
    x, t, ctx, pooled = torch.randn(1, 3, 8, 8), torch.tensor([500]), torch.randn(1, 3, 32), torch.randn(1, 16)

    def one_step():  # a whole loop, divided by its evaluations below
        samplers.sample(lambda x, t: x, x_T, seeds, plan, guidance_scale=4.0)

    return {
        f"samplers.sample, per step ({steps} guided DDIM steps)": (one_step, steps),
        "UNet forward (tiny preset, 1×3×8×8)": (lambda: unet(x, t, ctx, pooled), 1),
    }


def measure(calls: int, repeats: int) -> list[dict]:
    """Every row as {"name", "us"}: the baselines first, then the ops and the loops (in dry run: no launches).

    ``repeats`` rounds, each timing every row once (a mean over ``calls`` calls, fewer for the loops);
    a row's figure is its best round."""
    torch.set_num_threads(1)
    with fastdiff.ops.dry_run():
        rows = [(n, fn, calls, 1, None) for n, fn in baseline_cases().items()]
        rows += [(n, fn, calls, 1, "bwd" in n) for n, fn in op_cases().items()]
        rows += [(n, fn, max(calls // 50, 2), per, False) for n, (fn, per) in loop_cases().items()]
        best = dict.fromkeys((name for name, *_ in rows), float("inf"))
        for round_ in range(repeats + 1):  # the first round warms every row up
            for name, fn, n, per, grad in rows:
                with contextlib.nullcontext() if grad is None else torch.enable_grad() if grad else torch.no_grad():
                    if round_ == 0:
                        warm_up(fn, n)
                    else:
                        best[name] = min(best[name], mean_us(fn, n) / per)
    return [{"name": name, "us": us} for name, us in best.items()]


def _target(name: str) -> float | None:
    if name in (BASELINE, AUTOGRAD_FLOOR) or name.startswith(("F.", "samplers.", "UNet")):
        return None
    return TARGETS["fwd+bwd" if "bwd" in name else "fwd"]


def table(rows: list[dict]) -> str:
    add = next(r["us"] for r in rows if r["name"] == BASELINE)
    lines = [f"{'':52s} {'µs':>8s} {'× add':>7s}  target"]
    for r in rows:
        target = _target(r["name"])
        ratio = r["us"] / add
        verdict = "" if target is None else f"≤ {target:.0f}× {'ok' if ratio <= target else 'MISSED'}"
        lines.append(f"{r['name']:52s} {r['us']:8.1f} {ratio:7.1f}  {verdict}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=50, help="calls per row in a round (default 50)")
    parser.add_argument("--repeats", type=int, default=40, help="timed rounds; a row's best is kept (default 40)")
    parser.add_argument("--json", action="store_true", help='print a JSON list of {"name": ..., "us": ...}')
    args = parser.parse_args(argv)
    if args.calls < 1 or args.repeats < 1:
        parser.error("--calls and --repeats must be >= 1")
    rows = measure(args.calls, args.repeats)
    print(json.dumps(rows, indent=1) if args.json else table(rows))


if __name__ == "__main__":
    main()
