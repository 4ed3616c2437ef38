"""``fastdiff bench``: every kernel and end-to-end benchmark, one report.

Runs every entry of ``benchmarks/`` (``benchmarks/run.py``: kernels, the sampling loop, the
patched diffusers UNet), prints each table (op, shape, dtype, device ms, host µs, GB/s or
TFLOP/s or images/s, % of the measured roofline, the check against the reference, speed-up
of ours vs each baseline), and writes to ``benchmarks/results/<date>-<device>/``:

    <entry>.json         the rows and the environment (device, library versions), per entry
    report.md            every table in Markdown, with the plots
    plots/<op>.png       throughput (from device time) against problem size, one line per
                         (implementation, dtype, layout)
    plots/<op>-host.png  host µs per eager call against problem size

Without a CUDA GPU only the PyTorch reference path is timed, and the report says so in its
first lines.  The benchmarks live in the source tree (not in the installed package): run
this from a checkout.
"""
from __future__ import annotations

import os
import re
import sys
from collections import defaultdict


def _import_benchmarks():
    """The ``benchmarks`` package of the source checkout this fastdiff comes from."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isfile(os.path.join(root, "benchmarks", "run.py")) and root not in sys.path:
        sys.path.insert(0, root)
    try:
        from benchmarks import harness, run
    except ImportError as e:
        raise ImportError(f"the benchmarks/ folder of a fastdiff checkout is needed ({e})") from e
    return harness, run


# ----------------------------------------------------------------------------- plots


# (size field, its unit in the plot, throughput field, axis labels), in order of preference
_METRICS = (
    ("items", 1.0, "items_per_s", "images per call", "images/s"),
    ("flops", 1e9, "tflops", "GFLOP per call", "TFLOP/s"),
    ("bytes", 1e6, "gbps", "MB moved per call", "GB/s"),
)


def _metric(rows):
    """The first metric that every timed row of one op has, or None (then the op gets no plot)."""
    timed = [r for r in rows if r.ms]
    for metric in _METRICS:
        if timed and all(getattr(r, metric[0]) and getattr(r, metric[2]) is not None for r in timed):
            return metric
    return None


def _variant(shape: str) -> str:
    """What a shape label says besides the size ("(8, 4, 64, 64) ddim+cfg" -> "ddim+cfg"): one line per variant."""
    return re.sub(r"^\s*(\([^)]*\)|B=\d+)\s*", "", shape)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def _plot(plt, points_by_line: dict, x_label: str, y_label: str, title: str, path: str) -> str:
    """One log-x line plot, one line per (impl, dtype, note, variant); returns ``path``."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (impl, dtype, note, variant), points in sorted(points_by_line.items()):
        points.sort()
        label = " ".join(p for p in (impl, dtype, variant, note if len(note) < 24 else "") if p)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_rows(rows, out_dir: str, prefix: str) -> list[str]:
    """PNGs per op, ``<prefix>-<op>.png`` (throughput vs size) and ``<prefix>-<op>-host.png``
    (host µs vs size, where rows have it); returns the paths ([] without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    by_op = defaultdict(list)
    for r in rows:
        by_op[r.op].append(r)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for op, op_rows in by_op.items():
        metric = _metric(op_rows)
        if metric is None:
            continue
        x_field, x_unit, y_field, x_label, y_label = metric
        throughput, host = defaultdict(list), defaultdict(list)
        for r in op_rows:
            key = (r.impl, r.dtype, r.note, _variant(r.shape))
            if r.ms:
                throughput[key].append((getattr(r, x_field) / x_unit, getattr(r, y_field)))
            if r.host_us is not None:
                host[key].append((getattr(r, x_field) / x_unit, r.host_us))
        base = os.path.join(out_dir, f"{_slug(prefix)}-{_slug(op)}")
        paths.append(_plot(plt, throughput, x_label, y_label, op, f"{base}.png"))
        if host:
            paths.append(_plot(plt, host, x_label, "host µs per eager call", f"{op}: host", f"{base}-host.png"))
    return paths


# ----------------------------------------------------------------------------- report


def markdown_table(rows) -> str:
    """The rows as a Markdown table, with the console table's columns (``harness.COLUMNS``)."""
    harness, _ = _import_benchmarks()
    headers, cells = harness.table(rows)
    align = "|".join("---:" if h in harness.NUMERIC else "---" for h in headers)
    lines = ["| " + " | ".join(headers) + " |", f"|{align}|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def write_report(results, env: dict, out_dir: str, plots: dict[str, list[str]]) -> str:
    """report.md in ``out_dir``: the environment, then each entry's table and plots."""
    lines = [
        f"# fastdiff benchmarks — {env['date'][:10]}, {env['device']}",
        "",
        f"**Timed:** {env['timed']}.",
        "",
        f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, diffusers {env['diffusers']}, "
        f"xformers {env['xformers']}, Python {env['python']}.  Measured copy bandwidth "
        f"{results.bandwidth_gbps:.1f} GB/s (the roofline of memory-bound ops).",
        "",
        "*device ms*: GPU time per call, the median of CUDA-graph replays (CUDA events) of many calls "
        "on rotated inputs (each replay sweeps several times the L2 before reusing an input); "
        "throughput, % of roofline and speed-ups come from it.  *host µs*: host time per eager call.  "
        "*wall ms*: one end-to-end call with its syncs.  *check*: the worst error against the reference "
        "as a fraction of the tolerance (✗ above 1).  Speed-up: the first implementation of each case (ours) "
        "against each other one; > 1 means ours is faster; \"vs copy (same bytes)\" is against a copy "
        "moving the case's bytes, the floor of a memory-bound op.",
        "",
    ]
    for name, rows in results.rows.items():
        partial = " (partial: the run stopped before the end of this entry)" if name in results.partial else ""
        lines += [f"## {name}{partial}", "", markdown_table(rows), ""]
        lines += [f"![{os.path.basename(p)}](plots/{os.path.basename(p)})" for p in plots.get(name, [])]
        lines.append("")
    disagreements = results.disagreements()
    if disagreements:
        lines += ["## Implementations that disagree with the reference", ""]
        lines += [f"- {line}" for line in disagreements]
        lines.append("")
    if results.failed:
        lines += ["## Entries that failed", ""]
        lines += [f"- `{name}`: {err}" for name, err in results.failed.items()]
        lines.append("")
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def load_results(run, harness, out_dir: str):
    """(Results, environment) from the ``<entry>.json`` files in ``out_dir`` (runs made one entry at a time).

    A file that is not a result (not JSON, not an object, rows missing or of another form) is
    refused in one line naming it."""
    results, env = run.Results(bandwidth_gbps=0.0), None
    for name in run.entries():
        path = os.path.join(out_dir, f"{name}.json")
        if not os.path.isfile(path):
            continue
        data, rows = _read_result(harness, path)
        results.rows[name] = rows
        if not data.get("complete", True):
            results.partial.add(name)
        results.paths[name] = path
        results.bandwidth_gbps = data.get("copy_bandwidth_gbps", results.bandwidth_gbps)
        env = env or data["environment"]
    if env is None:
        raise FileNotFoundError(f"--report-only: no <entry>.json in --out {out_dir!r}")
    return results, env


def _read_result(harness, path: str) -> tuple[dict, list]:
    """One result file's JSON object and its rows (``harness.Row`` objects)."""
    import json

    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a benchmark result (not valid JSON: {e})") from None
    shaped = isinstance(data, dict) and isinstance(data.get("rows"), list) and isinstance(data.get("environment"), dict)
    if not shaped:
        raise ValueError(f"{path}: not a benchmark result (a JSON object with 'rows' and 'environment')")
    try:
        rows = [harness.row_from_json(row) for row in data["rows"]]
    except (TypeError, ValueError) as e:  # a row that is not an object, or with fields Row does not have
        raise ValueError(f"{path}: a row is not a benchmark row ({e})") from None
    return data, rows


# ----------------------------------------------------------------------------- command


def main(argv: list[str] | None = None) -> int:
    """``fastdiff bench [--only NAME ...] [--quick] [--no-compile] [--out DIR] [--report-only]``.

    Exit status 1 if an entry failed or an implementation disagrees with its reference.  Bad
    arguments and unreadable results raise (the command line reports them in one line, exit
    status 2)."""
    from fastdiff.checks import check_out_dir
    from fastdiff.cli import OneLineParser

    harness, run = _import_benchmarks()
    parser = OneLineParser(prog="fastdiff bench", description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=run.entries(), metavar="NAME",
                        help=f"run only this entry (repeatable): {', '.join(run.entries())}")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="the smallest shapes of each entry only")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results/<date>-<device>)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile baselines")
    parser.add_argument(
        "--report-only", action="store_true", help="time nothing: report.md and plots from the JSONs in --out"
    )
    args = parser.parse_args(argv)
    if args.no_compile:
        harness.COMPILE_BASELINES = False

    out_dir = args.out or harness.results_dir()
    check_out_dir(out_dir, "--out")  # before hours of timing: a file in the way, or a folder that refuses writes
    if args.report_only:
        results, env = load_results(run, harness, out_dir)
    else:
        results, env = run.run(args.only, args.quick, out_dir), harness.environment()
    plots = {name: plot_rows(rows, os.path.join(out_dir, "plots"), name) for name, rows in results.rows.items()}
    report = write_report(results, env, out_dir, plots)
    print(f"report: {report}")
    for name, err in results.failed.items():
        print(f"FAILED {name}: {err}")
    return 1 if results.failed or results.disagreements() else 0


if __name__ == "__main__":
    from fastdiff.cli import main as cli_main

    raise SystemExit(cli_main(["bench", *sys.argv[1:]]))
