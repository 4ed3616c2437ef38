"""Benchmark harness shared by every fastdiff benchmark entry.

An entry (``benchmarks/bench_<op>.py``) yields `Case`s: one op at one shape and dtype, a
factory of its inputs, the implementations to time (ours first, then the baselines:
eager PyTorch chain, torch.compile of it, SDPA backends, ...), the bytes the op must move
and/or the FLOPs it must do (a formula written out in the entry), and a check that
compares an implementation's output with a reference.

**Device time** (``device_ms``, GPU).  Each implementation is captured in one CUDA graph
that calls it ``graph_calls`` times back to back, and the graph is replayed many times
after warm-up, with CUDA events around each replay; device_ms = median(replay time) /
graph_calls.  The graph removes the host from the measurement: the memory-bound kernels
take a few µs at diffusion sizes, less than a Python call costs.

**Cache.**  Inputs are rotated rather than the L2 flushed: call j of the graph reads copy
j mod n of the inputs and writes outputs that stay alive until the capture ends, so that
every call touches memory of its own, and n is chosen so that a replay cycles through at
least ``ROTATION_L2 = 4`` times the L2 (200 MB on an H100/H200, whose L2 is 50 MB) before
a copy is read again.  Under LRU no line survives a cyclic sweep of 4× the cache, and
under random replacement at most about a quarter could.  A flush (writing a buffer the
size of L2 between calls) would instead put its own dirty lines in the cache, whose
write-back the next kernel pays for, and it needs per-call events whose launch gaps are
as long as the kernels; rotation keeps the calls back to back, as in a model.

**Host time** (``host_us``).  The host's time to issue one eager call: back-to-back eager
calls without a sync, timed with ``time.perf_counter``, median over a few repeats.  On a
CPU, where an op returns only when it is done, this is the op's whole time.

**Checks.**  Every case carries a check: run once per implementation (GPU and CPU alike),
it returns the worst error of the implementation's output against the case's reference,
as a fraction of the allowed error (≤ 1 agrees).  ``tests/test_benchmarks.py`` asserts
it on the CPU, and a GPU run records it in every row and flags a disagreement.

**Roofline.**  Memory-bound ops: GB/s from ``bytes`` against the device's copy
bandwidth, measured in the same run with a large device-to-device copy, device-timed
the same way.  Compute-bound ops: TFLOP/s from ``flops`` against the dense peak given by
the entry.  Items/s from ``items`` (images for the end-to-end entries).

Without a CUDA GPU the harness says so, checks every implementation and times only the
first (the ops' PyTorch reference path): those numbers describe PyTorch on this CPU,
not the kernels.  Cases without an ``inputs`` factory (the end-to-end entries: sampling
loops with host syncs) are timed per call with their syncs, as ``wall_ms``.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Callable

import torch

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")

# torch.compile baselines: None adds them on a GPU only (Inductor's first graph costs about
# 90 s on a CPU), False leaves them out (``--no-compile``), True adds them anywhere.
COMPILE_BASELINES: bool | None = None
# How the baselines are compiled.  max-autotune without Inductor's own CUDA graphs: the
# harness captures every implementation in a CUDA graph itself, and a graph cannot capture
# a function that replays graphs of its own.  Specialised per shape (dynamic=False), like a
# model compiled at one resolution; fullgraph so that a graph break fails loudly.
COMPILE_OPTIONS = {"mode": "max-autotune-no-cudagraphs", "dynamic": False, "fullgraph": True}

ROTATION_L2 = 4  # a replay touches this many times the L2 before reusing an input copy
MIN_GRAPH_CALLS = 4  # calls per graph at least: a replay's launch is a small part of it
MAX_GRAPH_CALLS = 2048  # and at most: 2048 calls of ≥ 98 KB each reach 4 × 50 MB
H100_L2_BYTES = 50 * 2**20  # when the device does not say (and for fake clocks in tests)
REPLAY_TARGET_MS = 50.0  # total replay time aimed at per implementation, within:
MIN_REPLAYS, MAX_REPLAYS = 10, 100
HOST_WINDOW_MS = 20.0  # device time allowed per repeat of the host timing
HOST_REPEATS = 5

def compile_baselines() -> bool:
    """Whether the entries add their torch.compile baselines."""
    return has_gpu() if COMPILE_BASELINES is None else COMPILE_BASELINES


def compiled(fn: Callable, **options) -> Callable:
    """``fn`` under torch.compile as every baseline is compiled (`COMPILE_OPTIONS`, overridable).

    Each benchmarked shape is one more graph of the same code object, so Dynamo's
    recompile caps are lifted: past them it would silently run ``fn`` eagerly.
    """
    import torch._dynamo.config as dynamo_config

    for knob in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(dynamo_config, knob):
            setattr(dynamo_config, knob, max(getattr(dynamo_config, knob), 1024))
    return torch.compile(fn, **{**COMPILE_OPTIONS, **options})


# ----------------------------------------------------------------------------- cases and rows


@dataclass
class Case:
    op: str  # e.g. "q_sample"
    shape: str  # human-readable shape, e.g. "(8,4,64,64)"
    dtype: str  # "bf16", "fp16", "fp32"
    # name -> implementation, ours first.  With ``inputs``: called as impl(*inputs), after
    # ``impl.prepare(*inputs)`` when it has one (see `Backward`).  Without: a zero-argument call.
    impls: dict[str, Callable]
    bytes: float = 0.0  # minimum bytes moved through device memory by one call
    flops: float = 0.0  # floating-point operations of one call
    note: str = ""
    items: float = 0.0  # work items of one call (images for end-to-end entries), for items/s
    inputs: Callable[[], tuple] | None = None  # a fresh set of the op's inputs (drawn once per rotated copy)
    # (call, inputs) -> worst error of call(inputs) against the reference, as a fraction of the
    # tolerance (≤ 1 agrees); ``call`` runs one implementation.  See `Reference`.
    check: Callable[[Callable[[tuple], object], tuple], float] | None = None
    unavailable: dict[str, str] = field(default_factory=dict)  # baseline -> why it cannot run here
    graph_calls: int | None = None  # calls per CUDA graph; None: enough for the rotation
    peak_memory_mb: dict[str, float] = field(default_factory=dict)  # impl -> GPU memory, as the entry measures it


@dataclass
class Row:
    op: str
    shape: str
    dtype: str
    impl: str
    device_ms: float | None = None  # GPU time per call: CUDA-graph replay, inputs rotated
    host_us: float | None = None  # host time per eager call (on a CPU: the whole call)
    wall_ms: float | None = None  # cases without inputs (end to end): one call with its syncs
    gbps: float | None = None
    tflops: float | None = None
    pct_roofline: float | None = None  # of the measured copy bandwidth (memory-bound) or of the peak given
    speedup: dict[str, float] = field(default_factory=dict)  # ours vs each baseline (>1: ours faster)
    check: float | None = None  # worst error / tolerance against the reference (≤ 1 agrees); None: not checked
    unavailable: str = ""  # why this row lacks numbers (baseline missing, failed, not capturable)
    note: str = ""
    items_per_s: float | None = None  # items / second (images/s for end-to-end entries)
    bytes: float = 0.0  # the case's size: bytes moved, FLOPs and items of one call (for plots)
    flops: float = 0.0
    items: float = 0.0
    graph_calls: int = 0  # calls per replayed graph
    rotation_mb: float = 0.0  # distinct memory a replay sweeps before reusing an input copy
    peak_memory_mb: float | None = None  # GPU memory of the implementation (the entry says what it counts)

    @property
    def ms(self) -> float | None:
        """The time that throughput, % of roofline and speed-ups come from: the device time, else
        the wall time; the host time only where no time is missing (a CPU run: the call is the work),
        never for a GPU row whose device time could not be measured."""
        if self.device_ms is not None:
            return self.device_ms
        if self.wall_ms is not None:
            return self.wall_ms
        return self.host_us / 1e3 if self.host_us is not None and not self.unavailable else None

    @property
    def disagrees(self) -> bool:
        return self.check is not None and not self.check <= 1.0  # NaN disagrees


def row_from_json(data: dict) -> Row:
    """A Row from its saved JSON; results saved before device timing (one "ms" per eager
    call, events around it) load with that figure as their wall time."""
    data = dict(data)
    if "ms" in data:
        data.setdefault("wall_ms", data.pop("ms"))
    known = {f.name for f in fields(Row)}
    return Row(**{k: v for k, v in data.items() if k in known})


def has_gpu() -> bool:
    return torch.cuda.is_available()


def device_name() -> str:
    return torch.cuda.get_device_name() if has_gpu() else f"cpu ({platform.processor() or platform.machine()})"


def device_slug() -> str:
    return "".join(c if c.isalnum() else "-" for c in device_name().lower()).strip("-")[:40]


def l2_bytes() -> int:
    """The device's L2 size (50 MB on an H100/H200)."""
    if not has_gpu():
        return H100_L2_BYTES
    return getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 0) or H100_L2_BYTES


# ----------------------------------------------------------------------------- implementations


def prepared(impl: Callable, inputs: tuple) -> tuple:
    """``inputs`` as ``impl`` takes them (its ``prepare``, if it has one, run once)."""
    prepare = getattr(impl, "prepare", None)
    return prepare(*inputs) if prepare is not None else inputs


def bound(impl: Callable) -> Callable[[tuple], object]:
    """``inputs -> output`` of one implementation: what a check calls."""
    return lambda inputs: impl(*prepared(impl, inputs))


def checked(impl: Callable) -> bool:
    """Whether an implementation computes the case's op (`SameBytesCopy` does not)."""
    return not getattr(impl, "unchecked", False)


class Backward:
    """An implementation whose backward alone is timed.

    ``prepare`` runs the forward once per set of inputs (untimed; the last input is the
    output gradient); the call then replays the backward through the retained autograd graph
    and returns the gradients of every input that requires one.
    """

    def __init__(self, forward: Callable):
        self.forward = forward

    def prepare(self, *inputs):
        *args, grad = inputs
        leaves = [a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args]
        wrt = [a for a in leaves if isinstance(a, torch.Tensor) and a.requires_grad]
        with torch.enable_grad():
            out = self.forward(*leaves)
        return out, wrt, grad

    def __call__(self, out, wrt, grad):
        return torch.autograd.grad(out, wrt, grad, retain_graph=True)


class ForwardBackward:
    """An implementation timed forward and backward together: returns the gradients of
    every input that requires one (the last input is the output gradient)."""

    def __init__(self, forward: Callable):
        self.forward = forward

    def __call__(self, *inputs):
        *args, grad = inputs
        wrt = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        with torch.enable_grad():
            return torch.autograd.grad(self.forward(*args), wrt, grad)


class SameBytesCopy:
    """A copy moving as many bytes as a memory-bound case (reads nbytes/2, writes nbytes/2).

    Its device time is the floor for the case on this device: "0.70× vs copy (same bytes)"
    means that ours takes 1/0.70 of the copy's time.  ``prepare`` gives every rotated input
    set a source of its own, so the copy is rotated like the op.  It computes nothing to check.
    """

    unchecked = True

    def __init__(self, nbytes: float):
        self.half = max(int(nbytes) // 2, 1)

    def prepare(self, *inputs):
        device = _tensors(inputs)[0].device
        return (torch.empty(self.half, dtype=torch.uint8, device=device).random_(),)

    def __call__(self, src: torch.Tensor) -> torch.Tensor:
        return src.clone()


def forward_backward(fn: Callable, leaves: list[torch.Tensor], grad_out: torch.Tensor) -> Callable[[], None]:
    """A call of ``fn(*leaves)`` and its backward from ``grad_out``, the leaves' gradients cleared first."""

    def run():
        for t in leaves:
            t.grad = None
        fn(*leaves).backward(grad_out)

    return run


def cuda_graph(fn: Callable[[], object]) -> Callable[[], object] | None:
    """``fn`` captured once in a CUDA graph, as a replay callable; None (with the reason printed) if it cannot be.

    For end-to-end entries that time a captured loop as one of their implementations (the
    kernel entries' cases are captured by the harness itself).  ``fn``'s inputs are fixed:
    it must read and write the same tensors on every call.
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
        print(f"CUDA-graph capture failed, case skipped: {first_line(e)}")
        return None
    return graph.replay


# ----------------------------------------------------------------------------- checks


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensors(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in _tensors(item)]
    return []


def tensor_bytes(*objs) -> int:
    """Bytes of the distinct storages of the tensors in ``objs`` (nested tuples, lists, dicts)."""
    storages = {}
    for t in _tensors(objs):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; inf if ``out`` is not finite or has another shape."""
    if tuple(out.shape) != tuple(ref.shape):
        return math.inf
    out, ref = out.detach().double(), ref.detach().double().to(out.device)
    if not torch.isfinite(out).all():
        return math.inf
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def error_ratio(outs, refs, tolerance: float) -> float:
    """The worst `relative_error` over paired tensors, as a fraction of ``tolerance``."""
    outs, refs = _tensors(outs), _tensors(refs)
    if len(outs) != len(refs):
        return math.inf
    return max(relative_error(o, r) for o, r in zip(outs, refs)) / tolerance


def normal_law_ratio(z: torch.Tensor, sigmas: float = 6.0) -> float:
    """How far drawn noise is from N(0, 1), as a fraction of a ``sigmas``-σ band.

    Mean and standard deviation of n draws are off by 1/√n and 1/√(2n) (one σ); the ratio
    is the worse of the two offsets over ``sigmas`` of those σ.  All-zero or constant
    noise (a chain that forgot to draw) is far outside.
    """
    z = z.detach().double().flatten()
    n = z.numel()
    return max(abs(z.mean().item()) * math.sqrt(n), abs(z.std().item() - 1.0) * math.sqrt(2 * n)) / sigmas


class Reference:
    """A check that compares each implementation's output with ``expected(*inputs)``.

    The expected outputs (computed in higher precision by the entry) are computed once per
    case and reused for every implementation, which are all checked on the same first set
    of inputs.  ``checked_inputs`` maps the case's inputs to the ones the check runs on
    (default: the same), e.g. with the noise switched off.
    """

    def __init__(
        self, expected: Callable[..., object], tolerance: float, checked_inputs: Callable[[tuple], tuple] | None = None
    ):
        self.expected, self.tolerance, self.checked_inputs = expected, tolerance, checked_inputs
        self._key, self._inputs, self._value = None, None, None

    def __call__(self, call: Callable[[tuple], object], inputs: tuple) -> float:
        if self._key is not inputs:
            self._key = inputs
            self._inputs = self.checked_inputs(inputs) if self.checked_inputs else inputs
            self._value = self.expected(*self._inputs)
        return error_ratio(call(self._inputs), self._value, self.tolerance)


def reference_dtype(device) -> torch.dtype:
    """Precision of the references: float64 on a CPU; float32 on a GPU, where float64 is slow
    (attention's score matrices, the UNet) and fp32 is far more precise than the bf16/fp16 under test."""
    return torch.float64 if torch.device(device).type == "cpu" else torch.float32


# ----------------------------------------------------------------------------- clocks


class HostClock:
    """No GPU: the host's clock only (CPU ops are synchronous: the host time is the work)."""

    graphs = False  # no device time: only the first implementation of a case is timed

    def setup(self):
        """Context for making inputs, warming up and capturing."""
        return contextlib.nullcontext()

    def sync(self) -> None:
        pass

    def call_ms(self, fn: Callable[[], object]) -> float:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3


class CudaClock(HostClock):
    """CUDA events and CUDA graphs on the current device.

    Inputs, warm-up and capture all run on one side stream: a graph must be warmed up off
    the default stream, and autograd runs a backward on the stream of its forward, so a
    backward captured on this stream needs its forward made there too.
    """

    graphs = True

    def __init__(self):
        self.stream = torch.cuda.Stream()

    def setup(self):
        return torch.cuda.stream(self.stream)

    def sync(self) -> None:
        torch.cuda.synchronize()

    def call_ms(self, fn: Callable[[], object]) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    def capture(self, fn: Callable[[], object]) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream):
            fn()
        return graph

    def replay_ms(self, graph: torch.cuda.CUDAGraph, replays: int) -> list[float]:
        """Milliseconds of each of ``replays`` back-to-back replays (events around each)."""
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(replays)]
        for start, end in events:
            start.record()
            graph.replay()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in events]


def default_clock() -> HostClock:
    return CudaClock() if has_gpu() else HostClock()


# ----------------------------------------------------------------------------- timing


def rotation(footprint: int, l2: int, graph_calls: int | None = None) -> tuple[int, int]:
    """(calls per graph, input copies) for calls that each touch ``footprint`` bytes.

    Copies: enough that the calls between two reads of one copy sweep ``ROTATION_L2``·L2
    bytes.  Calls: at least that many and ``MIN_GRAPH_CALLS``, at most ``MAX_GRAPH_CALLS``
    (unless the case fixes ``graph_calls``); call j reads copy j mod copies.
    """
    needed = max(1, math.ceil(ROTATION_L2 * l2 / max(footprint, 1)))
    calls = graph_calls or min(max(needed, MIN_GRAPH_CALLS), MAX_GRAPH_CALLS)
    return calls, min(needed, calls)


def replay_count(replay_ms: float) -> int:
    """Replays to time: about ``REPLAY_TARGET_MS`` in all, within [MIN_REPLAYS, MAX_REPLAYS]."""
    wanted = REPLAY_TARGET_MS / max(replay_ms, 1e-6)
    return int(min(max(math.ceil(wanted), MIN_REPLAYS), MAX_REPLAYS))


def host_us(call: Callable[[], object], clock: HostClock, device_ms: float | None = None) -> float:
    """Host µs per eager call: median over repeats of back-to-back calls without a sync.

    A repeat's calls are kept to about ``HOST_WINDOW_MS`` of device work (and at most 20),
    so that the launch queue never fills and blocks the host.
    """
    per_repeat = 20 if device_ms is None else int(min(max(HOST_WINDOW_MS / max(device_ms, 1e-6), 2), 20))
    if not clock.graphs:
        per_repeat = 3  # a CPU call is the whole op: a few are enough
    times = []
    for _ in range(HOST_REPEATS):
        clock.sync()
        start = time.perf_counter()
        for _ in range(per_repeat):
            call()
        times.append((time.perf_counter() - start) / per_repeat)
    clock.sync()
    return statistics.median(times) * 1e6


@dataclass
class Measured:
    """One implementation's numbers on one case."""

    device_ms: float | None = None
    host_us: float | None = None
    wall_ms: float | None = None
    check: float | None = None
    unavailable: str = ""
    graph_calls: int = 0
    rotation_mb: float = 0.0


class InputSets:
    """The case's input sets, drawn as the rotation asks for them and shared by its implementations."""

    def __init__(self, make: Callable[[], tuple]):
        self.make, self.sets = make, []

    def first(self, n: int) -> list[tuple]:
        while len(self.sets) < n:
            self.sets.append(tuple(self.make()))
        return self.sets[:n]


def device_time(
    impl: Callable, first: tuple, inputs: InputSets, clock: HostClock, graph_calls: int | None, m: Measured
) -> None:
    """Fill ``m.device_ms``, ``graph_calls`` and ``rotation_mb`` from CUDA-graph replays of ``impl``.

    ``first``: the first input set, prepared for ``impl``; the others are drawn and prepared here.
    """
    for _ in range(2):  # warm-up outside the capture: JIT compilation, autotuning, library handles
        out = impl(*first)
    clock.sync()
    footprint = tensor_bytes(first, out)
    del out
    calls, copies = rotation(footprint, l2_bytes(), graph_calls)
    sets = [first] + [prepared(impl, s) for s in inputs.first(copies)[1:]]

    def all_calls():
        return [impl(*sets[j % copies]) for j in range(calls)]  # kept alive: each call writes memory of its own

    graph = clock.capture(all_calls)
    warm = clock.replay_ms(graph, 2)
    times = clock.replay_ms(graph, replay_count(statistics.median(warm)))
    m.device_ms = statistics.median(times) / calls
    m.graph_calls, m.rotation_mb = calls, copies * footprint / 1e6


def wall_time_ms(call: Callable[[], object], clock: HostClock, budget_ms: float = 100.0) -> float:
    """Median time of one call with its syncs (cases without inputs): ≥ 3 calls, about ``budget_ms``."""
    call()  # warm-up
    times: list[float] = []
    deadline = time.perf_counter() + budget_ms / 1e3
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
        times.append(clock.call_ms(call))
    return statistics.median(times)


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:200]


def measure(case: Case, name: str, inputs: InputSets | None, clock: HostClock, timed: bool) -> Measured:
    """One implementation of ``case``: its check (always), then its times when ``timed``.

    Whatever fails (a baseline that cannot run, a capture that is refused, memory) is
    recorded in ``unavailable``, never raised: one broken baseline must not hide the others.
    """
    impl, m = case.impls[name], Measured()
    try:
        with clock.setup():
            if inputs is None:
                if case.check is not None and checked(impl):
                    m.check = case.check(lambda _: impl(), ())  # also the first warm-up
                m.wall_ms = wall_time_ms(impl, clock) if timed else None
                return m
            if case.check is not None and checked(impl):
                m.check = case.check(bound(impl), inputs.first(1)[0])  # also the first warm-up
            if not timed:
                return m
            first = prepared(impl, inputs.first(1)[0])
            if clock.graphs:
                try:
                    device_time(impl, first, inputs, clock, case.graph_calls, m)
                except Exception as e:  # it runs eagerly but cannot be captured: host time only
                    m.unavailable = f"no device time (CUDA-graph capture failed): {first_line(e)}"
                    clock.sync()
            m.host_us = host_us(lambda: impl(*first), clock, m.device_ms)
    except Exception as e:
        m.unavailable = first_line(e)
        if has_gpu():
            torch.cuda.empty_cache()
    return m


def _row(case: Case, name: str, m: Measured, roofline: Callable[[Row], float | None]) -> Row:
    row = Row(
        case.op, case.shape, case.dtype, name, device_ms=m.device_ms, host_us=m.host_us, wall_ms=m.wall_ms,
        check=m.check, unavailable=m.unavailable, note=case.note, bytes=case.bytes, flops=case.flops,
        items=case.items, graph_calls=m.graph_calls, rotation_mb=m.rotation_mb,
        peak_memory_mb=case.peak_memory_mb.get(name),
    )  # fmt: skip
    seconds = row.ms * 1e-3 if row.ms else None
    if seconds:
        row.gbps = case.bytes / seconds / 1e9 if case.bytes else None
        row.tflops = case.flops / seconds / 1e12 if case.flops else None
        row.items_per_s = case.items / seconds if case.items else None
        row.pct_roofline = roofline(row)
    return row


def run_case(
    case: Case, bandwidth_gbps: float, peak_tflops: float | None = None, clock: HostClock | None = None
) -> list[Row]:
    """Rows of one case: every implementation checked; timed on a GPU, only ours on a CPU."""
    clock = clock or default_clock()

    def roofline(row: Row) -> float | None:
        if row.gbps is not None and bandwidth_gbps:
            return 100 * row.gbps / bandwidth_gbps
        if row.tflops is not None and peak_tflops:
            return 100 * row.tflops / peak_tflops
        return None

    inputs = InputSets(case.inputs) if case.inputs is not None else None
    names = list(case.impls)
    rows = []
    for i, name in enumerate(names):
        timed = clock.graphs or i == 0
        if not timed and (case.check is None or not checked(case.impls[name])):
            continue  # on a CPU: neither timed nor checked
        rows.append(_row(case, name, measure(case, name, inputs, clock, timed), roofline))
    for name, why in case.unavailable.items():
        rows.append(Row(case.op, case.shape, case.dtype, name, unavailable=why, note=case.note))
    ours = rows[0]
    if ours.ms:
        ours.speedup = {r.impl: r.ms / ours.ms for r in rows[1:] if r.ms}
    return rows


def copy_case(nbytes: int, device: str) -> Case:
    """A device-to-device copy of ``nbytes`` (read + write: 2·nbytes moved), timed like any case."""

    def inputs():
        return (torch.empty(nbytes, dtype=torch.uint8, device=device).random_(),)

    def check(call, inputs):
        return 0.0 if torch.equal(call(inputs), inputs[0]) else math.inf

    shape = f"{nbytes / 2**20:.0f} MiB"
    return Case("copy", shape, "u8", {"clone": torch.clone}, bytes=2 * nbytes, inputs=inputs, check=check)


def copy_bandwidth_gbps(clock: HostClock | None = None, nbytes: int | None = None) -> float:
    """Measured device copy bandwidth: (read + write bytes) / device time of a large copy (1 GiB; 32 MiB on a CPU)."""
    clock = clock or default_clock()
    gpu = isinstance(clock, CudaClock)
    (row,) = run_case(copy_case(nbytes or (2**30 if gpu else 2**25), "cuda" if gpu else "cpu"), 0.0, clock=clock)
    if row.gbps is None:
        raise RuntimeError(f"the copy-bandwidth measurement failed: {row.unavailable}")
    return row.gbps


# ----------------------------------------------------------------------------- output


def _num(value: float | None, fmt: str) -> str:
    return format(value, fmt) if value is not None else "–"


def _check_cell(row: Row) -> str:
    if row.check is None:
        return "–"
    return f"✗ {row.check:.2g}" if row.disagrees else f"{row.check:.2g}"


# (header, cell) of every table column, console and Markdown alike
COLUMNS: list[tuple[str, Callable[[Row], str]]] = [
    ("op", lambda r: r.op),
    ("shape", lambda r: r.shape),
    ("dtype", lambda r: r.dtype),
    ("impl", lambda r: r.impl),
    ("device ms", lambda r: _num(r.device_ms, ".4f")),
    ("host µs", lambda r: _num(r.host_us, ".1f")),
    ("wall ms", lambda r: _num(r.wall_ms, ".3f")),
    ("GB/s", lambda r: _num(r.gbps, ".1f")),
    ("TFLOP/s", lambda r: _num(r.tflops, ".1f")),
    ("images/s", lambda r: _num(r.items_per_s, ".2f")),
    ("peak MB", lambda r: _num(r.peak_memory_mb, ".0f")),
    ("% roofline", lambda r: _num(r.pct_roofline, ".1f")),
    ("check", _check_cell),
    ("speed-up", lambda r: ", ".join(f"{v:.2f}× vs {k}" for k, v in r.speedup.items())),
    ("note", lambda r: "; ".join(p for p in (r.note, r.unavailable) if p)),
]
# right-aligned
NUMERIC = {"device ms", "host µs", "wall ms", "GB/s", "TFLOP/s", "images/s", "peak MB", "% roofline", "check"}


def table(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    """(headers, cells) of ``rows``; a column after the first four that no row fills is left out."""
    cells = [[cell(r) for _, cell in COLUMNS] for r in rows]
    keep = [i for i in range(len(COLUMNS)) if i < 4 or any(row[i] not in ("", "–") for row in cells)]
    return [COLUMNS[i][0] for i in keep], [[row[i] for i in keep] for row in cells]


def format_table(rows: list[Row]) -> str:
    """The console table: columns padded to their widest cell, numbers right-aligned."""
    headers, cells = table(rows)
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]

    def line(values):
        padded = (v.rjust(w) if h in NUMERIC else v.ljust(w) for v, w, h in zip(values, widths, headers))
        return "  ".join(padded).rstrip()

    head = line(headers)
    return "\n".join([head, "-" * len(head)] + [line(row) for row in cells])


def timed_path() -> str:
    """What the numbers of this machine measure: the kernels, or only PyTorch's reference path."""
    if has_gpu():
        return "Triton kernels (CUDA): device time from CUDA-graph replay with rotated inputs, host time per eager call"
    return "CPU reference path only (no CUDA GPU): not kernel performance"


# name in the environment -> its distribution (FlashAttention-3 installs as flash_attn_3)
PACKAGES = {"triton": "triton", "xformers": "xformers", "diffusers": "diffusers", "flash_attn": "flash-attn",
            "flash_attn_3": "flash_attn_3"}  # fmt: skip


def environment() -> dict:
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(),
        "gpu": has_gpu(),
        "timed": timed_path(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "l2_bytes": l2_bytes() if has_gpu() else None,
        "rotation": f"≥ {ROTATION_L2} × L2 swept between reads of one input copy; "
        f"{MIN_GRAPH_CALLS}–{MAX_GRAPH_CALLS} calls per graph",
        "compile_options": {k: v for k, v in COMPILE_OPTIONS.items()},
    }
    for name, distribution in PACKAGES.items():
        try:  # the installed distribution's version: importing diffusers alone takes seconds
            env[name] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            env[name] = None
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
        data = {"benchmark": name, "environment": environment(), **extra, "rows": [asdict(r) for r in rows]}
        json.dump(data, f, indent=1)
    return path
