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
    if x.ndim >= 3 and x.stride(1) == 1 and _dense(x.shape, x.stride(), (0, *range(2, x.ndim), 1)):
        return "channels_last"
    return None


def _dense(sizes, strides, order) -> bool:
    """Whether the dims, taken in ``order`` (outermost first), are laid out densely: the rule of
    ``Tensor.is_contiguous``, dims of size 1 free.  Read from the sizes and strides on the host, it
    costs a fraction of a ``movedim(1, -1).is_contiguous()``, which builds a view (~7 µs)."""
    expected = 1
    for d in reversed(order):
        if sizes[d] != 1:
            if strides[d] != expected:
                return False
            expected *= sizes[d]
    return True


def match_layout(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``x`` with the same strides as ``like`` (a copy only when they differ)."""
    return x if x.stride() == like.stride() else torch.empty_like(like, dtype=x.dtype).copy_(x)
