"""The benchmarks' own tests, on the CPU.

1. Agreement: every implementation of every kernel case (the ops' reference path, the eager
   chains, SDPA's CPU backend, eager math; torch.compile of the chains through Dynamo and AOT
   autograd) agrees with the case's reference, through the same check a GPU run records in
   every row; and the checks have power (a 10 % error, noise of zeros fail them).
2. The formulas: attention FLOPs against PyTorch's FLOP counter, bytes against the tensors.
3. The GPU-side machinery with a fake clock: CUDA-graph replay of rotated inputs, device and
   host columns, baselines that fail or cannot be captured, disagreements, the copy bandwidth.
4. ``fastdiff bench``: the JSON, the report and its plots, ``--report-only`` (also of results
   saved before device timing and of an entry a time limit stopped), ``scripts/gpu_check.sh``.

torch.compile's Inductor is left out here: its first graph costs about 90 s on this CPU (the
C++ toolchain), so the compiled chains are checked through Dynamo and AOT autograd
(``backend="aot_eager"``), and a GPU run checks Inductor's output once per case.
"""
import importlib
import json
import math
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

import fastdiff
from benchmarks import harness, run
from benchmarks.harness import Case, HostClock, Reference, SameBytesCopy, bound, run_case
from fastdiff.bench import main as bench_main

from conftest import kernel_device

REPO = Path(__file__).resolve().parent.parent
KERNEL_ENTRIES = ["attention", "group_norm", "noising", "sampler_step"]
# What each entry runs on a CPU (its other baselines need CUDA)
CPU_IMPLS = {
    "attention": {"fastdiff", "sdpa_flash", "eager_math"},
    "group_norm": {"fastdiff", "eager"},
    "noising": {"fastdiff", "eager"},
    "sampler_step": {"fastdiff", "eager"},
}


def entry(name: str):
    return importlib.import_module(f"benchmarks.bench_{name}")


@pytest.fixture(autouse=True)
def _reference_path():
    """The ops' PyTorch reference, as a CPU benchmark run uses them (not the interpreter)."""
    with fastdiff.use_backend("reference"):
        yield


def _label(case: Case, impl: str) -> str:
    return f"{case.op} {case.shape} {case.dtype} {impl}"


# ----------------------------------------------------------------------------- agreement


@pytest.mark.parametrize("name", KERNEL_ENTRIES)
def test_every_implementation_agrees_with_the_reference(name):
    disagreeing = []
    for case in entry(name).cases("cpu", quick=False):
        assert CPU_IMPLS[name] <= set(case.impls), _label(case, "")
        inputs = case.inputs()
        for impl_name, impl in case.impls.items():
            if harness.checked(impl):
                ratio = case.check(bound(impl), inputs)
                if not ratio <= 1:
                    disagreeing.append(f"{_label(case, impl_name)}: {ratio:.3g} × the tolerance")
    assert not disagreeing, disagreeing


def _off_by_ten_percent(out):
    """The output (or the first of several) 10 % too large."""
    return out * 1.1 if isinstance(out, torch.Tensor) else (out[0] * 1.1, *out[1:])


@pytest.mark.parametrize("name", KERNEL_ENTRIES)
def test_the_checks_catch_a_wrong_output(name):
    for case in entry(name).cases("cpu", quick=True):
        ours = bound(case.impls["fastdiff"])
        assert case.check(lambda inputs: _off_by_ten_percent(ours(inputs)), case.inputs()) > 1, _label(case, "")


def test_the_noising_check_catches_noise_of_zeros():
    """x_t = sqrt(ᾱ)·x0 with ε = 0 satisfies the formula; only the noise's law gives it away."""
    case = entry("noising").cases("cpu", quick=True)[0]

    def no_noise(inputs):
        x0, t, acp = inputs
        return acp[t].sqrt().view(-1, 1, 1, 1).to(x0.dtype) * x0, torch.zeros_like(x0)

    assert case.check(no_noise, case.inputs()) > 1


def test_torch_compile_baselines_agree(monkeypatch):
    """The compiled chains with their noise, inpainting blend and backward (one test: Dynamo warms up once)."""
    monkeypatch.setattr(harness, "COMPILE_BASELINES", True)
    monkeypatch.setattr(harness, "COMPILE_OPTIONS", {"backend": "aot_eager", "dynamic": False, "fullgraph": True})
    torch._dynamo.reset()
    chosen = [("group_norm", "group_norm_silu.fwd+bwd"), ("noising", "training_target[v]"), ("sampler_step", "inpaint")]
    for name, want in chosen:
        case = next(c for c in entry(name).cases("cpu", quick=True) if want in f"{c.op} {c.shape}")
        assert case.check(bound(case.impls["torch.compile"]), case.inputs()) <= 1, _label(case, "torch.compile")


def test_harness_compiles_baselines_with_max_autotune_and_without_its_own_cuda_graphs(monkeypatch):
    seen = {}
    monkeypatch.setattr(torch, "compile", lambda fn, **options: seen.update(options) or fn)
    harness.compiled(abs)
    assert seen == {"mode": "max-autotune-no-cudagraphs", "dynamic": False, "fullgraph": True}


def test_gpu_attention_baselines_that_cannot_run_get_a_row_saying_why():
    """The GPU's implementation list, built on this CPU (where FlashAttention and xformers cannot run)."""
    bench = entry("attention")
    impls, unavailable = bench.implementations(1, 16, 16384, 16384, gpu=True)
    assert list(impls)[:4] == ["fastdiff", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn"]
    optional = {"flash_attn3", "flash_attn2", "xformers"}
    assert optional <= set(impls) ^ set(unavailable) and all(unavailable.values())
    assert "eager_math" not in impls and "2^30" in unavailable["eager_math"]
    assert "eager_math" in bench.implementations(2, 8, 4096, 4096, gpu=True)[0]


@pytest.mark.parametrize("returns_lse", [False, True])
def test_flash_attention_layout_adapter(returns_lse):
    """FlashAttention takes (B, L, H, D) and FA3 may return (out, lse): the adapter gives SDPA's layout back."""
    import torch.nn.functional as F

    def blhd_sdpa(q, k, v):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        return (out, None) if returns_lse else out

    q, k, v = torch.randn(2, 3, 11, 40), torch.randn(2, 3, 7, 40), torch.randn(2, 3, 7, 40)
    out = entry("attention")._blhd(blhd_sdpa)(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))


def test_gpu_shapes_fill_the_chip_and_quick_is_a_subset():
    """What the GPU runs: SD-1.5 attention at batch 2 and 16, 16k tokens at D 64/128, ≥ 256 MB GroupNorm,
    1024² latents (128×128×4); --quick picks among the full shapes."""
    attention, group_norm, steps = entry("attention"), entry("group_norm"), entry("sampler_step")
    full = attention.shapes(quick=False)
    sd = {(B, L, D) for B in (2, 16) for L, D in attention.SD_LEVELS}
    assert {(B, L, D) for B, _, L, Lk, D in full if L == Lk and D in (40, 80, 160)} == sd
    assert {(B, L, D) for B, _, L, Lk, D in full if Lk == 77} == sd
    assert {D for _, _, L, _, D in full if L >= 16384} == {64, 128}
    for quick in (False, True):
        assert max(math.prod(s) * 2 for s in group_norm.shapes(quick)) >= 256 * 2**20  # bf16 bytes
        assert any(s[1:] == (4, 128, 128) for s in entry("noising").shapes(quick))
        assert any(s[1:] == (4, 128, 128) for s, _ in steps.shapes(quick))
    for name in ("attention", "group_norm", "noising"):
        assert set(entry(name).shapes(quick=True)) <= set(entry(name).shapes(quick=False)), name
    every_config = dict(steps.shapes(quick=False))
    assert all(set(configs) <= set(every_config[s]) for s, configs in steps.shapes(quick=True))


# ----------------------------------------------------------------------------- formulas


@pytest.mark.parametrize("Lq, Lk, D", [(13, 13, 40), (9, 77, 80)])
def test_attention_flops_match_pytorchs_flop_counter(Lq, Lk, D):
    """Forward: the two matmuls.  Backward: its four gradient matmuls plus q kᵀ recomputed."""
    from torch.utils.flop_counter import FlopCounterMode

    bench = entry("attention")
    B, H = 2, 3
    q = torch.randn(B, H, Lq, D, requires_grad=True)
    k, v = (torch.randn(B, H, Lk, D, requires_grad=True) for _ in range(2))
    with FlopCounterMode(display=False) as forward:
        out = bench.eager_math(q, k, v)
    with FlopCounterMode(display=False) as backward:
        out.backward(torch.randn_like(out))
    qk = 2 * B * H * Lq * Lk * D
    assert bench.attention_flops(B, H, Lq, Lk, D) == forward.get_total_flops()
    assert bench.attention_flops(B, H, Lq, Lk, D, backward=True) == backward.get_total_flops() + qk


def test_memory_bound_bytes_are_the_inputs_read_and_the_outputs_written():
    """Every big tensor read once and written once (γ, β, scale, shift, t and ᾱ are negligible and left out)."""
    nbytes = harness.tensor_bytes
    for case in entry("noising").cases("cpu", quick=False):
        x0, t, acp = case.inputs()
        assert case.bytes == nbytes(x0) + nbytes(case.impls["eager"](x0, t, acp)), _label(case, "")
    for case in entry("sampler_step").cases("cpu", quick=False):
        x, o_c, o_u, coeffs, seeds, known, mask = inputs = case.inputs()
        moved = nbytes(x, o_c, o_u, known, mask) + nbytes(case.impls["eager"](*inputs))
        if "rescale" in case.shape:
            moved += nbytes(o_c, o_u)  # the statistics pass reads them a second time
        assert case.bytes == moved, _label(case, "")
    for case in entry("group_norm").cases("cpu", quick=False):
        x, *params = case.inputs()[:5]
        y = entry("group_norm").eager_chain(x, *params)
        forward = nbytes(x) + nbytes(y)
        assert case.bytes == (forward if case.op.endswith(".fwd") else forward + 3 * nbytes(x)), _label(case, "")


# ----------------------------------------------------------------------------- the GPU path with a fake clock


class FakeClock(HostClock):
    """Stands in for CudaClock: "capture" runs the function once and keeps its outputs; the n-th
    captured graph replays in ``replays[n]`` ms (the last value repeats)."""

    graphs = True

    def __init__(self, *replays: float):
        self.times, self.capturing, self.captured, self.replays = list(replays or [2.0]), False, [], []

    def capture(self, fn):
        self.capturing = True
        try:
            self.captured.append(fn())
        finally:
            self.capturing = False
        return self.times.pop(0) if len(self.times) > 1 else self.times[0]  # the "graph": its replay time

    def replay_ms(self, graph, replays):
        self.replays.append(replays)
        return [graph] * replays


def test_rotation_sweeps_four_times_the_l2_between_reuses():
    l2 = 50 * 2**20
    assert harness.rotation(300 * 2**20, l2) == (harness.MIN_GRAPH_CALLS, 1)  # one call passes the cache
    assert harness.rotation(10 * 2**20, l2) == (20, 20)
    assert harness.rotation(1, l2) == (harness.MAX_GRAPH_CALLS, harness.MAX_GRAPH_CALLS)
    assert harness.rotation(10 * 2**20, l2, graph_calls=1) == (1, 1)
    calls, copies = harness.rotation(98 * 2**10, l2)  # an SD latent's q_sample at batch 1
    assert copies * 98 * 2**10 >= harness.ROTATION_L2 * l2 * 0.97


def test_device_time_replays_one_graph_of_calls_on_rotated_inputs(monkeypatch):
    monkeypatch.setattr(harness, "l2_bytes", lambda: 10_000)  # 4 × L2 = 40 kB
    clock, captured_inputs = FakeClock(2.0), []

    def double(x):
        if clock.capturing:
            captured_inputs.append(x.data_ptr())
        return 2 * x

    case = Case("double", "(1000,)", "fp32", {"ours": double}, bytes=8000.0,
                inputs=lambda: (torch.randn(1000),), check=Reference(lambda x: 2 * x, 1e-6))  # fmt: skip
    (row,) = run_case(case, bandwidth_gbps=100.0, clock=clock)
    # 4 kB read + 4 kB written per call: 5 copies sweep 40 kB; each call has its own input and output
    assert (row.graph_calls, row.rotation_mb) == (5, 5 * 8000 / 1e6)
    (outs,) = clock.captured
    assert len({o.data_ptr() for o in outs}) == 5 and len(set(captured_inputs)) == 5
    assert row.device_ms == pytest.approx(2.0 / 5)
    assert row.gbps == pytest.approx(8000 / 0.4e-3 / 1e9) and row.pct_roofline == pytest.approx(row.gbps)
    assert clock.replays == [2, harness.replay_count(2.0)] and harness.replay_count(2.0) == 25
    assert row.host_us > 0 and row.check < 1 and not row.unavailable


def test_a_case_reports_every_baseline_even_those_that_fail(monkeypatch):
    monkeypatch.setattr(harness, "l2_bytes", lambda: 10_000)
    clock = FakeClock(1.0, 3.0, 1.0, 1.0)  # captured in order: ours, slower, wrong, copy

    def broken(x):
        raise RuntimeError("No available kernel.\nmore text")

    def uncapturable(x):
        if clock.capturing:
            raise RuntimeError("operation not permitted when stream is capturing")
        return x + 1

    impls = {"ours": lambda x: x + 1, "slower": lambda x: x + 1, "broken": broken, "uncapturable": uncapturable,
             "wrong": lambda x: x + 2, "copy (same bytes)": SameBytesCopy(8000)}  # fmt: skip
    case = Case("inc", "(1000,)", "fp32", impls, bytes=8000.0, inputs=lambda: (torch.randn(1000),),
                check=Reference(lambda x: x + 1, 1e-6), unavailable={"flash_attn3": "not importable"})  # fmt: skip
    rows = {r.impl: r for r in run_case(case, 100.0, clock=clock)}
    assert list(rows) == [*impls, "flash_attn3"]
    assert rows["broken"].unavailable == "RuntimeError: No available kernel." and rows["broken"].ms is None
    uncaptured = rows["uncapturable"]
    assert uncaptured.unavailable.startswith("no device time (CUDA-graph capture failed): RuntimeError")
    assert uncaptured.device_ms is None and uncaptured.host_us > 0 and uncaptured.gbps is None
    assert rows["wrong"].disagrees and not rows["ours"].disagrees and rows["copy (same bytes)"].check is None
    assert rows["flash_attn3"].unavailable == "not importable"
    # speed-ups from device time, against every baseline that has one
    assert rows["ours"].speedup == pytest.approx({"slower": 3.0, "wrong": 1.0, "copy (same bytes)": 1.0})


def test_host_time_counts_the_whole_eager_call():
    clock = HostClock()
    assert harness.host_us(lambda: time.sleep(0.002), clock) >= 2000


def test_copy_bandwidth_is_device_timed_like_a_case():
    clock = FakeClock(4.0)
    gbps = harness.copy_bandwidth_gbps(clock, nbytes=2**20)
    calls, _ = harness.rotation(2 * 2**20, harness.l2_bytes())  # 1 MiB in, 1 MiB out
    assert clock.captured and len(clock.captured[0]) == calls
    assert gbps == pytest.approx(2 * 2**20 / (4.0 / calls * 1e-3) / 1e9)


def test_backward_times_the_backward_alone_on_a_prepared_forward():
    calls = []

    def forward(a, b):
        calls.append("forward")
        return a * b

    impl = harness.Backward(forward)
    a, b = torch.randn(5, requires_grad=True), torch.randn(5)
    grad = torch.randn(5)
    prepared = harness.prepared(impl, (a, b, grad))
    (da,) = impl(*prepared)
    (da_again,) = impl(*prepared)  # the retained graph replays
    assert calls == ["forward"] and torch.equal(da, grad * b) and torch.equal(da_again, da)


# ----------------------------------------------------------------------------- fastdiff bench and its report


def test_fastdiff_bench_writes_json_report_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("diffusers")
    assert bench_main(["--only", "diffusers_unet", "--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "diffusers_unet.json").read_text())
    assert data["environment"]["gpu"] == (kernel_device() == "cuda") and data["complete"]
    rows = {row["impl"]: row for row in data["rows"]}
    assert rows["patched"]["host_us"] > 0 and rows["patched"]["items_per_s"] > 0
    assert all(0 <= row["check"] <= 1 for row in rows.values())
    report = (tmp_path / "report.md").read_text()
    assert "## diffusers_unet" in report and "| host µs |" in report and "| check |" in report
    if kernel_device() != "cuda":
        assert "CPU reference path only" in report
    plots = list((tmp_path / "plots").glob("diffusers_unet-*.png"))
    assert {p.name for p in plots} == {"diffusers_unet-tiny_unet.png", "diffusers_unet-tiny_unet-host.png"}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)
    assert f"plots/{plots[0].name}" in report


def _fake_rows() -> list[harness.Row]:
    """Rows as a GPU run writes them (fake clock)."""
    case = Case("inc", "(1000,)", "bf16", {"fastdiff": lambda x: x + 1, "eager": lambda x: x + 1.5},
                bytes=8000.0, inputs=lambda: (torch.randn(1000),), check=Reference(lambda x: x + 1, 1e-6),
                unavailable={"xformers": "xformers is not importable (ModuleNotFoundError)"})  # fmt: skip
    return run_case(case, 100.0, clock=FakeClock(2.0))


def test_report_only_renders_device_and_host_columns_and_flags_disagreements(tmp_path):
    pytest.importorskip("matplotlib")
    harness.save("noising", _fake_rows(), {"copy_bandwidth_gbps": 100.0, "complete": True}, str(tmp_path))
    assert bench_main(["--report-only", "--out", str(tmp_path)]) == 1  # the eager row disagrees
    report = (tmp_path / "report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| op |"))
    assert [h.strip() for h in header.strip("|").split("|")] == [
        "op", "shape", "dtype", "impl", "device ms", "host µs", "GB/s", "% roofline", "check", "speed-up", "note",
    ]  # fmt: skip
    assert "✗" in report and "## Implementations that disagree with the reference" in report
    assert "xformers is not importable" in report
    assert (tmp_path / "plots" / "noising-inc-host.png").is_file()


def test_report_only_reads_results_saved_before_device_timing(tmp_path):
    old = REPO / "benchmarks/results/2026-11-27-nvidia-h200/sampler_step.json"
    shutil.copy(old, tmp_path / "sampler_step.json")
    assert bench_main(["--report-only", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "| wall ms |" in report and "| device ms |" not in report


def test_an_entry_stopped_midway_keeps_its_finished_cases(tmp_path, monkeypatch):
    calls = []

    def first_then_stop(case, bandwidth, peak=None):
        calls.append(case)
        if len(calls) > 1:
            raise KeyboardInterrupt  # a time limit kills the process; here an interrupt stops the entry
        return _fake_rows()[:1]

    monkeypatch.setattr(run, "run_case", first_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run.run_entry("noising", True, 100.0, str(tmp_path))
    data = json.loads((tmp_path / "noising.json").read_text())
    assert not data["complete"] and len(data["rows"]) == 1
    bench_main(["--report-only", "--out", str(tmp_path)])
    assert "## noising (partial" in (tmp_path / "report.md").read_text()


def test_fastdiff_bench_reports_a_failing_entry(tmp_path, monkeypatch):
    def broken(name, quick, bandwidth, out_dir=None):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(run, "run_entry", broken)
    assert bench_main(["--only", "noising", "--out", str(tmp_path)]) == 1
    assert "- `noising`: RuntimeError: out of memory" in (tmp_path / "report.md").read_text()


# ----------------------------------------------------------------------------- scripts/gpu_check.sh


def _gpu_check(tmp_path, *stages, **env):
    """Run gpu_check.sh with a ``python3`` that only logs its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stub = bin_dir / "python3"
    stub.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/python3.log\n')
    stub.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", **env}
    subprocess.run(["bash", str(REPO / "scripts/gpu_check.sh"), str(out), *stages], cwd=REPO, env=env,
                   check=True, capture_output=True, timeout=60)  # fmt: skip
    calls = (tmp_path / "python3.log").read_text().splitlines()
    return (out / "logs/summary.txt").read_text(), [c for c in calls if not c.startswith("-c ")]


def test_gpu_check_runs_the_sweep_hook_then_quick_benchmarks(tmp_path):
    sweep = tmp_path / "tune.py"
    sweep.write_text("")
    summary, calls = _gpu_check(tmp_path, "sweep", "memory", "attention+full+nocompile", GPU_CHECK_SWEEP=str(sweep))
    out = tmp_path / "out"
    assert calls[:3] == [
        f"{sweep} --quick --budget-s 60 --out {out}/res/sweep",
        f"-m benchmarks.run --out {out}/res --only noising --only sampler_step --only group_norm --quick",
        f"-m benchmarks.run --out {out}/res --only attention --no-compile",
    ]
    assert calls[3] == f"-m fastdiff bench --out {out}/res --report-only"
    assert "stage sweep: exit 0" in summary and "stage bench-memory: exit 0" in summary


def _fake_gpu_tools(tmp_path, compute_cap: str, cmake_exit: str = "") -> Path:
    """tmp_path/bin with an ``nvidia-smi`` that reports ``compute_cap`` and a ``cmake`` that logs its
    arguments to tmp_path/cmake.log (then runs ``cmake_exit``, a shell line giving its status)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\necho {compute_cap}\n")
    (bin_dir / "cmake").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/cmake.log\n{cmake_exit}\n')
    for tool in ("nvidia-smi", "cmake"):
        (bin_dir / tool).chmod(0o755)
    return bin_dir


@pytest.mark.parametrize("compute_cap, arch", [("9.0", "90"), ("8.6", "80"), ("10.0", "100")])
def test_gpu_check_builds_the_library_for_the_gpu_it_runs_on(tmp_path, compute_cap, arch):
    """The build stage configures for the launch tables' architecture of this GPU with this machine's
    python3; a failed build is noted and the stages after it still run (on Triton's JIT)."""
    # configure succeeds, the build fails: nothing is copied into the source tree
    bin_dir = _fake_gpu_tools(tmp_path, compute_cap, cmake_exit='[ "$1" = -S ]')
    summary, calls = _gpu_check(tmp_path, "build", "attention")
    configure, build = (tmp_path / "cmake.log").read_text().splitlines()
    assert f"-DFASTDIFF_PYTHON={bin_dir}/python3 -DFASTDIFF_ARCHS={arch}" in configure
    assert configure.startswith("-S . -B build/gpu -G Ninja") and build == "--build build/gpu"
    assert "stage build: exit 1" in summary and "stage bench-attention: exit 0" in summary
    assert calls[0] == f"-m benchmarks.run --out {tmp_path}/out/res --only attention --quick"


@pytest.mark.parametrize("compute_cap", ["12.0", "10.3"])
def test_gpu_check_builds_no_library_where_none_of_its_cubins_runs(tmp_path, compute_cap):
    """sm_100a cubins run on 10.0 alone: on 10.3 or a 12.x card the build stage is skipped, said so, and
    the stages after it run (on Triton's JIT)."""
    _fake_gpu_tools(tmp_path, compute_cap)
    summary, calls = _gpu_check(tmp_path, "build", "attention")
    assert not (tmp_path / "cmake.log").exists()
    cc = compute_cap.replace(".", "")
    assert f"stage build: skipped (no cubin of the library runs on compute capability {cc};" in summary
    assert "stage bench-attention: exit 0" in summary


def test_gpu_check_skips_a_missing_sweep_and_keeps_within_its_total(tmp_path):
    summary, calls = _gpu_check(
        tmp_path, "sweep", "attention", GPU_CHECK_SWEEP="scripts/absent.py", GPU_CHECK_TOTAL_S="30"
    )
    assert "stage sweep: skipped (scripts/absent.py does not exist yet)" in summary
    assert "stage bench-attention: skipped (the session's 30 s are spent)" in summary
    assert calls == [f"-m fastdiff bench --out {tmp_path}/out/res --report-only"]
