"""Benchmark harness shared by every fastdiff benchmark entry.

An entry (``benchmarks/bench_<op>.py``) yields `Case`s: one op at one shape and
dtype, the bytes it must move and/or the FLOPs it must do (written out as a
formula in the entry), and the implementations to time — ours first, then the
baselines (eager PyTorch chain, torch.compile of it, SDPA, xformers, ...).

Timing: device events around the call, median of many runs after warm-up
(``triton.testing.do_bench``).  Roofline: memory-bound ops against the copy
bandwidth measured once on this device (bytes read + written by a large
device-to-device copy); compute-bound ops in TFLOP/s.

Throughput: GB/s from ``bytes``, TFLOP/s from ``flops``, and items/s from ``items``
(images for the end-to-end entries: items / seconds per call).

Without a CUDA GPU the harness says so and times only the CPU reference path:
those numbers describe PyTorch on this CPU, not the kernels.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import torch

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")

# torch.compile baselines: one graph per shape costs seconds to minutes of compilation
# (the SD UNet: about a minute each); ``--no-compile`` leaves them out of a short run.
COMPILE_BASELINES = True


def compile_baselines() -> bool:
    """Whether the entries add their torch.compile baselines (GPU only, and not under --no-compile)."""
    return has_gpu() and COMPILE_BASELINES


@dataclass
class Case:
    op: str  # e.g. "q_sample"
    shape: str  # human-readable shape, e.g. "(8,4,64,64)"
    dtype: str  # "bf16", "fp16", "fp32"
    impls: dict[str, Callable[[], object]]  # name -> zero-arg callable; the first is ours
    bytes: float = 0.0  # minimum bytes moved through device memory by one call
    flops: float = 0.0  # floating-point operations of one call
    note: str = ""
    items: float = 0.0  # work items of one call (images for end-to-end entries), for items/s


@dataclass
class Row:
    op: str
    shape: str
    dtype: str
    impl: str
    ms: float
    gbps: float | None
    tflops: float | None
    pct_roofline: float | None  # of measured copy bandwidth (memory-bound) or of peak given
    speedup: dict[str, float] = field(default_factory=dict)  # ours vs each baseline (>1: ours faster)
    note: str = ""
    items_per_s: float | None = None  # items / second (images/s for end-to-end entries)
    bytes: float = 0.0  # the case's size: bytes moved, FLOPs and items of one call (for plots)
    flops: float = 0.0
    items: float = 0.0


def has_gpu() -> bool:
    return torch.cuda.is_available()


def device_name() -> str:
    return torch.cuda.get_device_name() if has_gpu() else f"cpu ({platform.processor() or platform.machine()})"


def device_slug() -> str:
    return "".join(c if c.isalnum() else "-" for c in device_name().lower()).strip("-")[:40]


def time_ms(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median time of one call in milliseconds."""
    if has_gpu():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()  # warm-up
    times = []
    deadline = time.perf_counter() + rep_ms / 1000
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def forward_backward(fn: Callable, leaves: list[torch.Tensor], grad_out: torch.Tensor) -> Callable[[], None]:
    """A call of ``fn(*leaves)`` and its backward from ``grad_out``, the leaves' gradients cleared first."""

    def run():
        for t in leaves:
            t.grad = None
        fn(*leaves).backward(grad_out)

    return run


def cuda_graph(fn: Callable[[], object]) -> Callable[[], object] | None:
    """``fn`` captured once in a CUDA graph, as a replay callable; None (with the reason printed) if it cannot be.

    Replays time the GPU's work without the host's per-op launch cost, as a server running a
    captured UNet sees it.  ``fn``'s inputs are fixed: it must read and write the same tensors
    on every call.
    """
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # outside the capture: JIT compilation, library handles, allocator pools
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception as e:  # a baseline that cannot be captured is reported and left out, not fatal
        print(f"CUDA-graph capture failed, case skipped: {type(e).__name__}: {str(e).splitlines()[0]}")
        return None
    return graph.replay


def copy_bandwidth_gbps(nbytes: int = 1 << 30) -> float:
    """Measured device copy bandwidth: (read + write bytes) / time of a large copy."""
    if not has_gpu():
        nbytes = 1 << 26
        src = torch.empty(nbytes, dtype=torch.uint8).random_()
    else:
        src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def run_cases(cases: Iterable[Case], bandwidth_gbps: float, peak_tflops: float | None = None) -> list[Row]:
    rows = []
    for case in cases:
        names = list(case.impls)
        if not has_gpu():
            names = names[:1]  # CPU: the reference path only
        times = {name: time_ms(case.impls[name]) for name in names}
        for name in names:
            ms = times[name]
            gbps = case.bytes / (ms * 1e-3) / 1e9 if case.bytes else None
            tflops = case.flops / (ms * 1e-3) / 1e12 if case.flops else None
            if gbps is not None:
                pct = 100 * gbps / bandwidth_gbps
            elif tflops is not None and peak_tflops:
                pct = 100 * tflops / peak_tflops
            else:
                pct = None
            speedup = {b: times[b] / ms for b in names if b != name} if name == names[0] else {}
            per_s = case.items / (ms * 1e-3) if case.items else None
            rows.append(Row(
                case.op, case.shape, case.dtype, name, ms, gbps, tflops, pct, speedup, case.note, per_s,
                case.bytes, case.flops, case.items,
            ))  # fmt: skip
    return rows


def _num(value: float | None, width: int, fmt: str) -> str:
    return f"{value:{width}{fmt}}" if value is not None else f"{'-':>{width}}"


def format_table(rows: list[Row]) -> str:
    head = (
        f"{'op':22} {'shape':26} {'dtype':5} {'impl':18} {'ms':>9} {'GB/s':>8} {'TFLOP/s':>8} {'items/s':>9} "
        f"{'%roof':>6}  speed-up"
    )
    lines = [head, "-" * (len(head) + 20)]
    for r in rows:
        sp = " ".join(f"{v:.2f}x vs {k}" for k, v in r.speedup.items())
        lines.append(
            f"{r.op:22} {r.shape:26} {r.dtype:5} {r.impl:18} {r.ms:9.4f} {_num(r.gbps, 8, '.2f')} "
            f"{_num(r.tflops, 8, '.2f')} {_num(r.items_per_s, 9, '.2f')} {_num(r.pct_roofline, 6, '.1f')}  {sp}"
        )
    return "\n".join(lines)


def timed_path() -> str:
    """What the numbers of this machine measure: the kernels, or only PyTorch's reference path."""
    return "Triton kernels (CUDA)" if has_gpu() else "CPU reference path only (no CUDA GPU): not kernel performance"


def environment() -> dict:
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(),
        "gpu": has_gpu(),
        "timed": timed_path(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
    }
    for mod in ("triton", "xformers", "diffusers"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:
            env[mod] = None
    return env


def results_dir() -> str:
    """Today's results folder for this device: results/<date>-<device>."""
    return os.path.join(RESULTS_DIR, f"{_dt.date.today().isoformat()}-{device_slug()}")


def save(name: str, rows: list[Row], extra: dict, out_dir: str | None = None) -> str:
    """Write rows + environment as JSON under results/<date>-<device>/<name>.json."""
    out_dir = out_dir or results_dir()
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump({"benchmark": name, "environment": environment(), **extra, "rows": [asdict(r) for r in rows]}, f, indent=1)
    return path
