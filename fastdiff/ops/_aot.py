"""Launching through libfastdiff_kernels: the launch tables compiled ahead of time (``kernels/``).

On CUDA, an eager op call launches through the library when it is installed with the package
(``fastdiff/ops/libfastdiff_kernels.so`` and its binding ``_aot_binding``, built by ``pip install``)
and was built from the kernel sources in this package (``launch_tables.source_hash``).  Nothing is then
compiled at the first call, and a launch costs a C call instead of Triton's JIT binder.  Where the
library declines a call (a configuration it does not ship, a view off a 16-byte boundary, a GPU
none of its cubins runs on: ``launch_tables.library_arch``) that call launches through Triton's JIT
instead.  ``info()`` tells which path each op takes.

``dry_run()`` makes every op take the kernel path on any device, down to and excluding the driver
call: the library checks, picks and plans the launches and records them instead of launching
(host-overhead measurements on a machine without a GPU, and tests).

``eager``: the ops' eager calls in C++ (``fastdiff/ops/_eager``, built with the library against the
installed torch; ``kernels/python/eager.cpp``).  Each public op tries it first: it reads the call's
signature, finds its plan, allocates the outputs with ATen and calls the library (a call autograd
records gets a C++ autograd node, whose backward launches from C++ too), or returns None and the
Python path takes the call.  Plans come from the ops' planners (`set_planner`),
which make the public function's checks on the first checked call of a signature.  Where the module
is not built, or was built against another torch, every call takes the Python path.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys

import torch

from fastdiff.ops import _backend, launch_tables

SUCCESS, UNSUPPORTED = 0, 2


@functools.lru_cache(maxsize=None)
def _load():
    """(binding, "") when the library is usable, else (None, why not)."""
    try:
        from fastdiff.ops import _aot_binding as binding
    except ImportError as exc:
        return None, f"libfastdiff_kernels is not built ({exc}); `pip install -e .` builds it"
    if binding.source_hash() != launch_tables.source_hash():
        return None, "libfastdiff_kernels was built from other kernel sources (stale); `pip install -e .` rebuilds it"
    return binding, ""


def binding():
    return _load()[0]


def active(x: torch.Tensor) -> bool:
    """Whether this call launches through the library: on the current CUDA device (the library uses the
    thread's current context), or in dry run."""
    return target(x) is not None


def target(x: torch.Tensor) -> int | None:
    """The raw CUDA stream a call on ``x`` launches on through the library (0 in dry run off CUDA), or
    None when it launches through the JIT."""
    if x.is_cuda:
        index = x.get_device()
        lib = binding()
        if index != torch._C._cuda_getDevice() or lib is None:
            return None
        if lib.use_device(index):  # a thread without a current context yet (an autograd worker's)
            raise RuntimeError(f"libfastdiff_kernels: {lib.last_error()}")
        return torch._C._cuda_getCurrentRawStream(index)
    return 0 if _backend.dry_run_active() and binding() is not None else None


def launch(op: str, *args) -> bool:
    """Run the library's ``op`` on ``args`` (the op's argument struct, then the stream): True when it
    launched, False when it declined and the caller should launch through the JIT.  Any other failure,
    and a declined call in dry run (there is no JIT to fall back on), raises with the library's message."""
    status = getattr(binding(), op)(*args)
    return status == SUCCESS or declined(op, status)


def declined(op: str, status: int) -> bool:
    """After the library's ``op`` returned ``status`` (not SUCCESS): False, so that the caller launches
    through the JIT, when it declined the call; raises with its message otherwise, and in dry run."""
    if status == UNSUPPORTED and not _backend.dry_run_active():
        return False
    raise RuntimeError(f"libfastdiff_kernels {op}: {binding().last_error()}")


class _PythonPath:
    """Stands in for `_eager` where it is not usable: every entry returns None (the Python path)."""

    def __getattr__(self, op: str):
        return _python_path


def _python_path(*args) -> None:
    return None


NO_EAGER = _PythonPath()
_planners: dict[str, tuple] = {}


class _Unloaded:
    """`eager` until its first use: loads the module (after the library, which it links) then."""

    def __getattr__(self, op: str):
        return getattr(_loaded_eager(), op)


def _loaded_eager():
    """`eager`, loaded now if it was not yet."""
    global eager
    if isinstance(eager, _Unloaded):
        eager = _load_eager()
    return eager


def _load_eager():
    """The configured `_eager` module, or `NO_EAGER` (with the library missing or stale, or the module
    not built, or built against another torch: `eager_status` says which)."""
    global eager_status
    if binding() is None or not _backend.HAS_TRITON:
        eager_status = "not used without the library" if _backend.HAS_TRITON else "not used without triton"
        return NO_EAGER
    try:
        from fastdiff.ops import _eager as module
    except ImportError as exc:
        eager_status = f"not built ({exc}); `pip install -e .` builds it"
        return NO_EAGER
    if module.torch_version() != torch.__version__:
        eager_status = f"built against torch {module.torch_version()}, not {torch.__version__}; `pip install -e .`"
        return NO_EAGER
    eager_status = f"C++ ({module.__file__})"
    cuda = torch._C._cuda_getDevice if hasattr(torch._C, "_cuda_getCurrentRawStream") else None
    if _backend.environment_backend() == "reference":
        cuda = None  # CUDA calls take the reference, in Python
    module.configure(*_backend.context_variables(), cuda, torch._C._cuda_getCurrentRawStream if cuda else None)
    for op, (planner, backward) in _planners.items():
        module.set_planner(op, planner, backward)
    return module


def set_planner(op: str, planner, backward=None) -> None:
    """``planner(*args)`` makes the plan of a signature of ``eager.<op>(*args)`` (see `eager`): it makes
    the public function's checks when the call is a checked one (its last argument True), and returns
    the plan's integers, or None where that signature takes the Python path.  ``backward``: for an op
    with gradients, its Python backward, for the backward passes the library declines."""
    _planners[op] = (planner, backward)
    if not isinstance(eager, (_Unloaded, _PythonPath)):
        eager.set_planner(op, planner, backward)


eager = _Unloaded()
eager_status = "not loaded yet"


# Scratch for library calls, one buffer per (device, stream): (floats, buffer, its address).
_scratch: dict[tuple[int, int], tuple[int, torch.Tensor, int]] = {}
_SCRATCH_STREAMS = 16  # past this many streams the oldest buffer is dropped
_SCRATCH_MIN = 1 << 16  # floats: small calls share one buffer without regrowing it


def scratch(x: torch.Tensor, stream: int, floats: int) -> tuple[int, torch.Tensor | None]:
    """The address of at least ``floats`` fp32 of scratch on ``x``'s device for one library call on
    ``stream``, and the buffer to hold until that call is made (None when it is the stream's own).

    Each (device, stream) keeps one buffer that every library call on it reuses, so a call allocates
    no scratch.  This is safe because a library call enqueues all of its kernels at once (one C call,
    holding the GIL), each of its kernels writes its scratch before any kernel of the call reads it
    (nothing is carried from one call to the next), and the stream runs one call's kernels after the
    previous call's.  Another stream gets its own buffer.  While the stream is captured into a CUDA
    graph a call gets a fresh buffer instead: the graph keeps the addresses it captured, and a
    buffer allocated in the capture belongs to the graph's memory pool.
    """
    if stream and torch._C._cuda_isCurrentStreamCapturing():
        buffer = torch.empty(floats, device=x.device, dtype=torch.float32)
        return buffer.data_ptr(), buffer
    key = (x.get_device(), stream)
    held = _scratch.get(key)
    if held is not None and held[0] >= floats:
        return held[2], None
    size = max(floats, _SCRATCH_MIN, 2 * held[0] if held is not None else 0)
    buffer = torch.empty(size, device=x.device, dtype=torch.float32)  # allocated on `stream` (the current one)
    _scratch.pop(key, None)
    if len(_scratch) >= _SCRATCH_STREAMS:
        del _scratch[next(iter(_scratch))]
    _scratch[key] = (size, buffer, buffer.data_ptr())
    return buffer.data_ptr(), None


@contextlib.contextmanager
def dry_run(arch: int = 90, num_sms: int = 132):
    """``with fastdiff.ops.dry_run():`` — every op takes the kernel path through the library on any
    device and stops before the driver call: launches are planned and recorded (``recorded()``), nothing
    runs, outputs stay uninitialised.  ``arch``/``num_sms``: the GPU to plan for (H100 by default)."""
    lib = binding()
    if lib is None:
        raise RuntimeError(f"dry_run needs libfastdiff_kernels: {_load()[1]}")
    with _backend.dry_run_mode():
        lib.set_dry_run(arch, num_sms)
        try:
            yield
        finally:
            lib.set_dry_run(0, 0)


def recorded() -> list[tuple[str, tuple[int, int, int], list[int]]]:
    """The launches planned since the last call in dry run: (case name, grid, arguments), oldest first."""
    return binding().dry_run_take()


# each op and the fastdiff.ops module that defines it
OP_MODULES = {"q_sample": "noising", "training_target": "noising", "diffusion_loss": "noising",
              "attention": "flash_attention", "group_norm_silu": "group_norm", "sampler_step": "fused_step"}  # fmt: skip


def info() -> dict[str, str]:
    """Which path each op's eager CUDA calls take: 'library (<path>)' or 'triton jit (<why>)', and with
    the library, whether they enter through C++ (`eager`) or Python (why)."""
    lib, why = _load()
    if lib is None:
        path = f"triton jit ({why})"
    else:
        path = f"library ({os.path.join(os.path.dirname(lib.__file__), 'libfastdiff_kernels.so')})"
    if lib is not None:
        _loaded_eager()
        path += f"; eager calls enter through {eager_status}"
    return {op: path + (_jit_only(module) if lib is not None else "") for op, module in OP_MODULES.items()}


def _jit_only(module: str) -> str:
    """The cases of an op module's tables that the library does not ship, and why (``KernelCase.jit_only``)."""
    mod = sys.modules.get(f"fastdiff.ops.{module}")
    cases = [case for table in getattr(mod, "LAUNCH_TABLES", ()) for case in table.cases() if case.jit_only]
    if not cases:
        return ""
    return f"; Triton's JIT launches {len(cases)} case(s) where picked, e.g. {cases[0].name}: {cases[0].jit_only}"
