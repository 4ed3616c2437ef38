r"""Timestep embeddings.

Sinusoidal embedding of a (possibly fractional) timestep t (Vaswani et al. 2017,
§3.5; used for diffusion time by Ho et al. 2020, App. B):

    f_k    = max_period^(−k / half),                 k = 0 … half − 1,  half = dim / 2
    emb(t) = [cos(t·f_0) … cos(t·f_{half−1}), sin(t·f_0) … sin(t·f_{half−1})]

The cos-first order is Stable Diffusion's (``flip_sin_to_cos=True``,
``downscale_freq_shift=0`` in diffusers), so SD weights map onto it unchanged.
Computed in fp32 whatever the autocast dtype: at t ≈ 1000 the argument t·f_0 needs
more than bf16's 8 mantissa bits to tell neighbouring timesteps apart.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) timesteps → (B, dim) fp32 sinusoidal embedding (cos half first, then sin)."""
    if t.ndim != 1:
        raise ValueError(f"t must have shape (B,), got {tuple(t.shape)}")
    if dim % 2:
        raise ValueError(f"dim must be even, got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class TimestepEmbedding(nn.Module):
    """sinusoid(t) → Linear → SiLU → Linear: the (B, embed_dim) vector every ResBlock reads.

    ``pooled_dim``: when set, a pooled text embedding (B, pooled_dim) is projected and
    added to the time embedding (as ADM adds its class embedding, Dhariwal & Nichol
    2021), so global attributes of the prompt reach every ResBlock's scale/shift, not
    only the attention layers.

    ``added_time_ids`` (SDXL's micro-conditioning, Podell et al. 2023, §2.2): the pooled
    embedding is joined by that many scalars per image, each embedded as a timestep at
    ``added_time_dim``, and the pair goes through an MLP instead (diffusers' ``add_embedding``):

        emb += Linear(SiLU(Linear([pooled, sinusoid(id_1), …, sinusoid(id_n)])))
    """

    def __init__(
        self, in_dim: int, embed_dim: int, pooled_dim: int | None = None, added_time_ids: int = 0,
        added_time_dim: int = 256,
    ):  # fmt: skip
        super().__init__()
        self.in_dim = in_dim
        self.linear_1 = nn.Linear(in_dim, embed_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(embed_dim, embed_dim)
        self.pooled_proj = nn.Linear(pooled_dim, embed_dim) if pooled_dim and not added_time_ids else None
        self.added_time_dim = added_time_dim
        self.add_embedding = None
        if added_time_ids:
            width = pooled_dim + added_time_ids * added_time_dim
            self.add_embedding = nn.Sequential()
            self.add_embedding.add_module("linear_1", nn.Linear(width, embed_dim))
            self.add_embedding.add_module("act", nn.SiLU())
            self.add_embedding.add_module("linear_2", nn.Linear(embed_dim, embed_dim))

    def forward(
        self, t: torch.Tensor, pooled: torch.Tensor | None = None, time_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        emb = timestep_embedding(t, self.in_dim).to(self.linear_1.weight.dtype)
        emb = self.linear_2(self.act(self.linear_1(emb)))
        if self.pooled_proj is None and self.add_embedding is None:
            return emb
        if pooled is None:
            raise ValueError("pooled must be given: this model was built with pooled_dim set")
        if self.add_embedding is None:
            return emb + self.pooled_proj(pooled.to(emb.dtype))
        if time_ids is None:
            raise ValueError("time_ids must be given: this model was built with added_time_ids set")
        ids = timestep_embedding(time_ids.flatten(), self.added_time_dim).reshape(time_ids.shape[0], -1)
        return emb + self.add_embedding(torch.cat([pooled.float(), ids], dim=1).to(emb.dtype))
