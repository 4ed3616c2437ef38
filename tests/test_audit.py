"""The kernel audit: every Triton kernel compiles for sm_80/sm_90 without spills, and so do sm_100's own
tiles (they reach tcgen05 MMA).

The audit compiles for real GPUs, so it runs in a subprocess without the
interpreter that the rest of the suite uses.  sm_80/sm_90 find the cubins of the library's build in
Triton's cache; sm_100 is not in the default build, so its compilations here are cold: the suite audits
the cases only sm_100 has (its attention tiles, ~85 s of 2 cores) and ``make audit`` every case for every
arch (docs/ops.md).
"""
import os
import pkgutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _compile_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTDIFF_BACKEND")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(code: str, tmp_path) -> subprocess.CompletedProcess:
    script = tmp_path / "probe.py"  # @triton.jit needs its source in a file
    script.write_text(textwrap.dedent(code))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=_compile_env(), cwd=ROOT)


def _kernel_modules() -> list[str]:
    """Op modules with Triton kernels, found by the same rule the audit uses."""
    names = []
    for info in pkgutil.iter_modules([os.path.join(ROOT, "fastdiff", "ops")]):
        path = os.path.join(ROOT, "fastdiff", "ops", f"{info.name}.py")
        if not os.path.exists(path):
            continue  # the compiled library's binding
        with open(path) as f:
            if "LAUNCH_TABLES =" in f.read():
                names.append(info.name)
    return names


def _audit(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "fastdiff.audit", "--jobs", "1", *args], capture_output=True,
                          text=True, env=_compile_env(), cwd=ROOT)  # fmt: skip
    print(proc.stdout[-20000:])
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    return proc.stdout


@pytest.mark.parametrize("module", _kernel_modules())
def test_every_kernel_compiles_for_sm80_and_sm90_without_spills(module):
    """One test per op module, so that parallel test workers share the compilations."""
    out = _audit("--module", module, "--arch", "80", "--arch", "90")
    assert "sm_80" in out and "sm_90" in out


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_the_sm100_tiles_compile_without_spills_and_reach_tcgen05(dtype):
    """The cases only sm_100's tables have (its 16-bit attention tiles and δ preprocess), one test per
    dtype to share them between the test workers: no spills, and every matmul kernel on tcgen05 MMA."""
    from fastdiff.audit import op_modules, table_cases

    out = _audit("--arch", "100", "--match", f"sm100,{dtype}")
    own = [c.name for m in op_modules() for c in table_cases(m) if c.archs == (100,) and f",{dtype}," in c.name]
    assert len(own) > 40 and all(f"{name} " in out for name in own)


def test_audit_lists_the_noising_kernels():
    from fastdiff.audit import op_modules, table_cases

    (mod,) = op_modules(("noising",))
    kernels = {case.kernel_name for case in table_cases(mod)}
    assert kernels == {"_q_sample_kernel", "_sq_err_partial_kernel", "_sum_kernel", "_sq_err_backward_kernel"}


def test_audit_compiles_exactly_the_launch_tables():
    """What the audit compiles is what the launchers pick and the library ships: every table's cases."""
    from fastdiff.audit import op_modules, table_cases

    for mod in op_modules():
        in_tables = {id(c) for table in mod.LAUNCH_TABLES for c in table.entries.values()}
        assert {id(c) for c in table_cases(mod)} == in_tables, mod.__name__


def test_audit_flags_spills_and_uncovered_kernels(tmp_path):
    """The audit must be able to fail: a kernel that cannot fit in registers, and one with no case."""
    proc = _run(
        """
        import triton, triton.language as tl, types
        from fastdiff.audit import audit_case, uncovered_kernels
        from fastdiff.ops.launch_tables import KernelCase

        @triton.jit
        def hog_kernel(X, BLOCK: tl.constexpr):
            # a BLOCK x BLOCK fp32 tile held by one warp: far beyond 255 registers/thread
            offs = tl.arange(0, BLOCK)
            tile = tl.load(X + offs[:, None] * BLOCK + offs[None, :])
            tile = tl.exp(tile) * tl.sum(tile, axis=0)[None, :]
            acc = tl.sum(tile, axis=1)
            tl.store(X + offs, acc)

        case = KernelCase("hog", hog_kernel, {"X": "*fp32", "BLOCK": "constexpr"}, {"BLOCK": 128}, num_warps=1)
        row = audit_case(case, 90)
        print("SPILL", row.spill_bytes, row.ok, row.error)
        mod = types.ModuleType("fake_ops")
        hog_kernel.fn.__module__ = "fake_ops"
        mod.hog_kernel = hog_kernel
        print("UNCOVERED", uncovered_kernels(mod, []))
        """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    spill_line = next(line for line in proc.stdout.splitlines() if line.startswith("SPILL"))
    _, spill, ok, *_ = spill_line.split()
    assert int(spill) > 0 and ok == "False", spill_line
    assert "UNCOVERED ['hog_kernel']" in proc.stdout


def test_audit_wants_each_archs_tensor_core_mma(tmp_path):
    """A case that expects tensor cores passes with HGMMA on sm_90 and tcgen05 MMA on sm_100 (Blackwell
    has no HGMMA), and fails there without a matmul; sm_80 (mma.sync) is not checked."""
    proc = _run(
        """
        import triton, triton.language as tl
        from fastdiff.audit import audit_case
        from fastdiff.ops.launch_tables import KernelCase

        @triton.jit
        def mma_kernel(A, B, C, DOT: tl.constexpr):
            rows, cols = tl.arange(0, 128), tl.arange(0, 64)
            a = tl.load(A + rows[:, None] * 64 + cols[None, :])
            b = tl.load(B + cols[:, None] * 64 + cols[None, :])
            if DOT:
                c = tl.dot(a, b)
            else:
                c = a.to(tl.float32) * 2.0
            tl.store(C + rows[:, None] * 64 + cols[None, :], c)

        sig = {"A": "*fp16", "B": "*fp16", "C": "*fp32", "DOT": "constexpr"}
        for dot in (True, False):
            case = KernelCase(f"dot={dot}", mma_kernel, sig, {"DOT": dot}, num_warps=4, expect_mma=True)
            for arch in (80, 90, 100):
                row = audit_case(case, arch)
                print("ROW", dot, arch, row.mma, row.ok, row.error)
        """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split(" ", 5)[1:] for line in proc.stdout.splitlines() if line.startswith("ROW")]
    assert rows == [["True", "80", "None", "True", ""], ["True", "90", "True", "True", ""],
                    ["True", "100", "True", "True", ""],
                    ["False", "80", "None", "True", ""],
                    ["False", "90", "False", "False", "no HGMMA on sm_90 (its matmuls missed the arch's tensor-core path)"],
                    ["False", "100", "False", "False",
                     "no tcgen05.mma on sm_100 (its matmuls missed the arch's tensor-core path)"]], proc.stdout  # fmt: skip


def test_audit_refuses_to_run_under_the_interpreter():
    env = _compile_env()
    env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-m", "fastdiff.audit"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 2 and "without" in proc.stdout


@pytest.mark.parametrize(
    "text,expected",
    [("Function k:\n  REG:52 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:576", (52, 0, 0)),
     ("Function k:\n  REG:255 STACK:64 SHARED:1024 LOCAL:32 CONSTANT[0]:576", (255, 96, 1024))],
)  # fmt: skip
def test_parse_cuobjdump_resource_usage(text, expected):
    from fastdiff.audit import _parse_resources

    assert _parse_resources(text) == expected
