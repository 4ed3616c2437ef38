"""Memory layouts the elementwise and normalisation kernels read in place.

A (B, C, *spatial) tensor is taken without a copy when it is contiguous (NC…) or
channels-last (N…C, channel stride 1, the rest dense): in both, each sample is one
dense run of memory.  Anything else is copied to contiguous by the launchers.
"""
from __future__ import annotations

import torch


def sample_layout(x: torch.Tensor) -> str | None:
    """'contiguous', 'channels_last', or None for any other stride pattern."""
    if x.is_contiguous():
        return "contiguous"
    if x.ndim >= 3 and x.stride(1) == 1 and x.movedim(1, -1).is_contiguous():
        return "channels_last"
    return None


def match_layout(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``x`` with the same strides as ``like`` (a copy only when they differ)."""
    return x if x.stride() == like.stride() else torch.empty_like(like, dtype=x.dtype).copy_(x)
