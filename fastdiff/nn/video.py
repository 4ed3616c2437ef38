r"""A text-to-video UNet: the image `UNet` with temporal attention layers ("inflation").

Video diffusion models of the VDM / Video LDM / AnimateDiff family (Ho et al. 2022
"Video Diffusion Models"; Blattmann et al. 2023 "Align your Latents"; Guo et al. 2024
"AnimateDiff") keep the image network and add layers that mix information across
frames.  With a clip x of shape (B, C, F, H, W):

* spatial layers are shared by all frames: the frames are folded into the batch,
  (B, C, F, H, W) → (B·F, C, H, W), and every ResBlock / spatial transformer of the
  image `UNet` runs unchanged; the time and text conditioning of clip b is repeated
  for its F frames;
* every GroupNorm(+SiLU) normalises over the whole clip: statistics per (clip, group)
  over C/G × F × H × W (the "inflated" GroupNorm of the 3-D UNets), through
  ``ops.group_norm_silu`` on the (B, C, F, H, W) view of the folded map;
* after every spatial stage (and the middle transformer) a temporal attention layer
  lets every spatial position attend over the frames at that position:

      h   = proj_in(GN(x)) + e_f                    e_f: sinusoidal frame-position embedding
      h   = Attn(h) over the sequence f = 0 … F−1    (B·H·W sequences; ops.attention)
      out = x + proj_out(h)                          proj_out starts at zero

  The zero-initialised output projection makes a fresh temporal layer the identity,
  so a `VideoUNet` whose spatial weights come from a trained image model is, at
  initialisation, that image model applied to each frame (exactly, for a clip of
  identical frames: the clip statistics of the GroupNorm are then the frame's).
  Fine-tuning then only has to learn motion.

* the frame position also reaches the spatial layers: every frame's time embedding
  (the vector that sets each ResBlock's FiLM scale and shift) gets

      e'_f = e(t, text) + MLP([sinusoid(f), pooled text])      last layer zero-initialised

  so a ResBlock knows which frame it draws and which way the prompt says to move:
  the displacement of the shape is a function of (frame, prompt) the spatial layers
  can apply directly, while the temporal attention keeps the frames consistent.
  With ``text_pool_heads`` = k > 0 the MLP's hidden layer also gets an attention
  pooling of the text tokens (k learned queries, a softmax over the tokens each;
  its projection zero-initialised): a pooled sentence embedding barely tells
  "moving left" from "moving right", the token of the direction word does.

Layout maps (``layout_maps`` = k > 0, `FrameLayout`): an MLP of the whitened pooled text
embedding and the frame position draws k coarse maps per frame, projected into a bias of
the first feature map (projection zero-initialised).  They give the spatial layers the
place where the prompt's motion puts the shape in frame f; the whitening (statistics of
the training captions) makes the motion word, a small part of the raw sentence
embedding, as readable as the colour.

Noise prior (``noise_correlation`` ρ; Ge et al. 2023 "Preserve Your Own Correlation",
the "mixed" prior): the noise of frame f is ε_f = √ρ·ε_shared + √(1−ρ)·ε_f^ind, still
N(0, I) per frame, so the image model's per-frame statistics hold, but the frames of a
clip start correlated, closer to one picture than independent draws would be.  The
model is trained and sampled with the same ρ (`correlated_noise`).

The frame embedding is the sinusoid of `fastdiff.nn.embeddings.timestep_embedding`
(defined for any frame index); ``max_frames`` is the longest clip the model accepts:
the length it was trained on, since attention patterns over longer sequences were
never seen.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastdiff.nn.attention import Attention
from fastdiff.nn.embeddings import timestep_embedding
from fastdiff.nn.norm import GroupNormSiLU
from fastdiff.nn.unet import UNet, UNetConfig, skip_layer_checks, zero_init
from fastdiff.ops import tensor_checks


@dataclass
class VideoConfig:
    """What the video model adds to a `UNetConfig`."""

    max_frames: int = 16  # longest clip accepted (= the trained clip length)
    temporal_dim_head: int = 32  # channels per head of the temporal attention (must divide every level's width)
    noise_correlation: float = 0.0  # ρ: share of the noise variance common to all frames of a clip
    text_pool_heads: int = 0  # attention-pooling queries over the text tokens for the frame embedding (0: none)
    layout_maps: int = 0  # coarse per-frame layout maps from the prompt, added after conv_in (`FrameLayout`; 0: none)

    def __post_init__(self):
        if not isinstance(self.max_frames, int) or self.max_frames < 1:
            raise ValueError(f"max_frames must be an int >= 1, got {self.max_frames!r}")
        if not 0.0 <= self.noise_correlation < 1.0:
            raise ValueError(f"noise_correlation must be in [0, 1), got {self.noise_correlation}")
        for name in ("text_pool_heads", "layout_maps"):  # optional layers: 0 leaves them out
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def correlated_noise(noise: torch.Tensor, rho: float) -> torch.Tensor:
    """(B, C, F + 1, H, W) independent N(0, I) → (B, C, F, H, W) with frame correlation ρ.

    Frame 0 of the input is the shared part: ε_f = √ρ·ε_0 + √(1−ρ)·ε_{f+1}.
    """
    return rho**0.5 * noise[:, :, :1] + (1 - rho) ** 0.5 * noise[:, :, 1:]


class ClipGroupNormSiLU(GroupNormSiLU):
    """`GroupNormSiLU` on frame-folded (B·F, C, H, W) maps, with statistics over the whole clip.

    ``frames`` is set by `VideoUNet.forward` before each call.  FiLM terms arrive
    per frame, (B·F, C), repeated from the clip's: the clip's row is taken.  The
    parameters are GroupNormSiLU's, so image-model weights load unchanged.
    """

    frames: int = 1

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None):
        n = self.frames
        if n == 1:
            return super().forward(x, scale, shift)
        clip = x.unflatten(0, (-1, n)).transpose(1, 2)  # (B, C, F, H, W); a view, channels_last_3d if x is NHWC
        scale = scale[::n] if scale is not None else None
        shift = shift[::n] if shift is not None else None
        y = super().forward(clip, scale, shift)
        return y.transpose(1, 2).flatten(0, 1)  # back to (B·F, C, H, W)

    @classmethod
    def from_module(cls, m: GroupNormSiLU) -> "ClipGroupNormSiLU":
        new = cls(m.num_groups, m.num_channels, m.eps, m.affine, m.silu)
        new.check_inputs = m.check_inputs
        if m.affine:
            new.weight, new.bias = m.weight, m.bias
        return new


def fold_frames(x: torch.Tensor) -> torch.Tensor:
    """(B, C, F, H, W) → (B·F, C, H, W), frame-major within each clip."""
    return x.transpose(1, 2).flatten(0, 1)


def unfold_frames(x: torch.Tensor, frames: int) -> torch.Tensor:
    """(B·F, C, H, W) → (B, C, F, H, W); the inverse of `fold_frames`."""
    return x.unflatten(0, (-1, frames)).transpose(1, 2)


class FrameEmbedding(nn.Module):
    """MLP([sinusoid(f), pooled text]) → (B·F, emb_dim), added to each frame's time embedding; starts at zero.

    With ``pool_heads`` > 0 the hidden layer also gets ``token_proj`` of an attention pooling of
    the text tokens (``pool_heads`` learned queries); ``token_proj`` starts at zero, so adding it
    to a trained model changes nothing until it is trained.
    """

    def __init__(self, frame_dim: int, pooled_dim: int, emb_dim: int, context_dim: int = 0, pool_heads: int = 0):
        super().__init__()
        self.frame_dim, self.pooled_dim, self.pool_heads = frame_dim, pooled_dim, pool_heads
        self.linear_1 = nn.Linear(frame_dim + pooled_dim, emb_dim)
        self.linear_2 = zero_init(nn.Linear(emb_dim, emb_dim))
        if pool_heads:
            self.token_queries = nn.Parameter(torch.randn(pool_heads, context_dim) / context_dim**0.5)
            self.token_proj = zero_init(nn.Linear(pool_heads * context_dim, emb_dim))

    def pool_tokens(self, context: torch.Tensor) -> torch.Tensor:
        """(B, L, D) text tokens → (B, heads·D): per head, the tokens averaged with softmax(q·token/√D) weights."""
        q = self.token_queries.to(context.dtype)
        weights = torch.softmax(context @ q.T * context.shape[-1] ** -0.5, dim=1)  # (B, L, heads)
        return (weights.transpose(1, 2) @ context).flatten(1)

    def forward(
        self, frames: int, batch: int, pooled: torch.Tensor | None, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        f = timestep_embedding(torch.arange(frames, device=self.linear_1.weight.device), self.frame_dim)
        h = f.to(self.linear_1.weight.dtype).expand(batch, -1, -1)  # (B, F, frame_dim)
        if self.pooled_dim:
            h = torch.cat([h, pooled.to(h.dtype)[:, None].expand(-1, frames, -1)], dim=-1)
        h = self.linear_1(h)
        if self.pool_heads:
            h = h + self.token_proj(self.pool_tokens(context.to(h.dtype)))[:, None]
        return self.linear_2(F.silu(h)).flatten(0, 1)  # (B·F, emb_dim)


class FrameLayout(nn.Module):
    """Per-frame coarse layout from the prompt: a bias of the first feature map; starts at zero.

        w   = W·(pooled − μ)                           whitened sentence embedding (Su et al. 2021)
        m_f = Linear(SiLU(Linear([w, sinusoid(f)])))  ``maps`` maps of SIZE×SIZE for frame f
        out = Conv1×1(bilinear(m_f) to H×W)           C channels; zero-initialised

    At high noise the best prediction of a clip is the average clip of its prompt, whose
    shape sits where the motion puts it in frame f.  The image layers place a shape from
    the evidence in x_t, so a layout bias at the input steers them, but only if it can
    tell the directions apart: in the raw sentence embedding "moving left" and "moving
    right" differ by a few percent (cosine 0.97), under the colour and shape words.
    Whitening with the statistics of the training captions (μ, W = Σ^-½, `set_text_statistics`)
    gives every direction of variation of the captions unit scale, the motion word's included.
    """

    SIZE = 8
    EPS = 1e-2  # added to each standard deviation of the whitening (directions the captions barely use)

    def __init__(self, pooled_dim: int, frame_dim: int, channels: int, maps: int, hidden: int = 128):
        super().__init__()
        self.maps, self.frame_dim = maps, frame_dim
        self.register_buffer("text_mean", torch.zeros(pooled_dim))
        self.register_buffer("text_whiten", torch.eye(pooled_dim))
        self.linear_1 = nn.Linear(pooled_dim + frame_dim, hidden)
        self.to_maps = nn.Linear(hidden, maps * self.SIZE**2)
        self.to_channels = zero_init(nn.Conv2d(maps, channels, 1))

    @torch.no_grad()
    def set_text_statistics(self, pooled: torch.Tensor) -> None:
        """μ and W = V·diag(1/(σ + EPS))·Vᵀ from (N, D) pooled embeddings of the training captions."""
        mean = pooled.double().mean(0)
        _, s, vt = torch.linalg.svd(pooled.double() - mean, full_matrices=False)
        std = s / max(len(pooled) - 1, 1) ** 0.5
        self.text_mean.copy_(mean)
        self.text_whiten.copy_(vt.T @ torch.diag(1 / (std + self.EPS)) @ vt)

    def forward(self, pooled: torch.Tensor, frames: int, size: tuple[int, int]) -> torch.Tensor:
        """pooled (B, D) per clip → (B·F, C, *size), frame-major within a clip."""
        dtype = self.linear_1.weight.dtype
        w = (pooled.to(dtype) - self.text_mean.to(dtype)) @ self.text_whiten.to(dtype)  # W is symmetric
        f = timestep_embedding(torch.arange(frames, device=pooled.device), self.frame_dim).to(dtype)
        h = torch.cat([w[:, None].expand(-1, frames, -1), f.expand(len(w), -1, -1)], dim=-1).flatten(0, 1)
        m = self.to_maps(F.silu(self.linear_1(h))).view(-1, self.maps, self.SIZE, self.SIZE)
        return self.to_channels(F.interpolate(m, size=size, mode="bilinear", align_corners=False))


class TemporalAttention(nn.Module):
    """x + proj_out(Attn_frames(proj_in(GN(x)) + e_f)) on a frame-folded (B·F, C, H, W) map."""

    def __init__(self, dim: int, dim_head: int, groups: int):
        super().__init__()
        if dim % dim_head:
            raise ValueError(f"temporal_dim_head={dim_head} must divide the width {dim}")
        self.dim = dim
        self.norm = GroupNormSiLU(groups, dim, eps=1e-6, silu=False)
        self.proj_in = nn.Linear(dim, dim)
        self.attn = Attention(dim, heads=dim // dim_head, dim_head=dim_head)
        self.proj_out = zero_init(nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        BF, C, H, W = x.shape
        B = BF // frames
        h = self.norm(unfold_frames(x, frames))  # (B, C, F, H, W): statistics over the clip
        h = h.permute(0, 3, 4, 2, 1).reshape(B * H * W, frames, C)  # one sequence of frames per position
        pos = timestep_embedding(torch.arange(frames, device=x.device), C).to(h.dtype)  # (F, C)
        h = self.attn(self.proj_in(h) + pos)
        h = self.proj_out(h).view(B, H, W, frames, C).permute(0, 3, 4, 1, 2).flatten(0, 1)  # (B·F, C, H, W)
        return x + h.to(x.dtype)


class VideoUNet(UNet):
    """``forward(x (B, C, F, H, W), t (B,), context (B, L, D), pooled=None) -> (B, C, F, H, W)`` fp32.

    The image `UNet` (same parameter names, so `load_image_weights` takes an image
    checkpoint) plus a `TemporalAttention` after every spatial stage and after the
    middle transformer (``temporal_down``, ``temporal_mid``, ``temporal_up``) and the
    per-frame embedding of the ResBlocks' conditioning (``temporal_frame_embed``).
    """

    def __init__(self, config: UNetConfig, video: VideoConfig | None = None):
        super().__init__(config)
        self.video = v = video or VideoConfig()
        c = config
        for name, m in list(self.named_modules()):
            if isinstance(m, GroupNormSiLU):
                parent, _, leaf = name.rpartition(".")
                setattr(self.get_submodule(parent) if parent else self, leaf, ClipGroupNormSiLU.from_module(m))
        self._clip_norms = [m for m in self.modules() if isinstance(m, ClipGroupNormSiLU)]

        def temporal(stage) -> TemporalAttention:
            return TemporalAttention(stage.res.conv2.out_channels, v.temporal_dim_head, c.num_groups)

        emb_dim = c.time_embed_dim or 4 * c.model_channels
        self.temporal_frame_embed = FrameEmbedding(
            c.model_channels, c.pooled_dim or 0, emb_dim, c.context_dim, v.text_pool_heads
        )
        if v.layout_maps:
            if not c.pooled_dim:
                raise ValueError("layout_maps needs a pooled text embedding (UNetConfig.pooled_dim)")
            self.temporal_layout = FrameLayout(c.pooled_dim, c.model_channels, c.model_channels, v.layout_maps)
        self.temporal_down = nn.ModuleList(nn.ModuleList(temporal(s) for s in stages) for stages in self.down)
        self.temporal_mid = TemporalAttention(self.mid_res2.conv2.out_channels, v.temporal_dim_head, c.num_groups)
        self.temporal_up = nn.ModuleList(nn.ModuleList(temporal(s) for s in stages) for stages in self.up)
        skip_layer_checks(self)

    def temporal_parameters(self) -> list[str]:
        """Names of the parameters that the image model does not have."""
        return [n for n, _ in self.named_parameters() if n.startswith("temporal_")]

    def load_image_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Initialise the spatial layers from an image `UNet` state dict of the same config."""
        mine = {k: v.shape for k, v in self.state_dict().items() if not k.startswith("temporal_")}
        theirs = {k: v.shape for k, v in state.items()}
        if mine != theirs:
            diff = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
            raise ValueError(f"the image weights do not match this model's spatial layers: {diff[:5]} differ")
        self.load_state_dict(state, strict=False)

    def load_video_weights(self, state: dict[str, torch.Tensor]) -> list[str]:
        """Initialise from a video checkpoint whose model lacks some temporal layers; returns those left new.

        Every tensor of ``state`` must exist here with its shape; only temporal parameters may be missing
        (e.g. the text pooling of a model trained without it), and they keep their initial values.
        """
        mine = {k: v.shape for k, v in self.state_dict().items()}
        wrong = sorted(k for k, v in state.items() if mine.get(k) != v.shape)
        missing = sorted(set(mine) - set(state))
        if wrong or any(not k.startswith("temporal_") for k in missing):
            raise ValueError(f"the video weights do not fit this model: {(wrong + missing)[:5]} differ")
        self.load_state_dict(state, strict=False)
        return missing

    def _check(self, x, t, context, pooled) -> torch.Tensor:
        c, v = self.config, self.video
        tensor_checks.check_float("x", x)
        if x.ndim != 5 or x.shape[1] != c.in_channels:
            raise ValueError(f"x must have shape (B, {c.in_channels}, F, H, W), got {tuple(x.shape)}")
        if not 1 <= x.shape[2] <= v.max_frames:
            raise ValueError(f"the clip length F must be in [1, {v.max_frames}] for this model, got {x.shape[2]}")
        return self._check_inputs(x.shape, t, context, pooled, frames=x.shape[2])

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor | None = None
    ) -> torch.Tensor:
        c = self.config
        t = self._check(x, t, context, pooled)
        n = x.shape[2]
        for m in self._clip_norms:
            m.frames = n
        # Conditioning is per clip; the spatial layers see B·F images (frame-major within a clip).
        emb = self.time_embed(t, pooled).repeat_interleave(n, dim=0)
        emb = emb + self.temporal_frame_embed(n, x.shape[0], pooled, context)
        context = context.repeat_interleave(n, dim=0)
        h = fold_frames(x)
        h = self.conv_in(F.pixel_unshuffle(h, c.patch_size) if c.patch_size > 1 else h)
        if self.video.layout_maps:
            h = h + self.temporal_layout(pooled, n, h.shape[-2:]).to(h.dtype)
        skips = [h]
        for stages, temporals, down in zip(self.down, self.temporal_down, self.downsamplers):
            for s, tmp in zip(stages, temporals):
                h = self._run(tmp, self._run(s, h, emb, context), n)
                skips.append(h)
            if not isinstance(down, nn.Identity):
                h = down(h)
                skips.append(h)
        h = self._run(self.mid_res1, h, emb)
        h = self._run(self.temporal_mid, self._run(self.mid_attn, h, context), n)
        h = self._run(self.mid_res2, h, emb)
        for stages, temporals, up in zip(self.up, self.temporal_up, self.upsamplers):
            for s, tmp in zip(stages, temporals):
                h = self._run(tmp, self._run(s, torch.cat([h, skips.pop()], dim=1), emb, context), n)
            h = up(h)
        out = self.conv_out(self.norm_out(h))
        out = F.pixel_shuffle(out, c.patch_size) if c.patch_size > 1 else out
        return unfold_frames(out, n).float()
