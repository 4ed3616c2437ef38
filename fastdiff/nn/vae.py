r"""The Stable Diffusion autoencoder ("AutoencoderKL", Rombach et al. 2022, §3), built on fastdiff's ops.

    encoder: conv_in → per level [ResBlock × layers, Downsample (not after the last)]
             → mid: ResBlock, Attention, ResBlock → GN+SiLU → conv_out → quant_conv
             → (μ, log σ²) of the posterior q(z | x), 2 × latent_channels
    decoder: post_quant_conv → conv_in → mid → per level, deepest first,
             [ResBlock × (layers + 1), Upsample (not after the last)] → GN+SiLU → conv_out

    ResBlock:  h = conv2(SiLU(GN(conv1(SiLU(GN(x)))))),  out = shortcut(x) + h   (no time input)
    Attention: one head over the full width: y = x + Wo·softmax(q kᵀ/sqrt(C))·v, q, k, v from GN(x)

An image x in [−1, 1] of H×W becomes a latent z of H/f × W/f, f = 2^(levels − 1) (8 for
SD).  The diffusion model works on z·scaling_factor (unit variance over the training
set); a pipeline divides by it before `VAE.decode`.  A draw from the posterior is
z = μ + exp(½·log σ²)·ε; img2img and inpainting usually take it, the round trip μ.

Every GroupNorm(+SiLU) is fastdiff's fused ``ops.group_norm_silu`` (the VAE's hot path:
SD's decoder normalises 512-channel maps at up to 512×512).  The mid-block attention
has a single 512-wide head, beyond ``ops.attention``'s head dims, and runs on PyTorch's
scaled_dot_product_attention.  Module and parameter names are diffusers', except
``to_out`` (``to_out.0``) and ``resample`` (``downsamplers.0`` / ``upsamplers.0``): a
folder's state dict loads through `fastdiff.sd.vae_from_diffusers`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastdiff.nn.norm import GroupNormSiLU
from fastdiff.nn.unet import Upsample

EPS = 1e-6  # every GroupNorm of SD's autoencoder


@dataclass
class VAEConfig:
    """The shape of a `VAE` (diffusers' AutoencoderKL config; the defaults are SD 1.x/2.x's)."""

    in_channels: int = 3  # image channels
    out_channels: int = 3  # decoded image channels
    latent_channels: int = 4  # channels of z
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # width per level, full resolution first
    layers_per_block: int = 2  # encoder ResBlocks per level (the decoder has one more)
    norm_num_groups: int = 32  # GroupNorm groups everywhere
    mid_attention: bool = True  # the middle blocks have their attention layer
    use_quant_conv: bool = True  # 1×1 conv after the encoder
    use_post_quant_conv: bool = True  # 1×1 conv before the decoder
    scaling_factor: float = 0.18215  # diffusion latents are z·scaling_factor

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)
        for width in self.block_out_channels:
            if width % self.norm_num_groups:
                raise ValueError(f"block_out_channels must be divisible by norm_num_groups={self.norm_num_groups}")

    @property
    def downscale(self) -> int:
        """f: an H×W image has an H/f × W/f latent."""
        return 2 ** (len(self.block_out_channels) - 1)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = GroupNormSiLU(groups, cin, eps=EPS)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = GroupNormSiLU(groups, cout, eps=EPS)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(self.norm2(self.conv1(self.norm1(x))))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class SpatialAttention(nn.Module):
    """Single-head self-attention over the H·W positions of a (B, C, H, W) map, residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = GroupNormSiLU(groups, channels, eps=EPS, silu=False)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, H·W, C)
        q, k, v = (proj(h).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1, H·W, C)
        o = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        return x + self.to_out(o).transpose(1, 2).reshape(B, C, H, W)


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups), ResnetBlock(channels, channels, groups)])
        self.attentions = nn.ModuleList([SpatialAttention(channels, groups)] if attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    """Stride-2 3×3 conv after padding one row and column on the bottom and right (SD's encoder)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Level(nn.Module):
    """ResBlocks at one resolution, then an optional resampler (diffusers' DownEncoderBlock2D / UpDecoderBlock2D)."""

    def __init__(self, cin: int, cout: int, layers: int, groups: int, resample: nn.Module | None):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(layers))
        self.resample = resample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.resample is None else self.resample(x)


class Encoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        widths, g = c.block_out_channels, c.norm_num_groups
        self.conv_in = nn.Conv2d(c.in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        for i, width in enumerate(widths):
            down = Downsample(width) if i < len(widths) - 1 else None
            self.down_blocks.append(Level(widths[max(i - 1, 0)], width, c.layers_per_block, g, down))
        self.mid_block = MidBlock(widths[-1], g, c.mid_attention)
        self.conv_norm_out = GroupNormSiLU(g, widths[-1], eps=EPS)
        self.conv_out = nn.Conv2d(widths[-1], 2 * c.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        return self.conv_out(self.conv_norm_out(self.mid_block(h)))


class Decoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        widths, g = c.block_out_channels[::-1], c.norm_num_groups  # deepest first
        self.conv_in = nn.Conv2d(c.latent_channels, widths[0], 3, padding=1)
        self.mid_block = MidBlock(widths[0], g, c.mid_attention)
        self.up_blocks = nn.ModuleList()
        for i, width in enumerate(widths):
            up = Upsample(width) if i < len(widths) - 1 else None
            self.up_blocks.append(Level(widths[max(i - 1, 0)], width, c.layers_per_block + 1, g, up))
        self.conv_norm_out = GroupNormSiLU(g, widths[-1], eps=EPS)
        self.conv_out = nn.Conv2d(widths[-1], c.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(self.conv_norm_out(h))


class VAE(nn.Module):
    """``encode(x) -> (μ, log σ²)`` and ``decode(z) -> x``; x (B, 3, H, W) in [−1, 1], z (B, 4, H/f, W/f)."""

    LOGVAR_RANGE = (-30.0, 20.0)  # diffusers clamps log σ² here: exp stays finite in fp16

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = c = config
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        self.quant_conv = nn.Conv2d(2 * c.latent_channels, 2 * c.latent_channels, 1) if c.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c.latent_channels, c.latent_channels, 1) if c.use_post_quant_conv else None

    def _check(self, name: str, x: torch.Tensor, channels: int, multiple: int) -> None:
        if x.ndim != 4 or x.shape[1] != channels or x.shape[2] % multiple or x.shape[3] % multiple:
            shape = f"(B, {channels}, H, W) with H and W multiples of {multiple}"
            raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior's mean μ and log-variance log σ², each (B, latent_channels, H/f, W/f)."""
        self._check("x", x, self.config.in_channels, self.config.downscale)
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(*self.LOGVAR_RANGE)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The image (B, out_channels, H·f, W·f), about [−1, 1] (not clamped)."""
        self._check("z", z, self.config.latent_channels, 1)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)
