"""q_sample / training_target vs the eager PyTorch chain and torch.compile of it.

Bytes (minimum traffic, elements N, element size s):
    q_sample with in-kernel noise:   read x0, write x_t and ε        = 3·N·s
    training_target (v-prediction):  read x0, write x_t, ε and v     = 4·N·s
(t and ᾱ are B and T elements: negligible.)  The eager chain is what a training
loop writes by hand: randn_like + gather ᾱ[t] + sqrt + mul + add (+ v).
"""
from __future__ import annotations

import torch

from benchmarks.harness import Case, compile_baselines
from fastdiff import ops
from fastdiff.schedule import make_schedule

SHAPES = [(1, 4, 64, 64), (8, 4, 64, 64), (64, 4, 64, 64), (8, 3, 256, 256)]
QUICK_SHAPES = [(8, 4, 64, 64)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def eager_q_sample(x0, t, acp):
    noise = torch.randn_like(x0)
    abar = acp[t].view(-1, *([1] * (x0.ndim - 1)))
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise, noise


def eager_v_target(x0, t, acp):
    noise = torch.randn_like(x0)
    abar = acp[t].view(-1, *([1] * (x0.ndim - 1)))
    a, s = abar.sqrt(), (1 - abar).sqrt()
    return a * x0 + s * noise, noise, a * noise - s * x0


def cases(device: str, quick: bool) -> list[Case]:
    acp = make_schedule("scaled_linear", 1000).alphas_cumprod.to(device, torch.float32)
    compiled_q = torch.compile(eager_q_sample)
    compiled_v = torch.compile(eager_v_target)
    out = []
    dtypes = {"bf16": DTYPES["bf16"]} if quick else DTYPES
    for shape in QUICK_SHAPES if quick else SHAPES:
        for name, dtype in dtypes.items():
            x0 = torch.randn(shape, device=device, dtype=dtype)
            t = torch.randint(0, 1000, (shape[0],), device=device)
            n, s = x0.numel(), x0.element_size()
            q_impls = {
                "fastdiff": lambda x0=x0, t=t: ops.q_sample(x0, t, acp),
                "eager": lambda x0=x0, t=t: eager_q_sample(x0, t, acp),
            }
            v_impls = {
                "fastdiff": lambda x0=x0, t=t: ops.training_target(x0, t, acp, prediction="v"),
                "eager": lambda x0=x0, t=t: eager_v_target(x0, t, acp),
            }
            if compile_baselines():
                q_impls["torch.compile"] = lambda x0=x0, t=t: compiled_q(x0, t, acp)
                v_impls["torch.compile"] = lambda x0=x0, t=t: compiled_v(x0, t, acp)
            out.append(Case("q_sample", str(shape), name, bytes=3 * n * s, impls=q_impls))
            out.append(Case("training_target[v]", str(shape), name, bytes=4 * n * s, impls=v_impls))
    return out
