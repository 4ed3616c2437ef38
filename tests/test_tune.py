"""The tuning sweep (scripts/tune_kernels.py) without a GPU: its plan, its ranking and the table it writes,
with a fake timer and a fake audit.  Only a candidate measured faster (by the margin) at every shape of
its slot, and passed by the audit, replaces a default; the written table reads back into launch tables
whose cases the audit enumerates."""
import importlib
import importlib.util
import os
import sys
import types

import pytest

from fastdiff.audit import table_cases

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from fastdiff.ops import flash_attention as attn


@pytest.fixture(scope="module")
def tune():
    spec = importlib.util.spec_from_file_location("tune_kernels", os.path.join(ROOT, "scripts", "tune_kernels.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


SHAPES = [(16, 8, 4096, 4096, 40), (16, 8, 4096, 77, 40), (1, 16, 16384, 16384, 128), (2, 8, 1024, 1024, 80)]


def test_plan_covers_the_benchmark_shapes(tune):
    from benchmarks.bench_attention import shapes

    plan = tune.plan_sweep(90, 132, shapes(True, "cuda"), quick=True)
    roles = {(slot.key, slot.role) for slot in plan.slots}
    assert {(40, "fwd"), (40, "bwd_kv"), (40, "bwd_q"), (40, "fwd_short"), (40, "bwd_short"), (160, "fwd"),
            (128, "fwd"), (64, "bwd_q")} <= roles  # fmt: skip
    for slot, candidates in plan.slots.items():
        assert candidates[0] == getattr(attn.TABLES.configs16[90][slot.key], slot.role)  # the tiles in force first
        assert len(set(candidates)) == len(candidates) <= 2 + attn.QUICK_CANDIDATES
    if attn.HAS_TENSOR_DESCRIPTORS:  # the Hopper candidate is timed against today's forward at D = 64, 128
        assert plan.slots[tune.Slot("attention", 90, 128, "fwd")][1].tma


def test_only_a_faster_candidate_replaces_a_default(tune, tmp_path):
    plan = tune.plan_sweep(90, 132, SHAPES, quick=True)
    slot = {(s.key, s.role): s for s in plan.slots}
    winner = plan.slots[slot[128, "fwd"]][1]
    near = plan.slots[slot[40, "fwd"]][1]  # faster, but within the margin
    refused = plan.slots[slot[40, "fwd_short"]][1]  # faster, but the audit refuses it
    partial = plan.slots[slot[40, "bwd_short"]][1]  # faster where measured, but one timing failed its check
    fast = {(slot[128, "fwd"], winner): 0.5, (slot[40, "fwd"], near): 0.99, (slot[40, "fwd_short"], refused): 0.6,
            (slot[40, "bwd_short"], partial): 0.7}  # fmt: skip

    def timer(work):
        if (work.slot, work.candidate) == (slot[40, "bwd_short"], partial) and work.shape == SHAPES[1]:
            return None
        default = plan.slots[work.slot][0]
        return 1.0 if work.candidate == default else fast.get((work.slot, work.candidate), 1.1)

    def vet(s, cand):
        return "spills 64 bytes to local memory" if (s, cand) == (slot[40, "fwd_short"], refused) else ""

    times = tune.measure_all(plan, timer, budget_s=1e9, log=lambda *a: None)
    verdicts = {(v.slot.key, v.slot.role): v for v in tune.rank(plan, times, vet)}
    assert verdicts[128, "fwd"].best == winner and verdicts[128, "fwd"].best_ms == 0.5
    assert all(v.best is None for k, v in verdicts.items() if k != (128, "fwd")), verdicts
    assert "spills" in verdicts[40, "fwd_short"].why
    table = tune.tuned_table({}, list(verdicts.values()), "fake GPU", "2026-12-02")
    assert list(table["attention"]["sm90"]) == ["128"] and list(table["attention"]["sm90"]["128"]) == ["fwd"]
    assert table["attention"]["sm90"]["128"]["fwd"]["tiles"] == [winner.block_m, winner.block_n, winner.num_warps,
                                                                 winner.num_stages]  # fmt: skip

    # written, read back, and enumerated by the audit as the launch tables' forward case of d128 on sm_90
    path = tmp_path / "_tuned.py"
    path.write_text(tune.tuned_source(table))
    assert tune.load_tuned(str(path)) == table
    tables = attn.Tables(attn.configs_with(table["attention"]), attn.CONFIGS_FP32)
    for code in (1, 2):  # fp16, bf16
        picked = tables.fwd.pick((90, code, 128, 0))
        assert picked.constexprs["BLOCK_M"] == winner.block_m and picked.num_stages == winner.num_stages
        assert picked.constexprs["TMA"] == winner.tma and bool(picked.jit_only) == winner.tma
        assert picked in table_cases(types.SimpleNamespace(LAUNCH_TABLES=tables.tables))
    assert tables.fwd.pick((80, 1, 128, 0)) == attn.TABLES.fwd.pick((80, 1, 128, 0))  # sm_80 untouched


def test_nothing_measured_changes_nothing(tune):
    plan = tune.plan_sweep(90, 132, SHAPES[:2], quick=True)
    times = tune.measure_all(plan, lambda work: 0.1, budget_s=-1.0, log=lambda *a: None)
    verdicts = tune.rank(plan, times, lambda s, c: "")
    assert not times and all(v.best is None for v in verdicts)
    assert tune.tuned_table({"attention": {"sm80": {}}}, verdicts, "x", "y") == {"attention": {"sm80": {}}}


def test_compiling_stops_at_its_deadline(tune, monkeypatch):
    """Candidates' new cases are compiled ahead (the new tiles of every alternative, none of the tiles in
    force), but none is started after the deadline: the sweep's time stays within its budget."""
    plan = tune.plan_sweep(90, 132, SHAPES, quick=True)
    compiled = []
    monkeypatch.setattr(tune, "_compile_one", lambda i: compiled.append(tune._PRECOMPILE[i]) or "")
    in_force = {case.name for table in attn.TABLES.tables for case in table.cases()}
    assert tune.precompile(plan, 1, deadline=float("inf")) == len(compiled) == len(tune._PRECOMPILE) > 0
    assert all(case.name not in in_force and arch == 90 for case, arch in compiled)
    compiled.clear()
    assert tune.precompile(plan, 1, deadline=0.0) == 0 and not compiled


def test_dry_plan_runs_without_a_gpu(tune, tmp_path, capsys):
    assert tune.main(["--out", str(tmp_path), "--quick", "--dry-plan"]) == 0
    out = capsys.readouterr().out
    assert "attention sm_90 d128 fwd" in out and "group_norm: no tuning candidates" in out
