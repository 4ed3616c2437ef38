"""Host cost of each op's Python path: ``python -m benchmarks.host_overhead``.

At diffusion sizes the memory-bound ops take a few µs on a GPU, so what a call costs on
the host (argument checks, allocations, autograd, dispatch, launch set-up) decides their
speed.  This measures that path on any machine: every Triton kernel launch is replaced
by a no-op and the ops take the kernel branch on CPU tensors, so nothing is computed
except the small host-side tensor work an op really does (casts, allocations).  Triton's
own launch cost (argument binding, the driver call) is not included.

Prints µs per call, the best of several repeats.
"""
from __future__ import annotations

import argparse
import importlib
import time

import torch

from benchmarks.harness import forward_backward

OP_MODULES = ("group_norm", "attention", "noising", "sampler_step")


class _NoLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def stub_kernels():
    """Every ``*_kernel`` of the op modules becomes a no-op, and every op takes its kernel branch."""
    modules = {}
    for name in OP_MODULES:
        module = importlib.import_module(f"fastdiff.ops.{name}")
        for attr in dir(module):
            if attr.endswith("_kernel"):
                setattr(module, attr, _NoLaunch())
        module.use_triton = lambda *tensors: True
        modules[name] = module
    return modules


def time_us(fn, calls: int = 300, repeats: int = 5) -> float:
    """Best of ``repeats`` mean times of ``calls`` calls, in µs."""
    for _ in range(20):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def cases(m) -> dict[str, callable]:
    """Op calls at SD-like shapes (the host path does not depend on the size)."""
    from fastdiff.ops.sampler_step import step_coefficients

    dt = torch.bfloat16
    x = torch.randn(2, 320, 64, 64, dtype=dt).to(memory_format=torch.channels_last)
    w, b, film = torch.randn(320, dtype=dt), torch.randn(320, dtype=dt), torch.randn(2, 320, dtype=dt)
    w32, b32 = w.float(), b.float()
    gn = m["group_norm"].group_norm_silu
    gn_leaves = [t.detach().clone().requires_grad_() for t in (x, w, b, film, film)]
    q = torch.randn(2, 8, 256, 64, dtype=dt)
    q_leaves = [q.detach().clone().requires_grad_() for _ in range(3)]
    acp = torch.linspace(0.99, 0.01, 1000)
    x0, t = torch.randn(8, 4, 64, 64, dtype=dt), torch.randint(0, 1000, (8,))
    coeffs = step_coefficients(x0_from_x=1.2, x0_from_out=-0.6, eps_from_out=1.0, x=0.9, x0=0.1, noise=0.05)
    seeds = torch.arange(8)
    noising, step = m["noising"], m["sampler_step"].sampler_step
    plain = {
        "group_norm_silu fwd (bf16 γ, β, FiLM)": lambda: gn(x, 32, w, b, scale=film, shift=film),
        "group_norm_silu fwd (fp32 γ, β)": lambda: gn(x, 32, w32, b32),
        "attention fwd": lambda: m["attention"].attention(q, q, q),
        "q_sample": lambda: noising.q_sample(x0, t, acp),
        "training_target v": lambda: noising.training_target(x0, t, acp, prediction="v"),
        "sampler_step cfg + noise": lambda: step(
            x0, x0, coeffs, uncond_output=x0, guidance_scale=7.5, seeds=seeds, step=3, add_noise=True
        ),
    }
    gn_fb = forward_backward(lambda *a: gn(a[0], 32, a[1], a[2], scale=a[3], shift=a[4]), gn_leaves, torch.randn_like(x))
    attn_fb = forward_backward(m["attention"].attention, q_leaves, torch.randn_like(q))
    return {**plain, "group_norm_silu fwd+bwd": gn_fb, "attention fwd+bwd": attn_fb}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    modules = stub_kernels()
    for name, fn in cases(modules).items():
        grad = torch.enable_grad() if "bwd" in name else torch.no_grad()
        with grad:
            print(f"{name:42s} {time_us(fn, args.calls):8.1f} µs")


if __name__ == "__main__":
    main()
