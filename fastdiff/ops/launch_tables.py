"""Launch tables: every kernel configuration of an op, declared once.

Each op module declares its configurations as `KernelCase`s (specialisation, block sizes,
warps, stages, target archs) gathered in `LaunchTable`s, one per kernel, keyed by what the
launcher decides from its arguments (dtype, flags, head dim, ...).  Three readers:

* the launcher picks its case (`LaunchTable.pick`) and launches it (`KernelCase.launch`);
* the audit (``fastdiff.audit``) compiles every case for its archs and reads its resources;
* the ahead-of-time build (``kernels/build.py``) compiles every case into libfastdiff_kernels,
  whose C dispatcher looks its case up in the same tables by the same keys.

Adding a configuration, or a tuned default for one arch, is a data edit: a row of a table.

Specialisation contract, the same for Triton's JIT and the compiled library (so that both
run the same machine code):

* every pointer argument is 16-byte aligned — torch allocates so; a view that is not makes
  the library decline (the JIT then compiles for it);
* integer arguments named in ``KernelCase.divisible`` are multiples of 16, and the launcher
  only picks such a case when they are (``divisible_key``); every other integer argument is
  unspecialised — the kernels list them in ``do_not_specialize``, so the JIT neither marks
  them divisible by 16 nor folds the value 1 into the code;
* FP fusion (a·b + c contracted to one FMA) is on, set explicitly: Triton's default flips in 3.10.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

# Compute capabilities with launch tables: the ones the audit compiles for and the library can ship
# (CMake builds 80 and 90 by default, 100 on request: docs/c-abi.md).  Triton targets sm_90 and sm_100
# as sm_90a and sm_100a: cubins that run on compute capability 9.0 and 10.0 only (`library_arch`).
ARCHS = (80, 90, 100)
FP_FUSION = True
# Integer codes of the key fields the C dispatcher shares with the launchers.
DTYPE_CODES = {"fp32": 0, "fp16": 1, "bf16": 2}
# The value of a divisibility flag in a key: whether every `divisible` argument is a multiple of 16.
DIVISOR = 16


@dataclass(frozen=True)
class KernelCase:
    """One compilable launch configuration of a Triton kernel."""

    name: str  # label shown by the audit and the library, e.g. "q_sample[bf16,draw]"
    fn: object  # the @triton.jit function
    signature: dict  # argument name -> Triton type ("*fp16", "i32", "fp32", "constexpr")
    constexprs: dict = field(default_factory=dict)  # constexpr name -> value
    num_warps: int = 4
    num_stages: int = 3
    expect_mma: bool = False  # the matmuls must reach the arch's MMA: HGMMA in sm_90 SASS, tcgen05.mma for sm_100
    archs: tuple[int, ...] = ARCHS  # the architectures whose launcher can pick this case
    divisible: tuple[str, ...] = ()  # integer arguments assumed to be multiples of 16
    jit_only: str = ""  # why the library does not ship this case (launched by Triton's JIT); "" when it does

    @property
    def kernel_name(self) -> str:
        return self.fn.fn.__name__

    def runtime_args(self) -> list[str]:
        """Names of the arguments a launch passes, in order (the signature without constexprs)."""
        return [n for n, ty in self.signature.items() if ty != "constexpr"]

    def specialised(self) -> list[str]:
        """Arguments compiled as 16-byte aligned / multiples of 16: every pointer and ``divisible``."""
        return [n for n, ty in self.signature.items() if ty.startswith("*") or n in self.divisible]

    def launch(self, grid: tuple[int, ...], *args) -> None:
        """Launch through Triton's JIT (the fallback of the compiled library)."""
        if _recorder is not None:
            _recorder(self, grid, args)
            return
        self.fn[grid](
            *args, **self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages, enable_fp_fusion=FP_FUSION
        )


class LaunchTable:
    """The cases of one kernel, keyed by a tuple of small integers named by ``key_fields``.

    ``entries`` maps key -> case; several keys may share a case (e.g. head dims with one
    config).  Keys are integers only (dtypes as ``DTYPE_CODES``, flags as 0/1) because the C
    dispatcher searches the same rows.
    """

    def __init__(self, name: str, key_fields: tuple[str, ...], entries: dict[tuple[int, ...], KernelCase]):
        for key in entries:
            if len(key) != len(key_fields) or not all(isinstance(k, int) for k in key):
                raise ValueError(f"launch table {name}: key {key} must be {len(key_fields)} ints {key_fields}")
        self.name, self.key_fields, self.entries = name, key_fields, dict(entries)

    def pick(self, key: tuple[int, ...]) -> KernelCase | None:
        """The case for ``key``, or None when the table has none (the caller compiles on demand)."""
        return self.entries.get(key)

    def cases(self) -> list[KernelCase]:
        """Every distinct case, in table order."""
        seen, out = set(), []
        for case in self.entries.values():
            if id(case) not in seen:
                seen.add(id(case))
                out.append(case)
        return out


def table_arch(major: int, minor: int) -> int:
    """The architecture whose tables (tiles, warps, stages) a device of compute capability major.minor
    uses: 90 for Hopper (9.x), 100 for datacenter Blackwell (10.x: B200, B300), else 80 — the sm_80
    tables fit the ~100 KB of shared memory of sm_86/sm_89 and of consumer Blackwell (12.x), and
    their matmuls need no more than mma.sync, which every GPU since runs."""
    return {9: 90, 10: 100}.get(major, 80)


def library_arch(major: int, minor: int, archs: tuple[int, ...] = ARCHS) -> int:
    """The arch of ``archs`` whose cubins run on a device of compute capability major.minor, 0 when none
    does (the library declines its calls: Triton's JIT compiles for it).  An sm_80 cubin runs on every
    8.x; Triton's sm_90 and sm_100 cubins are sm_90a and sm_100a, which run on 9.0 and 10.0 alone (not
    on 10.3, nor on 12.x).  Where it is not 0 it is `table_arch`: the library serves a device with the
    tables Python uses.  kernels/src/fdk_runtime.c (table_arch) decides the same."""
    arch = 80 if major == 8 else 10 * major if minor == 0 and major in (9, 10) else 0
    return arch if arch in archs else 0


@functools.lru_cache(maxsize=None)
def device_arch(device_index: int | None) -> int:
    """The architecture whose tables a CUDA device uses (`table_arch`).
    No device (the interpreter, a dry run on CPU): 90."""
    from fastdiff.ops._backend import INTERPRET

    if device_index is None or INTERPRET:
        return 90
    import torch

    return table_arch(*torch.cuda.get_device_capability(device_index))


@functools.lru_cache(maxsize=None)
def device_sms(device_index: int | None) -> int:
    """The multiprocessors a device's grids are planned for: its own, else an H100's 132 (no device:
    the interpreter; the library's dry run plans for 132 too unless told otherwise)."""
    from fastdiff.ops._backend import INTERPRET

    if device_index is None or INTERPRET:
        return 132
    import torch

    return torch.cuda.get_device_properties(device_index).multi_processor_count


def divisible_key(*values: int) -> int:
    """1 when every value is a multiple of 16 (the `divisible` cases apply), else 0."""
    return int(all(v % DIVISOR == 0 for v in values))


def dtype_name(dtype) -> str:
    """'fp32' | 'fp16' | 'bf16' for a torch dtype."""
    return {"torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16"}[str(dtype)]


_codes: dict = {}  # torch dtype -> DTYPE_CODES value, filled as dtypes are seen


def dtype_code(dtype) -> int:
    code = _codes.get(dtype)
    if code is None:
        code = _codes[dtype] = DTYPE_CODES[dtype_name(dtype)]
    return code


def aligned(n: int, itemsize: int = 4) -> int:
    """``n`` elements rounded up to a whole number of 16-byte units: where the next row may start aligned."""
    per_16 = 16 // itemsize
    return -(-n // per_16) * per_16


def aligned_rows(n: int, shape: tuple[int, ...], device, dtype) -> "torch.Tensor":
    """(n, *shape) scratch in one allocation whose every row starts 16-byte aligned (rows padded),
    so that ``rows[i]`` can be passed where a kernel assumes an aligned pointer."""
    import torch

    numel = 1
    for d in shape:
        numel *= d
    return torch.empty(n, aligned(numel, dtype.itemsize), device=device, dtype=dtype)[:, :numel].view(n, *shape)


class Plans(dict):
    """Launch plans by call signature: what a call's launches depend on besides its data pointers
    (geometry, case keys, the library's scalar arguments), computed once per signature.

    A signature is a tuple of what the plan is computed from (shapes, strides, dtypes, devices,
    flags), read from the call's arguments.  Bounded: past ``limit`` signatures the oldest is
    forgotten (a process that sees ever new shapes recomputes plans, it does not grow).
    """

    def __init__(self, limit: int = 256):
        super().__init__()
        self.limit = limit

    def remember(self, key, plan):
        if len(self) >= self.limit:
            self.pop(next(iter(self), None), None)  # another thread may have dropped it first
        self[key] = plan
        return plan


# ----------------------------------------------------------------------------- compiling


def compile_case(case: KernelCase, arch: int):
    """``triton.compile`` of ``case`` for sm_``arch``, without a GPU: the audit's and the build's one way.

    The same source, attributes and options give the same Triton cache key, so the audit reuses
    what the build compiled (and the reverse).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    names = list(case.signature)
    aligned = backend.parse_attr("D") if hasattr(backend, "parse_attr") else [["tt.divisibility", 16]]
    attrs = {(names.index(n),): aligned for n in case.specialised()}
    src = ASTSource(fn=case.fn, signature=case.signature, constexprs=case.constexprs, attrs=attrs)
    options = {"num_warps": case.num_warps, "num_stages": case.num_stages, "enable_fp_fusion": FP_FUSION}
    return triton.compile(src, target=target, options=options)


# Files whose text decides what the library compiles: the op modules (kernels and tables), the
# Philox device functions they call, this contract, and the tuning sweep's measured defaults.
SOURCE_FILES = ("flash_attention.py", "group_norm.py", "noising.py", "fused_step.py", "philox.py", "launch_tables.py",
                "_tuned.py")


def source_hash() -> str:
    """SHA-256 of ``SOURCE_FILES``: the library carries the hash it was built from, and fastdiff launches
    through it only while its own files hash the same (an edited kernel makes it stale, never wrong)."""
    import hashlib
    import os

    h = hashlib.sha256()
    here = os.path.dirname(os.path.abspath(__file__))
    for name in SOURCE_FILES:
        with open(os.path.join(here, name), "rb") as f:
            h.update(name.encode() + b"\0" + f.read())
    return h.hexdigest()


# ----------------------------------------------------------------------------- recording (tests)

_recorder = None


class record_launches:
    """``with record_launches() as log:`` — launches append ``(case, grid, args)`` to ``log`` instead of running.

    The tests compare these with the launches the C dispatcher plans in dry-run mode.
    """

    def __enter__(self) -> list:
        global _recorder
        self.log, self.previous = [], _recorder
        _recorder = lambda case, grid, args: self.log.append((case, tuple(grid), tuple(args)))  # noqa: E731
        return self.log

    def __exit__(self, *exc) -> None:
        global _recorder
        _recorder = self.previous
