"""Run fastdiff's benchmark entries: ``python -m benchmarks.run [--only noising] [--quick]``.

Every entry is a module ``benchmarks/bench_<name>.py`` with
``cases(device, quick) -> list[Case]``.  The copy bandwidth is measured once and
used as the roofline of all memory-bound ops.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil

import benchmarks
from benchmarks.harness import copy_bandwidth_gbps, device_name, format_table, has_gpu, run_cases, save


def entries() -> list[str]:
    return sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules(benchmarks.__path__) if m.name.startswith("bench_"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=entries(), help="run only these entries")
    parser.add_argument("--quick", action="store_true", help="the smallest shapes only")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results/<date>-<device>)")
    args = parser.parse_args(argv)
    device = "cuda" if has_gpu() else "cpu"
    print(f"device: {device_name()}")
    if not has_gpu():
        print("no CUDA GPU here: timing the CPU reference path only; these figures say nothing about the kernels")
    bandwidth = copy_bandwidth_gbps()
    print(f"measured copy bandwidth: {bandwidth:.1f} GB/s\n")
    for name in args.only or entries():
        mod = importlib.import_module(f"benchmarks.bench_{name}")
        rows = run_cases(mod.cases(device, args.quick), bandwidth, getattr(mod, "PEAK_TFLOPS", None))
        print(f"== {name}\n{format_table(rows)}\n")
        path = save(name, rows, {"copy_bandwidth_gbps": bandwidth}, args.out)
        print(f"saved {path}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
