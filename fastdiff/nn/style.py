r"""A UNet that is also conditioned on a style image: `StyleUNet` and its `StyleEncoder`.

The style image s is read by a small convolutional encoder into one vector in the
space of the pooled text embedding, and added to it:

    f      = ConvNet(s)                                  (B, width, h, w) feature map
    z      = [mean_hw f, max_hw f]                        (B, 2·width)
    pooled' = pooled + keep · W z                         (B, pooled_dim),  W zero-initialised

The UNet's time embedding already adds ``pooled_proj(pooled)`` to every ResBlock's
scale/shift (ADM's class embedding; SDXL's pooled text), so the style reaches the whole
network through the path that carries global attributes of the prompt (its colour,
for the shapes set).  Max-pooling alongside the mean makes the vector see a colour
whatever the area it covers (a small shape is a few pixels of a 32×32 image).

Why this injection point: with W = 0 the model is *exactly* the text model it is
initialised from (appending style tokens to the cross-attention context would not be:
extra keys change every softmax), so fine-tuning starts from a working model.
``keep`` (B,) is 0 where the style is dropped (training for classifier-free guidance;
sampling without a style image), which again gives exactly the text model.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from fastdiff.nn.unet import UNet, UNetConfig


@dataclass
class StyleConfig:
    """The shape of a `StyleEncoder`."""

    in_channels: int = 3  # channels of the style image
    width: int = 64  # channels of the encoder's feature maps
    depth: int = 3  # stride-2 3×3 convolutions (32×32 → 4×4 with 3)

    def to_dict(self) -> dict:
        return asdict(self)


class StyleEncoder(nn.Module):
    """(B, C, H, W) image in [−1, 1] → (B, out_dim) vector; the output projection starts at zero."""

    def __init__(self, config: StyleConfig, out_dim: int):
        super().__init__()
        self.config = c = config
        layers, ch = [], c.in_channels
        for _ in range(c.depth):
            layers += [nn.Conv2d(ch, c.width, 3, stride=2, padding=1), nn.SiLU()]
            ch = c.width
        self.features = nn.Sequential(*layers)
        self.proj = nn.Linear(2 * c.width, out_dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        f = self.features(image)  # (B, width, h, w)
        z = torch.cat([f.mean((2, 3)), f.amax((2, 3))], dim=1)  # (B, 2·width)
        return self.proj(z)


class StyleUNet(UNet):
    """`UNet` + `StyleEncoder`: ``forward(x, t, context, pooled, style=None, style_keep=None)``.

    style: (B, C, R, R) style images in [−1, 1] or None (no style: exactly the UNet);
    style_keep: (B,) 1 to use image b's style, 0 to ignore it (default: all 1).
    The UNet's parameters keep their names, so a text model's weights load into it.
    """

    def __init__(self, config: UNetConfig, style_config: StyleConfig | None = None):
        if not config.pooled_dim:
            raise ValueError("StyleUNet needs a UNetConfig with pooled_dim (the style joins the pooled embedding)")
        super().__init__(config)
        self.style_config = style_config or StyleConfig()
        self.style_encoder = StyleEncoder(self.style_config, config.pooled_dim)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        pooled: torch.Tensor | None = None,
        style: torch.Tensor | None = None,
        style_keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if style is not None:
            B, c = x.shape[0], self.style_config
            if style.ndim != 4 or style.shape[0] != B or style.shape[1] != c.in_channels:
                raise ValueError(f"style must have shape ({B}, {c.in_channels}, H, W), got {tuple(style.shape)}")
            if pooled is None or pooled.shape != (B, self.config.pooled_dim):
                raise ValueError(f"pooled must have shape ({B}, {self.config.pooled_dim}) with a style")
            s = self.style_encoder(style.to(pooled.dtype))  # (B, pooled_dim)
            if style_keep is not None:
                s = s * style_keep.to(s.dtype)[:, None]
            pooled = pooled + s
        return super().forward(x, t, context, pooled)
