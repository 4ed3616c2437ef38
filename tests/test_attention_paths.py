"""The attention launcher's paths: long keys on large and small grids, short keys, TMA; head dims in two blocks.

Each path is checked against float64 attention, forward and every gradient, with the tolerance
policy of test_attention.py (twice PyTorch's own low-precision error plus a floor per dtype), on
odd shapes with NaN-poisoned outputs; and the launcher is shown to pick it for the shapes it is
for (`record_launches`).  The interpreter plans for an H100's 132 SMs; ``sms`` fixtures replace
that count where a test needs the large-grid tiles (1 SM: every grid is "large") or short-path
programs that step through several query blocks.
"""
import dataclasses

import pytest
import torch

from fastdiff.ops.launch_tables import record_launches
from tests.test_attention import _check_against_float64, _qkv

from fastdiff.ops import flash_attention as attn_mod


@pytest.fixture
def sms(monkeypatch):
    """Plan the grids for this many SMs (the plans are cached per SM count, so nothing stale leaks)."""

    def set_sms(n: int) -> None:
        monkeypatch.setattr(attn_mod, "device_sms", lambda device_index: n)

    return set_sms


def _launches(fn, *args, **kwargs) -> list:
    """(case, grid) of each launch ``fn`` makes, nothing run."""
    with record_launches() as log:
        fn(*args, **kwargs)
    return [(case, grid) for case, grid, _ in log]


def _paths(B, H, Lq, Lk, D, dtype, tables=None) -> tuple[list, list]:
    """The forward's and the backward's launches for one shape."""
    q, k, v = (torch.empty(B, H, L, D, dtype=dtype) for L in (Lq, Lk, Lk))
    tables = tables or attn_mod.TABLES
    fwd = _launches(attn_mod.forward_with, tables, q, k, v, 0.3)
    lse = torch.empty(B, H, Lq)
    bwd = _launches(attn_mod.backward_with, tables, torch.empty_like(q), q, k, v, attn_mod._empty_out(q), lse, 0.3)
    return fwd, bwd


# ----------------------------------------------------------------------------- numerics of each path


@pytest.mark.parametrize("D", attn_mod.HEAD_DIMS)
def test_long_keys_large_grid_every_head_dim(D, sms, device, poisoned_alloc):
    """The default fp16/bf16 tiles (every grid is large on 1 SM), Lk past the short block (fp32's long
    path: test_attention.py's test_fp32_configs)."""
    sms(1)
    dtype = torch.float16 if attn_mod.HEAD_DIMS.index(D) % 2 else torch.bfloat16
    _check_against_float64(*_qkv(1, 3, 37, 131, D, dtype, device), scale=0.2)


@pytest.mark.parametrize("D,dtype", [(40, torch.float16), (80, torch.bfloat16)])
def test_long_keys_small_grid(D, dtype, device, poisoned_alloc):
    """64-row forward and dQ tiles on a grid smaller than the 132 SMs."""
    fwd, bwd = _paths(3, 1, 70, 131, D, dtype)
    assert fwd[0][0].constexprs["BLOCK_M"] == 64 and fwd[0][1] == (3, 2)
    assert bwd[-1][0].kernel_name == "_attn_bwd_dq_kernel" and bwd[-1][0].constexprs["BLOCK_M"] == 64
    _check_against_float64(*_qkv(3, 1, 70, 131, D, dtype, device))


FP32_SHORT = [D for D in attn_mod.HEAD_DIMS if attn_mod.CONFIGS_FP32[D].fwd_short is not None]


@pytest.mark.parametrize("D", FP32_SHORT)
def test_short_keys_fp32_every_head_dim(D, sms, device, poisoned_alloc):
    """fp32's short path (Lk ≤ 32): one program per query block (132 SMs) or a few stepping through all (1 SM)."""
    i = FP32_SHORT.index(D)
    sms(1 if i % 2 else 132)
    fwd, bwd = _paths(1, 3, 29, 27, D, torch.float32)
    assert fwd[0][0].kernel_name == "_attn_fwd_short_kernel" and bwd[0][0].kernel_name == "_attn_bwd_short_kernel"
    _check_against_float64(*_qkv(1, 3, 29, 27 if i % 3 else 32, D, torch.float32, device), scale=0.3)


def test_short_keys_fp32_wide_heads_take_the_long_path():
    """fp32 past D = 64 has no short path (it would spill): the long kernels, at any Lk."""
    for D in (80, 96, 128, 160):
        fwd, bwd = _paths(1, 2, 29, 7, D, torch.float32)
        assert [c.kernel_name for c, _ in fwd] == ["_attn_fwd_kernel"]
        assert bwd[0][0].kernel_name == "_attn_bwd_preprocess_kernel"


@pytest.mark.parametrize("D,dtype", [(80, torch.bfloat16), (32, torch.float16)])
def test_short_keys_several_query_blocks_per_program(D, dtype, sms, device, poisoned_alloc):
    """16-bit short path where each program steps through several query blocks and adds several partials."""
    sms(1)
    fwd, bwd = _paths(1, 1, 300, 77, D, dtype)
    assert fwd[0][1] == (1, 2) and bwd[0][1] == (1, 2)  # 2 programs for 3 (forward) and 5 (backward) blocks
    _check_against_float64(*_qkv(1, 1, 300, 77, D, dtype, device))


@pytest.mark.skipif(not attn_mod.HAS_TENSOR_DESCRIPTORS, reason="this Triton has no tensor descriptors")
@pytest.mark.parametrize("D,dtype", [(64, torch.float16), (128, torch.bfloat16)])
def test_tma_forward(D, dtype, device, poisoned_alloc, monkeypatch):
    """The Hopper candidate (tensor-descriptor loads) where tuning picks it; its backward is the long path's."""
    tiles = dataclasses.replace(attn_mod.TABLES.configs16[90][D].fwd, tma=True)
    tables = attn_mod.TABLES.with_tiles(90, D, "fwd", tiles)
    monkeypatch.setattr(attn_mod, "TABLES", tables)
    monkeypatch.setattr(attn_mod, "device_sms", lambda device_index: 1)
    fwd, _ = _paths(1, 3, 37, 131, D, dtype)
    assert fwd[0][0].constexprs["TMA"] and fwd[0][0].jit_only
    _check_against_float64(*_qkv(1, 3, 37, 131, D, dtype, device))


# ----------------------------------------------------------------------------- which path the launcher picks


def test_short_keys_pick_the_short_kernels():
    fwd, bwd = _paths(2, 8, 4096, 77, 40, torch.bfloat16)  # SD's cross-attention at batch 2
    (case, grid), = fwd  # fmt: skip
    assert case.kernel_name == "_attn_fwd_short_kernel" and case.constexprs["BLOCK_N"] == 128
    assert grid == (16, attn_mod.short_programs(16, 4096 // case.constexprs["BLOCK_M"], 132)) == (16, 17)
    (main, main_grid), (red, red_grid) = bwd
    assert main.kernel_name == "_attn_bwd_short_kernel" and red.kernel_name == "_attn_bwd_short_reduce_kernel"
    assert main_grid == (16, 17) and red_grid == (16, 2, -(-77 * 40 // red.constexprs["BLOCK"]))
    # one key past the block, or fp32 past its 32 keys: the long path
    for shape, dtype in (((2, 8, 4096, 129, 40), torch.bfloat16), ((1, 2, 33, 33, 64), torch.float32)):
        fwd, bwd = _paths(*shape, dtype)
        assert [c.kernel_name for c, _ in fwd] == ["_attn_fwd_kernel"]
        assert [c.kernel_name for c, _ in bwd] == [
            "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"]  # fmt: skip


def test_grid_size_picks_the_tiles():
    """B·H·⌈Lq/128⌉ below the SM count: 64-row forward and dQ tiles; at or above it: the default 128."""
    small_fwd, small_bwd = _paths(2, 8, 1024, 1024, 64, torch.float16)  # 128 programs < 132
    large_fwd, large_bwd = _paths(2, 8, 1040, 1040, 64, torch.float16)  # 144 programs
    assert small_fwd[0][0].constexprs["BLOCK_M"] == 64 and small_fwd[0][1] == (16, 16)
    assert large_fwd[0][0].constexprs["BLOCK_M"] == 128 and large_fwd[0][1] == (16, 9)
    assert small_bwd[-1][0].constexprs["BLOCK_M"] == 64 and large_bwd[-1][0].constexprs["BLOCK_M"] == 128
    # head dim 160 has no smaller tile: the same case either way
    assert _paths(1, 1, 300, 300, 160, torch.float16)[0] == _paths(1, 1, 300, 300, 160, torch.float16)[0]


@pytest.mark.parametrize("D,blocks", [(32, (32, 0)), (40, (32, 16)), (64, (64, 0)), (80, (64, 16)), (96, (64, 32)),
                                      (128, (128, 0)), (160, (128, 32))])  # fmt: skip
def test_head_dims_are_split_into_two_column_blocks(D, blocks):
    assert attn_mod.column_blocks(D) == blocks
    fwd, bwd = _paths(1, 1, 300, 300, D, torch.bfloat16)
    for case, _ in fwd + bwd:
        if "BLOCK_D0" in case.constexprs:
            assert (case.constexprs["BLOCK_D0"], case.constexprs["BLOCK_D1"]) == blocks, case.name


def test_tma_cases_are_candidates_never_defaults():
    """Untuned tables never pick a tensor-descriptor case; the audit still compiles them (their own table)."""
    picked = {id(case) for table in attn_mod.LAUNCH_TABLES if table.name != "attention_fwd_tma"
              for case in table.entries.values()}  # fmt: skip
    tma = attn_mod.TABLES.fwd_tma.cases()
    assert all(case.jit_only for case in tma)
    if attn_mod._tuned.TUNED.get("attention") is None:
        assert not any(id(case) in picked for case in tma)
    assert len(tma) == (4 if attn_mod.HAS_TENSOR_DESCRIPTORS else 0)  # sm_90, fp16/bf16, D = 64, 128


def test_tma_needs_tensor_descriptors(monkeypatch):
    """Under a Triton without in-kernel tensor descriptors, no table has a TMA case and the sweep offers none;
    a tuned TMA forward falls back to the same tiles loaded without TMA."""
    monkeypatch.setattr(attn_mod, "HAS_TENSOR_DESCRIPTORS", False)
    tiles = attn_mod.TABLES.configs16[90][128].fwd
    tuned = {"sm90": {"128": {"fwd": attn_mod.tuned_entry(dataclasses.replace(tiles, tma=True))}}}
    configs = attn_mod.configs_with(tuned)
    assert configs[90][128].fwd == dataclasses.replace(tiles, tma=False)
    tables = attn_mod.Tables(configs, attn_mod.CONFIGS_FP32)
    assert not tables.fwd_tma.entries
    assert not any(case.jit_only or case.constexprs.get("TMA") for t in tables.tables for case in t.cases())
    assert not any(t.tma for t in attn_mod.tuning_candidates(90, 128, "fwd"))
