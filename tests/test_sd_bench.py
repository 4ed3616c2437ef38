"""The end_to_end benchmark's Stable Diffusion rows on the CPU, on their tiny random folder: every
implementation agrees with diffusers' pipeline through the check a GPU run records, the check has
power, and the harness checks the implementations it does not time."""
import importlib

import pytest

from benchmarks import harness

pytest.importorskip("diffusers")


pytestmark = pytest.mark.usefixtures("reference_ops")


def test_end_to_end_rows_agree_with_diffusers():
    cases = importlib.import_module("benchmarks.bench_end_to_end").cases("cpu", quick=True)
    assert [(c.op, c.items) for c in cases] == [("tiny_denoise", 2), ("tiny_generate", 1)]
    for case in cases:
        assert list(case.impls) == ["fastdiff", "diffusers-eager"]
        for name, impl in case.impls.items():
            assert case.check(lambda _: impl(), ()) <= 1, (case.op, name)
        ours = case.impls["fastdiff"]
        assert case.check(lambda _: ours() * 1.1, ()) > 1, case.op
    rows = harness.run_case(cases[0], 0.0)
    assert [(r.impl, r.wall_ms is not None) for r in rows] == [("fastdiff", True), ("diffusers-eager", False)]
    assert all(r.check <= 1 and r.peak_memory_mb is None for r in rows)  # memory is measured on a GPU only
