"""Multi-head attention for the UNet (self- and cross-attention), built on `fastdiff.ops.attention`.

Layer names follow the Stable Diffusion / diffusers convention (``to_q``, ``to_k``,
``to_v``, ``to_out``) so that checkpoints map one to one.

    q = x Wq,  k = c Wk,  v = c Wv            (c = x for self-attention)
    o = softmax(q kᵀ / sqrt(d)) v  per head   (Vaswani et al. 2017, Eq. 1)
    y = o Wout + b

Self-attention runs one fused (3·heads·dim_head) projection; q, k and v are
strided views of its output, which the kernel reads through their strides, so
nothing is copied.  The op writes its output in (B, L, heads, dim_head) memory
order, so merging the heads back before ``to_out`` is free as well.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastdiff.ops.attention import attention


class Attention(nn.Module):
    """Multi-head attention: self-attention when ``context`` is None, else cross-attention to it.

    query_dim:   channels of the queries' tokens x (B, L, query_dim)
    context_dim: channels of the context tokens (B, Lk, context_dim); None = query_dim (self-attention)
    heads:       number of heads
    dim_head:    channels per head; one of the op's head dims (32, 40, 64, 80, 96, 128, 160)
    out_bias:    bias of the output projection
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        out_bias: bool = True,
    ):
        super().__init__()
        inner = heads * dim_head
        self.query_dim = query_dim
        self.context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.dim_head = dim_head
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(self.context_dim, inner, bias=False)
        self.to_v = nn.Linear(self.context_dim, inner, bias=False)
        self.to_out = nn.Linear(inner, query_dim, bias=out_bias)

    def extra_repr(self) -> str:
        dims = f"query_dim={self.query_dim}, context_dim={self.context_dim}"
        return f"{dims}, heads={self.heads}, dim_head={self.dim_head}"

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim != 3 or x.shape[-1] != self.query_dim:
            raise ValueError(f"x must have shape (B, L, {self.query_dim}), got {tuple(x.shape)}")
        B, L, _ = x.shape
        H, D = self.heads, self.dim_head
        if context is None:
            if self.context_dim != self.query_dim:
                raise ValueError(
                    f"context is required: this layer attends to context of {self.context_dim} channels, "
                    f"not to x ({self.query_dim})"
                )
            w_qkv = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight])
            qkv = F.linear(x, w_qkv).view(B, L, 3, H, D)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 × (B, H, L, D) views
        else:
            if context.ndim != 3 or context.shape[0] != B or context.shape[-1] != self.context_dim:
                raise ValueError(
                    f"context must have shape ({B}, Lk, {self.context_dim}), got {tuple(context.shape)}"
                )
            Lk = context.shape[1]
            q = self.to_q(x).view(B, L, H, D).transpose(1, 2)
            w_kv = torch.cat([self.to_k.weight, self.to_v.weight])
            k, v = F.linear(context, w_kv).view(B, Lk, 2, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        o = attention(q, k, v)  # (B, H, L, D) stored as (B, L, H, D)
        return self.to_out(o.transpose(1, 2).reshape(B, L, H * D))


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
