"""GroupNorm (+ FiLM scale/shift) + SiLU as a module: a drop-in for ``nn.GroupNorm`` + ``nn.SiLU``.

The parameters are named and shaped as in ``nn.GroupNorm`` (``weight``, ``bias``
of shape (C,)), so a state dict saved from a model built with ``nn.GroupNorm``
loads unchanged.  The math and the kernels live in ``fastdiff.ops.group_norm``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from fastdiff.ops.group_norm import group_norm_silu, group_norm_silu_unchecked


class GroupNormSiLU(nn.Module):
    """y = SiLU(GN(x)·(1 + scale) + shift), or without the SiLU when ``silu=False``.

    ``forward(x, scale=None, shift=None)``: x is (B, C, *spatial) with 0–3 spatial
    dims, contiguous or channels_last; scale/shift are optional (B, C) FiLM terms
    (ADM's scale-shift norm, Dhariwal & Nichol 2021, §3).

    ``check_inputs``: each call checks its arguments (``ops.group_norm_silu``).  A model
    that checks its own inputs once per forward turns it off on its layers, whose inputs
    it then makes itself (`fastdiff.nn.unet.skip_layer_checks`); the configuration is
    checked here, once.
    """

    check_inputs: bool = True

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True, silu: bool = True):
        super().__init__()
        if num_groups <= 0 or num_channels % num_groups:
            raise ValueError(
                f"num_channels must be divisible by num_groups, got num_channels={num_channels}, num_groups={num_groups}"
            )
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < math.inf:
            raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
        if not isinstance(silu, bool):
            raise TypeError(f"silu must be a bool, got {type(silu).__name__}")
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        self.silu = silu
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels))
            self.bias = nn.Parameter(torch.zeros(num_channels))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(
        self, x: torch.Tensor, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None
    ) -> torch.Tensor:
        op = group_norm_silu if self.check_inputs else group_norm_silu_unchecked
        return op(x, self.num_groups, self.weight, self.bias, self.eps, scale=scale, shift=shift, silu=self.silu)

    @classmethod
    def from_group_norm(cls, gn: nn.GroupNorm, silu: bool = True) -> "GroupNormSiLU":
        """A GroupNormSiLU with ``gn``'s configuration, sharing its parameters (no copy)."""
        mod = cls(gn.num_groups, gn.num_channels, gn.eps, gn.affine, silu)
        if gn.affine:
            mod.weight = gn.weight
            mod.bias = gn.bias
        return mod

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, silu={self.silu}"
