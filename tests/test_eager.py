"""The ops' eager calls in C++ (``fastdiff.ops._aot.eager``, ``kernels/python/eager.cpp``), without a GPU.

In dry run a call of every op goes through the C++ entry (counted by ``launched()``) or, with the
entry switched off, through the Python path; both must plan the same library launches (cases, grids,
scalars, and the inputs' pointers in the same places) and return outputs of the same shapes, dtypes
and strides.  Calls the entry leaves to Python (autograd, copies, numbers of other types) must take
the Python path, and a checked call must make the public function's checks, raising its errors.
Skipped, with the reason, where the module is not built.
"""
import pytest
import torch

import fastdiff
from fastdiff.ops import _aot, flash_attention, fused_step, group_norm, noising
from fastdiff.ops.fused_step import coefficient_rows, step_coefficients


@pytest.fixture
def eager():
    if _aot.binding() is None:
        pytest.skip(_aot._load()[1])
    module = _aot._loaded_eager()
    if module is _aot.NO_EAGER:
        pytest.skip(f"fastdiff.ops._eager is {_aot.eager_status}")
    return module


def _input(*shape, dtype=torch.float32, channels_last=False, device="cpu"):
    x = torch.randn(*shape, device=device).to(dtype)
    return x.to(memory_format=torch.channels_last) if channels_last else x


def _cases(device="cpu"):
    """name -> a call of a public op (fresh tensors per call: the layouts and options vary)."""
    ops = fastdiff.ops
    bf16, f16 = torch.bfloat16, torch.float16
    x = _input(3, 6, 5, 7, dtype=bf16, channels_last=True, device=device)
    x32 = _input(2, 4, 3, 5, device=device)
    xc = _input(3, 6, 5, 7, dtype=bf16, device=device)
    w, b = _input(6, dtype=bf16, device=device), _input(6, dtype=bf16, device=device)
    film = _input(3, 6, dtype=bf16, device=device)
    q = _input(2, 3, 19, 40, dtype=f16, device=device)
    k, v = _input(2, 3, 77, 40, dtype=f16, device=device), _input(2, 3, 77, 40, dtype=f16, device=device)
    t, acp = torch.tensor([3, 70, 11], device=device), torch.linspace(0.99, 0.01, 100, device=device)
    keys = torch.tensor([5, 2**40, 7], device=device)
    coeffs = coefficient_rows(step_coefficients(x0_from_x=1.1, x0_from_out=-0.4, eps_from_out=1.0, x=0.9, x0=0.1,
                                                noise=0.1).unsqueeze(0), device)[0]  # fmt: skip
    seeds = torch.arange(3, device=device)
    mask = (torch.rand(3, 1, 5, 7, device=device) > 0.5).to(bf16).to(memory_format=torch.channels_last)
    weight = torch.rand(2, device=device)
    return {
        "group_norm_silu, bf16 channels-last, FiLM": lambda: ops.group_norm_silu(x, 3, w, b, scale=film, shift=film),
        "group_norm_silu, fp32, no affine": lambda: ops.group_norm_silu(x32, 2, silu=False),
        "group_norm_silu_unchecked": lambda: group_norm.group_norm_silu_unchecked(x32, 4, w.float()[:4], None, 1e-6),
        "attention": lambda: ops.attention(q, q, q),
        "attention, cross, scale": lambda: ops.attention(q, k, v, scale=0.3),
        "attention_unchecked": lambda: flash_attention.attention_unchecked(q, k, v, scale=40**-0.5),
        "q_sample, drawn noise": lambda: ops.q_sample(x, t, acp),
        "q_sample, given noise": lambda: ops.q_sample(x32[:2], t[:2], acp, torch.randn_like(x32[:2])),
        "q_sample_unchecked": lambda: noising.q_sample_unchecked(x, t, acp),
        "training_target v, keys": lambda: ops.training_target(x, t, acp, prediction="v", keys=keys),
        "training_target_unchecked sample": lambda: noising.training_target_unchecked(x, t, acp, prediction="sample"),
        "diffusion_loss, weighted": lambda: ops.diffusion_loss(x32, torch.randn_like(x32), weight),
        "diffusion_loss_unchecked": lambda: noising.diffusion_loss_unchecked(x, torch.randn_like(x)),
        "sampler_step, guided, noise": lambda: ops.sampler_step(
            xc, xc, coeffs, uncond_output=xc, guidance_scale=3.5, seeds=seeds, step=4, add_noise=True),
        "sampler_step, every option, channels-last": lambda: ops.sampler_step(
            x, x, coeffs, uncond_output=x, guidance_scale=3.5, guidance_rescale=0.7, clip_x0=1.0, x0_prev=x,
            return_x0=True, seeds=seeds, step=4, add_noise=True, known=x, mask=mask),
        "sampler_step_unchecked": lambda: fused_step.sampler_step_unchecked(x32, x32, coeffs),
    }  # fmt: skip


def _outputs(out) -> list:
    return [(o.shape, o.dtype, o.stride()) if isinstance(o, torch.Tensor) else o
            for o in (out if isinstance(out, tuple) else (out,))]  # fmt: skip


def _launches(records, inputs: dict[int, str]) -> list:
    """The recorded launches with each input's pointer named, and every other pointer as "p": the
    scalars, grids and cases compare exactly."""
    return [(name, grid, [inputs.get(a, "p" if a > 2**40 else a) for a in args]) for name, grid, args in records]


def _run(call, monkeypatch, through_eager: bool):
    with monkeypatch.context() as m:
        if not through_eager:
            m.setattr(_aot, "eager", _aot.NO_EAGER)
        with fastdiff.ops.dry_run(), torch.no_grad():
            _aot.recorded()
            before = _aot.eager.launched() if through_eager else 0
            out = call()
            launched = _aot.eager.launched() - before if through_eager else 0
            return out, _aot.recorded(), launched


@pytest.mark.parametrize("name", list(_cases()))
def test_the_cpp_entry_launches_what_the_python_path_launches(eager, name, monkeypatch):
    call = _cases()[name]
    torch.manual_seed(0)
    out_py, records_py, _ = _run(call, monkeypatch, through_eager=False)
    torch.manual_seed(0)
    out_cpp, records_cpp, launched = _run(call, monkeypatch, through_eager=True)
    assert launched == 1, f"{name} did not launch from the C++ entry"
    assert records_cpp and len(records_cpp) == len(records_py)
    assert _outputs(out_cpp) == _outputs(out_py)
    # the inputs' pointers by name (the tensors the call closes over); outputs and scratch are fresh per call
    held = [c.cell_contents for c in call.__closure__ or ()]
    inputs = {t.data_ptr(): f"input{i}" for i, t in enumerate(held) if isinstance(t, torch.Tensor)}
    assert _launches(records_cpp, inputs) == _launches(records_py, inputs)
    assert all(isinstance(o, torch.Tensor) or o is None for o in (out_cpp if isinstance(out_cpp, tuple) else [out_cpp]))


def test_a_plan_is_made_once_per_signature(eager, monkeypatch):
    made = []
    planner, backward = _aot._planners["attention"]
    eager.set_planner("attention", lambda *args: made.append(args[-1]) or planner(*args), backward)
    try:
        q = torch.randn(1, 2, 9, 32, dtype=torch.bfloat16)
        with fastdiff.ops.dry_run():
            for _ in range(3):
                flash_attention.attention_unchecked(q, q, q, scale=0.2)
            for _ in range(3):
                fastdiff.ops.attention(q, q, q)
            flash_attention.attention_unchecked(q, q, q, scale=0.2)
            fastdiff.ops.attention(q[:, :1], q[:, :1], q[:, :1])  # another signature
    finally:
        eager.set_planner("attention", planner, backward)
    # unchecked once; checked once more (an unchecked plan was never checked); then the new signature
    assert made == [False, True, True]


def test_a_checked_call_makes_the_checks_of_its_public_function(eager):
    x = torch.randn(2, 4, 3, 3)
    acp = torch.linspace(0.99, 0.01, 10)
    with fastdiff.ops.dry_run():
        noising.q_sample_unchecked(x, torch.tensor([1, 2, 3]), acp)  # unchecked: planned, not checked
        with pytest.raises(ValueError, match="t must have one timestep per sample"):
            fastdiff.ops.q_sample(x, torch.tensor([1, 2, 3]), acp)
        with pytest.raises(ValueError, match="num_groups must divide the 4 channels"):
            fastdiff.ops.group_norm_silu(x, 3)
        with pytest.raises(ValueError, match="eps must be a finite number"):
            fastdiff.ops.group_norm_silu(x, 2, eps=-1.0)
        with pytest.raises(ValueError, match="guidance_rescale"):
            fastdiff.ops.sampler_step(x, x, step_coefficients(x=1.0), guidance_rescale=1.5)
        q = torch.randn(1, 1, 5, 48, dtype=torch.bfloat16)
        with pytest.raises(ValueError, match="head"):
            fastdiff.ops.attention(q, q, q)


class _Subclass(torch.Tensor):
    pass


@pytest.mark.parametrize("why", ["a copy first", "numbers of other types", "a tensor subclass"])
def test_calls_the_entry_leaves_to_python_take_the_python_path(eager, why):
    x = torch.randn(2, 4, 3, 3, dtype=torch.bfloat16)
    with fastdiff.ops.dry_run():
        before = eager.launched()
        if why == "a copy first":
            fastdiff.ops.group_norm_silu(x.transpose(2, 3), 2)  # neither contiguous nor channels-last
        elif why == "numbers of other types":
            fastdiff.ops.group_norm_silu(x, 2, eps=0)  # an int eps: checked in Python
            fastdiff.ops.sampler_step(x, x, step_coefficients(x=1.0), guidance_scale=2)
        else:
            fastdiff.ops.group_norm_silu(x.as_subclass(_Subclass), 2)
        assert eager.launched() == before
        assert _aot.recorded(), "the Python path launched through the library"


def _gradient_cases(device="cpu"):
    """name -> (the leaves, a call of a differentiable op on them)."""
    bf16, f16 = torch.bfloat16, torch.float16
    x = _input(3, 6, 5, 7, dtype=bf16, channels_last=True, device=device)
    w, b = _input(6, dtype=bf16, device=device), _input(6, dtype=bf16, device=device)
    film = _input(3, 6, dtype=bf16, device=device)
    x32 = _input(2, 4, 3, 5, device=device)
    q, kv = _input(2, 3, 19, 40, dtype=f16, device=device), _input(2, 3, 77, 40, dtype=f16, device=device)
    q_long = _input(1, 2, 150, 64, dtype=bf16, device=device)
    weight = torch.rand(2, device=device)
    ops = fastdiff.ops
    return {
        "group_norm_silu, FiLM": ((x, w, b, film, film),
                                  lambda *t: ops.group_norm_silu(t[0], 3, t[1], t[2], scale=t[3], shift=t[4])),
        "group_norm_silu, x only": ((x32,), lambda x: group_norm.group_norm_silu_unchecked(x, 2)),
        "attention, short keys": ((q, kv, kv), lambda *t: ops.attention(*t)),
        "attention, long keys": ((q_long, q_long, q_long), lambda *t: flash_attention.attention_unchecked(*t, scale=0.125)),
        "diffusion_loss, weighted": ((x32, x32), lambda p, t: ops.diffusion_loss(p, t, weight)),
    }  # fmt: skip


def _forward_backward(leaves, fn):
    """(output, gradients, the leaves' pointers by name) of a forward and backward on fresh leaves."""
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*leaves)
    out.backward(torch.ones_like(out))
    return out, [t.grad for t in leaves], {t.data_ptr(): f"leaf{i}" for i, t in enumerate(leaves)}


def _both_paths(eager, leaves, fn, monkeypatch, python_backward_only=False) -> dict:
    """A forward and backward in dry run through the Python path (False) and the C++ entry (True):
    (output, gradients, the launches with the leaves named, the library calls made from C++)."""
    runs = {}
    for through_eager in (False, True):
        with monkeypatch.context() as m:
            if not through_eager:
                m.setattr(_aot, "eager", _aot.NO_EAGER)
            with fastdiff.ops.dry_run():
                _aot.recorded()
                before = eager.launched()
                eager.set_python_backward_only(python_backward_only and through_eager)
                try:
                    out, grads, names = _forward_backward(leaves, fn)
                finally:
                    eager.set_python_backward_only(False)
                runs[through_eager] = (out, grads, _launches(_aot.recorded(), names), eager.launched() - before)
    return runs


def _layouts(tensors) -> list:
    return [(t.shape, t.dtype, t.stride()) for t in tensors]


@pytest.mark.parametrize("name", list(_gradient_cases()))
def test_a_call_autograd_records_runs_forward_and_backward_from_cpp(eager, name, monkeypatch):
    """The C++ autograd node launches what the Python autograd.Function launches, forward and backward,
    and gives gradients of the same shapes, dtypes and layouts."""
    runs = _both_paths(eager, *_gradient_cases()[name], monkeypatch)
    (out_py, grads_py, launches_py, _), (out_cpp, grads_cpp, launches_cpp, launched) = runs[False], runs[True]
    assert launched == 2, f"{name}: forward and backward were not both launched from C++"
    assert type(out_cpp.grad_fn).__name__ == "CppFunction"
    assert _outputs(out_cpp) == _outputs(out_py)
    assert _layouts(grads_cpp) == _layouts(grads_py)
    assert len(launches_cpp) >= 2 and launches_cpp == launches_py


@pytest.mark.parametrize("name", list(_gradient_cases()))
def test_a_backward_the_library_declines_goes_to_the_python_backward(eager, name, monkeypatch):
    """From the C++ node (its forward launched from C++), through the op's Python backward under the GIL:
    the backward's launches and gradients are the Python path's."""
    runs = _both_paths(eager, *_gradient_cases()[name], monkeypatch, python_backward_only=True)
    (_, grads_py, launches_py, _), (_, grads_cpp, launches_cpp, launched) = runs[False], runs[True]
    assert launched == 1, "the forward launches from C++, the backward from Python"
    assert _layouts(grads_cpp) == _layouts(grads_py)
    assert launches_cpp == launches_py


def test_outside_dry_run_cpu_calls_take_the_reference(eager):
    x = torch.randn(2, 4, 3, 3)
    before = eager.launched()
    y = fastdiff.ops.group_norm_silu(x, 2)
    assert eager.launched() == before
    torch.testing.assert_close(y, torch.nn.functional.silu(torch.nn.functional.group_norm(x, 2)))


def test_a_call_the_library_declines_raises_its_message_in_dry_run(eager):
    """A head dim the library has no case for (the unchecked entry lets it through): in dry run there is
    no JIT to fall back on, so the C++ entry raises the library's message, as the Python path does."""
    q = torch.randn(1, 1, 5, 48, dtype=torch.bfloat16)
    with fastdiff.ops.dry_run(), pytest.raises(RuntimeError, match="libfastdiff_kernels attention_fwd: .*48"):
        flash_attention.attention_unchecked(q, q, q, scale=0.1)


def _poison_cuda_allocator():
    """Fill the caching allocator's free small blocks with NaN: the next small outputs start as NaN."""
    blocks = [torch.full((16384,), float("nan"), device="cuda") for _ in range(64)]
    del blocks


@pytest.mark.skipif(not torch.cuda.is_available(), reason="launches on a CUDA device")
@pytest.mark.parametrize("name", list(_cases()))
def test_on_cuda_the_cpp_entry_gives_the_python_paths_bits(eager, name, monkeypatch):
    """The CUDA half of the entry (the current device and stream, ATen allocations on them): the same
    launches as the Python path, so the same bits (same inputs, same Philox keys)."""
    call = _cases("cuda")[name]
    with torch.no_grad():
        torch.manual_seed(0)
        _poison_cuda_allocator()
        before = eager.launched()
        from_cpp = call()
        assert eager.launched() == before + 1, f"{name} did not launch from the C++ entry on CUDA"
        monkeypatch.setattr(_aot, "eager", _aot.NO_EAGER)
        torch.manual_seed(0)
        _poison_cuda_allocator()
        from_python = call()
    torch.cuda.synchronize()
    for a, b in zip(from_cpp if isinstance(from_cpp, tuple) else [from_cpp],
                    from_python if isinstance(from_python, tuple) else [from_python]):  # fmt: skip
        if a is None:
            assert b is None
            continue
        assert (a.shape, a.dtype, a.stride()) == (b.shape, b.dtype, b.stride())
        assert not a.isnan().any(), f"{name}: an output the kernels did not write"
        assert torch.equal(a, b), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="launches on a CUDA device")
@pytest.mark.parametrize("name", list(_gradient_cases()))
def test_on_cuda_the_cpp_autograd_node_gives_the_python_paths_gradients(eager, name, monkeypatch):
    """The CUDA half of the autograd node: the backward on the forward's stream, from the engine's thread,
    with its scratch laid out as the Python path lays it out (a wrong offset gives other numbers)."""
    leaves, fn = _gradient_cases("cuda")[name]
    torch.manual_seed(0)
    _poison_cuda_allocator()
    before = eager.launched()
    out_cpp, grads_cpp, _ = _forward_backward(leaves, fn)
    assert eager.launched() == before + 2, f"{name}: forward and backward were not both launched from C++"
    monkeypatch.setattr(_aot, "eager", _aot.NO_EAGER)
    torch.manual_seed(0)
    out_py, grads_py, _ = _forward_backward(leaves, fn)
    torch.cuda.synchronize()
    assert torch.equal(out_cpp, out_py), name
    for a, b in zip(grads_cpp, grads_py):
        assert not a.isnan().any(), f"{name}: a gradient the kernels did not write"
        torch.testing.assert_close(a, b)  # the same kernels: equal up to the order of any atomic sums


def test_arguments_the_entries_cannot_read_raise_as_before_instead_of_crashing(eager):
    """None first, a nested tensor, vmap's wrapped tensors: the Python path's errors, never a crash."""
    x = torch.randn(2, 4, 3, 3)
    with fastdiff.ops.dry_run():
        with pytest.raises(Exception):
            fastdiff.ops.attention(None, None, None)
        with pytest.raises(Exception):
            fastdiff.ops.diffusion_loss(None, x)
        nested = torch.nested.nested_tensor([torch.randn(4, 3, 3), torch.randn(4, 2, 3)])
        with pytest.raises(Exception):
            fastdiff.ops.group_norm_silu(nested, 2)
        q = torch.randn(3, 1, 2, 5, 32, dtype=torch.bfloat16)
        with pytest.raises(Exception):
            torch.vmap(lambda q: fastdiff.ops.attention(q, q, q))(q)


@pytest.mark.parametrize("through_eager", [False, True])
def test_gradients_off_a_16_byte_boundary_are_copied_first(eager, through_eager, monkeypatch):
    """A contiguous dO that starts off a 16-byte boundary, and each loss's gradient as a view into one
    tensor (a stack of losses): both paths copy them before the backward reads them."""
    if not through_eager:
        monkeypatch.setattr(_aot, "eager", _aot.NO_EAGER)
    q = torch.randn(1, 2, 9, 32, dtype=torch.bfloat16, requires_grad=True)
    pred = torch.randn(2, 4, 3, 3, requires_grad=True)
    with fastdiff.ops.dry_run():
        o = fastdiff.ops.attention(q, q, q)
        z = torch.cat([torch.zeros(1, dtype=o.dtype), o.reshape(-1)])  # o's gradient: z's from element 1 on
        z.sum().backward()
        losses = torch.stack([fastdiff.ops.diffusion_loss(pred, pred.detach() * k) for k in (0.5, 2.0)])
        (losses * torch.tensor([1.0, 3.0])).sum().backward()
    assert q.grad is not None and pred.grad is not None
