"""The PyTorch Philox generator equals the kernels' in-register one."""
import math

import pytest
import torch

from fastdiff.ops import philox

triton = pytest.importorskip("triton")
tl = triton.language


@triton.jit
def _words_kernel(KEYS, OUT, N, BLOCK: tl.constexpr):  # OUT: (B, 4, N) int64
    b = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    w0, w1, w2, w3 = tl.randint4x(tl.load(KEYS + b), offs)
    base = OUT + b * 4 * N + offs
    tl.store(base, w0.to(tl.int64) & 0xFFFFFFFF, mask=mask)
    tl.store(base + N, w1.to(tl.int64) & 0xFFFFFFFF, mask=mask)
    tl.store(base + 2 * N, w2.to(tl.int64) & 0xFFFFFFFF, mask=mask)
    tl.store(base + 3 * N, w3.to(tl.int64) & 0xFFFFFFFF, mask=mask)


@triton.jit
def _normal_kernel(KEYS, OUT, N, BLOCK: tl.constexpr):  # OUT: (B, N) fp32
    b = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    tl.store(OUT + b * N + offs, philox.philox_normal(tl.load(KEYS + b), offs), mask=offs < N)


KEYS = torch.tensor([0, 1, 12345678901234, 2**62 + 17, 2**63 - 1])


def test_philox_words_match_triton_bit_for_bit(device):
    n = 77
    keys = KEYS.to(device)
    out = torch.full((len(keys), 4, n), -1, dtype=torch.int64, device=device)
    _words_kernel[(len(keys),)](keys, out, n, BLOCK=128)
    ours = torch.stack(philox.philox4x32(keys.view(-1, 1), torch.arange(n, device=device).view(1, -1)), 1)
    assert torch.equal(out, ours)


def test_normal_matches_kernel(device):
    n = 203
    keys = KEYS.to(device)
    out = torch.full((len(keys), n), float("nan"), device=device)
    _normal_kernel[(len(keys),)](keys, out, n, BLOCK=256)
    ref = philox.randn_like_philox(keys, (len(keys), n))
    torch.testing.assert_close(out, ref, rtol=2e-6, atol=2e-6)


def test_cos_polynomial_is_accurate():
    u = torch.rand(100_000)
    err = (philox._cos_2pi_ref(u).double() - torch.cos(2 * math.pi * u.double())).abs().max().item()
    assert err < 5e-7


def test_step_keys_give_distinct_streams():
    seeds = torch.tensor([0, 1, 2])
    a = philox.randn_like_philox(philox.step_keys(seeds, 0), (3, 1000))
    b = philox.randn_like_philox(philox.step_keys(seeds, 1), (3, 1000))
    corr = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()
    assert abs(corr) < 5 / math.sqrt(3000)
