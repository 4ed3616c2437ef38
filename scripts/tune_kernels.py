"""The kernels' tuning sweep: time each kernel's candidate configurations at the benchmark shapes on a
GPU and write the winners into the launch tables, per arch (``fastdiff/ops/_tuned.py``).

    python scripts/tune_kernels.py --out DIR [--quick] [--apply] [--budget-s SECONDS]

A *slot* is one default of one launch table that a candidate may replace: (op, arch, head dim,
role), e.g. the forward tiles of bf16/fp16 head dim 128 on sm_90.  The sweep

1. plans: runs the benchmark's shapes (``benchmarks/bench_attention.py``, ``--quick``: its quick
   set) through the launcher's own plans to find the slots each shape uses, forward and backward,
   and asks the op for each slot's candidates (``flash_attention.tuning_candidates``: the tiles in force
   first, so nothing regresses blind);
2. measures: every candidate at every shape of its slot, in bf16, as the device time of the whole
   forward or backward with only that slot replaced (CUDA-graph replay with rotated inputs,
   ``benchmarks.harness.device_time``), after checking its output against the tiles in force.
   Candidates are compiled first, in parallel, into Triton's cache;
3. ranks: per slot, the candidate with the least total time over the slot's shapes; it replaces
   the default only if every shape of the slot was measured, it is at least ``MARGIN`` faster
   than the tiles in force, and the audit passes its cases (``fastdiff.audit``: compiles for
   that arch, no spills, HGMMA on sm_90, tcgen05 MMA on sm_100);
4. writes ``DIR/sweep.json`` (every timing), ``DIR/_tuned.py`` (the proposed table) and, with
   ``--apply``, ``fastdiff/ops/_tuned.py``, which the op files read: commit it, and rebuild the
   library (``pip install -e .``), whose tables then carry the winners.

The tuned table applies to both 16-bit dtypes (the kernels are the same apart from the dtype).
``--budget-s`` (default 90) bounds the run: compiling stops starting new cases at half of it,
measuring stops when it is spent (each overshoots by at most one compilation or one timing), and
what was measured is ranked and written; a slot with an unmeasured shape keeps its default.  A run
is thus bounded by the budget plus start-up and the audit of the winners: within five minutes by
design at the default (not yet timed on a GPU).  Ops without candidates (the memory-bound
ones declare one configuration per key) are listed as such.  Needs a CUDA GPU except for
``--dry-plan``, which prints the plan.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import importlib
import json
import os
import pprint
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TUNED_FILE = os.path.join(ROOT, "fastdiff", "ops", "_tuned.py")
MARGIN = 0.03  # a candidate must be this much faster than the tiles in force (run-to-run noise is ~1 %)
CHECK_TOLERANCE = 2e-2  # bf16: a candidate's output against the tiles in force (accumulation order only)
OPS_WITHOUT_CANDIDATES = ("noising", "group_norm", "fused_step")


@dataclass(frozen=True)
class Slot:
    op: str
    arch: int
    key: int  # head dim
    role: str


@dataclass(frozen=True)
class Work:
    """One timing: a candidate of a slot at one shape and direction."""

    slot: Slot
    candidate: object  # the op's Tiles
    shape: tuple[int, ...]
    direction: str  # "fwd" | "bwd"


@dataclass
class Plan:
    slots: dict[Slot, list] = field(default_factory=dict)  # slot -> candidates, the tiles in force first
    shapes: dict[Slot, list] = field(default_factory=dict)  # slot -> [(shape, direction)]

    def work(self) -> list[Work]:
        return [Work(slot, cand, shape, direction) for slot, cands in self.slots.items() for cand in cands
                for shape, direction in self.shapes[slot]]  # fmt: skip


def attention_module():
    return importlib.import_module("fastdiff.ops.flash_attention")


@functools.lru_cache(maxsize=None)
def candidate_tables(slot: Slot, tiles):
    """The attention's launch tables with ``tiles`` in ``slot``, built once per candidate: its timings at
    every shape, its compilation ahead and its audit read the same tables."""
    return attention_module().TABLES.with_tiles(slot.arch, slot.key, slot.role, tiles)


@functools.lru_cache(maxsize=None)
def _names_in_force() -> frozenset[str]:
    return frozenset(case.name for table in attention_module().TABLES.tables for case in table.cases())


def new_cases(slot: Slot, tiles) -> list:
    """The cases a candidate adds to the tables in force, for the slot's arch: what is compiled ahead for it,
    and what the audit must pass."""
    cases = {case.name: case for table in candidate_tables(slot, tiles).tables for case in table.cases()
             if case.name not in _names_in_force() and slot.arch in case.archs}  # fmt: skip
    return list(cases.values())


def plan_sweep(arch: int, num_sms: int, shapes: list[tuple[int, ...]], quick: bool) -> Plan:
    """The attention slots the shapes use, their candidates and shapes (no GPU needed)."""
    attn = attention_module()
    plan = Plan()
    for shape in shapes:
        B, H, Lq, Lk, D = shape
        for direction, role in attn.tuning_roles(arch, num_sms, B, H, Lq, Lk, D):
            slot = Slot("attention", arch, D, role)
            if slot not in plan.slots:
                candidates = attn.tuning_candidates(arch, D, role, quick)
                if not candidates:
                    continue
                plan.slots[slot], plan.shapes[slot] = candidates, []
            plan.shapes[slot].append((shape, direction))
    return plan


def measure_all(plan: Plan, timer: Callable[[Work], float | None], budget_s: float, log=print) -> dict[Work, float]:
    """ms of every work item the budget allows (``timer`` returns None for a candidate that failed its check)."""
    start, times = time.monotonic(), {}
    for work in plan.work():
        if time.monotonic() - start > budget_s:
            log(f"budget of {budget_s:.0f} s spent: the rest is not measured")
            break
        ms = timer(work)
        if ms is not None:
            times[work] = ms
    return times


@dataclass
class Verdict:
    slot: Slot
    default: object
    default_ms: float | None
    best: object | None = None  # the replacement, or None: the default stays
    best_ms: float | None = None
    why: str = ""


def rank(plan: Plan, times: dict[Work, float], vet: Callable[[Slot, object], str]) -> list[Verdict]:
    """Per slot: the fastest fully measured candidate replaces the default only when it is `MARGIN` faster
    and ``vet`` (the audit) finds nothing wrong with it (``vet`` returns "" or the problem)."""
    verdicts = []
    for slot, candidates in plan.slots.items():
        totals = {}
        for cand in candidates:
            parts = [times.get(Work(slot, cand, shape, direction)) for shape, direction in plan.shapes[slot]]
            if all(p is not None for p in parts):
                totals[cand] = sum(parts)
        default = candidates[0]
        verdict = Verdict(slot, default, totals.get(default))
        if verdict.default_ms is None:
            verdict.why = "the tiles in force were not measured at every shape of the slot"
            verdicts.append(verdict)
            continue
        verdict.why = "no candidate measured faster"
        for cand, ms in sorted(((c, ms) for c, ms in totals.items() if c != default), key=lambda c_ms: c_ms[1]):
            if ms > verdict.default_ms * (1 - MARGIN):
                break
            problem = vet(slot, cand)
            if problem:
                verdict.why = f"{cand}: {problem}"
                continue
            verdict.best, verdict.best_ms, verdict.why = cand, ms, f"{verdict.default_ms / ms:.3f}x faster"
            break
        verdicts.append(verdict)
    return verdicts


def tuned_table(previous: dict, verdicts: list[Verdict], device: str, date: str) -> dict:
    """``previous`` (the TUNED in force) with every winner written in; a slot whose default stays keeps
    whatever entry it had (the default it was measured against is what is in force)."""
    attn = attention_module()
    table = json.loads(json.dumps(previous))  # a deep copy of plain data
    for v in verdicts:
        if v.best is None:
            continue
        entry = attn.tuned_entry(v.best) | {"ms": round(v.best_ms, 5), "default_ms": round(v.default_ms, 5),
                                            "device": device, "date": date}  # fmt: skip
        table.setdefault(v.slot.op, {}).setdefault(f"sm{v.slot.arch}", {}).setdefault(str(v.slot.key), {})[
            v.slot.role] = entry
    return table


def tuned_source(table: dict) -> str:
    """The text of ``_tuned.py`` holding ``table``."""
    with open(TUNED_FILE) as f:
        text = f.read()
    header = text[: text.index("\nTUNED: dict") + 1]
    return header + "TUNED: dict = " + pprint.pformat(table, width=110, sort_dicts=True) + "\n"


def load_tuned(path: str) -> dict:
    """The TUNED of a ``_tuned.py`` file."""
    scope: dict = {}
    with open(path) as f:
        exec(compile(f.read(), path, "exec"), scope)
    return scope["TUNED"]


# ----------------------------------------------------------------------------- on a GPU


def audit_vet(slot: Slot, tiles) -> str:
    """The audit's verdict on every case the candidate adds to the tables ("" when all pass)."""
    from fastdiff.audit import audit_case

    for case in new_cases(slot, tiles):
        row = audit_case(case, slot.arch)
        if not row.ok:
            return f"{case.name}: {row.error}"
    return ""


class GpuTimer:
    """Device time of one forward or backward with one slot replaced; None when the output disagrees."""

    def __init__(self, log=print):
        import torch

        from benchmarks import harness

        self.torch, self.harness, self.log = torch, harness, log
        self.clock = harness.CudaClock()
        self.inputs: dict = {}
        self.reference: dict = {}

    def _make(self, shape, direction):
        torch, attn = self.torch, attention_module()
        B, H, Lq, Lk, D = shape
        scale = D**-0.5

        def make():
            q = torch.randn(B, H, Lq, D, device="cuda", dtype=torch.bfloat16)
            k, v = (torch.randn(B, H, Lk, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            if direction == "fwd":
                return q, k, v
            o, lse = attn.forward_with(attn.TABLES, q, k, v, scale)
            return torch.randn_like(q), q, k, v, o, lse

        return make

    def __call__(self, work: Work) -> float | None:
        harness, attn = self.harness, attention_module()
        slot, shape, direction = work.slot, work.shape, work.direction
        scale = shape[-1] ** -0.5
        tables = candidate_tables(slot, work.candidate)
        run = attn.forward_with if direction == "fwd" else attn.backward_with

        def impl(*inputs):
            return run(tables, *inputs, scale)

        with self.clock.setup():
            sets = self.inputs.setdefault((shape, direction), harness.InputSets(self._make(shape, direction)))
            first = sets.first(1)[0]
            out = impl(*first)
            ref = self.reference.setdefault((shape, direction), out)
            err = max(harness.relative_error(a, b) for a, b in zip(out, ref) if a.is_floating_point())
            if not err <= CHECK_TOLERANCE:
                self.log(f"  {slot.role} d{slot.key} {work.candidate}: output off by {err:.2e}, left out")
                return None
            m = harness.Measured()
            harness.device_time(impl, first, sets, self.clock, None, m)
        self.log(f"  {slot.role:12} d{slot.key:<4} {str(shape):28} {direction} {_tiles_text(work.candidate):22} "
                 f"{m.device_ms:9.4f} ms")  # fmt: skip
        return m.device_ms


def _tiles_text(t) -> str:
    return f"{t.block_m}x{t.block_n}w{t.num_warps}s{t.num_stages}{'+tma' if t.tma else ''}"


_PRECOMPILE: list = []


def _compile_one(i: int) -> str:
    from fastdiff.ops.launch_tables import compile_case

    case, arch = _PRECOMPILE[i]
    try:
        compile_case(case, arch)
        return ""
    except Exception as exc:  # the timing will fail the same way and say so
        return f"{case.name}: {type(exc).__name__}"


def precompile(plan: Plan, jobs: int, deadline: float) -> int:
    """Every candidate's new cases compiled in parallel into Triton's cache, which the JIT then reads; none
    is started after ``deadline`` (``time.monotonic()``: the JIT compiles the rest when they are timed).
    Returns how many were compiled."""
    _PRECOMPILE.clear()
    seen = set()  # a case several candidates add is compiled once
    for slot, candidates in plan.slots.items():
        for cand in candidates[1:]:
            for case in new_cases(slot, cand):
                if case.name not in seen:
                    seen.add(case.name)
                    _PRECOMPILE.append((case, slot.arch))
    if jobs > 1 and len(_PRECOMPILE) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, wait

        pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork"))
        futures = [pool.submit(_compile_one, i) for i in range(len(_PRECOMPILE))]
        wait(futures, timeout=max(0.0, deadline - time.monotonic()))
        pool.shutdown(wait=True, cancel_futures=True)  # the ones running finish; the rest never start
        return sum(1 for f in futures if f.done() and not f.cancelled())
    done = 0
    for i in range(len(_PRECOMPILE)):
        if time.monotonic() > deadline:
            break
        _compile_one(i)
        done += 1
    return done


# ----------------------------------------------------------------------------- main


def write_outputs(out: str, plan: Plan, times: dict, verdicts: list[Verdict], table: dict, meta: dict) -> str:
    os.makedirs(out, exist_ok=True)
    rows = [{"op": w.slot.op, "arch": w.slot.arch, "head_dim": w.slot.key, "role": w.slot.role,
             "tiles": _tiles_text(w.candidate), "shape": list(w.shape), "direction": w.direction,
             "device_ms": times.get(w)} for w in plan.work()]  # fmt: skip
    summary = [{"op": v.slot.op, "arch": v.slot.arch, "head_dim": v.slot.key, "role": v.slot.role,
                "default": _tiles_text(v.default), "default_ms": v.default_ms,
                "winner": _tiles_text(v.best) if v.best else None, "winner_ms": v.best_ms, "why": v.why}
               for v in verdicts]  # fmt: skip
    with open(os.path.join(out, "sweep.json"), "w") as f:
        json.dump(meta | {"timings": rows, "verdicts": summary}, f, indent=1)
    path = os.path.join(out, "_tuned.py")
    with open(path, "w") as f:
        f.write(tuned_source(table))
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for sweep.json and the proposed _tuned.py")
    parser.add_argument("--quick", action="store_true", help="the benchmark's quick shapes, fewer candidates")
    parser.add_argument("--apply", action="store_true", help="also write fastdiff/ops/_tuned.py")
    parser.add_argument("--budget-s", type=float, default=90.0, help="stop measuring after this many seconds")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compilations")
    parser.add_argument("--dry-plan", action="store_true", help="print the slots and candidates, measure nothing")
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    os.environ.setdefault("FASTDIFF_BACKEND", "auto")
    import torch

    from benchmarks.bench_attention import shapes
    from fastdiff.ops import launch_tables

    # the current GPU's tables and SM count, as the launchers read them; without a GPU the plan is an H100's
    device = torch.cuda.current_device() if torch.cuda.is_available() else None
    arch, num_sms = launch_tables.device_arch(device), launch_tables.device_sms(device)
    plan = plan_sweep(arch, num_sms, shapes(args.quick, "cuda"), args.quick)
    for op in OPS_WITHOUT_CANDIDATES:
        print(f"{op}: no tuning candidates declared (one configuration per key)")
    for slot, candidates in plan.slots.items():
        print(f"attention sm_{arch} d{slot.key} {slot.role}: {len(candidates)} candidates, "
              f"{len(plan.shapes[slot])} shape(s)")  # fmt: skip
    if args.dry_plan:
        return 0
    if device is None:
        print("the sweep measures on a CUDA GPU; none here (--dry-plan prints the plan)")
        return 2
    name = torch.cuda.get_device_name(device)
    # half the budget at most for compiling, so that the sweep ends within about --budget-s
    compiled = precompile(plan, args.jobs, t0 + args.budget_s / 2)
    print(f"compiled {compiled} of the candidates' {len(_PRECOMPILE)} new cases in {time.monotonic() - t0:.0f} s")
    times = measure_all(plan, GpuTimer(), args.budget_s - (time.monotonic() - t0))
    verdicts = rank(plan, times, audit_vet)
    previous = load_tuned(TUNED_FILE)
    table = tuned_table(previous, verdicts, name, datetime.date.today().isoformat())
    import triton

    meta = {"device": name, "arch": arch, "num_sms": num_sms, "quick": args.quick,
            "torch": torch.__version__, "triton": triton.__version__, "seconds": round(time.monotonic() - t0, 1)}
    path = write_outputs(args.out, plan, times, verdicts, table, meta)
    for v in verdicts:
        print(f"{v.slot.role:12} d{v.slot.key:<4} {_tiles_text(v.default):22} -> "
              f"{_tiles_text(v.best) if v.best else 'kept':22} {v.why}")  # fmt: skip
    if args.apply:
        with open(TUNED_FILE, "w") as f:
            f.write(tuned_source(table))
        print(f"wrote {TUNED_FILE}: commit it, then `pip install -e .` rebuilds the library with it")
    else:
        print(f"proposed table in {path} (--apply writes it into fastdiff/ops/_tuned.py)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
