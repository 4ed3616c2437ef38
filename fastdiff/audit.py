"""Kernel audit: compile every Triton kernel of fastdiff for real GPUs, on any machine.

Each op module declares the launch configurations it can use once, in its launch
tables (``LAUNCH_TABLES``, see ``fastdiff.ops.launch_tables``).  The audit compiles every
case of every table for its archs — sm_80 (A100), sm_90 (H100) and sm_100 (B200) — with
``triton.compile`` and an explicit ``GPUTarget`` (no GPU needed), exactly as the
ahead-of-time build does, reads the cubin's resource use with
``cuobjdump --dump-resource-usage`` (registers, stack/local memory = spills, shared
memory) and, for kernels that should use tensor cores, checks that their matmuls took
the arch's MMA path (`MMA_CHECKS`: HGMMA on sm_90, tcgen05 on sm_100; sm_80's mma.sync
needs no check).  It fails when a kernel does not compile, spills, misses its arch's MMA
where expected, or is not covered by any table.

    python -m fastdiff.audit            # table + exit status
    fastdiff audit
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from fastdiff.ops.launch_tables import ARCHS, KernelCase, compile_case  # noqa: F401  (KernelCase: the case type)


@dataclass
class AuditRow:
    case: str
    kernel: str
    arch: int
    registers: int = -1
    spill_bytes: int = -1  # STACK + LOCAL
    shared_bytes: int = -1
    mma: bool | None = None  # the arch's MMA found (`MMA_CHECKS`); None: not looked for
    error: str = ""
    jit_only: bool = False  # the library does not ship it (KernelCase.jit_only)

    @property
    def ok(self) -> bool:
        return not self.error


# Where a case expects tensor cores (``KernelCase.expect_mma``): what its arch's MMA path shows, and
# where the audit looks for it.  sm_90: Hopper's warp-group MMA in the SASS (nvdisasm, ~0.6 s a
# cubin, so only these cases are disassembled).  sm_100: Blackwell's tcgen05 MMA (UTCHMMA in the
# SASS, not HGMMA) in the PTX, at no cost: ptxas has no other lowering for tcgen05.mma.
MMA_CHECKS = {90: ("HGMMA", "sass"), 100: ("tcgen05.mma", "ptx")}


def _tool(name: str) -> str:
    import triton

    here = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    path = here if os.path.exists(here) else shutil.which(name)
    if not path:
        raise FileNotFoundError(f"{name} not found (it ships with triton's NVIDIA backend)")
    return path


def op_modules(only: tuple[str, ...] = ()) -> list:
    """Every module of fastdiff.ops that has Triton kernels (those declaring LAUNCH_TABLES)."""
    import fastdiff.ops

    mods = []
    for info in pkgutil.iter_modules(fastdiff.ops.__path__):
        if only and info.name not in only:
            continue
        if not os.path.exists(os.path.join(info.module_finder.path, f"{info.name}.py")):
            continue  # the compiled library and its binding
        mod = importlib.import_module(f"fastdiff.ops.{info.name}")
        if getattr(mod, "LAUNCH_TABLES", None):
            mods.append(mod)
    return mods


def uncovered_kernels(mod, cases: list[KernelCase]) -> list[str]:
    """Names of kernels defined in ``mod`` that no case compiles.

    Kernels are the @triton.jit functions whose name ends in ``_kernel``; other jit
    functions are device helpers, compiled as part of the kernels that call them.
    """
    from triton.runtime.jit import JITFunction

    covered = {id(c.fn) for c in cases}
    return [
        name
        for name, obj in vars(mod).items()
        if isinstance(obj, JITFunction)
        and name.endswith("_kernel")
        and obj.fn.__module__ == mod.__name__
        and id(obj) not in covered
    ]


def _parse_resources(text: str) -> tuple[int, int, int]:
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", text)
    if not m:
        raise RuntimeError(f"cannot read cuobjdump output:\n{text}")
    reg, stack, shared, local = map(int, m.groups())
    return reg, stack + local, shared


def table_cases(mod) -> list[KernelCase]:
    """Every distinct case of a module's launch tables."""
    seen, cases = set(), []
    for table in mod.LAUNCH_TABLES:
        for case in table.cases():
            if id(case) not in seen:
                seen.add(id(case))
                cases.append(case)
    return cases


def audit_case(case: KernelCase, arch: int) -> AuditRow:
    row = AuditRow(case.name, case.kernel_name, arch, jit_only=bool(case.jit_only))
    try:
        compiled = compile_case(case, arch)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            usage = subprocess.run(
                [_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
            ).stdout
            row.registers, row.spill_bytes, _ = _parse_resources(usage)
            # Triton allocates dynamic shared memory; the compiled metadata has the real figure.
            row.shared_bytes = int(compiled.metadata.shared)
            if case.expect_mma and arch in MMA_CHECKS:
                mark, where = MMA_CHECKS[arch]
                if where == "sass":
                    text = subprocess.run([_tool("nvdisasm"), f.name], capture_output=True, text=True, check=True)
                    text = text.stdout
                else:
                    text = compiled.asm["ptx"]
                row.mma = mark in text
    except Exception as exc:  # report every failure in the table, keep auditing the rest
        row.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"[:160]
        return row
    if row.spill_bytes:
        row.error = f"spills {row.spill_bytes} bytes to local memory"
    elif row.mma is False:
        row.error = f"no {MMA_CHECKS[arch][0]} on sm_{arch} (its matmuls missed the arch's tensor-core path)"
    return row


_JOBS: list[tuple[KernelCase, int]] = []  # filled before the worker processes fork


def _compile_job(index: int) -> AuditRow:
    case, arch = _JOBS[index]
    return audit_case(case, arch)


def run_audit(
    archs=ARCHS, match: str = "", jobs: int = 1, modules: tuple[str, ...] = ()
) -> tuple[list[AuditRow], list[str]]:
    problems = []
    _JOBS.clear()
    for mod in op_modules(modules):
        cases = [c for c in table_cases(mod) if match in c.name]
        if not match:
            problems += [f"{mod.__name__}.{k} is in no launch table" for k in uncovered_kernels(mod, cases)]
        _JOBS.extend((case, arch) for case in cases for arch in archs if arch in case.archs)
    if jobs > 1 and len(_JOBS) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # fork: the workers inherit the imported kernels and index into _JOBS
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            rows = list(pool.map(_compile_job, range(len(_JOBS))))
    else:
        rows = [_compile_job(i) for i in range(len(_JOBS))]
    problems += [f"{r.case} sm_{r.arch}: {r.error}" for r in rows if not r.ok]
    return rows, problems


def format_table(rows: list[AuditRow]) -> str:
    head = f"{'case':44} {'kernel':28} {'arch':>6} {'regs':>5} {'spill':>6} {'smem':>7} {'mma':>6}  status"
    lines = [head, "-" * len(head)]
    for r in rows:
        hg = "-" if r.mma is None else ("yes" if r.mma else "no")
        status = ("ok" if not r.jit_only else "ok (JIT only)") if r.ok else r.error
        lines.append(
            f"{r.case:44} {r.kernel:28} {'sm_' + str(r.arch):>6} {r.registers:>5} {r.spill_bytes:>6} "
            f"{r.shared_bytes:>7} {hg:>6}  {status}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastdiff audit", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90 (repeatable)")
    parser.add_argument("--match", default="", help="only cases whose name contains this text")
    parser.add_argument("--module", action="append", help="only this fastdiff.ops module, e.g. noising (repeatable)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compilations")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("fastdiff audit compiles for real GPUs: run it without FASTDIFF_BACKEND=interpret / TRITON_INTERPRET=1")
        return 2
    # as kernels/build.py sets it: Triton (3.9) keys its cache on this variable too, and with the same
    # value the audit finds the cubins the library's build compiled (and the reverse)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    rows, problems = run_audit(tuple(args.arch or ARCHS), args.match, args.jobs, tuple(args.module or ()))
    print(format_table(rows))
    if problems:
        print("\nFAILED:\n  " + "\n  ".join(problems))
        return 1
    print(f"\n{len(rows)} compilations, all without spills")
    return 0


if __name__ == "__main__":
    sys.exit(main())
