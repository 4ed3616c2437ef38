"""Flash attention: kernel (interpreter on CPU, real on CUDA) vs reference vs float64, forward and gradients.

Tolerance (as in flash-attn's tests): the kernel's error against a float64
reference may be at most twice PyTorch's own error when it computes the same
attention in the input dtype, plus a small floor per dtype.

The interpreter runs kernels about a thousand times slower than a GPU, so the
matrix is a covering subset: every head dim at one odd length pair, every odd
length at one head dim, every dtype, every tile configuration the launcher can
pick for fp32, and the layouts the UNet produces.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import fastdiff
from fastdiff.ops.flash_attention import HEAD_DIMS, attention, attention_ref

from fastdiff.ops import flash_attention as attn_mod
from tests.conftest import DTYPES, real_size, rel_err

FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}
# Gradients follow flash attention's recipe: P is recomputed as exp(S − L) from the saved
# log-sum-exp and dS = P ∘ (dP − δ) with δ = rowsum(dO ∘ O). Where a row's dP ≈ δ this
# cancels, and in fp32 a single-row case reaches about 100 ulp (worst 1.1e-5 over 9000
# draws), while autograd differentiates the softmax directly and stays near 10 ulp.
# The bugs these tests are for (a wrong equation, a lost chunk, a mis-scaled term)
# cost 1e-3 or more, far above a 3e-5 floor.
GRAD_FLOOR = {**FLOOR, torch.float32: 3e-5}
EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


# ----------------------------------------------------------------------------- helpers


def _qkv(B, H, Lq, Lk, D, dtype, device, layout="bhld"):
    """Leaf tensors and a function making (q, k, v) views of them, in one of the UNet's layouts.

    bhld:  contiguous (B, H, L, D)
    blhd:  (B, L, H, D) memory viewed as (B, H, L, D), as produced by a per-token projection
    fused: q, k, v strided views of one (B, L, 3, H, D) projection (self-attention, Lq == Lk)
    """
    if layout == "fused":
        assert Lq == Lk
        leaves = [torch.randn(B, Lq, 3, H, D, device=device).to(dtype)]
        return leaves, lambda ls: ls[0].permute(2, 0, 3, 1, 4).unbind(0)
    shapes = [(B, H, L, D) if layout == "bhld" else (B, L, H, D) for L in (Lq, Lk, Lk)]
    leaves = [torch.randn(s, device=device).to(dtype) for s in shapes]
    return leaves, (lambda ls: ls) if layout == "bhld" else (lambda ls: [x.transpose(1, 2) for x in ls])


def _make(B, H, Lq, Lk, D, dtype, device, layout="bhld"):
    """(q, k, v) as plain tensors (no grad) for forward-only checks."""
    leaves, views = _qkv(B, H, Lq, Lk, D, dtype, device, layout)
    return views(leaves)


def _lowp_attention(q, k, v, scale):
    """PyTorch computing attention in the inputs' own dtype: the error budget we are held to."""
    return torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1) @ v


def _check_against_float64(leaves, views, scale=None, check_grads=True):
    """Kernel vs float64 math, forward and every gradient, tolerance from PyTorch's own low-precision error."""
    dtype = leaves[0].dtype
    runs = {}
    for name, cast in (("ours", lambda x: x), ("low", lambda x: x), ("f64", lambda x: x.double())):
        ls = [cast(x.detach()).requires_grad_() for x in leaves]
        runs[name] = (ls, views(ls))
    q, k, v = runs["ours"][1]
    D = q.shape[-1]
    tau = 1.0 / math.sqrt(D) if scale is None else scale
    out = attention(q, k, v, scale=scale)
    assert out.dtype == dtype and out.shape == q.shape[:3] + (D,)
    low = _lowp_attention(*runs["low"][1], tau)
    ref = attention_ref(*runs["f64"][1], scale=tau)

    def tol(lo, hi, floor=FLOOR):
        return 2 * rel_err(lo, hi) + floor[dtype]

    assert rel_err(out, ref) <= tol(low, ref), (rel_err(out, ref), rel_err(low, ref))
    if not check_grads:
        return
    do = torch.randn_like(out)
    g = torch.autograd.grad(out, runs["ours"][0], do)
    glow = torch.autograd.grad(low, runs["low"][0], do)
    g64 = torch.autograd.grad(ref, runs["f64"][0], do.double())
    for i, (a, lo, hi) in enumerate(zip(g, glow, g64)):
        assert a.shape == hi.shape and a.dtype == dtype
        assert rel_err(a, hi) <= tol(lo, hi, GRAD_FLOOR), (i, rel_err(a, hi), rel_err(lo, hi))


# ----------------------------------------------------------------------------- reference


def test_reference_matches_float64_sdpa():
    q, k, v = _make(2, 3, 13, 29, 40, torch.float32, "cpu")
    ref = attention_ref(q, k, v)
    sdpa = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert rel_err(ref, sdpa) < 2e-6


@pytest.mark.parametrize("Lq,Lk", [(113, 77), (1, 7)])
def test_reference_path_gradients_match_float64_autograd(Lq, Lk, monkeypatch):
    """The op's CPU path (explicit backward equations, chunked over queries) vs autograd of the definition."""
    monkeypatch.setattr(attn_mod, "_REF_CHUNK_ELEMS", 7 * Lk * 2)  # several ragged chunks of 7 rows
    with fastdiff.use_backend("reference"):
        _check_against_float64(*_qkv(1, 2, Lq, Lk, 64, torch.float32, "cpu", layout="blhd"), scale=0.3)


# ----------------------------------------------------------------------------- kernel


@pytest.mark.parametrize("D", HEAD_DIMS)
def test_every_head_dim(D, device, poisoned_alloc):
    dtype = torch.float16 if HEAD_DIMS.index(D) % 2 else torch.bfloat16
    _check_against_float64(*_qkv(1, 1, 113, 77, D, dtype, device))


@pytest.mark.parametrize("Lq,Lk", [(1, 203), (7, 257), (77, 1), (113, 113), (203, 7), (257, 77)])
def test_odd_lengths(Lq, Lk, device, poisoned_alloc):
    _check_against_float64(*_qkv(2, 1, Lq, Lk, 40, torch.float16, device), check_grads=Lk > 1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype_cross_attention_layout(dtype, device, poisoned_alloc):
    """(B, L, H, D) projections as in the UNet's cross-attention, Lk = 77 text tokens."""
    _check_against_float64(*_qkv(2, 2, 37, 77, 80, dtype, device, layout="blhd"))


@pytest.mark.parametrize("B,H,Lq,Lk,D,dtype,layout", [
    real_size(2, 8, 4096, 4096, 40, torch.float16, "fused", id="sd-64x64-self"),
    real_size(2, 8, 4096, 77, 40, torch.bfloat16, "blhd", id="sd-64x64-cross"),
    real_size(4, 10, 1024, 1024, 64, torch.bfloat16, "bhld", id="sdxl-32x32-self"),
    real_size(1, 8, 2048, 2048, 128, torch.float16, "bhld", id="d128"),
    real_size(16, 4, 16, 16, 64, torch.float32, "bhld", id="temporal-16f"),
])  # fmt: skip
def test_real_sizes(B, H, Lq, Lk, D, dtype, layout, device, poisoned_alloc):
    """Kernel vs float64 at the sizes of real UNets, forward and gradients (CUDA only)."""
    _check_against_float64(*_qkv(B, H, Lq, Lk, D, dtype, device, layout=layout))


@pytest.mark.parametrize("D", [32, 64, 80, 160])  # the fp32 long-key tiles (short keys: test_attention_paths.py)
def test_fp32_configs(D, device, poisoned_alloc):
    _check_against_float64(*_qkv(1, 1, 41, 67, D, torch.float32, device), scale=0.2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_qkv_views_are_read_in_place(dtype, device, poisoned_alloc, monkeypatch):
    """Self-attention on strided views of one qkv projection: the launchers get the views themselves
    (no copy of q, k, v, nor of dO), and the gradients are correct."""
    copied, launched = [], []
    real_layout = attn_mod._kernel_layout

    def spy(x):
        y = real_layout(x)
        copied.append(y is not x)
        return y

    monkeypatch.setattr(attn_mod, "_kernel_layout", spy)
    for name, first in (("_forward_triton", 0), ("_backward_triton", 1)):  # where q, k, v start in each

        def launcher(*args, _real=getattr(attn_mod, name), _first=first):
            launched.append([(x.data_ptr(), x.stride()) for x in args[_first : _first + 3]])
            return _real(*args)

        monkeypatch.setattr(attn_mod, name, launcher)
    leaves, views = _qkv(1, 2, 67, 67, 64, dtype, device, layout="fused")
    assert not views(leaves)[0].is_contiguous()
    _check_against_float64(leaves, views)
    assert launched == [[(x.data_ptr(), x.stride()) for x in views(leaves)]] * 2  # forward, backward
    assert not any(copied)


def test_block_multiple_lengths(device, poisoned_alloc):
    """Lengths that are exact multiples of every tile: the unmasked path of each loop."""
    _check_against_float64(*_qkv(1, 1, 128, 128, 64, torch.float16, device))


@pytest.mark.parametrize("odd", ["pointer", "strides"])
def test_unaligned_and_transposed_inputs_are_copied(odd, device, poisoned_alloc):
    """A data pointer off the 16-byte grid (with strides the kernels read), or a head dim that is not
    unit-stride, still give the right answer and gradients: the launchers copy the one, the public
    function the other (before autograd records the op)."""
    B, H, L, D = 1, 2, 19, 32
    shapes = {"pointer": [(B * H * L * D + 1,), (B, H, L, D)], "strides": [(B, H, L, D), (B, H, D, L)]}[odd]
    leaves = [torch.randn(shape, device=device, dtype=torch.float16) for shape in shapes + [(B, H, L, D)]]

    def views(ls):
        if odd == "pointer":
            return ls[0][1:].view(B, H, L, D), ls[1], ls[2]  # q 2 bytes off the 16-byte grid
        return ls[0], ls[1].transpose(2, 3), ls[2]  # k with stride(-1) == L

    _check_against_float64(leaves, views)


# A padded key row of the dK/dV tile may overflow (exp2(0 − lse) with lse ≈ −900); that
# row is never stored, and numpy reports the overflow.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2", "ignore:invalid value encountered in matmul")
def test_extreme_scores_stay_finite(device, poisoned_alloc):
    """Rows whose every score is hugely negative (or positive): no overflow in exp2, padded keys included.

    With all scores equal the softmax is uniform; the large magnitude exercises the
    running-max rescaling, and lse ≈ -1000 would overflow exp2(0 − lse) on a padded key.
    """
    B, H, Lq, Lk, D = 1, 2, 9, 77, 32
    u = torch.randn(D, device=device)
    u = u / u.norm()
    q = torch.empty(B, H, Lq, D, device=device)
    q[:, 0] = -60 * u  # scores -60·60/sqrt(32) ≈ -640 for every key
    q[:, 1] = 60 * u
    k = (60 * u).expand(B, H, Lk, D).contiguous()
    k[:, :, 5] *= 1.01  # one slightly different key so the answer is not trivially uniform
    v = torch.randn(B, H, Lk, D, device=device)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = attention(q, k, v)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = attention_ref(q64, k64, v64)
    refs = torch.autograd.grad(ref, (q64, k64, v64), do.double())
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    # Scores near ±640 in fp32 carry absolute errors ~1e-4 before the exponential.
    assert rel_err(out, ref) < 1e-3
    for g, r in zip(grads, refs):
        assert (g.double() - r).norm() <= 1e-2 * r.norm() + 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_key(dtype, device, poisoned_alloc):
    """Lk = 1: o = v exactly up to rounding, and dq = dk = 0 up to the rounding of O used in δ."""
    B, H, Lq, D = 1, 1, 23, 96
    q, k, v = (x.requires_grad_() for x in _make(B, H, Lq, 1, D, dtype, device))
    out = attention(q, k, v)
    do = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    assert rel_err(out, v.expand_as(out)) <= EPS[dtype]
    assert rel_err(dv, do.double().sum(2, keepdim=True)) <= 4 * EPS[dtype] + FLOOR[dtype]
    # |dS_i| = |dO_i·(v − round(o_i))| ≤ eps·‖dO_i‖‖v‖, and dq_i = τ dS_i k.
    tau = 1 / math.sqrt(D)
    bound = 2 * EPS[dtype] * tau * do.double().norm() * v.double().norm() * k.double().norm()
    assert dq.double().norm() <= bound and dk.double().norm() <= bound


def test_empty_query_batch(device):
    q = torch.randn(0, 2, 5, 32, device=device)
    k = torch.randn(0, 2, 3, 32, device=device)
    out = attention(q, k, k)
    assert out.shape == (0, 2, 5, 32)


def test_only_some_inputs_require_grad(device):
    q, k, v = _make(1, 1, 21, 17, 32, torch.float32, device)
    k.requires_grad_()
    out = attention(q, k, v)
    (dk,) = torch.autograd.grad(out.sum(), (k,))
    k64 = k.detach().double().requires_grad_()
    (ref,) = torch.autograd.grad(attention_ref(q.double(), k64, v.double()).sum(), (k64,))
    assert rel_err(dk, ref) < 1e-5


def test_output_is_stored_token_major(device):
    """o is returned as (B, H, L, D) over (B, L, H, D) memory: merging heads afterwards is a free view."""
    q, k, v = _make(2, 3, 11, 5, 32, torch.float16, device)
    out = attention(q, k, v)
    assert out.transpose(1, 2).is_contiguous()
    with fastdiff.use_backend("reference"):
        assert attention(q.cpu(), k.cpu(), v.cpu()).stride() == out.stride()


# ----------------------------------------------------------------------------- torch.library


def test_opcheck_registration():
    """Fake tensors, schema and autograd registration agree with the real op (reference path: fast)."""
    q, k, v = (x.requires_grad_() for x in _make(1, 2, 9, 7, 40, torch.float32, "cpu"))
    with fastdiff.use_backend("reference"):
        # aot_dispatch is covered by the torch.compile test below
        tests = ("test_schema", "test_autograd_registration", "test_faketensor")
        torch.library.opcheck(attn_mod._attention_fwd_call.registered, (q, k, v, 0.25), test_utils=tests)


def test_torch_compile_fullgraph_no_graph_break():
    def step(q, k, v):
        return attention(q, k, v).float().square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    q, k, v = (x.requires_grad_() for x in _make(1, 2, 13, 6, 32, torch.float32, "cpu"))
    with fastdiff.use_backend("reference"):
        loss = compiled(q, k, v)
        grads = torch.autograd.grad(loss, (q, k, v))
        eager = torch.autograd.grad(step(q, k, v), (q, k, v))
    for g, e in zip(grads, eager):
        assert rel_err(g, e) < 1e-6


# ----------------------------------------------------------------------------- errors


def _ok(**over):
    t = {"q": torch.randn(2, 3, 5, 40), "k": torch.randn(2, 3, 7, 40), "v": torch.randn(2, 3, 7, 40)}
    t.update(over)
    return t


@pytest.mark.parametrize(
    "inputs,exc,name",
    [
        (_ok(q=torch.randn(2, 3, 5, 48), k=torch.randn(2, 3, 7, 48), v=torch.randn(2, 3, 7, 48)), ValueError, "q"),
        (_ok(k=torch.randn(1, 3, 7, 40)), ValueError, "k"),
        (_ok(v=torch.randn(2, 2, 7, 40)), ValueError, "v"),
        (_ok(v=torch.randn(2, 3, 6, 40)), ValueError, "v"),
        (_ok(k=torch.randn(2, 3, 7, 32)), ValueError, "k"),
        (_ok(k=torch.randn(2, 3, 0, 40), v=torch.randn(2, 3, 0, 40)), ValueError, "k"),
        (_ok(q=torch.randn(3, 5, 40)), ValueError, "q"),
        (_ok(q=torch.randint(0, 3, (2, 3, 5, 40))), TypeError, "q"),
        (_ok(v=torch.randn(2, 3, 7, 40, dtype=torch.float16)), TypeError, "v"),
        (_ok(k=torch.randn(2, 3, 7, 40, device="meta")), ValueError, "k"),
        (_ok(v=[1.0]), TypeError, "v"),
    ],
)
def test_bad_input_names_the_argument(inputs, exc, name):
    with pytest.raises(exc, match=rf"\b{name}\b"):
        attention(**inputs)


@pytest.mark.parametrize(
    "scale,exc", [(0.0, ValueError), (-1.0, ValueError), (float("nan"), ValueError), ("x", TypeError)]
)
def test_bad_scale(scale, exc):
    with pytest.raises(exc, match="scale"):
        attention(**_ok(), scale=scale)


# ----------------------------------------------------------------------------- the UNet module


def _module_ref(mod, x, context):
    """The module's math in float64 with PyTorch's SDPA: projections, heads, softmax, output projection."""
    c = x if context is None else context
    B, L, _ = x.shape
    H, D = mod.heads, mod.dim_head

    def heads(t):
        return t.view(B, -1, H, D).transpose(1, 2)

    w_q, w_k, w_v = (w.double() for w in mod.projection_weights())
    q, k, v = heads(x.double() @ w_q.T), heads(c.double() @ w_k.T), heads(c.double() @ w_v.T)
    o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, H * D)
    out = o @ mod.to_out.weight.double().T
    return out + mod.to_out.bias.double() if mod.to_out.bias is not None else out


@pytest.mark.parametrize("cross", [False, True])
def test_attention_module_matches_float64(cross, device, poisoned_alloc):
    from fastdiff.nn.attention import Attention

    mod = Attention(24, context_dim=16 if cross else None, heads=2, dim_head=40, out_bias=not cross).to(device)
    x = torch.randn(2, 13, 24, device=device)
    context = torch.randn(2, 5, 16, device=device) if cross else None
    out = mod(x, context)
    assert out.shape == (2, 13, 24)
    ref = _module_ref(mod, x, context)
    assert rel_err(out, ref) < 1e-5
    out.square().sum().backward()
    params = list(mod.parameters())
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    _module_ref(mod, x, context).square().sum().backward()
    for g, p in zip(grads, params):
        assert rel_err(g, p.grad) < 1e-5


def test_self_attention_passes_views_of_one_projection(monkeypatch):
    import fastdiff.nn.attention as nn_attention

    seen = []

    def spy(q, k, v, **kwargs):
        seen.append((q, k, v))
        return attention(q, k, v, **kwargs)

    monkeypatch.setattr(nn_attention, "attention", spy)
    mod = nn_attention.Attention(32, heads=2, dim_head=32)
    with fastdiff.use_backend("reference"):
        mod(torch.randn(3, 7, 32))
    (q, k, v), = seen
    assert q._base is not None and q._base is k._base is v._base  # one qkv buffer, no copies
    assert q.shape == (3, 2, 7, 32) and not q.is_contiguous()


def test_attention_module_errors():
    from fastdiff.nn.attention import Attention

    cross = Attention(24, context_dim=16, heads=2, dim_head=32)
    with pytest.raises(ValueError, match="context"):
        cross(torch.randn(1, 4, 24))
    with pytest.raises(ValueError, match="context"):
        cross(torch.randn(1, 4, 24), torch.randn(1, 4, 24))
    with pytest.raises(ValueError, match=r"\bx\b"):
        cross(torch.randn(1, 4, 16), torch.randn(1, 4, 16))


def test_image_tokens_round_trip():
    from fastdiff.nn.attention import image_to_tokens, tokens_to_image

    x = torch.randn(2, 5, 3, 7)
    t = image_to_tokens(x)
    assert t.shape == (2, 21, 5)
    assert torch.equal(t[1, 2 * 7 + 4], x[1, :, 2, 4])  # token index = row · W + column
    back = tokens_to_image(t.contiguous(), 3, 7)
    assert torch.equal(back, x) and back.is_contiguous(memory_format=torch.channels_last)
    cl = x.contiguous(memory_format=torch.channels_last)
    assert image_to_tokens(cl).is_contiguous() and image_to_tokens(cl).data_ptr() == cl.data_ptr()
    with pytest.raises(ValueError, match=r"\bx\b"):
        image_to_tokens(torch.randn(2, 5, 21))
    with pytest.raises(ValueError, match=r"\bt\b"):
        tokens_to_image(t, 4, 5)
