"""Multi-head attention for the UNet (self- and cross-attention), built on `fastdiff.ops.attention`.

    q = x Wq,  k = c Wk,  v = c Wv            (c = x for self-attention)
    o = softmax(q kᵀ / sqrt(d)) v  per head   (Vaswani et al. 2017, Eq. 1)
    y = o Wout + b

The projections are stored fused, as the forward uses them: one (3·heads·dim_head, dim)
weight ``to_qkv`` when the layer can attend to itself (context width = query width),
else ``to_q`` and one (2·heads·dim_head, context_dim) weight ``to_kv``.  Self-attention
is then one matrix product whose output holds q, k and v as strided views, which the
kernel reads through their strides: nothing is copied, and no weights are concatenated
per call.  The op writes its output in (B, L, heads, dim_head) memory order, so merging
the heads back before ``to_out`` is free as well.  The forward multiplies by the fused
weights (``F.linear``) instead of calling ``to_qkv``, ``to_q`` or ``to_kv`` as modules,
whose call machinery costs a few µs of host time per call.

State dicts keep the Stable Diffusion / diffusers names (``to_q``, ``to_k``, ``to_v``,
``to_out``): they are split on saving and fused on loading, so checkpoints map one to
one, both ways.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastdiff.ops.flash_attention import HEAD_DIMS, attention, attention_unchecked


class Attention(nn.Module):
    """Multi-head attention: self-attention when ``context`` is None, else cross-attention to it.

    query_dim:   channels of the queries' tokens x (B, L, query_dim)
    context_dim: channels of the context tokens (B, Lk, context_dim); None = query_dim (self-attention)
    heads:       number of heads
    dim_head:    channels per head; one of the op's head dims (32, 40, 64, 80, 96, 128, 160)
    out_bias:    bias of the output projection

    ``check_inputs``: each call checks its arguments.  A model that checks its own inputs
    once per forward turns it off on its layers (`fastdiff.nn.unet.skip_layer_checks`);
    the configuration is checked here, once.
    """

    check_inputs: bool = True

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        out_bias: bool = True,
    ):
        super().__init__()
        if dim_head not in HEAD_DIMS:
            raise ValueError(f"dim_head must be one of {HEAD_DIMS} (the attention op's head dims), got {dim_head}")
        inner = heads * dim_head
        self.query_dim = query_dim
        self.context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.dim_head = dim_head
        self.scale = 1.0 / math.sqrt(dim_head)  # the op's default, computed as the op does
        # Rows [q; k; v] (or [k; v]).  nn.Linear's initialisation depends on the input width
        # only, and fills rows in order: the same draws as separate to_q, to_k, to_v layers.
        if self.context_dim == query_dim:
            self.to_qkv = nn.Linear(query_dim, 3 * inner, bias=False)
        else:
            self.to_q = nn.Linear(query_dim, inner, bias=False)
            self.to_kv = nn.Linear(self.context_dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, query_dim, bias=out_bias)
        self.register_state_dict_post_hook(_split_projections)
        self.register_load_state_dict_pre_hook(_fuse_projections)

    def extra_repr(self) -> str:
        dims = f"query_dim={self.query_dim}, context_dim={self.context_dim}"
        return f"{dims}, heads={self.heads}, dim_head={self.dim_head}"

    def projection_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Wq, Wk, Wv), each (heads·dim_head, in_dim) as ``nn.Linear`` stores them: views of the fused weights."""
        w_q, w_kv = self._cross_weights()
        return (w_q, *w_kv.chunk(2))

    def _cross_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Wq, [Wk; Wv]): to_q's and to_kv's weights, or views of to_qkv's rows."""
        if self.context_dim != self.query_dim:
            return self.to_q.weight, self.to_kv.weight
        inner = self.heads * self.dim_head
        return self.to_qkv.weight[:inner], self.to_qkv.weight[inner:]

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self.check_inputs:
            self._check(x, context)
        B, L, _ = x.shape
        H, D = self.heads, self.dim_head
        if context is None:
            qkv = F.linear(x, self.to_qkv.weight).view(B, L, 3, H, D)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 × (B, H, L, D) views
        else:
            w_q, w_kv = self._cross_weights()
            q = F.linear(x, w_q).view(B, L, H, D).transpose(1, 2)
            kv = F.linear(context, w_kv).view(B, context.shape[1], 2, H, D)
            k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # 2 × (B, H, Lk, D) views
        op = attention if self.check_inputs else attention_unchecked
        o = op(q, k, v, scale=self.scale)  # (B, H, L, D) stored as (B, L, H, D)
        return self.to_out(o.transpose(1, 2).reshape(B, L, H * D))

    def _check(self, x: torch.Tensor, context: torch.Tensor | None) -> None:
        if x.ndim != 3 or x.shape[-1] != self.query_dim:
            raise ValueError(f"x must have shape (B, L, {self.query_dim}), got {tuple(x.shape)}")
        if context is None and self.context_dim != self.query_dim:
            raise ValueError(
                f"context is required: this layer attends to context of {self.context_dim} channels, "
                f"not to x ({self.query_dim})"
            )
        if context is not None and (
            context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[-1] != self.context_dim
        ):
            raise ValueError(
                f"context must have shape ({x.shape[0]}, Lk, {self.context_dim}), got {tuple(context.shape)}"
            )


# fused weight -> the diffusers names of its row blocks, in order
_FUSED = {
    "to_qkv.weight": ("to_q.weight", "to_k.weight", "to_v.weight"),
    "to_kv.weight": ("to_k.weight", "to_v.weight"),
}


def _split_projections(module: Attention, state_dict: dict, prefix: str, local_metadata) -> None:
    """State-dict hook: each fused projection weight becomes its to_q / to_k / to_v rows (views)."""
    for fused, parts in _FUSED.items():
        if prefix + fused in state_dict:
            weight = state_dict.pop(prefix + fused)
            state_dict.update(zip((prefix + p for p in parts), weight.chunk(len(parts))))


def _fuse_projections(module: Attention, state_dict: dict, prefix: str, *args) -> None:
    """Load-state-dict pre-hook: to_q / to_k / to_v weights are concatenated into the fused ones this layer has."""
    for fused, parts in _FUSED.items():
        keys = [prefix + p for p in parts]
        if hasattr(module, fused.split(".")[0]) and all(k in state_dict for k in keys):
            state_dict[prefix + fused] = torch.cat([state_dict.pop(k) for k in keys])


def image_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) feature map -> (B, H·W, C) tokens, row-major over (H, W).

    A view (no copy); it is contiguous when ``x`` is channels_last.
    """
    if x.ndim != 4:
        raise ValueError(f"x must have 4 dimensions (B, C, H, W), got shape {tuple(x.shape)}")
    return x.flatten(2).transpose(1, 2)


def tokens_to_image(t: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, height·width, C) tokens -> (B, C, height, width); the inverse of `image_to_tokens`.

    A view (no copy) of contiguous tokens, returned in channels_last memory order.
    """
    if t.ndim != 3:
        raise ValueError(f"t must have 3 dimensions (B, L, C), got shape {tuple(t.shape)}")
    if t.shape[1] != height * width:
        raise ValueError(f"t must have height*width = {height * width} tokens, got {t.shape[1]}")
    B, _, C = t.shape
    return t.transpose(1, 2).reshape(B, C, height, width)
