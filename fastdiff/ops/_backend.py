"""Which implementation runs an op: the Triton kernel or the PyTorch reference.

The rule (per call, from the op's tensors):

* CUDA tensors and Triton importable      -> the Triton kernel;
* CPU tensors                             -> the PyTorch reference;
* ``FASTDIFF_BACKEND=interpret``          -> the Triton kernels run on CPU tensors
  through Triton's interpreter (this sets ``TRITON_INTERPRET=1`` before triton is
  imported, which is why it must be an environment variable);
* ``FASTDIFF_BACKEND=reference`` or ``with use_backend("reference"):`` forces the
  reference everywhere, CUDA included (A/B checks, benchmark baselines);
* ``FASTDIFF_BACKEND=triton`` / ``use_backend("triton")`` demands the kernels and
  raises where they cannot run.

The environment variable is read once, when fastdiff is imported; this is the
only behaviour fastdiff takes from the environment.
"""
from __future__ import annotations

import contextlib
import contextvars
import inspect
import os
import typing

import torch

BACKENDS = ("auto", "triton", "reference", "interpret")

_env_backend = os.environ.get("FASTDIFF_BACKEND", "auto").strip().lower() or "auto"
if _env_backend not in BACKENDS:
    raise ValueError(f"FASTDIFF_BACKEND must be one of {BACKENDS}, got {_env_backend!r}")
if _env_backend == "interpret":
    # Must happen before the first `import triton` anywhere in the process.
    os.environ["TRITON_INTERPRET"] = "1"

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # e.g. macOS / Windows: the reference path still works
    HAS_TRITON = False

INTERPRET = _env_backend == "interpret"
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastdiff_backend", default=None)
_dry_run: contextvars.ContextVar[bool] = contextvars.ContextVar("fastdiff_dry_run", default=False)


def current_backend() -> str:
    """The backend setting in force: an override from `use_backend`, else the environment's."""
    return _override.get() or _env_backend


def environment_backend() -> str:
    """``FASTDIFF_BACKEND`` as read at import ("auto" when unset)."""
    return _env_backend


def context_variables() -> tuple[contextvars.ContextVar, contextvars.ContextVar]:
    """The context variables behind `dry_run_active` and `use_backend` (the C++ eager entries read them
    directly: `fastdiff.ops._aot.eager`)."""
    return _dry_run, _override


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend inside a ``with`` block: "auto", "triton" or "reference".

    "interpret" cannot be switched on here: it must be set through
    FASTDIFF_BACKEND before triton is imported.
    """
    name = name.lower()
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "interpret" and not INTERPRET:
        raise ValueError("backend 'interpret' must be chosen with FASTDIFF_BACKEND=interpret before import")
    token = _override.set(name)
    try:
        yield
    finally:
        _override.reset(token)


def dry_run_active() -> bool:
    """Inside ``fastdiff.ops.dry_run()``: kernel paths are planned through the library, never run."""
    return _dry_run.get()


@contextlib.contextmanager
def dry_run_mode():
    """Every op takes its kernel path, on any device (see ``_aot.dry_run``, which also switches the library)."""
    token = _dry_run.set(True)
    try:
        yield
    finally:
        _dry_run.reset(token)


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """True when this call should run the Triton kernel for these tensors."""
    if _dry_run.get():
        return True
    mode = current_backend()
    if mode == "reference":
        return False
    on_cuda = any(t is not None and t.is_cuda for t in tensors)
    if INTERPRET and mode in ("auto", "interpret", "triton"):
        return HAS_TRITON
    if mode == "triton" and not (on_cuda and HAS_TRITON):
        raise RuntimeError(
            "backend 'triton' needs CUDA tensors and an importable triton "
            "(or FASTDIFF_BACKEND=interpret to run the kernels on the CPU)"
        )
    return on_cuda and HAS_TRITON


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for launch grids (``triton.cdiv`` goes through Triton's constexpr wrapper: ~5 µs a call)."""
    return -(-a // b)


def traced(x: torch.Tensor) -> bool:
    """True while torch.compile or export traces the call, or for a tensor subclass (fake, functional, DTensor)."""
    return torch.compiler.is_compiling() or type(x) is not torch.Tensor


def wants_grad(*args) -> bool:
    """Whether autograd must record a call with these arguments."""
    return torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


def define_op(
    name: str,
    impl,
    fake,
    *,
    eager_only: tuple[str, ...] = (),
    returns=None,
    empty=None,
    setup_context=None,
    backward=None,
    inference=None,
) -> "Op":
    """One fastdiff op, defined in one call: the registered ``torch.library`` custom op, its fake
    (shape-only) implementation, its autograd formula and the eager fast path (`Op`).

    ``impl``: the implementation, typed (the op's schema comes from its annotations).
    ``fake``: what tracers run instead: empty outputs of the right shapes, dtypes and layouts.
    ``eager_only``: trailing parameters of ``impl``, with defaults, that only eager calls pass
    (e.g. the plan of a call, which the registered op computes itself); the registered op leaves
    them out.
    ``empty``: for an ``impl`` that returns None for the outputs a call did not ask for (so the
    eager path allocates nothing it does not return): the registered op returns ``empty(*args)``
    in their place, since custom ops return tensors only, never None; ``returns`` is then the
    registered op's return annotation.
    ``setup_context``, ``backward``: the autograd formula, as ``register_autograd`` takes it; an
    op without one is never differentiated through (eager calls run ``impl`` as is).
    ``inference``: as in `Op`.
    """
    if empty is None:
        registered = _custom_op(name, lambda *args: impl(*args), impl, None, eager_only)
    else:

        def filled(*args):
            return tuple(empty(*args) if out is None else out for out in impl(*args))

        registered = _custom_op(name, filled, impl, returns, eager_only)
    registered.register_fake(fake)
    if backward is not None:
        registered.register_autograd(backward, setup_context=setup_context)
    return Op(registered, impl, setup_context, backward, inference)


def _custom_op(name: str, registered, impl, returns, eager_only: tuple[str, ...]):
    signature, hints = inspect.signature(impl), typing.get_type_hints(impl)  # types resolved in impl's module
    params = [
        p.replace(annotation=hints[name]) for name, p in signature.parameters.items() if name not in eager_only
    ]
    returns = hints["return"] if returns is None else returns
    registered.__signature__ = signature.replace(parameters=params, return_annotation=returns)
    registered.__name__ = registered.__qualname__ = impl.__name__
    registered.__module__ = impl.__module__
    return torch.library.custom_op(name, registered, mutates_args=())


class Op:
    """One fastdiff op as its public function calls it: ``Op(registered, impl, setup_context, backward)(*args)``.

    Traced (``traced(args[0])``) it calls the registered ``torch.library`` op, which is what
    tracers understand.  In plain eager mode it calls ``impl`` directly, through an
    ``autograd.Function`` built from ``setup_context`` and ``backward`` when a gradient is
    needed: a ``custom_op`` call makes several Python round trips through the dispatcher,
    50-100 µs on the host, more than the kernels of a diffusion step take on an H200.
    An op without a backward (``backward=None``) always calls ``impl`` in eager mode.
    ``inference``: what an eager call that records no gradient runs instead of ``impl`` (it may
    leave out, as None, the outputs only a backward reads).
    """

    def __init__(self, registered, impl, setup_context=None, backward=None, inference=None):
        self.registered, self.impl = registered, impl
        self.inference = impl if inference is None else inference
        self.function = None if backward is None else _eager_function(impl, setup_context, backward)

    def __call__(self, *args):
        if traced(args[0]):
            return self.registered(*args)
        return self.eager(*args)

    def eager(self, *args):
        """The call in plain eager mode, for a caller that checked ``traced`` itself; ``args`` may end with
        the implementation's eager-only arguments (those the registered op leaves out)."""
        if self.function is not None and wants_grad(*args):
            return self.function.apply(*args)
        return self.inference(*args)


def _eager_function(forward, setup_context, backward) -> type[torch.autograd.Function]:
    """An ``autograd.Function`` running an op's implementation, context and backward without the dispatcher.

    Its ``forward`` takes ``ctx`` itself: with a separate ``setup_context``,
    ``Function.apply`` re-reads the signature of ``forward`` on every call (~30 µs).
    """

    class EagerOp(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            output = forward(*inputs)
            setup_context(ctx, inputs, output)
            return output

    EagerOp.backward = staticmethod(backward)
    EagerOp.__name__ = EagerOp.__qualname__ = f"Eager_{forward.__module__.rsplit('.', 1)[-1]}"
    return EagerOp
