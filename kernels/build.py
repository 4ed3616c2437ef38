"""Compile every case of every op's launch table for its archs and write the library's data.

    python kernels/build.py --out DIR [--arch 80 --arch 90 --arch 100] [--match TEXT] [--jobs N]

Writes into DIR:

* ``fdk_cubins.bin``   every cubin, one after another;
* ``fdk_cubins.S``     embeds that file in the library (``.incbin``);
* ``fdk_tables.c``     the entries (kernel name, cubin offset and size, warps, shared memory,
                       CTAs per cluster, the parameter kinds) and the launch tables' rows
                       (key -> entry per arch), which the C dispatcher searches;
* ``fdk_tables.h``     one ``FDK_TABLE_<name>`` index per table and the kernel source hash.

Everything about a compiled kernel is read from what Triton produced — the kernel name and
resources from its metadata, the parameter list (including the scratch pointers newer Tritons
append) from the PTX entry — so the build follows whatever Triton is installed.  Compilation
goes through ``fastdiff.ops.launch_tables.compile_case``, the audit's one way: the two share
Triton's cache.  Run by CMake (``CMakeLists.txt``); needs no GPU.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

os.environ.pop("TRITON_INTERPRET", None)  # compile for real GPUs
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # every case sets FP fusion itself; silence the notice
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastdiff.audit import op_modules, table_cases  # noqa: E402
from fastdiff.ops.launch_tables import ARCHS, compile_case, source_hash  # noqa: E402

# PTX parameter type -> kind letter: p pointer, i 32-bit int, l 64-bit int, f fp32
_PTX_KINDS = {".u64": "l", ".s64": "l", ".b64": "l", ".u32": "i", ".s32": "i", ".b32": "i", ".f32": "f"}
_SIG_KINDS = {"i32": "i", "i64": "l", "fp32": "f"}

_JOBS: list = []  # (case, arch), filled before the workers fork


def ptx_params(ptx: str, kernel: str) -> str:
    """The kinds of the kernel's parameters, in order, from its PTX entry."""
    m = re.search(r"\.entry\s+" + re.escape(kernel) + r"\s*\((.*?)\)", ptx, re.S)
    if not m:
        raise RuntimeError(f"no .entry {kernel} in the PTX")
    kinds = []
    for line in m.group(1).split(","):
        line = line.strip()
        if not line:
            continue
        if ".ptr" in line:
            kinds.append("p")
            continue
        ty = next((t for t in _PTX_KINDS if f".param {t} " in line + " "), None)
        if ty is None:
            raise RuntimeError(f"unknown PTX parameter {line!r} of {kernel}")
        kinds.append(_PTX_KINDS[ty])
    return "".join(kinds)


def arg_kinds(case) -> str:
    """The kinds of the arguments a launch passes (the signature without constexprs)."""
    return "".join("p" if case.signature[n].startswith("*") else _SIG_KINDS[case.signature[n]]
                   for n in case.runtime_args())  # fmt: skip


def _compile(index: int) -> dict:
    case, arch = _JOBS[index]
    compiled = compile_case(case, arch)
    md = compiled.metadata
    params = ptx_params(compiled.asm["ptx"], md.name)
    args = arg_kinds(case)
    extra = params[len(args) :]
    if params[: len(args)] != args or any(k != "p" for k in extra):
        raise RuntimeError(f"{case.name} sm_{arch}: PTX parameters {params} do not start with the arguments {args}")
    for what in ("global_scratch_size", "profile_scratch_size"):
        if getattr(md, what, 0):
            raise RuntimeError(f"{case.name} sm_{arch}: needs {what}={getattr(md, what)} (the library passes none)")
    if getattr(md, "tensordesc_meta", None):
        raise RuntimeError(f"{case.name} sm_{arch}: tensor descriptors are not supported by the library")
    if getattr(md, "num_ctas", 1) != 1 or getattr(md, "launch_cooperative_grid", 0) or getattr(md, "launch_pdl", 0):
        raise RuntimeError(f"{case.name} sm_{arch}: clusters, cooperative or PDL launches are not supported")
    return {
        "case": case.name, "kernel": md.name, "arch": arch, "cubin": compiled.asm["cubin"],
        "shared": int(md.shared), "num_warps": int(md.num_warps), "args": args, "extra": len(extra),
        "constexprs": {n: v for n, v in case.constexprs.items() if type(v) is int and abs(v) < 2**31},
    }  # fmt: skip


def _c_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_outputs(out: str, tables, archs, entries: list[dict], index: dict) -> None:
    blob, offsets = bytearray(), []
    for e in entries:
        offsets.append(len(blob))
        blob += e["cubin"]
        blob += b"\0" * (-len(blob) % 16)
    with open(os.path.join(out, "fdk_cubins.bin"), "wb") as f:
        f.write(blob)
    with open(os.path.join(out, "fdk_cubins.S"), "w") as f:
        f.write(
            '    .section .rodata\n    .balign 16\n    .globl fdk_cubins\n    .hidden fdk_cubins\nfdk_cubins:\n'
            f'    .incbin "{os.path.join(os.path.abspath(out), "fdk_cubins.bin")}"\n'
            '    .section .note.GNU-stack,"",@progbits\n'
        )
    digest = source_hash()
    # integer constexprs (block sizes) the dispatcher needs for grids, by one index per name
    # (every table's, not only the compiled ones': the dispatcher's code does not depend on --match)
    cx_names = sorted({n for t in tables for c in t.cases() for n, v in c.constexprs.items()
                       if type(v) is int and abs(v) < 2**31})  # fmt: skip
    with open(os.path.join(out, "fdk_tables.h"), "w") as f:
        f.write("/* generated by kernels/build.py: do not edit */\n#pragma once\n")
        f.write(f'#define FDK_SOURCE_HASH "{digest}"\n#define FDK_NUM_ARCHS {len(archs)}\n')
        for i, table in enumerate(tables):
            f.write(f"#define FDK_TABLE_{table.name} {i}\n")
        f.write(f"#define FDK_NUM_TABLES {len(tables)}\n")
        for i, name in enumerate(cx_names):
            f.write(f"#define FDK_CX_{name} {i}\n")
        f.write(f"#define FDK_NUM_CX {max(1, len(cx_names))}\n")
    lines = ['/* generated by kernels/build.py: do not edit */', '#include "fdk_internal.h"', '',
             "extern const unsigned char fdk_cubins[];", ""]  # fmt: skip
    lines.append(f"const int fdk_archs[FDK_NUM_ARCHS] = {{{', '.join(map(str, archs))}}};")
    lines.append(f"const int fdk_num_entries = {len(entries)};")
    lines.append("const fdk_entry fdk_entries[] = {")
    for e, off in zip(entries, offsets):
        values = ", ".join(str(e["constexprs"].get(n, 0)) for n in cx_names) or "0"
        lines.append(
            f"    {{{_c_string(e['case'])}, {_c_string(e['kernel'])}, {e['arch']}, fdk_cubins + {off}, "
            f"{len(e['cubin'])}, {e['shared']}, {e['num_warps']}, {_c_string(e['args'])}, {e['extra']}, {{{values}}}}},"
        )
    if not entries:
        lines.append("    {0},")
    lines.append("};")
    table_defs = []
    for t, table in enumerate(tables):
        rows = list(table.entries.items())
        keys = [k for key, _ in rows for k in key] or [0]
        ids = [index.get((id(case), arch), -1) for _, case in rows for arch in archs] or [-1]
        lines.append(f"static const int keys_{t}[] = {{{', '.join(map(str, keys))}}};")
        lines.append(f"static const int ids_{t}[] = {{{', '.join(map(str, ids))}}};")
        table_defs.append(f"    {{{_c_string(table.name)}, {len(table.key_fields)}, {len(rows)}, keys_{t}, ids_{t}}},")
    lines.append("const fdk_table fdk_tables[FDK_NUM_TABLES] = {")
    lines += table_defs
    lines.append("};")
    with open(os.path.join(out, "fdk_tables.c"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the generated files")
    parser.add_argument("--arch", type=int, action="append", help=f"compute capability (default {ARCHS})")
    parser.add_argument("--match", default="",
                        help="only cases whose name contains one of these |-separated texts (quick builds)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compilations")
    args = parser.parse_args(argv)
    archs = tuple(args.arch or ARCHS)
    os.makedirs(args.out, exist_ok=True)
    modules = op_modules()
    tables = [table for mod in modules for table in mod.LAUNCH_TABLES]
    texts = args.match.split("|") if args.match else []
    for mod in modules:
        for case in table_cases(mod):
            # a jit_only case keeps its table rows with no entry: the dispatcher declines them
            if case.jit_only or (texts and not any(t in case.name for t in texts)):
                continue
            _JOBS.extend((case, arch) for arch in archs if arch in case.archs)
    if args.jobs > 1 and len(_JOBS) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            entries = list(pool.map(_compile, range(len(_JOBS)), chunksize=4))
    else:
        entries = [_compile(i) for i in range(len(_JOBS))]
    index = {(id(case), arch): i for i, (case, arch) in enumerate(_JOBS)}
    write_outputs(args.out, tables, archs, entries, index)
    print(f"kernels/build.py: {len(entries)} kernels for sm_{'/sm_'.join(map(str, archs))} in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
