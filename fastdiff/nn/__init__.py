"""Model code built on fastdiff's ops: the UNet and its layers.

``GroupNormSiLU`` (norm.py) and ``Attention`` (attention.py) wrap the fused ops as
modules; ``UNet`` (unet.py) stacks them into an ADM / Stable Diffusion UNet.
"""
from fastdiff.nn.embeddings import TimestepEmbedding, timestep_embedding
from fastdiff.nn.unet import PRESETS, UNet, UNetConfig

__all__ = ["PRESETS", "TimestepEmbedding", "UNet", "UNetConfig", "timestep_embedding"]
