"""Launching through libfastdiff_kernels: the launch tables compiled ahead of time (``kernels/``).

On CUDA, an eager op call launches through the library when it is installed with the package
(``fastdiff/ops/libfastdiff_kernels.so`` and its binding ``_aot_binding``, built by ``pip install``)
and was built from the kernel sources in this package (``_launch.source_hash``).  Nothing is then
compiled at the first call, and a launch costs a C call instead of Triton's JIT binder.  Where the
library declines a call (a configuration it does not ship, a view off a 16-byte boundary, a GPU
other than sm_80/sm_90) that call launches through Triton's JIT instead.  ``info()`` tells which
path each op takes.

``dry_run()`` makes every op take the kernel path on any device, down to and excluding the driver
call: the library checks, picks and plans the launches and records them instead of launching
(host-overhead measurements on a machine without a GPU, and tests).
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys

import torch

from fastdiff.ops import _backend, _launch

SUCCESS, UNSUPPORTED = 0, 2


@functools.lru_cache(maxsize=None)
def _load():
    """(binding, "") when the library is usable, else (None, why not)."""
    try:
        from fastdiff.ops import _aot_binding as binding
    except ImportError as exc:
        return None, f"libfastdiff_kernels is not built ({exc}); `pip install -e .` builds it"
    if binding.source_hash() != _launch.source_hash():
        return None, "libfastdiff_kernels was built from other kernel sources (stale); `pip install -e .` rebuilds it"
    return binding, ""


def binding():
    return _load()[0]


def active(x: torch.Tensor) -> bool:
    """Whether this call launches through the library: on the current CUDA device (the library uses the
    thread's current context), or in dry run."""
    if x.is_cuda:
        return x.device.index == torch._C._cuda_getDevice() and binding() is not None
    return _backend.dry_run_active() and binding() is not None


def stream(x: torch.Tensor) -> int:
    """The raw CUDA stream the call runs on (0 off CUDA: the dry run has none)."""
    return torch._C._cuda_getCurrentRawStream(x.device.index) if x.is_cuda else 0


def launch(op: str, *args) -> bool:
    """Run the library's ``op`` on ``args`` (the op's argument struct, then the stream): True when it
    launched, False when it declined and the caller should launch through the JIT.  Any other failure,
    and a declined call in dry run (there is no JIT to fall back on), raises with the library's message."""
    lib = binding()
    status = getattr(lib, op)(*args)
    if status == SUCCESS:
        return True
    if status == UNSUPPORTED and not _backend.dry_run_active():
        return False
    raise RuntimeError(f"libfastdiff_kernels {op}: {lib.last_error()}")


def ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


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


def info() -> dict[str, str]:
    """Which path each op's eager CUDA calls take: 'library (<path>)' or 'triton jit (<why>)'."""
    lib, why = _load()
    if lib is None:
        path = f"triton jit ({why})"
    else:
        path = f"library ({os.path.join(os.path.dirname(lib.__file__), 'libfastdiff_kernels.so')})"
    ops = ("q_sample", "training_target", "diffusion_loss", "attention", "group_norm_silu", "sampler_step")
    return {op: path + (_jit_only(op) if lib is not None else "") for op in ops}


def _jit_only(module: str) -> str:
    """The cases of an op module's tables that the library does not ship, and why (``KernelCase.jit_only``)."""
    mod = sys.modules.get(f"fastdiff.ops.{module}")
    cases = [case for table in getattr(mod, "LAUNCH_TABLES", ()) for case in table.cases() if case.jit_only]
    if not cases:
        return ""
    return f"; Triton's JIT launches {len(cases)} case(s) where picked, e.g. {cases[0].name}: {cases[0].jit_only}"
