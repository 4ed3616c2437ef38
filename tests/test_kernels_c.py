"""libfastdiff_kernels without a GPU: it builds, its C ABI is what the header says, it reports a
missing driver, and in dry-run mode it picks the same cases, grids and arguments as the Python
launchers over a grid of shapes.

The library is built once per session (CMake, sm_90, the cases these tests use) into a folder
shared by the test workers; Triton's cache makes a rebuild cheap.
"""
import ctypes
import importlib
import fcntl
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = os.path.join(ROOT, "kernels", "include", "fastdiff_kernels.h")
# the cases the dry-run comparisons need (sm_90; fp32 and bf16)
MATCH = ["q_sample[fp32", "q_sample[bf16", "attention_fwd[any,fp32", "attention_fwd[sm90,bf16",
         "attention_bwd_pre[fp32", "attention_bwd_pre[bf16", "[sm90,bf16", "[any,fp32"]  # fmt: skip

pytestmark = pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("cc") is None, reason="needs cmake, cc")


@pytest.fixture(scope="session")
def build_dir():
    pytest.importorskip("triton")
    out = os.path.join(tempfile.gettempdir(), f"fastdiff-kernels-test-{os.getuid()}")
    os.makedirs(out, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTDIFF_BACKEND")}
    with open(os.path.join(out, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one test worker builds, the others wait and reuse
        configure = ["cmake", "-S", ROOT, "-B", out, f"-DFASTDIFF_PYTHON={sys.executable}", "-DFASTDIFF_ARCHS=90",
                     f"-DFASTDIFF_KERNEL_MATCH={'|'.join(MATCH)}"]  # fmt: skip
        for cmd in (configure, ["cmake", "--build", out]):
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out


@pytest.fixture(scope="session")
def lib(build_dir):
    return ctypes.CDLL(os.path.join(build_dir, "libfastdiff_kernels.so"))


def test_header_compiles_as_c11(tmp_path):
    src = tmp_path / "use.c"
    src.write_text('#include "fastdiff_kernels.h"\nint main(void) { return fdk_init() == FDK_SUCCESS ? 0 : 1; }\n')
    proc = subprocess.run(
        ["cc", "-std=c11", "-pedantic", "-Wall", "-Wextra", "-Werror", "-fsyntax-only", "-I", os.path.dirname(HEADER),
         str(src)], capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr


def test_exported_symbols_match_the_header(build_dir):
    declared = set(re.findall(r"FDK_API\s+[\w\s\*]+?\b(fdk_\w+)\s*\(", open(HEADER).read()))
    nm = subprocess.run(["nm", "-D", "--defined-only", os.path.join(build_dir, "libfastdiff_kernels.so")],
                        capture_output=True, text=True, check=True).stdout  # fmt: skip
    exported = {line.split()[-1] for line in nm.splitlines() if " T " in line}
    assert declared and exported == declared


def test_example_builds_and_reports_the_missing_driver(build_dir):
    if torch.cuda.is_available():
        pytest.skip("a CUDA driver is present (scripts/gpu_check.sh runs the example)")
    proc = subprocess.run([os.path.join(build_dir, "fastdiff_example")], capture_output=True, text=True)
    assert proc.returncode == 2 and "FDK_ERROR_NO_DRIVER: no CUDA driver" in proc.stdout, proc.stdout + proc.stderr


def test_library_loads_and_refuses_without_driver_or_bad_input(lib):
    lib.fdk_last_error.restype = ctypes.c_char_p
    lib.fdk_status_name.restype = ctypes.c_char_p
    if not torch.cuda.is_available():
        assert lib.fdk_init() == 3 and b"no CUDA driver" in lib.fdk_last_error()
    lib.fdk_set_dry_run(90, 132)
    try:
        args = QSampleArgs(dtype=0, batch=2, channels=3, spatial=5, num_timesteps=10)  # null pointers
        assert lib.fdk_q_sample(ctypes.byref(args), None) == 1
        assert lib.fdk_last_error() == b"x0 must not be NULL"
        args = QSampleArgs(dtype=0, batch=-1, channels=3, spatial=5, num_timesteps=10)
        assert lib.fdk_q_sample(ctypes.byref(args), None) == 1 and b"batch" in lib.fdk_last_error()
        args = AttnFwdArgs(dtype=2, q=16, k=16, v=16, o=16, lse=16, batch=1, heads=1, len_q=4, len_k=4, head_dim=64,
                           scale=0.125, stride_q=(256, 256, 64, 2))  # fmt: skip
        assert lib.fdk_attention_fwd(ctypes.byref(args), None) == 1 and b"head-dim stride" in lib.fdk_last_error()
        assert lib.fdk_dry_run_take(None, 0) == 0  # nothing launched on bad input
    finally:
        lib.fdk_set_dry_run(0, 0)


# ----------------------------------------------------------------------------- dry run vs the Python launchers


class QSampleArgs(ctypes.Structure):
    _fields_ = [("dtype", ctypes.c_int), ("x0", ctypes.c_void_p), ("t", ctypes.c_void_p),
                ("alphas_cumprod", ctypes.c_void_p), ("num_timesteps", ctypes.c_int64), ("noise", ctypes.c_void_p),
                ("keys", ctypes.c_void_p), ("x_t", ctypes.c_void_p), ("v", ctypes.c_void_p),
                ("batch", ctypes.c_int64), ("channels", ctypes.c_int64), ("spatial", ctypes.c_int64),
                ("channels_last", ctypes.c_int)]  # fmt: skip


_S4 = ctypes.c_int64 * 4


class AttnFwdArgs(ctypes.Structure):
    _fields_ = [("dtype", ctypes.c_int), ("q", ctypes.c_void_p), ("k", ctypes.c_void_p), ("v", ctypes.c_void_p),
                ("o", ctypes.c_void_p), ("lse", ctypes.c_void_p), ("batch", ctypes.c_int64),
                ("heads", ctypes.c_int64), ("len_q", ctypes.c_int64), ("len_k", ctypes.c_int64),
                ("head_dim", ctypes.c_int64), ("stride_q", _S4), ("stride_k", _S4), ("stride_v", _S4),
                ("stride_o", _S4), ("scale", ctypes.c_double)]  # fmt: skip


class AttnBwdArgs(ctypes.Structure):
    _fields_ = [("dtype", ctypes.c_int)] + [(n, ctypes.c_void_p) for n in
                ("d_o", "q", "k", "v", "o", "lse", "dq", "dk", "dv", "delta")] + [
                (n, ctypes.c_int64) for n in ("batch", "heads", "len_q", "len_k", "head_dim")] + [
                (f"stride_{n}", _S4) for n in ("do", "q", "k", "v", "o", "dq", "dk", "dv")] + [
                ("scale", ctypes.c_double)]  # fmt: skip


class LaunchRecord(ctypes.Structure):
    _fields_ = [("case_name", ctypes.c_char_p), ("grid", ctypes.c_uint * 3), ("num_args", ctypes.c_int),
                ("args", ctypes.c_int64 * 48)]  # fmt: skip


def _as_int(a) -> int:
    """A launch argument as the library records it: pointers and ints as they are, fp32 as its bits."""
    if isinstance(a, torch.Tensor):
        return a.data_ptr()
    if isinstance(a, float):
        return struct.unpack("<i", struct.pack("<f", a))[0]
    return int(a)


def _python_launches(fn, *args):
    from fastdiff.ops._launch import record_launches

    with record_launches() as log:
        fn(*args)
    return [(case.name, grid + (1,) * (3 - len(grid)), [_as_int(a) for a in launch_args])
            for case, grid, launch_args in log]  # fmt: skip


def _library_launches(lib, call):
    lib.fdk_set_dry_run(90, 132)
    lib.fdk_last_error.restype = ctypes.c_char_p
    try:
        status = call()
        assert status == 0, lib.fdk_last_error()
        records = (LaunchRecord * 64)()
        n = lib.fdk_dry_run_take(records, 64)
    finally:
        lib.fdk_set_dry_run(0, 0)
    return [(r.case_name.decode(), tuple(r.grid), list(r.args[: r.num_args])) for r in records[:n]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 4, 8, 8), (3, 3, 5, 7), (2, 16, 1, 1), (5, 1, 33, 2)])
@pytest.mark.parametrize("draw,want_v,channels_last", [(0, 0, 0), (1, 1, 0), (1, 0, 1), (0, 1, 1)])
def test_dry_run_q_sample_matches_the_python_launcher(lib, dtype, shape, draw, want_v, channels_last):
    from fastdiff.ops import noising
    from fastdiff.ops._layout import sample_layout

    x0 = torch.randn(shape, dtype=dtype)
    if channels_last:
        x0 = x0.to(memory_format=torch.channels_last)
    t = torch.randint(0, 50, shape[:1])
    acp = torch.linspace(0.99, 0.01, 50)
    noise = None if draw else torch.randn_like(x0)
    keys = torch.randint(0, 2**62, shape[:1]) if draw else None
    want = _python_launches(noising._noising_triton, x0, t, acp, noise, keys, bool(want_v))
    (name, _, p), = want  # fmt: skip
    args = QSampleArgs(
        dtype={torch.float32: 0, torch.bfloat16: 2}[dtype], x0=p[0], t=p[1], alphas_cumprod=p[2], num_timesteps=50,
        noise=p[3], keys=p[4] if draw else None, x_t=p[5], v=p[6] if want_v else None, batch=shape[0],
        channels=shape[1], spatial=shape[2] * shape[3], channels_last=int(sample_layout(x0) == "channels_last"),
    )  # fmt: skip
    assert _library_launches(lib, lambda: lib.fdk_q_sample(ctypes.byref(args), None)) == want


def _strides(x):
    return _S4(*x.stride())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [40, 64, 160])
@pytest.mark.parametrize("B,H,Lq,Lk", [(1, 1, 1, 1), (2, 3, 67, 45), (1, 2, 300, 77)])
def test_dry_run_attention_matches_the_python_launcher(lib, dtype, head_dim, B, H, Lq, Lk):
    attn = importlib.import_module("fastdiff.ops.attention")  # the module (ops.attention is the function)

    q = torch.empty(B, H, Lq, head_dim, dtype=dtype)
    k, v = (torch.empty(B, Lk, H, head_dim, dtype=dtype).transpose(1, 2) for _ in range(2))  # strided views
    code = {torch.float32: 0, torch.bfloat16: 2}[dtype]
    scale = head_dim**-0.5
    want = _python_launches(attn._forward_triton, q, k, v, scale)
    (_, _, p), = want  # fmt: skip
    o_strides = _S4(*p[14:17], 1)  # the output's strides, as the launcher made it
    args = AttnFwdArgs(dtype=code, q=p[0], k=p[1], v=p[2], o=p[3], lse=p[4], batch=B, heads=H, len_q=Lq, len_k=Lk,
                       head_dim=head_dim, stride_q=_strides(q), stride_k=_strides(k), stride_v=_strides(v),
                       stride_o=o_strides, scale=scale)  # fmt: skip
    assert _library_launches(lib, lambda: lib.fdk_attention_fwd(ctypes.byref(args), None)) == want

    do, out = torch.empty_like(q), attn._empty_out(q)
    lse = torch.empty(B, H, Lq)
    want = _python_launches(attn._backward_triton, do, q, k, v, out, lse, scale)
    pre, *rest = want
    dq_launch = rest[-1][2]
    kv_launch = rest[0][2]
    bw = AttnBwdArgs(dtype=code, d_o=do.data_ptr(), q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(),
                     o=out.data_ptr(), lse=lse.data_ptr(), dq=dq_launch[6], dk=kv_launch[6], dv=kv_launch[7],
                     delta=pre[2][2], batch=B, heads=H, len_q=Lq, len_k=Lk, head_dim=head_dim, scale=scale,
                     stride_do=_strides(do), stride_q=_strides(q), stride_k=_strides(k), stride_v=_strides(v),
                     stride_o=_strides(out), stride_dq=_S4(*dq_launch[19:22], 1), stride_dk=_S4(*kv_launch[20:23], 1),
                     stride_dv=_S4(*kv_launch[23:26], 1))  # fmt: skip
    assert _library_launches(lib, lambda: lib.fdk_attention_bwd(ctypes.byref(bw), None)) == want
