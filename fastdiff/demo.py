"""``fastdiff demo``: a short tour of the ops on whatever backend this machine has."""
from __future__ import annotations

import time

import torch

from fastdiff import ops
from fastdiff.schedule import make_schedule


def run_ops_demo() -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sched = make_schedule("scaled_linear", 1000, zero_terminal_snr=True)
    acp = sched.alphas_cumprod.to(device, torch.float32)
    g = torch.Generator(device).manual_seed(0)
    x0 = torch.randn(8, 4, 64, 64, device=device, generator=g)
    t = torch.randint(0, 1000, (8,), device=device, generator=g)
    print(f"fastdiff demo on {device} (backend: {ops.current_backend()})")
    start = time.perf_counter()
    x_t, noise, target = ops.training_target(x0, t, acp, prediction="v", generator=g)
    weight = ops.min_snr_weight(t, acp, gamma=5.0, prediction="v")
    pred = target + 0.1 * torch.randn_like(target)
    loss = ops.diffusion_loss(pred, target, weight)
    print(f"  training_target + min-SNR loss on {tuple(x0.shape)}: loss={loss.item():.5f} "
          f"({(time.perf_counter() - start) * 1e3:.1f} ms)")  # fmt: skip
    print(f"  drawn noise: mean={noise.mean().item():+.4f} std={noise.std().item():.4f}")
    snr_last = sched.snr()[-1].item()
    print(f"  zero-terminal-SNR schedule: SNR at t=999 is {snr_last:.1f}, weight there {weight.max().item():.3f}")
    return 0
