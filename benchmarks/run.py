"""Run fastdiff's benchmark entries: ``python -m benchmarks.run [--only noising] [--quick]``.

Every entry is a module ``benchmarks/bench_<name>.py`` with
``cases(device, quick) -> list[Case]``.  The copy bandwidth is measured once and
used as the roofline of all memory-bound ops.  ``fastdiff bench`` runs the same
entries and adds a markdown report and plots (``fastdiff/bench.py``).
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import traceback
from dataclasses import dataclass, field

import benchmarks
from benchmarks import harness
from benchmarks.harness import Row, copy_bandwidth_gbps, device_name, format_table, has_gpu, run_cases, save


def entries() -> list[str]:
    return sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules(benchmarks.__path__) if m.name.startswith("bench_"))


@dataclass
class Results:
    """One run of a set of entries."""

    bandwidth_gbps: float  # measured copy bandwidth: the roofline of memory-bound ops
    rows: dict[str, list[Row]] = field(default_factory=dict)  # entry -> its rows
    paths: dict[str, str] = field(default_factory=dict)  # entry -> its JSON file
    failed: dict[str, str] = field(default_factory=dict)  # entry -> the error that stopped it


def run_entry(name: str, quick: bool, bandwidth: float, out_dir: str | None = None) -> tuple[list[Row], str]:
    """Time one entry, print its table, save its JSON; returns (rows, JSON path)."""
    mod = importlib.import_module(f"benchmarks.bench_{name}")
    device = "cuda" if has_gpu() else "cpu"
    rows = run_cases(mod.cases(device, quick), bandwidth, getattr(mod, "PEAK_TFLOPS", None))
    print(f"== {name}\n{format_table(rows)}\n")
    path = save(name, rows, {"copy_bandwidth_gbps": bandwidth}, out_dir)
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
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=entries(), help="run only these entries")
    parser.add_argument("--quick", action="store_true", help="the smallest shapes only")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results/<date>-<device>)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile baselines")
    args = parser.parse_args(argv)
    harness.COMPILE_BASELINES = not args.no_compile
    return 1 if run(args.only, args.quick, args.out).failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
