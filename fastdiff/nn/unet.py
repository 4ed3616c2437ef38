r"""A text-conditioned UNet (ADM / Stable Diffusion layout) built on fastdiff's ops.

Layout (Ronneberger et al. 2015; Dhariwal & Nichol 2021 "ADM"; Rombach et al. 2022 "LDM"):

    conv_in → [ResBlock (+ Transformer)] × num_res_blocks per level, Downsample between levels
            → mid: ResBlock, Transformer, ResBlock
            → [ResBlock(concat skip) (+ Transformer)] × (num_res_blocks + 1) per level, Upsample between
            → GroupNorm + SiLU → conv_out

ResBlock (ADM §3, "adaptive group normalisation" when ``scale_shift=True``):

    h = conv1(SiLU(GN(x)))
    scale_shift=True : h = conv2(SiLU(GN(h)·(1 + s) + b)),  [s, b] = Linear(SiLU(emb))
    scale_shift=False: h = conv2(SiLU(GN(h + b))),           b = Linear(SiLU(emb))   (Stable Diffusion)
    out = skip(x) + h

Transformer block (LDM §3.3; "BasicTransformerBlock" in diffusers):

    x = x + SelfAttn(LN(x));  x = x + CrossAttn(LN(x), text tokens);  x = x + GEGLU-FF(LN(x))

wrapped as GN → 1×1 proj_in → blocks → 1×1 proj_out (+ residual) on the feature map.

The hot paths are fastdiff ops: every GroupNorm(+SiLU, +FiLM) is
``GroupNormSiLU`` (``ops.group_norm_silu``) and every attention is ``Attention``
(``ops.attention``).  Convolutions and linears are PyTorch's (cuDNN / cuBLAS).
``forward`` checks its inputs once; the layers, whose every input the network makes
from those, then call the ops' unchecked entries (`skip_layer_checks`).

Precision: the network runs in whatever autocast gives it (bf16 on GPU); the
timestep embedding is computed in fp32 and the output is returned in fp32, so the
sampler's arithmetic around the network stays in fp32 (EDM2, Karras et al. 2024).
Output layers of every residual branch start at zero (ADM), so a fresh model is
the identity on its skip paths and trains stably from step one.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastdiff.nn.attention import Attention, image_to_tokens, tokens_to_image
from fastdiff.nn.embeddings import TimestepEmbedding
from fastdiff.nn.norm import GroupNormSiLU
from fastdiff.ops import tensor_checks

# The fused kernels address one sample (one (batch, head) sequence for attention) with
# 32-bit offsets; a model whose layers skip their checks bounds its inputs instead.
MAX_OFFSET = 2**31


@dataclass
class UNetConfig:
    """The shape of a `UNet`.  Presets: ``UNetConfig.preset("tiny" | "sd15")``."""

    in_channels: int = 4  # channels of x_t (4 for SD latents, 3 for RGB pixels)
    patch_size: int = 1  # space-to-depth factor p: the UNet runs on (p²·C, H/p, W/p) (cheap pixel models)
    out_channels: int = 4  # channels of the prediction (ε, v or x_0: same as x_t)
    model_channels: int = 320  # width of the first level; level i has model_channels·channel_mult[i]
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # width multiplier per resolution level
    num_res_blocks: int = 2  # ResBlocks per level on the way down (up: one more, for the extra skip)
    attention_levels: tuple[int, ...] = (0, 1, 2)  # levels (0 = full resolution) that get transformer blocks
    transformer_depth: int | tuple[int, ...] = 1  # transformer blocks per attention site, one or one per level
    dim_head: int | tuple[int, ...] = 40  # channels per attention head (heads = width / dim_head), one or one per level
    ff_mult: int = 4  # inner width of the transformer feed-forward, as a multiple of the width
    context_dim: int = 768  # width of the text tokens fed to cross-attention
    pooled_dim: int | None = None  # width of a pooled text embedding added to the time embedding (None: unused)
    # SDXL's micro-conditioning: this many scalars per image (6: original size, crop corner, target
    # size), each embedded sinusoidally at added_time_dim, join the pooled text embedding (0: none).
    added_time_ids: int = 0
    added_time_dim: int = 256
    num_groups: int = 32  # GroupNorm groups everywhere
    scale_shift: bool = False  # ADM FiLM (True) or SD's additive time embedding (False) in ResBlocks
    time_embed_dim: int | None = None  # width of the time embedding (None: 4·model_channels)
    dropout: float = 0.0  # dropout inside ResBlocks
    gradient_checkpointing: bool = False  # recompute block activations in backward to save memory

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)
        self.attention_levels = tuple(self.attention_levels)
        if not isinstance(self.dim_head, int):
            self.dim_head = tuple(self.dim_head)
            if len(self.dim_head) != len(self.channel_mult):
                levels = len(self.channel_mult)
                raise ValueError(f"dim_head must be an int or one per level ({levels}), got {self.dim_head}")
        if not isinstance(self.transformer_depth, int):
            self.transformer_depth = tuple(self.transformer_depth)
            if len(self.transformer_depth) != len(self.channel_mult):
                levels = len(self.channel_mult)
                raise ValueError(
                    f"transformer_depth must be an int or one per level ({levels}), got {self.transformer_depth}"
                )
        if self.added_time_ids and not self.pooled_dim:
            raise ValueError("added_time_ids needs pooled_dim: the time ids join the pooled text embedding")
        for lvl in self.attention_levels:
            if not 0 <= lvl < len(self.channel_mult):
                raise ValueError(f"attention_levels must index channel_mult (0…{len(self.channel_mult) - 1}), got {lvl}")
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {self.patch_size}")
        last = len(self.channel_mult) - 1  # the middle block always has attention
        for level, mult in enumerate(self.channel_mult):
            width = self.model_channels * mult
            if width % self.num_groups:
                raise ValueError(f"every level width must be divisible by num_groups={self.num_groups}, got {width}")
            if (level in self.attention_levels or level == last) and width % self.head_dim(level):
                raise ValueError(f"attention widths must be divisible by dim_head={self.head_dim(level)}, got {width}")

    @property
    def downscale(self) -> int:
        """H and W must be multiples of this: the patch size times a 2× downsampling between levels."""
        return self.patch_size * 2 ** (len(self.channel_mult) - 1)

    def head_dim(self, level: int) -> int:
        """Channels per attention head at ``level`` (the middle block uses the last level's)."""
        return self.dim_head if isinstance(self.dim_head, int) else self.dim_head[level]

    def depth(self, level: int) -> int:
        """Transformer blocks per attention site at ``level`` (the middle block uses the last level's)."""
        return self.transformer_depth if isinstance(self.transformer_depth, int) else self.transformer_depth[level]

    @staticmethod
    def preset(name: str, **overrides) -> "UNetConfig":
        """A named configuration, optionally with fields overridden."""
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
        return UNetConfig(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @staticmethod
    def from_dict(d: dict) -> "UNetConfig":
        known = {f.name for f in fields(UNetConfig)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown UNetConfig fields: {sorted(unknown)}")
        return UNetConfig(**d)


PRESETS: dict[str, dict] = {
    # 32×32 RGB pixels conditioned on all-MiniLM-L6-v2 (384-wide tokens + pooled
    # sentence embedding): 2.7 M parameters, small enough to train on a CPU.
    "tiny": dict(
        in_channels=3,
        out_channels=3,
        patch_size=2,  # 32×32×3 pixels → 16×16×12
        model_channels=32,
        channel_mult=(1, 2),  # 16×16×32, 8×8×64
        num_res_blocks=1,
        attention_levels=(1,),  # self/cross-attention at 8×8 (and in the middle block)
        dim_head=32,
        ff_mult=2,
        context_dim=384,
        pooled_dim=384,
        num_groups=8,
        scale_shift=True,
    ),
    # Stable Diffusion 1.5's UNet shape (Rombach et al. 2022; 860 M parameters):
    # 4-channel latents, CLIP ViT-L/14 text tokens (768), 8 heads at every level
    # (SD 2.x keeps 64 channels per head instead: dim_head=64).
    "sd15": dict(
        in_channels=4,
        out_channels=4,
        model_channels=320,
        channel_mult=(1, 2, 4, 4),
        num_res_blocks=2,
        attention_levels=(0, 1, 2),
        dim_head=(40, 80, 160, 160),  # 320/8, 640/8, 1280/8, 1280/8
        context_dim=768,
        pooled_dim=None,
        num_groups=32,
        scale_shift=False,
    ),
    # SDXL 1.0's UNet shape (Podell et al. 2023; 2.6 G parameters): three levels, no attention at
    # the first, 2 and 10 transformer blocks at the others (10 in the middle), 64 channels per
    # head, two CLIP towers' tokens (768 + 1280) and the second's pooled embedding (1280) with
    # six time ids (original size, crop corner, target size) in the time embedding.
    "sdxl": dict(
        in_channels=4,
        out_channels=4,
        model_channels=320,
        channel_mult=(1, 2, 4),
        num_res_blocks=2,
        attention_levels=(1, 2),
        transformer_depth=(1, 2, 10),
        dim_head=64,
        context_dim=2048,
        pooled_dim=1280,
        added_time_ids=6,
        added_time_dim=256,
        num_groups=32,
        scale_shift=False,
    ),
}


def skip_layer_checks(model: nn.Module) -> None:
    """Turn off the per-call argument checks of ``model``'s fused layers (`GroupNormSiLU`, `Attention`).

    For a model whose forward checks its own inputs: every tensor those layers see is made
    from them by the model's own layers, so each layer's checks (several µs of host time per
    call, a hundred calls per SD UNet forward) could only repeat them.  A layer taken out of
    such a model and called alone does not check its arguments either.
    """
    for m in model.modules():
        if isinstance(m, (GroupNormSiLU, Attention)):
            m.check_inputs = False


def zero_init(module: nn.Module) -> nn.Module:
    """``module`` with every parameter set to 0 (in place), returned.  The last layer of a residual
    branch starts at 0, so the branch starts as the identity (Dhariwal & Nichol 2021, ADM)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int, scale_shift: bool, dropout: float):
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = GroupNormSiLU(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * cout if scale_shift else cout)
        self.norm2 = GroupNormSiLU(groups, cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.norm1(x))
        e = self.emb_proj(F.silu(emb))  # (B, 2C) or (B, C)
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h, scale=scale, shift=shift)
        else:
            h = self.norm2(h + e[:, :, None, None])
        return self.skip(x) + self.conv2(self.dropout(h))


class FeedForward(nn.Module):
    """GEGLU feed-forward (Shazeer 2020): (x W₁ ⊙ GELU(x W₂)) W₃, inner width mult·dim."""

    def __init__(self, dim: int, mult: int):
        super().__init__()
        self.proj_in = nn.Linear(dim, 2 * mult * dim)
        self.proj_out = nn.Linear(mult * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(h * F.gelu(gate))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, context_dim: int, dim_head: int, ff_mult: int):
        super().__init__()
        heads = dim // dim_head
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads=heads, dim_head=dim_head)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, context_dim=context_dim, heads=heads, dim_head=dim_head)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, ff_mult)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))  # (B, L, C)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GN → 1×1 conv → transformer blocks on the (B, H·W, C) tokens → 1×1 conv (zero-init) → + x."""

    def __init__(self, dim: int, context_dim: int, dim_head: int, depth: int, groups: int, ff_mult: int):
        super().__init__()
        # eps 1e-6 and no SiLU: Stable Diffusion's normalisation in front of attention.
        self.norm = GroupNormSiLU(groups, dim, eps=1e-6, silu=False)
        self.proj_in = nn.Conv2d(dim, dim, 1)
        self.blocks = nn.ModuleList(TransformerBlock(dim, context_dim, dim_head, ff_mult) for _ in range(depth))
        self.proj_out = zero_init(nn.Conv2d(dim, dim, 1))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = image_to_tokens(self.proj_in(self.norm(x)))  # (B, H·W, C)
        for block in self.blocks:
            h = block(h, context)
        return x + self.proj_out(tokens_to_image(h, H, W))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Stage(nn.Module):
    """One ResBlock and its optional transformer: the unit that skips and checkpoints."""

    def __init__(self, res: ResBlock, attn: SpatialTransformer | None):
        super().__init__()
        self.res = res
        self.attn = attn

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.res(x, emb)
        return self.attn(x, context) if self.attn is not None else x


class UNet(nn.Module):
    """ε/v/x_0-predicting UNet: ``forward(x, t, context, pooled=None) -> (B, out_channels, H, W)`` fp32.

    x: (B, in_channels, H, W) with H and W divisible by 2^(levels − 1); t: (B,) int or
    float timesteps; context: (B, L, context_dim) text tokens; pooled: (B, pooled_dim)
    when the config has ``pooled_dim``; time_ids: (B, added_time_ids) when it has those
    (SDXL: original height and width, crop top and left, target height and width).
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        emb_dim = c.time_embed_dim or 4 * c.model_channels
        self.time_embed = TimestepEmbedding(c.model_channels, emb_dim, c.pooled_dim, c.added_time_ids, c.added_time_dim)
        p2 = c.patch_size**2
        self.conv_in = nn.Conv2d(p2 * c.in_channels, c.model_channels, 3, padding=1)

        def stage(cin: int, cout: int, level: int) -> Stage:
            res = ResBlock(cin, cout, emb_dim, c.num_groups, c.scale_shift, c.dropout)
            attn = None
            if level in c.attention_levels:
                attn = SpatialTransformer(
                    cout, c.context_dim, c.head_dim(level), c.depth(level), c.num_groups, c.ff_mult
                )
            return Stage(res, attn)

        widths = [c.model_channels * m for m in c.channel_mult]
        skip_widths = [c.model_channels]
        self.down = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        ch = c.model_channels
        for level, width in enumerate(widths):
            stages = nn.ModuleList()
            for _ in range(c.num_res_blocks):
                stages.append(stage(ch, width, level))
                ch = width
                skip_widths.append(ch)
            self.down.append(stages)
            last = level == len(widths) - 1
            self.downsamplers.append(nn.Identity() if last else Downsample(ch))
            if not last:
                skip_widths.append(ch)

        self.mid_res1 = ResBlock(ch, ch, emb_dim, c.num_groups, c.scale_shift, c.dropout)
        last = len(widths) - 1
        self.mid_attn = SpatialTransformer(ch, c.context_dim, c.head_dim(last), c.depth(last), c.num_groups, c.ff_mult)
        self.mid_res2 = ResBlock(ch, ch, emb_dim, c.num_groups, c.scale_shift, c.dropout)

        self.up = nn.ModuleList()
        self.upsamplers = nn.ModuleList()
        for level in reversed(range(len(widths))):
            stages = nn.ModuleList()
            for _ in range(c.num_res_blocks + 1):
                stages.append(stage(ch + skip_widths.pop(), widths[level], level))
                ch = widths[level]
            self.up.append(stages)
            self.upsamplers.append(Upsample(ch) if level > 0 else nn.Identity())

        self.norm_out = GroupNormSiLU(c.num_groups, ch)
        self.conv_out = zero_init(nn.Conv2d(ch, p2 * c.out_channels, 3, padding=1))
        skip_layer_checks(self)

    @property
    def downscale(self) -> int:
        """H and W must be multiples of this."""
        return self.config.downscale

    def _check_inputs(
        self, x_shape: tuple[int, ...], t, context, pooled, frames: int = 1, *, time_ids=None
    ) -> torch.Tensor:
        """Check a forward's inputs, x given by its shape (B, C, *spatial); returns t as (B,).

        These are the only checks of a forward: the layers skip theirs (`skip_layer_checks`).
        ``frames``: how many of x's images a GroupNorm normalises together (a video's clip).
        """
        c = self.config
        B, H, W = x_shape[0], x_shape[-2], x_shape[-1]
        if B == 0:
            raise ValueError(f"x must hold at least one image, got shape {tuple(x_shape)}")
        if H == 0 or W == 0 or H % self.downscale or W % self.downscale:
            raise ValueError(f"x's height and width must be positive multiples of {self.downscale}, got {(H, W)}")
        if t.ndim == 0:
            t = t.expand(B)
        if t.shape != (B,):
            raise ValueError(f"t must have shape ({B},), got {tuple(t.shape)}")
        tensor_checks.check_tensor("context", context)
        if context.ndim != 3 or context.shape[0] != B or context.shape[2] != c.context_dim or context.shape[1] == 0:
            raise ValueError(
                f"context must have shape ({B}, L, {c.context_dim}) with L >= 1, got {tuple(context.shape)}"
            )
        if c.pooled_dim and (pooled is None or pooled.shape != (B, c.pooled_dim)):
            got = None if pooled is None else tuple(pooled.shape)
            raise ValueError(f"pooled must have shape ({B}, {c.pooled_dim}), got {got}")
        if time_ids is not None:
            tensor_checks.check_tensor("time_ids", time_ids)
        if c.added_time_ids and (time_ids is None or time_ids.shape != (B, c.added_time_ids)):
            got = None if time_ids is None else tuple(time_ids.shape)
            raise ValueError(f"time_ids must have shape ({B}, {c.added_time_ids}), got {got}")
        if not c.added_time_ids and time_ids is not None:
            raise ValueError("time_ids given, but this model takes none (UNetConfig.added_time_ids is 0)")
        # The largest extent a layer addresses: at full resolution, q, k and v rows of 3·width
        # (a GroupNorm sees at most 2·width channels), over a clip's frames; the context's k, v rows.
        width = c.model_channels * max(c.channel_mult)
        positions = H * W // c.patch_size**2
        if max(frames * positions, context.shape[1]) * 3 * width >= MAX_OFFSET:
            raise ValueError(
                f"x {tuple(x_shape)} and context {tuple(context.shape)} are too large for this model's kernels "
                f"(32-bit offsets within a sample)"
            )
        return t

    def _run(self, module: nn.Module, *args) -> torch.Tensor:
        if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        c = self.config
        tensor_checks.check_float("x", x)
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"x must have shape (B, {c.in_channels}, H, W), got {tuple(x.shape)}")
        t = self._check_inputs(x.shape, t, context, pooled, time_ids=time_ids)

        emb = self.time_embed(t, pooled, time_ids)
        # Space-to-depth (Hoogeboom et al. 2023, §3.1): every p×p patch becomes p² channels,
        # so a pixel model pays for H/p × W/p positions; undone after conv_out.
        h = self.conv_in(F.pixel_unshuffle(x, c.patch_size) if c.patch_size > 1 else x)
        skips = [h]
        for stages, down in zip(self.down, self.downsamplers):
            for s in stages:
                h = self._run(s, h, emb, context)
                skips.append(h)
            if not isinstance(down, nn.Identity):
                h = down(h)
                skips.append(h)
        h = self._run(self.mid_res1, h, emb)
        h = self._run(self.mid_attn, h, context)
        h = self._run(self.mid_res2, h, emb)
        for stages, up in zip(self.up, self.upsamplers):
            for s in stages:
                h = self._run(s, torch.cat([h, skips.pop()], dim=1), emb, context)
            h = up(h)
        out = self.conv_out(self.norm_out(h))
        return (F.pixel_shuffle(out, c.patch_size) if c.patch_size > 1 else out).float()
