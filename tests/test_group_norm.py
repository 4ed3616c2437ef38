"""Fused GroupNorm (+ scale/shift) + SiLU: reference vs float64, kernels vs reference, errors, module."""
import pytest
import torch
import torch.nn.functional as F
from tests.conftest import DTYPES, real_size, rel_err

import fastdiff
from fastdiff.nn.norm import GroupNormSiLU
from fastdiff.ops import _backend
from fastdiff.ops import group_norm as gn
from fastdiff.ops._backend import use_triton
from fastdiff.ops._layout import sample_layout

# (shape, num_groups, which of weight/bias/scale/shift are given): C=4 in 2 groups as in
# diffusers' tests, C=63 (odd, 9 per group) at 1×1, a spatial size that is no multiple of
# any block, one channel per group, a single group, 1D, 3D (video) and no spatial dims.
SHAPES = [
    ((2, 4, 7, 9), 2, "wbss"),
    ((1, 63, 1, 1), 7, "wb"),
    ((2, 6, 65, 33), 3, "wbss"),
    ((3, 6, 5, 5), 6, "ss"),
    ((2, 6, 7, 9), 1, "w"),
    ((3, 10, 17), 5, "wbss"),
    ((2, 12, 3, 5, 7), 4, "bs"),
    ((3, 8), 4, "wbss"),
]
SHAPE_IDS = [f"{'x'.join(map(str, s))}/G{g}/{p}" for s, g, p in SHAPES]
# the SD UNet's levels (C @ H×W, 32 groups) and a 16-frame video block, on CUDA only
REAL_SIZES = [
    real_size((2, 320, 64, 64), 32, "wbss", "channels_last", id="sd-320x64-cl"),
    real_size((2, 320, 64, 64), 32, "wb", "contiguous", id="sd-320x64"),
    real_size((8, 640, 32, 32), 32, "wbss", "contiguous", id="sd-640x32-b8"),
    real_size((2, 1280, 8, 8), 32, "wbss", "channels_last", id="sd-1280x8-cl"),
    real_size((1, 128, 16, 32, 32), 32, "wb", "contiguous", id="video-16f"),
]


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """x with memory order (B, *spatial, C), any number of spatial dims."""
    return x.movedim(1, -1).contiguous().movedim(-1, 1)


def make_inputs(shape, parts, dtype, device, layout="contiguous", param_dtype=None):
    """x plus the optional γ, β (B, C) scale and shift named in ``parts`` ("w", "b", "s" scale, 2nd "s" shift)."""
    B, C = shape[:2]
    pd = param_dtype or dtype
    # an offset mean and a non-unit spread: statistics must not be E[x²] − E[x]²
    x = (torch.randn(shape, device=device) * 2 + 3).to(dtype)
    if layout == "channels_last":
        x = channels_last(x)
    w = (1 + 0.5 * torch.randn(C, device=device)).to(pd) if "w" in parts else None
    b = (0.5 * torch.randn(C, device=device)).to(pd) if "b" in parts else None
    n_s = parts.count("s")
    scale = (0.5 * torch.randn(B, C, device=device)).to(pd) if n_s >= 1 else None
    shift = (0.5 * torch.randn(B, C, device=device)).to(pd) if n_s >= 2 else None
    return x, w, b, scale, shift


def torch_chain(x, G, w, b, scale, shift, silu=True, eps=1e-5):
    """What a user writes in eager PyTorch, in the inputs' own dtype (the low-precision yardstick)."""
    shape = (x.shape[0], x.shape[1]) + (1,) * (x.ndim - 2)
    if w is None and b is not None:  # PyTorch's CPU backward of group_norm(bias only) fails; add β outside
        h = F.group_norm(x, G, None, None, eps) + b.view(shape[1:])
    else:
        h = F.group_norm(x, G, w, b, eps)
    if scale is not None:
        h = h * (1 + scale.view(shape))
    if shift is not None:
        h = h + shift.view(shape)
    return F.silu(h) if silu else h


def as_f32(*ts):
    return [None if t is None else t.detach().float() for t in ts]


def tolerance(torch_err: float, dtype: torch.dtype) -> float:
    """Twice PyTorch's own low-precision error vs the fp32 reference, with a floor at fp32 round-off.

    Triton's interpreter casts fp32 → bf16 by truncation (the GPU rounds to nearest
    even), which doubles the output's rounding error and biases it: allow one more ulp
    there (half an ulp failed about once in a few hundred runs on the 63-element case).
    """
    extra = 2.0**-8 if dtype == torch.bfloat16 and _backend.INTERPRET else 0.0
    return 2 * torch_err + (2e-6 if dtype == torch.float32 else 1e-4) + extra


def layouts(shape):
    return ["contiguous", "channels_last"] if len(shape) > 2 else ["contiguous"]


def _kernel_cases():
    return [
        pytest.param(s, g, p, lay, id=f"{i}-{lay}")
        for (s, g, p), i in zip(SHAPES, SHAPE_IDS)
        for lay in layouts(s)
    ]


@pytest.fixture
def kernel_path(device):
    if not use_triton(torch.empty(0, device=device)):
        pytest.skip("needs the kernels: FASTDIFF_BACKEND=interpret or a CUDA device")


# ----------------------------------------------------------------------------- the reference


@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("shape,G,parts", SHAPES, ids=SHAPE_IDS)
def test_reference_matches_float64(shape, G, parts, silu):
    x, w, b, sc, sh = make_inputs(shape, parts, torch.float32, "cpu")
    # independent float64 formulation: PyTorch's group_norm, then FiLM and SiLU
    w64, b64, sc64, sh64 = (None if t is None else t.double() for t in (w, b, sc, sh))
    want = torch_chain(x.double(), G, w64, b64, sc64, sh64, silu=silu)
    got = gn.group_norm_silu_ref(x, G, w, b, scale=sc, shift=sh, silu=silu)
    assert got.dtype == torch.float32
    # fp32 is ill-conditioned where a group's σ ≪ |μ| (2-element groups): PyTorch's own fp32 error is the yardstick.
    # With 2 elements x̂ = ±1/sqrt(1 + eps/σ²), and two fp32 formulations round σ² differently: their errors are
    # uncorrelated and one reached 3.5× the other's (about 1 seed in 150), so those groups get a floor of 1e-4
    # (a wrong formula errs by far more).
    torch_err = rel_err(torch_chain(x, G, w, b, sc, sh, silu=silu), want)
    floor = 1e-4 if x[0].numel() // G <= 2 else 1e-6
    assert rel_err(got, want) <= 2 * torch_err + floor


def test_reference_statistics_survive_a_large_mean():
    # |μ|/σ = 1e4: E[x²] − E[x]² in fp32 would lose every digit of σ²
    x = torch.randn(2, 8, 33, 17, dtype=torch.float64) * 0.1 + 1000
    want = torch_chain(x, 4, None, None, None, None)
    assert rel_err(gn.group_norm_silu_ref(x.float(), 4), want) < 1e-3


@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("shape,G", [((2, 4, 3, 2), 2), ((2, 6, 5), 3), ((3, 4), 1)])
def test_reference_gradcheck(shape, G, silu):
    x, w, b, sc, sh = make_inputs(shape, "wbss", torch.float64, "cpu")
    ins = [t.requires_grad_() for t in (x, w, b, sc, sh)]

    def fn(x, w, b, sc, sh):
        return gn.group_norm_silu_ref(x, G, w, b, scale=sc, shift=sh, silu=silu)

    assert torch.autograd.gradcheck(fn, ins)


@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("shape,G,parts", SHAPES, ids=SHAPE_IDS)
def test_closed_form_backward_matches_autograd(shape, G, parts, silu):
    """The backward formulas the kernels implement == autograd of the reference, in float64."""
    x, w, b, sc, sh = make_inputs(shape, parts, torch.float64, "cpu")
    dy = torch.randn_like(x)
    ins = [None if t is None else t.requires_grad_() for t in (x, w, b, sc, sh)]
    gn.group_norm_silu_ref(ins[0], G, ins[1], ins[2], scale=ins[3], shift=ins[4], silu=silu).backward(dy)
    got = gn.group_norm_silu_backward_ref(dy, x.detach(), G, w, b, 1e-5, sc, sh, silu)
    for name, g, t in zip(("dx", "dweight", "dbias", "dscale", "dshift"), got, ins):
        assert (g is None) == (t is None), name
        if t is not None:
            assert rel_err(g, t.grad) < 1e-10, name


# ----------------------------------------------------------------------------- the kernels


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,G,parts,layout", _kernel_cases() + REAL_SIZES)
def test_forward_kernel(shape, G, parts, layout, dtype, device, kernel_path, poisoned_alloc):
    x, w, b, sc, sh = make_inputs(shape, parts, dtype, device, layout)
    got = fastdiff.ops.group_norm_silu(x, G, w, b, scale=sc, shift=sh)
    want = gn.group_norm_silu_ref(*as_f32(x), G, *as_f32(w, b), scale=as_f32(sc)[0], shift=as_f32(sh)[0]).float()
    torch_err = rel_err(torch_chain(x, G, w, b, sc, sh), want)
    assert got.dtype == dtype and got.shape == x.shape
    assert got.stride() == x.stride(), "output must keep the input's memory layout"
    assert rel_err(got, want) <= tolerance(torch_err, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,G,parts,layout", _kernel_cases()[::2] + [_kernel_cases()[3]] + REAL_SIZES)
def test_backward_kernel(shape, G, parts, layout, dtype, device, kernel_path, poisoned_alloc):
    x, w, b, sc, sh = make_inputs(shape, parts, dtype, device, layout)
    dy = torch.randn(x.shape, device=device).to(dtype)
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, w, b, sc, sh)]
    # against the float64 truth.  In 2-element groups x̂ = ±1 up to eps, so dx cancels to ~1e-7 of its terms
    # (exactly 0 at eps = 0) and any fp32 formulation's dx is mostly round-off (ours reached 2.3× PyTorch's):
    # floors of 1e-2 for dx and 1e-4 for the others there.  A wrong formula errs by far more than ‖dx‖.
    few = x[0].numel() // G <= 2
    f64 = [None if t is None else t.detach().double().requires_grad_() for t in (x, w, b, sc, sh)]
    low = [None if t is None else t.detach().clone().requires_grad_() for t in (x, w, b, sc, sh)]
    fastdiff.ops.group_norm_silu(leaves[0], G, leaves[1], leaves[2], scale=leaves[3], shift=leaves[4]).backward(dy)
    gn.group_norm_silu_ref(f64[0], G, f64[1], f64[2], scale=f64[3], shift=f64[4]).backward(dy.double())
    torch_chain(low[0], G, low[1], low[2], low[3], low[4]).backward(dy)
    for name, ours, ref, eager in zip(("dx", "dweight", "dbias", "dscale", "dshift"), leaves, f64, low):
        if ours is None:
            continue
        assert ours.grad.dtype == ours.dtype and ours.grad.shape == ours.shape, name
        torch_err = rel_err(eager.grad, ref.grad)
        floor = (1e-2 if name == "dx" else 1e-4) if few else 0.0
        assert rel_err(ours.grad, ref.grad) <= tolerance(torch_err, dtype) + floor, name


@pytest.mark.parametrize("flags", range(16))
@pytest.mark.parametrize("silu", [True, False])
def test_every_optional_input(flags, silu, device, kernel_path, poisoned_alloc):
    """Each of weight/bias/scale/shift present or absent (each a separate kernel specialisation)."""
    shape, G = (2, 6, 5, 7), 3
    x, w, b, sc, sh = make_inputs(shape, "wbss", torch.float32, device)
    given = [t if flags & (1 << i) else None for i, t in enumerate((w, b, sc, sh))]
    leaves = [x.requires_grad_()] + [None if t is None else t.requires_grad_() for t in given]
    got = fastdiff.ops.group_norm_silu(leaves[0], G, leaves[1], leaves[2], scale=leaves[3], shift=leaves[4], silu=silu)
    dy = torch.randn_like(got)
    ours = torch.autograd.grad(got, [t for t in leaves if t is not None], dy)
    want = gn.group_norm_silu_ref(leaves[0], G, leaves[1], leaves[2], scale=leaves[3], shift=leaves[4], silu=silu)
    ref = torch.autograd.grad(want, [t for t in leaves if t is not None], dy)
    assert rel_err(got, want) < 1e-5
    for o, r in zip(ours, ref):
        assert rel_err(o, r) < 1e-5


def test_parameters_in_mixed_float_dtypes(device, kernel_path, poisoned_alloc):
    """γ, β, scale and shift are read in their own dtypes (no cast per call); gradients come back in them."""
    shape, G = (2, 6, 9, 7), 3
    x = (torch.randn(shape, device=device) * 2 + 1).to(torch.bfloat16)
    dtypes = (torch.float32, torch.float16, torch.bfloat16, torch.float32)  # γ, β, scale, shift
    sizes = ((6,), (6,), (2, 6), (2, 6))
    params = [(0.5 * torch.randn(n, device=device) + (i == 0)).to(dt) for i, (n, dt) in enumerate(zip(sizes, dtypes))]
    leaves = [x.clone().requires_grad_()] + [p.clone().requires_grad_() for p in params]
    f32 = [t.detach().float().requires_grad_() for t in leaves]
    dy = torch.randn(shape, device=device).to(torch.bfloat16)
    got = fastdiff.ops.group_norm_silu(leaves[0], G, leaves[1], leaves[2], scale=leaves[3], shift=leaves[4])
    want = gn.group_norm_silu_ref(f32[0], G, f32[1], f32[2], scale=f32[3], shift=f32[4])
    got.backward(dy)
    want.backward(dy.float())
    assert rel_err(got, want) < 1e-2
    for ours, ref in zip(leaves, f32):
        assert ours.grad.dtype == ours.dtype
        assert rel_err(ours.grad, ref.grad) < 2e-2


@pytest.mark.parametrize("sms", [1, 132])
@pytest.mark.parametrize("shape", [(1, 4, 70, 70), (2, 4, 70, 70), (2, 64, 33, 31)])
def test_split_and_multi_tile_chunks(shape, sms, device, kernel_path, monkeypatch, poisoned_alloc, request):
    """Groups split over several programs, chunks of several tiles, a short last chunk."""
    monkeypatch.setattr(gn, "device_sms", lambda index: sms)
    forget = [gn._geometry.cache_clear, gn._plans.clear, gn._checked_plans.clear]  # cached per shape
    for clear in forget:  # this test must see the patched SM count
        clear()
        request.addfinalizer(clear)
    x, w, b, sc, sh = make_inputs(shape, "wbss", torch.float32, device)
    if shape[1] == 64:
        x = channels_last(x)
    layout = sample_layout(x)
    block_c, block_s = gn._tile_shape(layout, shape[1], shape[2] * shape[3])
    split, tiles = gn._split(None, shape[0], -(-shape[1] // block_c), shape[2] * shape[3], block_s)
    leaves = [t.requires_grad_() for t in (x, w, b, sc, sh)]
    got = fastdiff.ops.group_norm_silu(leaves[0], 2, leaves[1], leaves[2], scale=leaves[3], shift=leaves[4])
    want = gn.group_norm_silu_ref(leaves[0], 2, leaves[1], leaves[2], scale=leaves[3], shift=leaves[4])
    dy = torch.randn_like(got)
    for o, r in zip(torch.autograd.grad(got, leaves, dy), torch.autograd.grad(want, leaves, dy)):
        assert rel_err(o, r) < 1e-5
    assert rel_err(got, want) < 1e-5
    # what this test is for: several chunks per channel, and (with 1 SM) chunks of several tiles
    assert split > 1 and (tiles > 1 if sms == 1 else tiles == 1)


def test_kernel_statistics_survive_a_large_mean(device, kernel_path):
    x = torch.randn(2, 8, 65, 33, device=device, dtype=torch.float64) * 0.1 + 1000
    want = torch_chain(x, 4, None, None, None, None)
    assert rel_err(fastdiff.ops.group_norm_silu(x.float(), 4), want) < 1e-3


def test_strided_input_is_made_dense(device, kernel_path):
    x = torch.randn(2, 4, 9, 22, device=device)[..., ::2]  # neither contiguous nor channels-last
    want = gn.group_norm_silu_ref(x.contiguous(), 2)
    assert rel_err(fastdiff.ops.group_norm_silu(x, 2), want) < 1e-5


def test_gradient_with_other_layout_than_input(device, kernel_path):
    """dy arrives contiguous while x is channels-last (the backward must not assume equal strides)."""
    x = channels_last(torch.randn(2, 6, 5, 7, device=device)).requires_grad_()
    dy = torch.randn(2, 6, 5, 7, device=device)
    (ours,) = torch.autograd.grad(fastdiff.ops.group_norm_silu(x, 3), x, dy)
    (ref,) = torch.autograd.grad(gn.group_norm_silu_ref(x, 3), x, dy)
    assert rel_err(ours, ref) < 1e-5


def test_split_fills_the_gpu():
    """At Stable Diffusion's batch-1 shapes the reductions run on at least 2 programs per SM of an H100."""
    pytest.importorskip("triton")
    for C, S in ((320, 64 * 64), (640, 32 * 32), (1280, 16 * 16)):
        for layout in ("contiguous", "channels_last"):
            block_c, block_s = gn._tile_shape(layout, C, S)
            c_blocks = -(-C // block_c)
            split, tiles = gn._split(None, 1, c_blocks, S, block_s)
            n_tiles = -(-S // block_s)
            assert c_blocks * split >= min(2 * 132, c_blocks * n_tiles), (C, S, layout)
    # a large batch keeps each channel block's reduction in one program
    assert gn._split(None, 64, 80, 4096, 1024) == (1, 4)


# ----------------------------------------------------------------------------- compile, errors, module


def test_compile_fullgraph_no_graph_break():
    mod = GroupNormSiLU(2, 4)
    x = torch.randn(2, 4, 5, 3, requires_grad=True)
    scale = torch.randn(2, 4, requires_grad=True)

    def f(x, scale):
        return mod(x, scale=scale).square().sum()

    with fastdiff.use_backend("reference"):
        explain = torch._dynamo.explain(f)(x, scale)
        assert explain.graph_break_count == 0
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        got = compiled(x, scale)
        g_got = torch.autograd.grad(got, (x, scale, mod.weight))
        want = f(x, scale)
        g_want = torch.autograd.grad(want, (x, scale, mod.weight))
    assert rel_err(got, want) < 1e-6
    for a, b in zip(g_got, g_want):
        assert rel_err(a, b) < 1e-6


def test_op_passes_torch_library_opcheck():
    x = torch.randn(2, 4, 3, 5)
    w, b, sc, sh = torch.randn(4), torch.randn(4), torch.randn(2, 4), torch.randn(2, 4)
    with fastdiff.use_backend("reference"):
        torch.library.opcheck(gn._group_norm_silu_call.registered, (x, w, b, sc, sh, 2, 1e-5, True))
        torch.library.opcheck(gn._group_norm_silu_call.registered, (channels_last(x), None, None, None, None, 4, 1e-5, False))


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(num_groups=3), ValueError, "num_groups"),
        (dict(num_groups=0), TypeError, "num_groups"),
        (dict(num_groups=2.0), TypeError, "num_groups"),
        (dict(weight=torch.ones(5)), ValueError, "weight"),
        (dict(bias=torch.ones(4, 1)), ValueError, "bias"),
        (dict(scale=torch.ones(4)), ValueError, "scale"),
        (dict(shift=torch.ones(3, 4)), ValueError, "shift"),
        (dict(weight=torch.ones(4, dtype=torch.int64)), TypeError, "weight"),
        (dict(x=torch.ones(2, 4, 3, dtype=torch.int32)), TypeError, "x"),
        (dict(x=torch.ones(4)), ValueError, "x"),
        (dict(x=torch.ones(0, 4, 3)), ValueError, "x"),
        (dict(x=[[1.0]]), TypeError, "x"),
        (dict(eps=-1.0), ValueError, "eps"),
        (dict(silu=1), TypeError, "silu"),
    ],
)
def test_bad_input_names_the_argument(kwargs, exc, match):
    args = dict(x=torch.randn(2, 4, 3), num_groups=2)
    args.update(kwargs)
    x, G = args.pop("x"), args.pop("num_groups")
    with pytest.raises(exc, match=match):
        fastdiff.ops.group_norm_silu(x, G, **args)


def test_module_loads_group_norm_state_dict_and_matches_it(device):
    ref = torch.nn.GroupNorm(4, 12, eps=1e-6).to(device)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    mod = GroupNormSiLU(4, 12, eps=1e-6).to(device)
    mod.load_state_dict(ref.state_dict())  # strict: same names and shapes
    plain = GroupNormSiLU(4, 12, eps=1e-6, silu=False).to(device)
    plain.load_state_dict(ref.state_dict())
    x = torch.randn(2, 12, 5, 6, device=device)
    assert rel_err(mod(x), F.silu(ref(x))) < 1e-5
    assert rel_err(plain(x), ref(x)) < 1e-5
    shared = GroupNormSiLU.from_group_norm(ref)
    assert shared.weight is ref.weight and shared.eps == ref.eps and shared.num_groups == 4
    assert rel_err(shared(x), F.silu(ref(x))) < 1e-5


def test_module_scale_shift_and_no_affine(device):
    mod = GroupNormSiLU(2, 4, affine=False)
    assert mod.weight is None and mod.bias is None and len(mod.state_dict()) == 0
    x, scale, shift = torch.randn(3, 4, 5, device=device), torch.randn(3, 4, device=device), torch.randn(3, 4, device=device)
    want = gn.group_norm_silu_ref(x, 2, scale=scale, shift=shift)
    assert rel_err(mod(x, scale, shift), want) < 1e-5
    assert "silu=True" in repr(mod)
    with pytest.raises(ValueError, match="num_groups"):
        GroupNormSiLU(3, 4)
