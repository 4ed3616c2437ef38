r"""diffusers ⇄ fastdiff: configs and state dicts of the SD UNet and VAE.

The UNet.  fastdiff's `UNet` has diffusers' ``UNet2DConditionModel`` layers under other
module names; `diffusers_name` maps each fastdiff parameter name to diffusers' (the only
place the two layouts meet):

    fastdiff                                   diffusers
    time_embed.linear_1                        time_embedding.linear_1
    time_embed.add_embedding.linear_1          add_embedding.linear_1                  (SDXL)
    down.{l}.{i}.res / .attn                   down_blocks.{l}.resnets.{i} / .attentions.{i}
    downsamplers.{l}                           down_blocks.{l}.downsamplers.0
    mid_res1, mid_attn, mid_res2               mid_block.resnets.0, .attentions.0, .resnets.1
    up.{l}.{i}.res / .attn, upsamplers.{l}     up_blocks.{l}.resnets.{i} / .attentions.{i}, .upsamplers.0
    norm_out                                   conv_norm_out
    …res.emb_proj, …res.skip                   …time_emb_proj, …conv_shortcut
    …attn.blocks.{k}                           …transformer_blocks.{k}
    …attn1.to_q / to_k / to_v / to_out         …attn1.to_q / to_k / to_v / to_out.0
    …ff.proj_in, …ff.proj_out                  …ff.net.0.proj, …ff.net.2

Shapes are the same except the transformers' ``proj_in``/``proj_out``: 1×1 convolutions in
fastdiff (and SD 1.x), linear layers in SD 2.x (``use_linear_projection``) — the same
matrix, (C, C, 1, 1) against (C, C).

The VAE.  fastdiff's `VAE` keeps diffusers' names but ``to_out`` (``to_out.0``) and
``resample`` (``downsamplers.0``, ``upsamplers.0``); older folders name the attention
``query``, ``key``, ``value``, ``proj_attn``, sometimes as 1×1 convolutions.

Every conversion checks names and shapes against the model it fills and raises naming
the weights file: a missing tensor, one of the wrong shape, one the config has no place for.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from fastdiff.nn.unet import UNetConfig
from fastdiff.nn.vae import VAEConfig
from fastdiff.ops.flash_attention import HEAD_DIMS

# ----------------------------------------------------------------------------- names

# fastdiff UNet name → diffusers name, applied in order (module paths first, then layers inside).
_UNET_RENAMES = [
    (r"^time_embed\.add_embedding\.", "add_embedding."),
    (r"^time_embed\.", "time_embedding."),
    (r"^norm_out\.", "conv_norm_out."),
    (r"^down\.(\d+)\.(\d+)\.res\.", r"down_blocks.\1.resnets.\2."),
    (r"^down\.(\d+)\.(\d+)\.attn\.", r"down_blocks.\1.attentions.\2."),
    (r"^downsamplers\.(\d+)\.", r"down_blocks.\1.downsamplers.0."),
    (r"^mid_res1\.", "mid_block.resnets.0."),
    (r"^mid_attn\.", "mid_block.attentions.0."),
    (r"^mid_res2\.", "mid_block.resnets.1."),
    (r"^up\.(\d+)\.(\d+)\.res\.", r"up_blocks.\1.resnets.\2."),
    (r"^up\.(\d+)\.(\d+)\.attn\.", r"up_blocks.\1.attentions.\2."),
    (r"^upsamplers\.(\d+)\.", r"up_blocks.\1.upsamplers.0."),
    (r"\.emb_proj\.", ".time_emb_proj."),
    (r"\.skip\.", ".conv_shortcut."),
    (r"\.blocks\.(\d+)\.", r".transformer_blocks.\1."),
    (r"\.to_out\.", ".to_out.0."),
    (r"\.ff\.proj_in\.", ".ff.net.0.proj."),
    (r"\.ff\.proj_out\.", ".ff.net.2."),
]

# fastdiff VAE name → diffusers names (current first, then the pre-0.14 attention names).
_VAE_RENAMES = [
    (r"^encoder\.down_blocks\.(\d+)\.resample\.", r"encoder.down_blocks.\1.downsamplers.0."),
    (r"^decoder\.up_blocks\.(\d+)\.resample\.", r"decoder.up_blocks.\1.upsamplers.0."),
    (r"\.to_out\.", ".to_out.0."),
]
_VAE_LEGACY = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}


def _rename(key: str, renames) -> str:
    for pattern, repl in renames:
        key = re.sub(pattern, repl, key)
    return key


def diffusers_name(key: str) -> str:
    """The name in diffusers' ``UNet2DConditionModel`` of fastdiff `UNet` parameter ``key``."""
    return _rename(key, _UNET_RENAMES)


def _vae_names(key: str) -> list[str]:
    name = _rename(key, _VAE_RENAMES)
    legacy = next((name.replace(new, old) for new, old in _VAE_LEGACY.items() if new in name), None)
    return [name] if legacy is None else [name, legacy]


# ----------------------------------------------------------------------------- state dicts


def _same_matrix(a: torch.Size, b: torch.Size) -> bool:
    """A linear layer's (out, in) and a 1×1 convolution's (out, in, 1, 1): the same weights."""
    strip = lambda s: tuple(s[:2]) if len(s) == 4 and tuple(s[2:]) == (1, 1) else tuple(s)  # noqa: E731
    return len(a) != len(b) and strip(a) == strip(b)


def _fill(model: nn.Module, state: dict[str, torch.Tensor], names, where: str) -> dict[str, torch.Tensor]:
    """``model``'s state dict (fp32) taken from ``state`` through ``names(key) -> [candidate names]``.

    Raises naming ``where`` unless every parameter of ``model`` is found with its shape (a
    linear/1×1-conv pair is reshaped) and every tensor of ``state`` is used.
    """
    out, used = {}, set()
    for key, ref in model.state_dict().items():
        candidates = names(key)
        name = next((n for n in candidates if n in state), None)
        if name is None:
            raise ValueError(f"{where}: no tensor {candidates[0]!r}; the weights do not fit the folder's config")
        t = state[name]
        if t.shape != ref.shape:
            if not _same_matrix(t.shape, ref.shape):
                raise ValueError(
                    f"{where}: {name} has shape {tuple(t.shape)}, the folder's config needs {tuple(ref.shape)}"
                )
            t = t.reshape(ref.shape)
        out[key] = t.float()
        used.add(name)
    extra = sorted(set(state) - used)
    if extra:
        raise ValueError(f"{where}: {len(extra)} tensors the folder's config has no place for, e.g. {extra[0]!r}")
    return out


def unet_from_diffusers(state: dict[str, torch.Tensor], unet: nn.Module, where: str = "unet") -> dict:
    """A state dict for fastdiff ``unet`` from a diffusers ``UNet2DConditionModel`` one."""
    return _fill(unet, state, lambda key: [diffusers_name(key)], where)


def unet_to_diffusers(state: dict[str, torch.Tensor], *, linear_projection: bool = False) -> dict:
    """A diffusers ``UNet2DConditionModel`` state dict from a fastdiff `UNet` one.

    ``linear_projection``: the transformers' proj_in/proj_out become linear layers (SD 2.x,
    ``use_linear_projection=True``) instead of 1×1 convolutions.
    """
    out = {}
    for key, t in state.items():
        name = diffusers_name(key)
        if linear_projection and re.search(r"attentions\.\d+\.proj_(in|out)\.weight$", name):
            t = t.reshape(t.shape[:2])
        out[name] = t
    return out


def vae_from_diffusers(state: dict[str, torch.Tensor], vae: nn.Module, where: str = "vae") -> dict:
    """A state dict for fastdiff ``vae`` from a diffusers ``AutoencoderKL`` one (current or legacy names)."""
    return _fill(vae, state, _vae_names, where)


# ----------------------------------------------------------------------------- configs

# diffusers' defaults for the UNet2DConditionModel options read here (a config.json may leave them out).
_UNET_DEFAULTS = {
    "in_channels": 4, "out_channels": 4, "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "attention_head_dim": 8, "num_attention_heads": None,
    "cross_attention_dim": 1280, "norm_num_groups": 32, "transformer_layers_per_block": 1, "time_embedding_dim": None,
    "addition_time_embed_dim": None,
}  # fmt: skip
# SDXL's micro-conditioning: original size, crop top-left, target size (StableDiffusionXLPipeline's time ids).
SDXL_TIME_IDS = 6
# diffusers UNet2DConditionModel options fastdiff's UNet has no equivalent for, and the value it needs.
_UNET_FIXED = {
    "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False, "downsample_padding": 1, "mid_block_scale_factor": 1, "act_fn": "silu",
    "norm_eps": 1e-5, "encoder_hid_dim": None, "dual_cross_attention": False, "class_embed_type": None,
    "addition_embed_type": None, "num_class_embeds": None, "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional",
    "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "projection_class_embeddings_input_dim": None, "attention_type": "default",
    "class_embeddings_concat": False, "mid_block_only_cross_attention": None, "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
}  # fmt: skip


def _check_fixed(config: dict, fixed: dict, where: Path) -> None:
    for key, needed in fixed.items():
        value = config.get(key, needed)
        if any(v != needed for v in (value if isinstance(value, list) else [value])):
            raise ValueError(f"{where}: {key}={value!r} is not supported (fastdiff's model needs {needed!r})")


def _per_level(config: dict, key: str, levels: int, where: Path) -> list:
    value = config[key]
    values = list(value) if isinstance(value, (list, tuple)) else [value] * levels
    if len(values) != levels:
        raise ValueError(f"{where}: {key} must have one entry per block ({levels}), got {value!r}")
    return values


def _uniform(config: dict, key: str, levels: int, where: Path) -> int:
    values = set(_per_level(config, key, levels, where))
    if len(values) != 1:
        raise ValueError(f"{where}: {key}={config[key]!r} differs between blocks; fastdiff's UNet needs one value")
    return values.pop()


def _depths(config: dict, levels: int, where: Path) -> int | tuple[int, ...]:
    """Transformer blocks per level: one int, or one per level (SDXL: 1, 2, 10); the middle block
    takes the last level's, as diffusers' does."""
    depths = _per_level(config, "transformer_layers_per_block", levels, where)
    if not all(isinstance(d, int) and d >= 1 for d in depths):
        raise ValueError(f"{where}: transformer_layers_per_block={config['transformer_layers_per_block']!r} is not "
                         "supported (fastdiff reads one positive int per block)")  # fmt: skip
    return depths[0] if len(set(depths)) == 1 else tuple(depths)


def unet_config_from_diffusers(config: dict, where: Path) -> UNetConfig:
    """The `UNetConfig` of a diffusers ``UNet2DConditionModel`` ``config.json`` (SD 1.x/2.x and SDXL layouts).

    Attention heads: diffusers' ``attention_head_dim`` is, for these models, the number of
    heads per block (``num_attention_heads`` when set); fastdiff stores channels per head.
    """
    config = {**_UNET_DEFAULTS, **config}
    pooled_dim, time_dim = None, 256
    if config.get("addition_embed_type") == "text_time":  # SDXL: pooled text + time ids join the time embedding
        time_dim, inputs = config["addition_time_embed_dim"], config.get("projection_class_embeddings_input_dim")
        if not isinstance(time_dim, int) or not isinstance(inputs, int) or inputs <= SDXL_TIME_IDS * time_dim:
            raise ValueError(
                f"{where}: addition_embed_type 'text_time' needs projection_class_embeddings_input_dim > "
                f"{SDXL_TIME_IDS}·addition_time_embed_dim, got {inputs!r} and {time_dim!r}"
            )
        pooled_dim = inputs - SDXL_TIME_IDS * time_dim
        config = {**config, "addition_embed_type": None, "projection_class_embeddings_input_dim": None}
    _check_fixed(config, _UNET_FIXED, where)
    widths = list(config["block_out_channels"])
    levels = len(widths)
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    if len(down) != levels or len(up) != levels:
        raise ValueError(f"{where}: down_block_types and up_block_types need one entry per block_out_channels")
    attention = [kind == "CrossAttnDownBlock2D" for kind in down]
    kinds = {("CrossAttnDownBlock2D", "CrossAttnUpBlock2D"), ("DownBlock2D", "UpBlock2D")}
    for d, u in zip(down, reversed(up)):
        if (d, u) not in kinds:
            raise ValueError(
                f"{where}: blocks {d} / {u} are not supported (fastdiff reads the SD 1.x/2.x and SDXL UNets)"
            )
    if any(w % widths[0] for w in widths):
        raise ValueError(f"{where}: block_out_channels {widths} must be multiples of the first")
    heads_key = "num_attention_heads" if config["num_attention_heads"] else "attention_head_dim"
    heads = _per_level(config, heads_key, levels, where)
    dim_head = [w // h for w, h in zip(widths, heads)]
    for level, d in enumerate(dim_head):
        if (attention[level] or level == levels - 1) and d not in HEAD_DIMS:
            raise ValueError(f"{where}: {widths[level]} channels in {heads[level]} heads is {d} per head; "
                             f"fastdiff's attention takes {HEAD_DIMS}")  # fmt: skip
    return UNetConfig(
        in_channels=config["in_channels"],
        out_channels=config["out_channels"],
        model_channels=widths[0],
        channel_mult=tuple(w // widths[0] for w in widths),
        num_res_blocks=_uniform(config, "layers_per_block", levels, where),
        attention_levels=tuple(i for i, a in enumerate(attention) if a),
        transformer_depth=_depths(config, levels, where),
        dim_head=dim_head[0] if len(set(dim_head)) == 1 else tuple(dim_head),
        ff_mult=4,
        context_dim=config["cross_attention_dim"],
        pooled_dim=pooled_dim,
        added_time_ids=SDXL_TIME_IDS if pooled_dim else 0,
        added_time_dim=time_dim,
        num_groups=config["norm_num_groups"],
        scale_shift=False,
        time_embed_dim=config["time_embedding_dim"],
        dropout=0.0,
    )


# diffusers' defaults for the AutoencoderKL options read here, and the options fastdiff's VAE needs fixed.
_VAE_DEFAULTS = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"], "block_out_channels": [64], "layers_per_block": 1, "latent_channels": 4,
    "norm_num_groups": 32, "scaling_factor": 0.18215, "mid_block_add_attention": True, "use_quant_conv": True,
    "use_post_quant_conv": True,
}  # fmt: skip
_VAE_FIXED = {"act_fn": "silu", "shift_factor": None, "latents_mean": None, "latents_std": None}


def vae_config_from_diffusers(config: dict, where: Path) -> VAEConfig:
    """The `VAEConfig` of a diffusers ``AutoencoderKL`` ``config.json``."""
    config = {**_VAE_DEFAULTS, **config}
    _check_fixed(config, _VAE_FIXED, where)
    for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if any(k != kind for k in config[key]):
            raise ValueError(f"{where}: {key} {config[key]} are not supported (fastdiff reads {kind} blocks)")
    return VAEConfig(
        in_channels=config["in_channels"],
        out_channels=config["out_channels"],
        latent_channels=config["latent_channels"],
        block_out_channels=tuple(config["block_out_channels"]),
        layers_per_block=config["layers_per_block"],
        norm_num_groups=config["norm_num_groups"],
        mid_attention=config["mid_block_add_attention"],
        use_quant_conv=config["use_quant_conv"],
        use_post_quant_conv=config["use_post_quant_conv"],
        scaling_factor=config["scaling_factor"],
    )
