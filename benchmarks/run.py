"""Run fastdiff's benchmark entries: ``python -m benchmarks.run [--only noising] [--quick]``.

Every entry is a module ``benchmarks/bench_<name>.py`` with
``cases(device, quick) -> Iterable[Case]``.  The copy bandwidth is measured once per run
(device-timed, like the cases) and used as the roofline of all memory-bound ops.  An
entry's JSON is rewritten after each case, so a run stopped by a time limit keeps the
rows it finished.  ``fastdiff bench`` runs the same entries and adds a markdown report and
plots (``fastdiff/bench.py``).

Without a GPU the ops run their PyTorch reference path (whatever ``FASTDIFF_BACKEND``
says): the CPU numbers describe PyTorch, and the checks compare it with the baselines.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import pkgutil
import time
import traceback
from dataclasses import dataclass, field

import benchmarks
from benchmarks import harness
from benchmarks.harness import Row, copy_bandwidth_gbps, device_name, format_table, has_gpu, run_case, save
from fastdiff.ops import use_backend


def entries() -> list[str]:
    modules = pkgutil.iter_modules(benchmarks.__path__)
    return sorted(m.name[len("bench_"):] for m in modules if m.name.startswith("bench_"))


@dataclass
class Results:
    """One run of a set of entries."""

    bandwidth_gbps: float  # measured copy bandwidth: the roofline of memory-bound ops
    rows: dict[str, list[Row]] = field(default_factory=dict)  # entry -> its rows
    paths: dict[str, str] = field(default_factory=dict)  # entry -> its JSON file
    failed: dict[str, str] = field(default_factory=dict)  # entry -> the error that stopped it
    partial: set[str] = field(default_factory=set)  # entries whose JSON says the run stopped before the end

    def disagreements(self) -> list[str]:
        """One line per row whose check failed: an implementation that does not compute the op."""
        return [
            f"{name}: {r.op} {r.shape} {r.dtype} {r.impl}: error {r.check:.3g} × the tolerance"
            for name, rows in self.rows.items() for r in rows if r.disagrees
        ]  # fmt: skip


def run_entry(name: str, quick: bool, bandwidth: float, out_dir: str | None = None) -> tuple[list[Row], str]:
    """Time one entry, print its table, save its JSON (after every case); returns (rows, JSON path)."""
    mod = importlib.import_module(f"benchmarks.bench_{name}")
    device = "cuda" if has_gpu() else "cpu"
    extra = {"copy_bandwidth_gbps": bandwidth, "quick": quick}
    rows: list[Row] = []
    save(name, rows, {**extra, "complete": False}, out_dir)
    backend = contextlib.nullcontext() if has_gpu() else use_backend("reference")
    with backend:
        for case in mod.cases(device, quick):
            start = time.perf_counter()
            rows += run_case(case, bandwidth, getattr(mod, "PEAK_TFLOPS", None))
            seconds = time.perf_counter() - start
            print(f"  {case.op} {case.shape} {case.dtype}: {len(case.impls)} implementations, {seconds:.1f} s")
            save(name, rows, {**extra, "complete": False}, out_dir)
    print(f"== {name}\n{format_table(rows)}\n")
    path = save(name, rows, {**extra, "complete": True}, out_dir)
    print(f"saved {path}\n")
    return rows, path


def run(names: list[str] | None = None, quick: bool = False, out_dir: str | None = None) -> Results:
    """Run ``names`` (default: every entry).  An entry that raises is reported and the others still run."""
    print(f"device: {device_name()}")
    if not has_gpu():
        print("no CUDA GPU here: timing the CPU reference path only; these figures say nothing about the kernels")
    results = Results(copy_bandwidth_gbps())
    print(f"measured copy bandwidth: {results.bandwidth_gbps:.1f} GB/s\n")
    for name in names or entries():
        try:
            results.rows[name], results.paths[name] = run_entry(name, quick, results.bandwidth_gbps, out_dir)
        except Exception as e:  # one broken entry must not hide the others' numbers
            traceback.print_exc()
            results.failed[name] = f"{type(e).__name__}: {e}"
            print(f"== {name} FAILED: {results.failed[name]}\n")
    for line in results.disagreements():
        print(f"DISAGREES {line}")
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=entries(), help="run only these entries")
    parser.add_argument("--quick", action="store_true", help="a few shapes per entry (a GPU session's budget)")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results/<date>-<device>)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile baselines")
    args = parser.parse_args(argv)
    if args.no_compile:
        harness.COMPILE_BASELINES = False
    results = run(args.only, args.quick, args.out)
    return 1 if results.failed or results.disagreements() else 0


if __name__ == "__main__":
    raise SystemExit(main())
