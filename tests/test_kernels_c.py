"""libfastdiff_kernels without a GPU: it builds, its C ABI is what the header says, it reports a
missing driver, and in dry-run mode it picks the same cases, grids and arguments as the Python
launchers over a grid of shapes.

The library is built once per session (CMake, sm_90, the cases these tests use) into a folder
shared by the test workers; Triton's cache makes a rebuild cheap.
"""
import ctypes
import fcntl
import hashlib
import importlib
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
         "attention_bwd_pre[fp32", "attention_bwd_pre[bf16", "[sm90,bf16", "[any,fp32", "[any,bf16",
         "sq_err_partial[fp32", "sq_err_backward[fp32", "sum", "gn_stats[fp32", "gn_apply[fp32", "gn_bwd_reduce[fp32",
         "gn_dx[fp32", "fp32 params", "sampler_step[fp32,", "sampler_step_stats[fp32"]  # fmt: skip

pytestmark = pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("cc") is None, reason="needs cmake, cc")


@pytest.fixture(scope="session")
def build_dir():
    pytest.importorskip("triton")
    # one folder per source tree: CMake refuses a build folder configured from another checkout
    tree = hashlib.sha1(ROOT.encode()).hexdigest()[:12]
    out = os.path.join(tempfile.gettempdir(), f"fastdiff-kernels-test-{os.getuid()}-{tree}")
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
    # The package's binding first: loaded after this build, it would link to it (the same soname) and
    # find only the cases built here.
    from fastdiff.ops import _aot

    _aot.binding()
    lib = ctypes.CDLL(os.path.join(build_dir, "libfastdiff_kernels.so"))
    lib.fdk_sampler_step_chunks.restype = lib.fdk_diffusion_loss_partials.restype = ctypes.c_int64
    return lib


def test_header_compiles_as_c11(tmp_path):
    src = tmp_path / "use.c"
    src.write_text('#include "fastdiff_kernels.h"\nint main(void) { return fdk_init() == FDK_SUCCESS ? 0 : 1; }\n')
    proc = subprocess.run(
        ["cc", "-std=c11", "-pedantic", "-Wall", "-Wextra", "-Werror", "-fsyntax-only", "-I", os.path.dirname(HEADER),
         str(src)], capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    if shutil.which("c++"):  # and as C++
        proc = subprocess.run(["c++", "-std=c++11", "-Wall", "-Werror", "-fsyntax-only", "-x", "c++", "-I",
                               os.path.dirname(HEADER), str(src)], capture_output=True, text=True)  # fmt: skip
        assert proc.returncode == 0, proc.stderr


def test_exported_symbols_match_the_header(build_dir):
    declared = set(re.findall(r"FDK_API\s+[\w\s\*]+?\b(fdk_\w+)\s*\(", open(HEADER).read()))
    nm = subprocess.run(["nm", "-D", "--defined-only", os.path.join(build_dir, "libfastdiff_kernels.so")],
                        capture_output=True, text=True, check=True).stdout  # fmt: skip
    exported = {line.split()[-1] for line in nm.splitlines() if " T " in line}
    assert declared and exported == declared


def test_example_builds_and_runs_or_reports_the_missing_driver(build_dir):
    """On a GPU the example's q_sample and attention match its CPU computation; without one it says why."""
    proc = subprocess.run([os.path.join(build_dir, "fastdiff_example")], capture_output=True, text=True)
    if torch.cuda.is_available():
        assert proc.returncode == 0 and "ok: both match" in proc.stdout, proc.stdout + proc.stderr
    else:
        assert proc.returncode == 2 and "FDK_ERROR_NO_DRIVER: no CUDA driver" in proc.stdout, proc.stdout + proc.stderr


# A stand-in for libcuda.so.1: three devices (compute capability 9.0 with 132 SMs, 8.0 with 108, 7.5
# with 80; others where compiled with -DFAKE_DEVICES), the current one chosen by fake_use_device (or no
# current context after fake_drop_context); it counts attribute queries, launches and primary-context
# retains, and runs nothing.
FAKE_DRIVER = r"""
#include <stdint.h>
#include <cuda.h>
#ifndef FAKE_DEVICES
#define FAKE_DEVICES {9, 0, 132}, {8, 0, 108}, {7, 5, 80}
#endif
static const int devices[][3] = {FAKE_DEVICES}; /* major, minor, SMs */
static int current, no_context;
int fake_attribute_queries, fake_launches, fake_retains;
void fake_use_device(int dev) { current = dev, no_context = 0; }
void fake_drop_context(void) { no_context = 1; }
CUresult cuInit(unsigned flags) { return CUDA_SUCCESS; }
CUresult cuGetErrorName(CUresult r, const char **name) { *name = "CUDA_ERROR_FAKE"; return CUDA_SUCCESS; }
CUresult cuCtxGetCurrent(CUcontext *ctx) {
  *ctx = no_context ? NULL : (CUcontext)(uintptr_t)(256 * (current + 1));
  return CUDA_SUCCESS;
}
CUresult cuDeviceGet(CUdevice *dev, int ordinal) { *dev = ordinal; return CUDA_SUCCESS; }
CUresult cuDevicePrimaryCtxRetain(CUcontext *ctx, CUdevice dev) {
  fake_retains++;
  *ctx = (CUcontext)(uintptr_t)(256 * (dev + 1));
  return CUDA_SUCCESS;
}
CUresult cuCtxSetCurrent(CUcontext ctx) { current = (int)((uintptr_t)ctx / 256) - 1, no_context = 0; return CUDA_SUCCESS; }
CUresult cuCtxGetDevice(CUdevice *dev) { *dev = current; return CUDA_SUCCESS; }
CUresult cuDeviceGetAttribute(int *v, CUdevice_attribute what, CUdevice dev) {
  fake_attribute_queries++;
  *v = devices[dev][what == CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR ? 0
                    : what == CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR ? 1 : 2];
  return CUDA_SUCCESS;
}
CUresult cuModuleLoadData(CUmodule *m, const void *image) { *m = (CUmodule)(uintptr_t)16; return CUDA_SUCCESS; }
CUresult cuModuleGetFunction(CUfunction *f, CUmodule m, const char *name) {
  *f = (CUfunction)(uintptr_t)32;
  return CUDA_SUCCESS;
}
CUresult cuFuncSetAttribute(CUfunction f, CUfunction_attribute what, int v) { return CUDA_SUCCESS; }
CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned shared, CUstream stream, void **params, void **extra) {
  fake_launches++;
  return CUDA_SUCCESS;
}
"""

# Asks the library, three times round the three devices, for a GroupNorm split (it depends on the SM
# count) and a q_sample launch (the library here has sm_90 cases only).
DEVICE_CALLS = r"""
#include <dlfcn.h>
#include <stdio.h>
#include "fastdiff_kernels.h"
static void report(const char *what, fdk_status s) {
  printf("%s: %s%s%s\n", what, fdk_status_name(s), s ? " " : "", s ? fdk_last_error() : "");
}
int main(void) {
  if (fdk_init() != FDK_SUCCESS) return puts(fdk_last_error()), 1;
  void *cuda = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
  void (*use_device)(int) = (void (*)(int))dlsym(cuda, "fake_use_device");
  int *queries = dlsym(cuda, "fake_attribute_queries"), *launches = dlsym(cuda, "fake_launches");
  for (int round = 0; round < 3; round++) {
    for (int dev = 0; dev < 3; dev++) {
      use_device(dev);
      int64_t split = 0;
      fdk_status s = fdk_group_norm_silu_split(1, 64, 1 << 20, 0, &split);
      char what[64];
      snprintf(what, sizeof what, "device %d split %lld", dev, (long long)split);
      report(what, s);
      char *p = (char *)4096;
      fdk_q_sample_args q = {FDK_FLOAT32, p, (const int64_t *)(p + 256), (const float *)(p + 512), 10, p + 768, NULL,
                             p + 1024, NULL, 2, 3, 5, 0};
      snprintf(what, sizeof what, "device %d q_sample", dev);
      report(what, fdk_q_sample(&q, NULL));
    }
  }
  /* a thread with no current context: a launch fails until fdk_use_device makes the device's current */
  void (*drop_context)(void) = (void (*)(void))dlsym(cuda, "fake_drop_context");
  int *retains = dlsym(cuda, "fake_retains");
  use_device(0);
  struct { _Alignas(16) int64_t pad; int64_t value; } odd; /* value: 8 bytes off a 16-byte boundary */
  report("a host out-parameter off a 16-byte boundary", fdk_group_norm_silu_split(1, 64, 1 << 20, 0, &odd.value));
  drop_context();
  int64_t split = 0;
  report("no context", fdk_group_norm_silu_split(1, 64, 1 << 20, 0, &split));
  report("use device 1", fdk_use_device(1));
  report("use device 1 again", fdk_use_device(1));
  report("then", fdk_group_norm_silu_split(1, 64, 1 << 20, 0, &split));
  printf("split %lld retains %d\n", (long long)split, *retains);
  printf("attribute queries %d launches %d\n", *queries, *launches);
  return 0;
}
"""


def test_devices_are_queried_once_each_and_calls_follow_the_current_one(lib, build_dir, tmp_path):
    """Through a stand-in driver: each device's properties are read from the driver once, and every call
    plans for the thread's current device (its SM count, its arch's cases, its error); on a thread with
    no current context, `fdk_use_device` makes the device's primary context current."""
    cuda_include = os.path.join(os.path.dirname(importlib.import_module("triton").__file__), "backends", "nvidia",
                                "include")  # fmt: skip
    (tmp_path / "fake_cuda.c").write_text(FAKE_DRIVER)
    (tmp_path / "calls.c").write_text(DEVICE_CALLS)
    for cmd in (["cc", "-shared", "-fPIC", "-I", cuda_include, "-o", "libcuda.so.1", "fake_cuda.c"],
                ["cc", "-std=c11", "-Wall", "-Werror", "-I", os.path.dirname(HEADER), "-o", "calls", "calls.c",
                 "-L", build_dir, f"-Wl,-rpath,{build_dir}", "-lfastdiff_kernels", "-ldl"]):  # fmt: skip
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([str(tmp_path / "calls")], capture_output=True, text=True,
                          env=os.environ | {"LD_LIBRARY_PATH": str(tmp_path)})  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()

    def dry_run_split(arch, sms):
        split = ctypes.c_int64()
        lib.fdk_set_dry_run(arch, sms)
        try:
            assert lib.fdk_group_norm_silu_split(1, 64, 1 << 20, 0, ctypes.byref(split)) == 0
        finally:
            lib.fdk_set_dry_run(0, 0)
        return split.value

    assert dry_run_split(90, 132) != dry_run_split(80, 108)  # the calls below tell the devices apart
    unsupported = "FDK_ERROR_UNSUPPORTED no kernels for compute capability 7.5 (the library has sm_90a)"
    want = [f"device 0 split {dry_run_split(90, 132)}: FDK_SUCCESS", "device 0 q_sample: FDK_SUCCESS",
            f"device 1 split {dry_run_split(80, 108)}: FDK_SUCCESS",
            "device 1 q_sample: FDK_ERROR_UNSUPPORTED no compiled q_sample case for key (0,0,0,0,0) on sm_80",
            f"device 2 split 0: {unsupported}", f"device 2 q_sample: {unsupported}"]  # fmt: skip
    assert lines[:18] == want * 3
    # a thread without a context: fdk_use_device makes the device's primary context current, once
    assert lines[18] == "a host out-parameter off a 16-byte boundary: FDK_SUCCESS"
    assert lines[19].startswith("no context: FDK_ERROR_CUDA no current CUDA context on this thread")
    assert lines[20:22] == ["use device 1: FDK_SUCCESS", "use device 1 again: FDK_SUCCESS"]
    assert lines[22:24] == ["then: FDK_SUCCESS", f"split {dry_run_split(80, 108)} retains 1"]
    assert lines[-1] == "attribute queries 9 launches 3"  # 3 attributes of 3 devices; q_sample on device 0, thrice


# Asks the library for a q_sample launch on each device of the stand-in driver: its status names the arch
# whose cases the library looked for (the library here has sm_90 cases only), or says it has none.
ARCH_CALLS = r"""
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include "fastdiff_kernels.h"
int main(int argc, char **argv) {
  if (fdk_init() != FDK_SUCCESS) return puts(fdk_last_error()), 1;
  void (*use_device)(int) = (void (*)(int))dlsym(dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD), "fake_use_device");
  for (int dev = 0; dev < atoi(argv[1]); dev++) {
    use_device(dev);
    char *p = (char *)4096;
    fdk_q_sample_args q = {FDK_FLOAT32, p, (const int64_t *)(p + 256), (const float *)(p + 512), 10, p + 768, NULL,
                           p + 1024, NULL, 2, 3, 5, 0};
    fdk_status s = fdk_q_sample(&q, NULL);
    printf("%s %s\n", fdk_status_name(s), s ? fdk_last_error() : "");
  }
  return 0;
}
"""


def test_the_library_takes_the_devices_python_says_its_cubins_run_on(build_dir, tmp_path):
    """The C dispatcher's arch for a device is `launch_tables.library_arch`'s: sm_80 on every 8.x, sm_90 on
    9.0, sm_100 on 10.0 (Triton's sm_90a/sm_100a cubins run there alone), none on 7.5, 10.3, 11.0, 12.x;
    and where there is one, it is the arch whose tables Python picks (`table_arch`)."""
    from fastdiff.ops.launch_tables import library_arch, table_arch

    caps = [(7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (10, 3), (11, 0), (12, 0), (12, 1)]
    devices = ", ".join(f"{{{major}, {minor}, 100}}" for major, minor in caps)
    cuda_include = os.path.join(os.path.dirname(importlib.import_module("triton").__file__), "backends", "nvidia",
                                "include")  # fmt: skip
    (tmp_path / "fake_cuda.c").write_text(FAKE_DRIVER)
    (tmp_path / "calls.c").write_text(ARCH_CALLS)
    for cmd in (["cc", "-shared", "-fPIC", f"-DFAKE_DEVICES={devices}", "-I", cuda_include, "-o", "libcuda.so.1",
                 "fake_cuda.c"],
                ["cc", "-std=c11", "-Wall", "-Werror", "-I", os.path.dirname(HEADER), "-o", "calls", "calls.c",
                 "-L", build_dir, f"-Wl,-rpath,{build_dir}", "-lfastdiff_kernels", "-ldl"]):  # fmt: skip
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([str(tmp_path / "calls"), str(len(caps))], capture_output=True, text=True,
                          env=os.environ | {"LD_LIBRARY_PATH": str(tmp_path)})  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    taken = []
    for (major, minor), line in zip(caps, proc.stdout.splitlines(), strict=True):
        if line.startswith("FDK_SUCCESS"):
            taken.append(90)
        elif (m := re.search(r"no compiled q_sample case for key \(.*\) on sm_(\d+)$", line)):
            taken.append(int(m.group(1)))
        else:
            none = f"FDK_ERROR_UNSUPPORTED no kernels for compute capability {major}.{minor} (the library has sm_90a)"
            assert line == none
            taken.append(0)
    assert taken == [library_arch(major, minor, (80, 90, 100)) for major, minor in caps]
    assert taken == [0, 80, 80, 80, 90, 100, 0, 0, 0, 0]
    assert all(arch in (0, table_arch(*cap)) for cap, arch in zip(caps, taken))


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
                ("scale", ctypes.c_double), ("dkdv_partial", ctypes.c_void_p)]  # fmt: skip


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
    from fastdiff.ops.launch_tables import record_launches

    with record_launches() as log:
        fn(*args)
    return [(case.name, grid + (1,) * (3 - len(grid)), [_as_int(a) for a in launch_args])
            for case, grid, launch_args in log]  # fmt: skip


def _library_launches(lib, call, unsupported=False):
    """The launches the library plans for ``call`` in dry run (None when it has no case, as expected)."""
    lib.fdk_set_dry_run(90, 132)
    lib.fdk_last_error.restype = ctypes.c_char_p
    try:
        status = call()
        if unsupported:
            assert status == 2 and lib.fdk_dry_run_take(None, 0) == 0, lib.fdk_last_error()
            return None
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
@pytest.mark.parametrize("B,H,Lq,Lk", [(1, 1, 1, 1), (2, 3, 67, 45), (1, 2, 300, 77), (3, 1, 150, 130),
                                       (70, 2, 130, 140)])  # fmt: skip
def test_dry_run_attention_matches_the_python_launcher(lib, dtype, head_dim, B, H, Lq, Lk):
    """Every path: short keys (Lk within the short case's block), long keys on a small grid (small-grid tiles)
    and on a grid of at least 132 programs (the default tiles), forward and backward."""
    from fastdiff.ops import flash_attention as attn

    q = torch.empty(B, H, Lq, head_dim, dtype=dtype)
    k, v = (torch.empty(B, Lk, H, head_dim, dtype=dtype).transpose(1, 2) for _ in range(2))  # strided views
    code = {torch.float32: 0, torch.bfloat16: 2}[dtype]
    scale = head_dim**-0.5
    want = _python_launches(attn.forward_with, attn.TABLES, q, k, v, scale)
    (_, _, p), = want  # fmt: skip
    o_strides = _S4(*p[14:17], 1)  # the output's strides, as the launcher made it
    args = AttnFwdArgs(dtype=code, q=p[0], k=p[1], v=p[2], o=p[3], lse=p[4], batch=B, heads=H, len_q=Lq, len_k=Lk,
                       head_dim=head_dim, stride_q=_strides(q), stride_k=_strides(k), stride_v=_strides(v),
                       stride_o=o_strides, scale=scale)  # fmt: skip
    assert _library_launches(lib, lambda: lib.fdk_attention_fwd(ctypes.byref(args), None)) == want

    do, out = torch.empty_like(q), attn._empty_out(q)
    lse = torch.empty(B, H, Lq)
    want = _python_launches(attn.backward_with, attn.TABLES, do, q, k, v, out, lse, scale)
    if len(want) == 2:  # the short path: dq and the dK/dV partials, then their sum
        (_, _, main), (_, _, red) = want
        dq, dk, dv, scratch = main[6], red[1], red[2], main[7]
        dq_strides, dk_strides, dv_strides = main[23:26], red[3:6], red[6:9]
    else:
        pre, kv, *_, (_, _, dq_launch) = want
        kv = kv[2]
        dq, dk, dv, scratch = dq_launch[6], kv[6], kv[7], pre[2][2]
        dq_strides, dk_strides, dv_strides = dq_launch[19:22], kv[20:23], kv[23:26]
    floats = ctypes.c_int64(-1)
    lib.fdk_set_dry_run(90, 132)
    sizes = [ctypes.c_int64(n) for n in (B, H, Lq, Lk, head_dim)]
    assert lib.fdk_attention_bwd_partials(code, *sizes, ctypes.byref(floats)) == 0
    lib.fdk_set_dry_run(0, 0)
    assert floats.value == (2 * B * H * Lk * head_dim * want[0][1][1] if len(want) == 2 else 0)
    bw = AttnBwdArgs(dtype=code, d_o=do.data_ptr(), q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(),
                     o=out.data_ptr(), lse=lse.data_ptr(), dq=dq, dk=dk, dv=dv, delta=scratch, dkdv_partial=scratch,
                     batch=B, heads=H, len_q=Lq, len_k=Lk, head_dim=head_dim, scale=scale,
                     stride_do=_strides(do), stride_q=_strides(q), stride_k=_strides(k), stride_v=_strides(v),
                     stride_o=_strides(out), stride_dq=_S4(*dq_strides, 1), stride_dk=_S4(*dk_strides, 1),
                     stride_dv=_S4(*dv_strides, 1))  # fmt: skip
    assert _library_launches(lib, lambda: lib.fdk_attention_bwd(ctypes.byref(bw), None)) == want


def _struct(*fields):
    """A ctypes mirror of one of the header's argument structs: (name, 'dtype'|'p'|'i'|'l'|'d'|'s4')."""
    kinds = {"dtype": ctypes.c_int, "p": ctypes.c_void_p, "i": ctypes.c_int, "l": ctypes.c_int64,
             "d": ctypes.c_double, "s4": _S4}  # fmt: skip
    return type("Args", (ctypes.Structure,), {"_fields_": [(n, kinds[k]) for n, k in fields]})


LossArgs = _struct(("dtype", "dtype"), ("pred", "p"), ("target", "p"), ("weight", "p"), ("loss", "p"),
                   ("partial", "p"), ("batch", "l"), ("per_sample", "l"))  # fmt: skip
LossBwdArgs = _struct(("dtype", "dtype"), ("grad", "p"), ("pred", "p"), ("target", "p"), ("weight", "p"),
                      ("d_pred", "p"), ("batch", "l"), ("per_sample", "l"))  # fmt: skip
GnFwdArgs = _struct(("dtype", "dtype"), ("params_dtype", "dtype"), ("x", "p"), ("y", "p"), ("weight", "p"),
                    ("bias", "p"), ("scale", "p"), ("shift", "p"), ("stride_scale", "l"), ("stride_shift", "l"),
                    ("mean", "p"), ("rstd", "p"), ("coef_a", "p"), ("coef_d", "p"), ("partial_mean", "p"),
                    ("partial_m2", "p"), ("batch", "l"), ("channels", "l"),
                    ("spatial", "l"), ("groups", "l"), ("channels_last", "i"), ("silu", "i"), ("eps", "d"))  # fmt: skip
GnBwdArgs = _struct(("dtype", "dtype"), ("params_dtype", "dtype"), ("dy", "p"), ("x", "p"), ("mean", "p"),
                    ("rstd", "p"), ("coef_a", "p"), ("coef_d", "p"), ("weight", "p"), ("bias", "p"), ("scale", "p"),
                    ("has_shift", "i"), ("stride_scale", "l"), ("dx", "p"), ("dweight", "p"), ("dbias", "p"),
                    ("dscale", "p"), ("dshift", "p"), ("sum_dz", "p"), ("sum_dzx", "p"), ("dx_e", "p"), ("dx_f", "p"),
                    ("term_w", "p"), ("term_b", "p"), ("batch", "l"), ("channels", "l"),
                    ("spatial", "l"), ("groups", "l"), ("channels_last", "i"), ("silu", "i"))  # fmt: skip
StepArgs = _struct(("dtype", "dtype"), ("out_dtype", "dtype"), ("x", "p"), ("model_output", "p"),
                   ("uncond_output", "p"), ("coeffs", "p"), ("per_sample_coeffs", "i"), ("x0_prev", "p"),
                   ("seeds", "p"), ("known", "p"), ("mask", "p"), ("mask_per_pixel", "i"), ("x_next", "p"),
                   ("x0_out", "p"), ("stats", "p"), ("batch", "l"), ("channels", "l"), ("spatial", "l"),
                   ("channels_last", "i"), ("add_noise", "i"), ("step", "l"), ("guidance_scale", "d"),
                   ("guidance_rescale", "d"), ("clip_x0", "d"))  # fmt: skip


def _ptr(t):
    return None if t is None else t.data_ptr()


@pytest.mark.parametrize("shape", [(1, 4, 8, 8), (3, 3, 5, 7), (2, 16, 40, 40)])
@pytest.mark.parametrize("weighted", [False, True])
def test_dry_run_diffusion_loss_matches_the_python_launcher(lib, shape, weighted):
    from fastdiff.ops import noising

    pred, target = torch.randn(shape), torch.randn(shape)
    weight = torch.rand(shape[0]) if weighted else None
    B, N = shape[0], pred[0].numel()
    plan = noising._loss_plan(pred, target, weight)
    want = _python_launches(noising._weighted_mse_triton, pred, target, weight, plan)
    partial, loss = want[1][2][0], want[1][2][1]
    assert lib.fdk_diffusion_loss_partials(ctypes.c_int64(B), ctypes.c_int64(N)) == want[1][2][2]
    args = LossArgs(dtype=0, pred=_ptr(pred), target=_ptr(target), weight=_ptr(weight), loss=loss, partial=partial,
                    batch=B, per_sample=N)  # fmt: skip
    assert _library_launches(lib, lambda: lib.fdk_diffusion_loss_fwd(ctypes.byref(args), None)) == want
    grad = torch.ones(())
    want = _python_launches(noising._sq_err_backward_triton, grad, pred, target, weight, plan)
    args = LossBwdArgs(dtype=0, grad=want[0][2][0], pred=_ptr(pred), target=_ptr(target), weight=_ptr(weight),
                       d_pred=want[0][2][4], batch=B, per_sample=N)  # fmt: skip
    assert _library_launches(lib, lambda: lib.fdk_diffusion_loss_bwd(ctypes.byref(args), None)) == want


@pytest.mark.parametrize("shape,groups", [((1, 4, 8, 8), 2), ((3, 6, 5, 7), 3), ((2, 64, 40, 40), 32),
                                          ((1, 32, 64, 64), 8), ((4, 20, 1, 1), 20)])  # fmt: skip
@pytest.mark.parametrize("params", ["", "wb", "ss", "wbss", "w"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_dry_run_group_norm_matches_the_python_launcher(lib, shape, groups, params, channels_last):
    gn = importlib.import_module("fastdiff.ops.group_norm")
    x = torch.randn(shape)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    B, C = shape[:2]
    S = shape[2] * shape[3]
    w, b = (torch.randn(C) if "w" in params else None), (torch.randn(C) if "b" in params else None)
    film = torch.randn(B, 2 * C)
    sc, sh = (film[:, :C], film[:, C:]) if "ss" in params else (None, None)
    cl = int(gn.geometry_of(x).channels_last)
    plan = gn._plan(x, groups, w, b, sc, sh, True)
    fwd = _python_launches(gn._forward_triton, x, w, b, sc, sh, 1e-5, plan, True)
    (_, _, stats), (_, _, final), (_, _, apply) = fwd
    args = GnFwdArgs(dtype=0, params_dtype=0, x=_ptr(x), y=apply[1], weight=_ptr(w), bias=_ptr(b), scale=_ptr(sc),
                     shift=_ptr(sh), stride_scale=2 * C, stride_shift=2 * C, mean=final[6], rstd=final[7],
                     coef_a=final[8], coef_d=final[9], partial_mean=stats[1], partial_m2=stats[2], batch=B,
                     channels=C, spatial=S, groups=groups,
                     channels_last=cl, silu=1, eps=1e-5)  # fmt: skip
    # a FiLM half that starts off a 16-byte boundary: the library declines, the JIT compiles for it
    misaligned = any(t is not None and t.data_ptr() % 16 for t in (w, b, sc, sh))
    call = lambda: lib.fdk_group_norm_silu_fwd(ctypes.byref(args), None)  # noqa: E731
    assert _library_launches(lib, call, unsupported=misaligned) == (None if misaligned else fwd)
    split = ctypes.c_int64()
    lib.fdk_set_dry_run(90, 132)
    assert lib.fdk_group_norm_silu_split(B, C, S, cl, ctypes.byref(split)) == 0
    lib.fdk_set_dry_run(0, 0)
    assert split.value == gn.geometry_of(x).split

    saved = torch.randn(plan.saved)
    mean, rstd, coef_a, coef_d = gn._saved_views(saved, B, C, groups)
    dy = torch.empty_like(x)
    bwd = _python_launches(gn._backward_triton, dy, x, saved, w, b, sc, sh, plan)
    reduce, final, *rest = [launch[2] for launch in bwd]
    affine = w is not None or b is not None
    args = GnBwdArgs(dtype=0, params_dtype=0, dy=_ptr(dy), x=_ptr(x), mean=_ptr(mean), rstd=_ptr(rstd),
                     coef_a=_ptr(coef_a), coef_d=_ptr(coef_d), weight=_ptr(w), bias=_ptr(b), scale=_ptr(sc),
                     has_shift=sh is not None, stride_scale=2 * C, dx=rest[-1][2],
                     dweight=rest[0][2] if affine else None, dbias=rest[0][3] if affine else None,
                     dscale=final[8] if sc is not None else None, dshift=final[9] if sh is not None else None,
                     sum_dz=reduce[6], sum_dzx=reduce[7], dx_e=final[6], dx_f=final[7],
                     term_w=final[10] if affine else None, term_b=final[11] if affine else None, batch=B,
                     channels=C, spatial=S, groups=groups, channels_last=cl, silu=1)  # fmt: skip
    misaligned = any(t is not None and t.data_ptr() % 16 for t in (w, b, sc))  # the backward reads no shift
    call = lambda: lib.fdk_group_norm_silu_bwd(ctypes.byref(args), None)  # noqa: E731
    assert _library_launches(lib, call, unsupported=misaligned) == (None if misaligned else bwd)


@pytest.mark.parametrize("shape", [(1, 4, 8, 8), (2, 3, 5, 7), (2, 4, 130, 130)])
@pytest.mark.parametrize("options", ["", "noise", "x0", "multistep", "cfg", "cfg,noise", "cfg,rescale,clip,inpaint"])
def test_dry_run_sampler_step_matches_the_python_launcher(lib, shape, options):
    from fastdiff.ops import fused_step as step_mod
    x, out_c, out_u = torch.randn(shape), torch.randn(shape), torch.randn(shape)
    B = shape[0]
    coeffs = torch.randn(B, step_mod.NUM_COEFFICIENTS) if "cfg" in options else torch.randn(step_mod.NUM_COEFFICIENTS)
    seeds = torch.arange(B)
    uncond = out_u if "cfg" in options else None
    x0_prev = torch.randn(shape) if "multistep" in options else None
    known = torch.randn(shape) if "inpaint" in options else None
    mask = torch.rand(B, 1, *shape[2:]) if "inpaint" in options else None
    rescale, clip = (0.7 if "rescale" in options else 0.0), (1.5 if "clip" in options else None)
    noise, return_x0 = "noise" in options, "x0" in options or "multistep" in options
    tensors = step_mod._Tensors(x, out_c, coeffs, uncond, x0_prev, seeds, known, mask)
    want = _python_launches(step_mod._sampler_step_triton, tensors, step_mod._options(3.5, rescale, clip, 7, noise,
                                                                                      return_x0))  # fmt: skip
    p = want[-1][2]
    args = StepArgs(dtype=0, out_dtype=0, x=_ptr(x), model_output=_ptr(out_c), uncond_output=_ptr(uncond),
                    coeffs=p[4], per_sample_coeffs=coeffs.ndim == 2, x0_prev=_ptr(x0_prev),
                    seeds=_ptr(seeds), known=_ptr(known), mask=p[8] if
                    known is not None else None, mask_per_pixel=known is not None, x_next=p[9],
                    x0_out=p[10] if return_x0 else None, stats=p[3] if rescale else None, batch=B,
                    channels=shape[1], spatial=shape[2] * shape[3], channels_last=0, add_noise=noise, step=7,
                    guidance_scale=3.5, guidance_rescale=rescale, clip_x0=clip or 0.0)  # fmt: skip
    shipped = any(case.name == want[-1][0] for case in step_mod.STEP.cases())
    got = _library_launches(lib, lambda: lib.fdk_sampler_step(ctypes.byref(args), None), unsupported=not shipped)
    assert got == (want if shipped else None)  # a combination not shipped: the library declines, the JIT runs it
    chunks = lib.fdk_sampler_step_chunks(ctypes.c_int64(x[0].numel()))
    assert chunks == step_mod._chunking(x[0].numel())[0]
