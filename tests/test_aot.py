"""Python launching through libfastdiff_kernels (fastdiff.ops._aot), without a GPU.

In dry-run mode every op's eager path runs through the binding and the library down to the
driver call; the launches the library plans must be the ones the Python launchers make through
the JIT (same cases, grids and scalar arguments).  Needs the library installed with the package
(``pip install -e .`` builds it); skipped, with the reason, where it is not.
"""
import pytest
import torch

import fastdiff
from fastdiff.ops import _aot, _backend, flash_attention, launch_tables
from fastdiff.ops.fused_step import step_coefficients


@pytest.fixture
def library():
    if _aot.binding() is None:
        pytest.skip(_aot._load()[1])
    return _aot.binding()


@pytest.mark.parametrize(
    "capability, tables, cubins",
    [((7, 5), 80, 0), ((8, 0), 80, 80), ((8, 6), 80, 80), ((8, 9), 80, 80), ((9, 0), 90, 90), ((10, 0), 100, 100),
     ((10, 3), 100, 0), ((11, 0), 80, 0), ((12, 0), 80, 0), ((12, 1), 80, 0)],
)  # fmt: skip
def test_a_device_takes_its_tables_and_the_cubins_that_run_on_it(monkeypatch, capability, tables, cubins):
    """Python's side of the arch choice (tests/test_kernels_c.py checks the C dispatcher's against it): the
    tables by family (12.x, consumer Blackwell with ~100 KB of shared memory, takes sm_80's), the library's
    cubins only where they run (sm_90a on 9.0, sm_100a on 10.0), and only where built."""
    assert launch_tables.table_arch(*capability) == tables
    assert launch_tables.library_arch(*capability) == cubins
    assert launch_tables.library_arch(*capability, archs=(80, 90)) == (0 if cubins == 100 else cubins)
    monkeypatch.setattr(_backend, "INTERPRET", False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: capability)
    assert launch_tables.device_arch.__wrapped__(0) == tables


def _scalars(case_name: str, args) -> list:
    """The non-pointer arguments of a launch, as the library records them."""
    case = next(c for t in _all_tables() for c in t.cases() if c.name == case_name)
    out = []
    for name, value in zip(case.runtime_args(), args):
        if not case.signature[name].startswith("*"):
            out.append(value)
    return out


def _all_tables():
    from fastdiff.audit import op_modules

    return [t for m in op_modules() for t in m.LAUNCH_TABLES]


def _jit_launches(fn):
    from tests.test_kernels_c import _as_int

    with launch_tables.record_launches() as log:
        fn()
    return [(c.name, g + (1,) * (3 - len(g)), [_as_int(a) for a in args]) for c, g, args in log]


def _library_launches(fn):
    with fastdiff.ops.dry_run():
        fn()
        return _aot.recorded()


def _same(jit, lib):
    assert [(n, g) for n, g, _ in lib] == [(n, g) for n, g, _ in jit]
    for (name, _, a), (_, _, b) in zip(jit, lib):
        assert _scalars(name, b) == _scalars(name, a), name


def _calls(device="cpu", dtype=torch.float32):
    x = torch.randn(2, 4, 8, 8, device=device, dtype=dtype)
    t, acp = torch.tensor([3, 70], device=device), torch.linspace(0.99, 0.01, 100, device=device)
    q = torch.randn(2, 3, 33, 64, device=device, dtype=dtype)
    coeffs = step_coefficients(x0_from_x=1.1, x0_from_out=-0.4, eps_from_out=1.0, x=0.9, x0=0.1, noise=0.1).to(device)
    w, b = torch.randn(4, device=device), torch.randn(4, device=device)
    ops = fastdiff.ops
    return {
        "q_sample": lambda: ops.q_sample(x, t, acp, torch.randn_like(x)),
        "training_target": lambda: ops.training_target(x, t, acp, torch.randn_like(x), prediction="v"),
        "diffusion_loss": lambda: ops.diffusion_loss(x, torch.randn_like(x), torch.rand(2)),
        "attention": lambda: ops.attention(q, q, q),
        "group_norm_silu": lambda: ops.group_norm_silu(x, 2, w, b),
        "sampler_step": lambda: ops.sampler_step(x, x, coeffs, uncond_output=x, guidance_scale=2.0,
                                                 seeds=torch.arange(2, device=device), add_noise=True),  # fmt: skip
    }


def _gradients(device, dtype):
    """Backward passes: GroupNorm+SiLU's and attention's gradients (long keys and short keys)."""
    x = torch.randn(2, 4, 8, 8, device=device, dtype=dtype, requires_grad=True)
    q = torch.randn(1, 2, 300, 40, device=device, dtype=dtype, requires_grad=True)
    ctx = torch.randn(1, 2, 77, 40, device=device, dtype=dtype, requires_grad=True)
    ops = fastdiff.ops
    return {
        "group_norm_silu backward": lambda: torch.autograd.grad(ops.group_norm_silu(x, 2).float().square().sum(), x),
        "attention backward": lambda: torch.autograd.grad(ops.attention(q, q, q).float().square().sum(), q),
        "attention backward, short keys": lambda: torch.autograd.grad(
            ops.attention(q, ctx, ctx).float().square().sum(), (q, ctx)),
    }


@pytest.mark.parametrize("op", list(_calls()))
def test_every_op_launches_through_the_library_as_the_jit_would(library, op):
    call = _calls()[op]
    torch.manual_seed(0)
    lib = _library_launches(call)
    torch.manual_seed(0)
    jit = _jit_launches(call)
    assert lib, f"{op} planned no launch through the library"
    _same(jit, lib)


def test_backward_passes_launch_through_the_library(library):
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    q = torch.randn(1, 2, 17, 40, requires_grad=True)

    def run():
        fastdiff.ops.group_norm_silu(x, 2).sum().backward()
        fastdiff.ops.attention(q, q, q).sum().backward()

    lib = _library_launches(run)
    jit = _jit_launches(run)
    _same(jit, lib)


def test_info_names_each_ops_path(library):
    paths = fastdiff.ops.info()
    assert set(paths) >= {"q_sample", "attention", "group_norm_silu", "sampler_step", "diffusion_loss"}
    assert all(p.startswith("library (") and "libfastdiff_kernels.so" in p for p in paths.values())
    # each op's own module's table cases the library does not ship (the attention's tensor-descriptor forward)
    jit_only = [case for table in flash_attention.LAUNCH_TABLES for case in table.cases() if case.jit_only]
    assert jit_only and "Triton's JIT launches" in paths["attention"]
    assert "Triton's JIT launches" not in paths["q_sample"]


def test_a_stale_library_is_not_used(monkeypatch):
    """Built from other kernel sources: the JIT path, and info() says why."""
    monkeypatch.setattr(launch_tables, "source_hash", lambda: "not the library's")
    _aot._load.cache_clear()
    try:
        assert all(p.startswith("triton jit (") for p in fastdiff.ops.info().values())
        assert not _aot.active(torch.empty(1))
    finally:
        monkeypatch.undo()
        _aot._load.cache_clear()


def _tensors(out) -> list[torch.Tensor]:
    return [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(o, torch.Tensor)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="launches on a CUDA device")
@pytest.mark.parametrize("op", [*_calls(), "group_norm_silu backward", "attention backward",
                                "attention backward, short keys"])  # fmt: skip
def test_the_library_and_the_jit_give_the_same_bits_on_cuda(library, op, monkeypatch):
    """The library's cubins are Triton's own compilations of the same cases, launched with the same grids
    and arguments: every output equals the JIT's bit for bit (same inputs, same Philox keys)."""
    calls = {**_calls("cuda", torch.bfloat16), **_gradients("cuda", torch.bfloat16)}
    assert _aot.active(torch.empty(1, device="cuda")), "the library is not this device's path"
    torch.manual_seed(0)
    from_library = _tensors(calls[op]())
    monkeypatch.setattr(_aot, "binding", lambda: None)  # every launch through Triton's JIT,
    monkeypatch.setattr(_aot, "eager", _aot.NO_EAGER)  # none from the C++ entries
    torch.manual_seed(0)
    from_jit = _tensors(calls[op]())
    torch.cuda.synchronize()
    assert len(from_library) == len(from_jit) > 0
    for a, b in zip(from_library, from_jit):
        assert torch.equal(a, b), op
