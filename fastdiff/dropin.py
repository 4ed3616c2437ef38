"""Drop fastdiff's fused kernels into models built elsewhere: ``patch(model)`` / ``unpatch(model)``.

The package exports these as ``fastdiff.patch``, ``fastdiff.unpatch`` and ``fastdiff.is_patched``;
the classes they install (`FastAttnProcessor`, ``FusedResnetBlock2D``, `SDPA`, ...) live here,
in ``fastdiff.dropin``, a module whose name no function takes.

What ``patch`` rewrites, walking every sub-module of ``model`` (a ``torch.nn.Module`` or a
diffusers pipeline, whose module components are patched one by one):

* **Attention** — every diffusers ``Attention`` whose processor is diffusers' own
  ``AttnProcessor2_0`` (the default under PyTorch 2) or ``AttnProcessor`` gets a
  `FastAttnProcessor`.  It runs the same code as the processor it replaces — spatial
  norm, group norm, ``norm_cross``, the q/k norms ``norm_q``/``norm_k``, 3-D (B, L, C) and
  4-D (B, C, H, W) hidden states, dropout, ``residual_connection``,
  ``rescale_output_factor`` — with `fastdiff.ops.attention` in place of the score/softmax
  core.  A call with an ``attention_mask`` (or with extra positional arguments) is handed
  to the original processor whole: the kernel has no mask.  A head dim outside
  ``HEAD_DIMS`` or a dtype outside fp32/fp16/bf16 keeps SDPA for the core.
* **ResnetBlock2D** — ``norm1 → SiLU`` and ``norm2 → SiLU`` each become one
  `fastdiff.ops.group_norm_silu` call.  With ``time_embedding_norm="scale_shift"`` the
  time embedding's ``h·(1 + scale) + shift`` is folded into the same pass (the op's FiLM
  terms).  With ``"default"`` the embedding is *added before* the norm, which moves each
  group's mean and variance, so it stays a separate add in front of the fused norm.
* **Output heads** — ``conv_norm_out → conv_act`` of ``UNet2DModel``,
  ``UNet2DConditionModel`` and the VAE ``Encoder``/``Decoder``: the GroupNorm computes
  SiLU(GN(x)) and the SiLU passes its input through.
* **Any ``nn.Sequential``** holding an ``nn.GroupNorm`` directly followed by an ``nn.SiLU``:
  fused the same way (the SiLU becomes a pass-through).
* **`SDPA` adapters** — modules that call attention through the `SDPA` module below route
  each call the kernel covers to `fastdiff.ops.attention`.

Nothing is rebuilt: a rewritten module keeps its identity, name, parameters (the same
Parameter objects), buffers and hooks; only its class is switched to a subclass whose
``forward`` calls the fused op (and an attention module only swaps its processor).  So
``state_dict()`` is unchanged by ``patch`` and ``unpatch`` switches every class and
processor back, after which the model computes exactly what it computed before.  Forward
hooks on ``norm1``/``norm2`` inside a patched ResnetBlock2D do not fire (the block calls the
fused op instead of those modules).

Modules a rewrite does not cover keep their original path and are listed, with the
reason, in the returned `PatchReport` (``report.fell_back``).

What ``patch`` can know is checked once, when patching: a GroupNorm's groups, eps and
affine shapes; an attention module's q/k/v widths, heads, head dim and softmax scale.  A
module that fails falls back.  A call of the host model then checks only what the host
passes, or may have changed since (``model.half()``): dtypes, shapes, devices and sizes
within the kernels' 32-bit offsets; it then calls the ops' unchecked entries
(``attention_unchecked``, ``group_norm_silu_unchecked``), not their public checks.
A call the kernels do not take runs PyTorch's own ops, which compute it or raise their own
error, as the unpatched model would.

    report = fastdiff.patch(pipe)     # or a UNet, a VAE, your own module
    print(report)                     # what was patched, what fell back and why
    fastdiff.unpatch(pipe)            # back to the original modules
"""
from __future__ import annotations

import collections
import math
import sys
from dataclasses import dataclass, field
import torch
import torch.nn.functional as F
from torch import nn

from fastdiff.ops.flash_attention import HEAD_DIMS, attention_unchecked
from fastdiff.ops.group_norm import group_norm_silu_unchecked

_OP_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_RECORD = "_fastdiff_patch"  # attribute of a patched root module: what to undo


# ----------------------------------------------------------------------------- report


@dataclass
class PatchReport:
    """What `patch` changed.  ``patched``: (kind, module path); ``fell_back``: (kind, path, reason).

    Kinds: "attention", "resnet_block", "output_head", "sequential", "sdpa".
    """

    patched: list[tuple[str, str]] = field(default_factory=list)
    fell_back: list[tuple[str, str, str]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Patched modules per kind."""
        return dict(collections.Counter(kind for kind, _ in self.patched))

    def fallback_counts(self) -> dict[str, int]:
        """Modules left on their original path, per kind."""
        return dict(collections.Counter(kind for kind, _, _ in self.fell_back))

    def _extend(self, other: "PatchReport", prefix: str) -> None:
        self.patched += [(k, _join(prefix, p)) for k, p in other.patched]
        self.fell_back += [(k, _join(prefix, p), r) for k, p, r in other.fell_back]

    def __str__(self) -> str:
        done, kept = self.counts(), self.fallback_counts()
        lines = [f"fastdiff.patch: {len(self.patched)} modules patched, {len(self.fell_back)} left on their original path"]
        for kind in sorted(set(done) | set(kept)):
            lines.append(f"  {kind:13} patched {done.get(kind, 0):4}   fell back {kept.get(kind, 0):4}")
        for kind, path, reason in self.fell_back:
            lines.append(f"  fallback {kind} {path or '<root>'}: {reason}")
        return "\n".join(lines)


def _join(prefix: str, path: str) -> str:
    return ".".join(p for p in (prefix, path) if p)


# ----------------------------------------------------------------------------- fused GroupNorm → SiLU


def _group_norm_problem(gn: nn.GroupNorm) -> str | None:
    """Why the fused op cannot stand in for ``gn`` whatever its input, or None (checked once, at patch time)."""
    C, G, eps = gn.num_channels, gn.num_groups, gn.eps
    if isinstance(G, bool) or not isinstance(G, int) or G <= 0 or C % G:
        return f"{G!r} groups do not divide its {C} channels"
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < math.inf:
        return f"eps {eps!r} is not a finite number >= 0"
    affine = [(name, t) for name, t in (("weight", gn.weight), ("bias", gn.bias)) if t is not None]
    for name, t in affine:
        if tuple(t.shape) != (C,) or not t.is_floating_point():
            return f"{name} is {t.dtype} of shape {tuple(t.shape)}, not floats of shape ({C},)"
    if len({(t.dtype, t.device) for _, t in affine}) > 1:
        return "weight and bias differ in dtype or device"
    return None


def _group_norm_takes(C: int, x: torch.Tensor, weight, scale, shift) -> bool:
    """Whether the fused op takes this call of a C-channel GroupNorm that passed `_group_norm_problem`:
    per call, only what the host model passes, and its weight's dtype and device, which ``model.half()``
    or ``.to(device)`` may have changed since patching."""
    shape = x.shape  # read once: each read of x.shape builds a new torch.Size
    if x.dtype not in _OP_DTYPES or len(shape) < 2 or shape[1] != C:
        return False
    n = x.numel()
    if n == 0 or n // shape[0] >= 2**31:  # the kernels' 32-bit offsets within a sample
        return False
    device = x.device
    if weight is not None and (weight.dtype not in _OP_DTYPES or weight.device != device):
        return False
    for t in (scale, shift):
        if t is not None and (t.shape != shape[:2] or t.dtype not in _OP_DTYPES or t.device != device):
            return False
    return True


def _gn_silu(gn: nn.GroupNorm, x: torch.Tensor, scale=None, shift=None) -> torch.Tensor:
    """SiLU(GN(x)·(1 + scale) + shift) with ``gn``'s groups, affine and eps, in one fused pass.

    A call the op does not take (float64, a FiLM term that broadcasts, another device, the
    wrong channel count) runs PyTorch's ops, which compute it or raise their own error, as
    the unpatched model would."""
    weight, bias = gn.weight, gn.bias  # each a module __getattr__: ~1 µs, read once
    if _group_norm_takes(gn.num_channels, x, weight, scale, shift):
        return group_norm_silu_unchecked(x, gn.num_groups, weight, bias, gn.eps, scale=scale, shift=shift)
    h = F.group_norm(x, gn.num_groups, weight, bias, gn.eps)
    if scale is not None:
        h = h * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
    return F.silu(h)


class GroupNormFusedSiLU(nn.GroupNorm):
    """A patched ``nn.GroupNorm`` whose following SiLU was folded in: forward = SiLU(GN(x))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _gn_silu(self, x)


class SiLUFoldedIntoNorm(nn.SiLU):
    """A patched ``nn.SiLU`` whose work the GroupNorm before it now does: forward = identity."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


# ----------------------------------------------------------------------------- attention


def _kernel_takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the attention kernel takes these (B, H, L, D) tensors, whose batch, heads, head dim
    and key count the caller has matched: one kernel dtype and device, a key, 32-bit token offsets."""
    dtype, device = q.dtype, q.device
    if dtype not in _OP_DTYPES or k.dtype != dtype or v.dtype != dtype or k.device != device or v.device != device:
        return False
    (_, _, Lq, D), Lk = q.shape, k.shape[2]
    return Lk > 0 and Lq * max(q.stride(2), D) < 2**31 and Lk * max(k.stride(2), v.stride(2), D) < 2**31


def _scale_ok(scale) -> bool:
    """A softmax scale the kernel takes: None (1/sqrt(D)) or a finite positive number."""
    return scale is None or (type(scale) in (int, float) and math.isfinite(scale) and scale > 0)


def _kernel_scale(head_dim: int, scale: float | None) -> float:
    """``scale``, or 1/sqrt(head_dim) where it is None, computed as SDPA and `fastdiff.ops.attention` do."""
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


class FastAttnProcessor:
    """diffusers attention processor with `fastdiff.ops.attention` as its core.

    Line for line the computation of diffusers' ``AttnProcessor2_0`` (which
    ``AttnProcessor`` equals up to how it spells the softmax), so every hook of the
    ``Attention`` module keeps working.  ``original`` is the processor it replaced: calls
    with an attention mask go to it unchanged, and `unpatch` puts it back.  ``head_dim``
    is the module's (one of ``HEAD_DIMS``); ``scale`` the softmax scale of the original
    (None: 1/sqrt(head_dim), as SDPA).  Both are checked here, once: a call checks only
    the dtypes, devices and sizes its module's layers produced (`_kernel_takes`), and
    one the kernel does not take runs SDPA.
    """

    def __init__(self, original, head_dim: int, scale: float | None = None):
        if head_dim not in HEAD_DIMS:
            raise ValueError(f"head dim {head_dim} not in {HEAD_DIMS}, the attention kernel's")
        if not _scale_ok(scale):
            raise ValueError(f"scale must be a finite positive number or None, got {scale!r}")
        self.original = original
        self.head_dim = head_dim
        self.scale = scale  # what SDPA gets, on calls the kernel does not take
        self.kernel_scale = _kernel_scale(head_dim, scale)

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if attention_mask is not None or args or kwargs:
            # The kernel has no mask; the original processor also owns the deprecated `scale` argument.
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size = hidden_states.shape[0] if encoder_hidden_states is None else encoder_hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        # (B, L, H·D) → (B, H, L, D) strided views: the kernel reads them in place
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # batch and heads agree by the views above; q, k and v widths by `_patch_attention`
        if head_dim == self.head_dim and _kernel_takes(query, key, value):
            hidden_states = attention_unchecked(query, key, value, scale=self.kernel_scale)
        else:
            hidden_states = F.scaled_dot_product_attention(query, key, value, scale=self.scale)

        # the op stores (B, L, H, D): merging the heads is a view
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)  # dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


# ----------------------------------------------------------------------------- SDPA adapter


class SDPA(nn.Module):
    """Adapter for your own attention modules: ``scaled_dot_product_attention`` as a module.

    Hold one (``self.sdpa = SDPA()``) and call it where you called
    ``F.scaled_dot_product_attention(q, k, v, ...)``, same arguments.  Unpatched it *is*
    that call.  After `patch`, calls without ``attn_mask``, ``dropout_p`` or ``is_causal``,
    with a head dim in ``HEAD_DIMS`` and fp32/fp16/bf16 tensors run
    `fastdiff.ops.attention`; every other call still runs SDPA.
    """

    def forward(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kwargs
        )


class FusedSDPA(SDPA):
    """A patched `SDPA`: the calls the kernel covers go to `fastdiff.ops.attention`."""

    def forward(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        plain = attn_mask is None and dropout_p == 0.0 and not is_causal and not kwargs
        if plain and _scale_ok(scale) and _sdpa_takes(query, key, value):
            return attention_unchecked(query, key, value, scale=_kernel_scale(query.shape[3], scale))
        return super().forward(query, key, value, attn_mask, dropout_p, is_causal, scale, **kwargs)


def _sdpa_takes(q, k, v) -> bool:
    """Whether the kernel takes the tensors of an `SDPA` call as they are: the user's, checked in full."""
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return False
    qs, ks, vs = q.shape, k.shape, v.shape
    return (
        len(qs) == len(ks) == len(vs) == 4
        and qs[3] in HEAD_DIMS
        and qs[:2] == ks[:2] == vs[:2]
        and qs[3] == ks[3] == vs[3]
        and ks[2] == vs[2]
        and _kernel_takes(q, k, v)
    )


# ----------------------------------------------------------------------------- diffusers ResnetBlock2D


def _fused_resnet_class() -> type:
    """The patched ResnetBlock2D subclass, defined on first use so that diffusers stays optional."""
    if _FUSED_RESNET:
        return _FUSED_RESNET[0]
    from diffusers.models.resnet import ResnetBlock2D

    class _FusedResnetBlock2D(ResnetBlock2D):
        """ResnetBlock2D with each GroupNorm → SiLU as one fused op (FiLM folded in for scale_shift).

        The rest of the forward is diffusers' own, step for step.
        """

        def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            if args or kwargs.get("scale", None) is not None:
                return ResnetBlock2D.forward(self, input_tensor, temb, *args, **kwargs)  # its deprecation path
            hidden_states = _gn_silu(self.norm1, input_tensor)
            if self.upsample is not None:
                if hidden_states.shape[0] >= 64:  # as diffusers: nearest-upsample of large NHWC batches
                    input_tensor = input_tensor.contiguous()
                    hidden_states = hidden_states.contiguous()
                input_tensor = self.upsample(input_tensor)
                hidden_states = self.upsample(hidden_states)
            elif self.downsample is not None:
                input_tensor = self.downsample(input_tensor)
                hidden_states = self.downsample(hidden_states)
            hidden_states = self.conv1(hidden_states)

            if self.time_emb_proj is not None:
                if not self.skip_time_act:
                    temb = self.nonlinearity(temb)
                temb = self.time_emb_proj(temb)  # (B, C) or (B, 2C)
            if self.time_embedding_norm == "scale_shift":
                if temb is None:
                    raise ValueError("`temb` should not be None when `time_embedding_norm` is scale_shift")
                time_scale, time_shift = torch.chunk(temb, 2, dim=1)
                hidden_states = _gn_silu(self.norm2, hidden_states, time_scale, time_shift)
            else:
                if temb is not None:
                    # added before the norm: it shifts the group statistics, so it cannot ride in the op's FiLM terms
                    hidden_states = hidden_states + (temb[:, :, None, None] if self.time_emb_proj is not None else temb)
                hidden_states = _gn_silu(self.norm2, hidden_states)

            hidden_states = self.dropout(hidden_states)
            hidden_states = self.conv2(hidden_states)
            if self.conv_shortcut is not None:
                if self.training:
                    input_tensor = input_tensor.contiguous()
                input_tensor = self.conv_shortcut(input_tensor)
            return (input_tensor + hidden_states) / self.output_scale_factor

    _FusedResnetBlock2D.__name__ = _FusedResnetBlock2D.__qualname__ = "FusedResnetBlock2D"
    _FusedResnetBlock2D.__module__ = __name__
    _FUSED_RESNET.append(_FusedResnetBlock2D)
    return _FusedResnetBlock2D


_FUSED_RESNET: list[type] = []  # the class, once built


def __getattr__(name: str):
    # `fastdiff.dropin.FusedResnetBlock2D` resolves on demand (the class is built on first use), so a
    # pickled patched model loads back in a fresh process
    if name == "FusedResnetBlock2D":
        return _fused_resnet_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------- the walk


@dataclass
class _Record:
    """What one `patch` call changed on a module tree, oldest first.

    Plain data (no closures), so that ``copy.deepcopy`` and pickling of a patched model
    carry a record that points at the copy's own modules.
    """

    report: PatchReport
    classes: list[tuple[nn.Module, type]] = field(default_factory=list)  # (module, its original class)
    processors: list[tuple[nn.Module, object]] = field(default_factory=list)  # (Attention, original processor)


def _swap_class(module: nn.Module, cls: type, record: _Record) -> None:
    record.classes.append((module, type(module)))
    module.__class__ = cls


# diffusers classes patch knows: (module, class name).  A model can only hold an instance
# of a class whose module is already imported, so patch looks them up in sys.modules and
# never imports diffusers itself.
_DIFFUSERS = {
    "Attention": ("diffusers.models.attention_processor", "Attention"),
    "AttnProcessor": ("diffusers.models.attention_processor", "AttnProcessor"),
    "AttnProcessor2_0": ("diffusers.models.attention_processor", "AttnProcessor2_0"),
    "ResnetBlock2D": ("diffusers.models.resnet", "ResnetBlock2D"),
    "UNet2DModel": ("diffusers.models.unets.unet_2d", "UNet2DModel"),
    "UNet2DConditionModel": ("diffusers.models.unets.unet_2d_condition", "UNet2DConditionModel"),
    "Encoder": ("diffusers.models.autoencoders.vae", "Encoder"),
    "Decoder": ("diffusers.models.autoencoders.vae", "Decoder"),
}
_HEADS = ("UNet2DModel", "UNet2DConditionModel", "Encoder", "Decoder")


def _diffusers() -> dict[str, type]:
    """The classes of ``_DIFFUSERS`` that are loaded in this process."""
    found = {}
    for key, (module, name) in _DIFFUSERS.items():
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None:
            found[key] = cls
    return found


def _patch_attention(path, attn, d, record) -> None:
    proc = attn.processor
    if type(proc) not in (d.get("AttnProcessor2_0"), d.get("AttnProcessor")):
        why = f"processor {type(proc).__name__} is not diffusers' default"
        record.report.fell_back.append(("attention", path, why))
        return
    widths = [getattr(attn, name, None) for name in ("to_q", "to_k", "to_v")]
    widths = [getattr(layer, "out_features", None) for layer in widths]
    if None in widths or len(set(widths)) > 1 or widths[1] % attn.heads:
        why = f"to_q, to_k, to_v widths {widths} are not one multiple of its {attn.heads} heads"
        record.report.fell_back.append(("attention", path, why))
        return
    # AttnProcessor2_0 leaves the scale to SDPA (1/sqrt(D)); AttnProcessor uses attn.scale
    scale = attn.scale if type(proc) is d.get("AttnProcessor") else None
    try:
        fast = FastAttnProcessor(proc, widths[1] // attn.heads, scale)
    except ValueError as e:  # a head dim or scale the kernel does not take
        record.report.fell_back.append(("attention", path, str(e)))
        return
    record.processors.append((attn, proc))
    attn.set_processor(fast)
    record.report.patched.append(("attention", path))


def _patch_resnet(path, block, d, record) -> None:
    if type(block) is not d["ResnetBlock2D"]:
        why = f"{type(block).__name__} overrides ResnetBlock2D.forward"
        record.report.fell_back.append(("resnet_block", path, why))
        return
    reason = None
    if type(block.nonlinearity) is not nn.SiLU:
        reason = f"activation is {type(block.nonlinearity).__name__}, not SiLU"
    elif type(block.norm1) is not nn.GroupNorm or type(block.norm2) is not nn.GroupNorm:
        reason = "norm1/norm2 are not plain nn.GroupNorm"
    elif block.time_embedding_norm == "scale_shift" and block.time_emb_proj is None:
        reason = "scale_shift without time_emb_proj"
    else:
        problems = {name: _group_norm_problem(getattr(block, name)) for name in ("norm1", "norm2")}
        reason = "; ".join(f"{name}: {why}" for name, why in problems.items() if why) or None
    if reason:
        record.report.fell_back.append(("resnet_block", path, reason))
        return
    _swap_class(block, _fused_resnet_class(), record)
    record.report.patched.append(("resnet_block", path))


def _fuse_pair(kind, path, gn, act, uses, record) -> bool:
    """Fold ``act`` (an nn.SiLU) into ``gn`` (an nn.GroupNorm) run right before it."""
    if uses[id(gn)] > 1 or uses[id(act)] > 1:
        # a module reached from two places may run alone there, where the fold would be wrong
        record.report.fell_back.append((kind, path, "GroupNorm or SiLU module is shared with another parent"))
        return False
    problem = _group_norm_problem(gn)
    if problem:
        record.report.fell_back.append((kind, path, problem))
        return False
    _swap_class(gn, GroupNormFusedSiLU, record)
    _swap_class(act, SiLUFoldedIntoNorm, record)
    record.report.patched.append((kind, path))
    return True


def _patch_head(path, model, uses, record) -> None:
    norm, act = model.conv_norm_out, model.conv_act
    if norm is None:
        return
    if type(norm) is not nn.GroupNorm or type(act) is not nn.SiLU:
        why = f"conv_norm_out {type(norm).__name__} → conv_act {type(act).__name__} is not GroupNorm → SiLU"
        record.report.fell_back.append(("output_head", path, why))
        return
    _fuse_pair("output_head", _join(path, "conv_norm_out"), norm, act, uses, record)


def _patch_sequential(path, seq, uses, record) -> None:
    mods = list(seq)
    i = 0
    while i < len(mods) - 1:
        if type(mods[i]) is nn.GroupNorm and type(mods[i + 1]) is nn.SiLU:
            if _fuse_pair("sequential", _join(path, str(i)), mods[i], mods[i + 1], uses, record):
                i += 1
        i += 1


def _check_unpatched(model: nn.Module, what: str) -> None:
    for name, m in model.named_modules():
        if hasattr(m, _RECORD):
            where = f" (its sub-module {name!r})" if name else ""
            raise ValueError(f"{what} is already patched{where}: call fastdiff.unpatch first")


def _patch_module(model: nn.Module, attention: bool, group_norm: bool) -> PatchReport:
    record = _Record(PatchReport())
    d = _diffusers()
    uses = collections.Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    heads = tuple(d[k] for k in _HEADS if k in d)
    for path, m in model.named_modules():
        if attention and "Attention" in d and isinstance(m, d["Attention"]):
            _patch_attention(path, m, d, record)
        elif group_norm and "ResnetBlock2D" in d and isinstance(m, d["ResnetBlock2D"]):
            _patch_resnet(path, m, d, record)
        elif group_norm and isinstance(m, heads):
            if type(m).forward in {cls.forward for cls in heads}:
                _patch_head(path, m, uses, record)
            else:
                record.report.fell_back.append(("output_head", path, f"{type(m).__name__} overrides forward"))
        if group_norm and isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward:
            _patch_sequential(path, m, uses, record)
        if attention and type(m) is SDPA:
            _swap_class(m, FusedSDPA, record)
            record.report.patched.append(("sdpa", path))
    setattr(model, _RECORD, record)
    return record.report


def _components(pipeline) -> dict[str, nn.Module]:
    return {k: v for k, v in pipeline.components.items() if isinstance(v, nn.Module)}


def _is_pipeline(obj) -> bool:
    return not isinstance(obj, nn.Module) and isinstance(getattr(obj, "components", None), dict)


def patch(model, *, attention: bool = True, group_norm: bool = True) -> PatchReport:
    """Route ``model``'s attention and GroupNorm → SiLU through fastdiff's fused ops, in place.

    model:      a ``torch.nn.Module`` (a diffusers UNet2DModel / UNet2DConditionModel /
                AutoencoderKL, or your own module) or a diffusers pipeline (each of its
                module components is patched).
    attention:  rewrite attention (diffusers processors, `SDPA` adapters).
    group_norm: rewrite GroupNorm → SiLU pairs (ResnetBlock2D, output heads, nn.Sequential).

    Returns a `PatchReport`: what was patched and what kept its original path, and why.
    Parameters and the state dict are untouched; `unpatch` restores the model exactly.
    """
    if _is_pipeline(model):
        comps = _components(model)
        for name, comp in comps.items():
            _check_unpatched(comp, f"model's component {name!r}")
        report = PatchReport()
        for name, comp in comps.items():
            report._extend(_patch_module(comp, attention, group_norm), name)
        return report
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or a diffusers pipeline, got {type(model).__name__}")
    _check_unpatched(model, "model")
    return _patch_module(model, attention, group_norm)


def unpatch(model) -> None:
    """Undo `patch`: every switched class and attention processor goes back to what it was.

    What the user changed after patching stays: an attention module whose processor is no
    longer the `FastAttnProcessor` that `patch` set (``attn.set_processor(mine)``,
    ``unet.set_attn_processor(...)``) keeps the processor it has now.
    """
    if _is_pipeline(model):
        for comp in _components(model).values():
            if hasattr(comp, _RECORD):
                unpatch(comp)
        return
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or a diffusers pipeline, got {type(model).__name__}")
    record = getattr(model, _RECORD, None)
    if record is None:
        raise ValueError("model was not patched by fastdiff.patch")
    for attn, proc in reversed(record.processors):
        current = attn.processor
        if isinstance(current, FastAttnProcessor) and current.original is proc:
            attn.set_processor(proc)
    for module, cls in reversed(record.classes):
        module.__class__ = cls
    delattr(model, _RECORD)


def is_patched(model) -> bool:
    """True when `patch` changed ``model`` (or, for a pipeline, any of its components)."""
    if _is_pipeline(model):
        return any(hasattr(c, _RECORD) for c in _components(model).values())
    return hasattr(model, _RECORD)
