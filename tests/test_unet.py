"""The UNet: shapes, layouts, checkpointing, autocast, torch.compile tracing, errors, and its
structure against diffusers' UNet2DConditionModel.  Runs the ops' reference path (a whole
UNet through the Triton interpreter would take minutes)."""
import functools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err

import fastdiff
from fastdiff.nn import UNet, UNetConfig, timestep_embedding
from fastdiff.nn.attention import Attention
from fastdiff.nn.norm import GroupNormSiLU
from fastdiff.nn.unet import zero_init
from fastdiff.ops import flash_attention, group_norm
from fastdiff.ops.launch_tables import Plans

# Small but complete: two levels, attention at level 1 and in the middle, scale-shift
# ResBlocks, patchified input, a pooled embedding, odd context width.
SMALL = dict(
    in_channels=3, out_channels=3, model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
    dim_head=32, ff_mult=2, context_dim=24, pooled_dim=20, num_groups=4, scale_shift=True,
)  # fmt: skip


pytestmark = pytest.mark.usefixtures("reference_ops")


def randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Overwrite every parameter (zero-initialised output layers would hide the conditioning)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def inputs(cfg: UNetConfig, B=3, H=8, W=12, L=5):
    x = torch.randn(B, cfg.in_channels, H, W)
    t = torch.randint(0, 1000, (B,))
    ctx = torch.randn(B, L, cfg.context_dim)
    pooled = torch.randn(B, cfg.pooled_dim) if cfg.pooled_dim else None
    return x, t, ctx, pooled


def small_unet(train: bool = False):
    """A randomised UNet of the SMALL config (in train or eval mode) and inputs (x, t, ctx, pooled) for it."""
    cfg = UNetConfig(**SMALL)
    return randomise(UNet(cfg)).train(train), inputs(cfg)


@pytest.mark.parametrize("patch_size", [1, 2])
def test_forward_shape_dtype_and_conditioning(patch_size):
    cfg = UNetConfig(**SMALL, patch_size=patch_size)
    model = randomise(UNet(cfg)).eval()
    x, t, ctx, pooled = inputs(cfg, H=4 * patch_size, W=6 * patch_size)
    with torch.no_grad():
        out = model(x, t, ctx, pooled)
        assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
        # every input must matter: time, text tokens, pooled text, the image itself
        for changed in (
            model(x, (t + 97) % 1000, ctx, pooled),
            model(x, t, torch.randn_like(ctx), pooled),
            model(x, t, ctx, torch.randn_like(pooled)),
            model(torch.randn_like(x), t, ctx, pooled),
        ):
            assert rel_err(changed, out) > 1e-3
        # samples are independent: image 0 alone equals image 0 in the batch
        alone = model(x[:1], t[:1], ctx[:1], pooled[:1])
        assert rel_err(alone, out[:1]) < 1e-5


def test_fresh_model_predicts_zero():
    # ADM zero-initialises the last layer of every residual branch and the output conv.
    cfg = UNetConfig(**SMALL)
    x, t, ctx, pooled = inputs(cfg)
    assert torch.count_nonzero(UNet(cfg)(x, t, ctx, pooled)) == 0


def test_zero_init():
    layer = torch.nn.Conv2d(int(torch.randint(1, 5, ())), 3, 3)
    assert zero_init(layer) is layer
    assert all(torch.count_nonzero(p) == 0 for p in layer.parameters())


def test_channels_last_matches_contiguous():
    model, (x, t, ctx, pooled) = small_unet()
    with torch.no_grad():
        ref = model(x, t, ctx, pooled)
        cl = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last), t, ctx, pooled)
    assert rel_err(cl, ref) < 1e-5


def test_gradient_checkpointing_gives_the_same_gradients():
    model, (x, t, ctx, pooled) = small_unet(train=True)
    target = torch.randn_like(x)
    grads = []
    for ckpt in (False, True):
        model.config.gradient_checkpointing = ckpt
        model.zero_grad()
        (model(x, t, ctx, pooled) - target).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for g0, g1 in zip(*grads):
        assert rel_err(g1, g0) < 1e-5


def test_bf16_autocast_close_to_fp32():
    model, (x, t, ctx, pooled) = small_unet()
    with torch.no_grad():
        ref = model(x, t, ctx, pooled)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, t, ctx, pooled)
    assert low.dtype == torch.float32
    # bf16 has 8 mantissa bits (~4e-3 relative per rounding); through ~20 layers the error
    # stays of the order of a few 1e-2.
    assert rel_err(low, ref) < 5e-2


def test_traces_without_graph_breaks():
    # fullgraph=True fails on any graph break: the fastdiff ops must be traceable custom ops.
    model, (x, t, ctx, pooled) = small_unet()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        assert rel_err(compiled(x, t, ctx, pooled), model(x, t, ctx, pooled)) < 1e-6


def test_timestep_embedding_matches_float64_formula():
    t = torch.tensor([0, 1, 17, 999, 500.5])
    dim = 10
    emb = timestep_embedding(t, dim)
    half = dim // 2
    f = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    args = t.double()[:, None] * f
    ref = torch.cat([args.cos(), args.sin()], 1)
    assert emb.dtype == torch.float32 and (emb.double() - ref).abs().max() < 1e-4


def test_errors_name_the_argument():
    cfg = UNetConfig(**SMALL)
    model = UNet(cfg)
    x, t, ctx, pooled = inputs(cfg)
    with pytest.raises(ValueError, match="x must"):
        model(x[:, :2], t, ctx, pooled)
    with pytest.raises(ValueError, match="multiples of 2"):
        model(x[..., :7], t, ctx, pooled)
    with pytest.raises(ValueError, match="t must"):
        model(x, t[:2], ctx, pooled)
    with pytest.raises(ValueError, match="context must"):
        model(x, t, ctx[..., :5], pooled)
    with pytest.raises(ValueError, match="pooled must"):
        model(x, t, ctx, None)
    with pytest.raises(ValueError, match="preset"):
        UNetConfig.preset("nope")
    with pytest.raises(ValueError, match="attention_levels"):
        UNetConfig(**{**SMALL, "attention_levels": (2,)})
    with pytest.raises(ValueError, match="num_groups"):
        UNetConfig(**{**SMALL, "num_groups": 5})
    with pytest.raises(ValueError, match="unknown UNetConfig fields"):
        UNetConfig.from_dict({"bogus": 1})


def test_config_round_trips_through_dict():
    cfg = UNetConfig.preset("tiny")
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg


def test_sd15_shape_matches_diffusers():
    """Same layer shapes as diffusers' UNet2DConditionModel of the same configuration.

    A two-level SD-style model (additive time embedding, attention at level 0, none at the
    last level) is built both ways; every tensor of the state dicts (where our attention
    layers show their fused projections as diffusers' to_q, to_k, to_v) must have a
    counterpart of the same shape.  The full sd15 preset is built on the meta device and counted.
    """
    diffusers = pytest.importorskip("diffusers")
    cfg = UNetConfig.preset(
        "sd15", model_channels=32, channel_mult=(1, 2), attention_levels=(0,), dim_head=32, num_groups=8,
        context_dim=24,
    )  # fmt: skip
    ours = UNet(cfg)
    theirs = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=1, norm_num_groups=8,
    )  # fmt: skip
    shapes = lambda m: sorted(tuple(p.shape) for p in m.state_dict().values())  # noqa: E731
    assert shapes(ours) == shapes(theirs)
    with torch.device("meta"):
        n = sum(p.numel() for p in UNet(UNetConfig.preset("sd15")).parameters())
    # Stable Diffusion 1.5's UNet: 859.52 M parameters.
    assert n == 859_520_964


# ----------------------------------------------------------------------------- checks at the door


def _count_op_checks(monkeypatch) -> dict[str, int]:
    """Counts of the argument checks of GroupNorm+SiLU's and attention's public functions (each call
    signature is checked once: the ops' record of checked signatures starts empty here)."""
    calls = {}
    for name, module in (("group_norm", group_norm), ("attention", flash_attention)):
        calls[name] = 0
        monkeypatch.setattr(module, "_checked_plans", Plans())

        def spy(*args, _name=name, _check=module._validate):
            calls[_name] += 1
            return _check(*args)

        monkeypatch.setattr(module, "_validate", spy)
    return calls


def _set_layer_checks(model: torch.nn.Module, on: bool) -> None:
    for m in model.modules():
        if isinstance(m, (GroupNormSiLU, Attention)):
            m.check_inputs = on


def test_layers_skip_their_checks(monkeypatch):
    """The UNet checks its inputs once; its layers then call the ops' unchecked entries, with the
    checked path's numbers bit for bit.  A layer on its own still checks its arguments."""
    model, args = small_unet()
    calls = _count_op_checks(monkeypatch)
    with torch.no_grad():
        fast = model(*args)
        assert calls == {"group_norm": 0, "attention": 0}
        _set_layer_checks(model, True)
        checked = model(*args)
    assert calls["group_norm"] > 0 and calls["attention"] > 0
    assert torch.equal(fast, checked)
    before = dict(calls)
    GroupNormSiLU(4, 16)(torch.randn(2, 16, 3, 3))
    Attention(16, heads=1, dim_head=32)(torch.randn(2, 5, 16))
    assert calls == {name: n + 1 for name, n in before.items()}
    with pytest.raises(ValueError, match="num_groups must divide"):
        GroupNormSiLU(4, 16)(torch.randn(2, 10, 3, 3))
    with pytest.raises(TypeError, match="q must"):
        Attention(16, heads=1, dim_head=32).double()(torch.randn(2, 5, 16, dtype=torch.float64))


def test_checks_at_the_door():
    cfg = UNetConfig(**SMALL)
    model = UNet(cfg)
    x, t, ctx, pooled = inputs(cfg)
    with pytest.raises(ValueError, match="at least one image"):
        model(x[:0], t[:0], ctx[:0], pooled[:0])
    with pytest.raises(ValueError, match="positive multiples"):
        model(x[..., :0], t, ctx, pooled)
    with pytest.raises(ValueError, match="context must"):
        model(x, t, ctx[:, :0], pooled)
    with pytest.raises(TypeError, match="context"):
        model(x, t, None, pooled)
    with pytest.raises(TypeError, match="x"):
        model(x.long(), t, ctx, pooled)
    # 32-bit offsets: 2²⁶ positions of 3·32 channels pass 2³¹; nothing is computed (meta tensor)
    big = torch.empty(1, cfg.in_channels, 8192, 8192, device="meta")
    with pytest.raises(ValueError, match="too large"):
        model(big, t[:1], ctx[:1], pooled[:1])
    with pytest.raises(ValueError, match="dim_head"):
        Attention(16, heads=1, dim_head=48)
    with pytest.raises(ValueError, match="eps"):
        GroupNormSiLU(4, 16, eps=-1.0)


def test_video_size_check_counts_the_frames():
    """A GroupNorm of a video model normalises a whole clip: the frames multiply the extent."""
    from fastdiff.nn.video import VideoConfig, VideoUNet

    cfg = UNetConfig(**{**SMALL, "model_channels": 32})
    model = VideoUNet(cfg, VideoConfig(max_frames=16))
    _, t, ctx, pooled = inputs(cfg, B=1)
    H = 2048  # 2²² positions of 3·64 channels: within 2³¹ for one frame, not for 16
    assert H * H * 3 * 64 < 2**31 <= 16 * H * H * 3 * 64
    with pytest.raises(ValueError, match="too large"):
        model(torch.empty(1, cfg.in_channels, 16, H, H, device="meta"), t, ctx, pooled)
    assert all(not m.check_inputs for m in model.modules() if isinstance(m, (GroupNormSiLU, Attention)))


# ----------------------------------------------------------------------------- fused q, k, v projections


@pytest.mark.parametrize("context_dim", [None, 24])
def test_attention_loads_and_saves_separate_projections(context_dim):
    """State dicts hold to_q, to_k, to_v (diffusers' names) whatever the layer stores; a layer loaded
    from them computes softmax(q kᵀ/√d) v with those weights (float64 reference)."""
    layer = Attention(16, context_dim=context_dim, heads=2, dim_head=32)
    c_dim = context_dim or 16
    state = {
        "to_q.weight": torch.randn(64, 16), "to_k.weight": torch.randn(64, c_dim), "to_v.weight": torch.randn(64, c_dim),
        "to_out.weight": torch.randn(16, 64), "to_out.bias": torch.randn(16),
    }  # fmt: skip
    given = dict(state)
    layer.load_state_dict(state)
    assert state.keys() == given.keys()  # the caller's dict is left alone
    saved = layer.state_dict()
    assert saved.keys() == state.keys()
    assert all(torch.equal(saved[k], state[k]) for k in state)
    x, c = torch.randn(3, 7, 16), torch.randn(3, 4, c_dim)
    q = (x.double() @ state["to_q.weight"].double().T).view(3, 7, 2, 32).transpose(1, 2)
    context = x if context_dim is None else c
    k, v = (
        (context.double() @ state[n].double().T).view(3, -1, 2, 32).transpose(1, 2) for n in ("to_k.weight", "to_v.weight")
    )
    o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(3, 7, 64)
    ref = o @ state["to_out.weight"].double().T + state["to_out.bias"].double()
    with torch.no_grad():
        out = layer(x) if context_dim is None else layer(x, c)
    assert rel_err(out, ref) < 1e-5


def test_fused_projections_start_as_separate_layers():
    """The fused weights get the draws separate to_q, to_k, to_v layers would get from the same seed."""
    torch.manual_seed(0)
    fused = Attention(16, context_dim=24, heads=2, dim_head=32)
    torch.manual_seed(0)
    separate = [torch.nn.Linear(n, 64, bias=False).weight for n in (16, 24, 24)]
    assert all(torch.equal(a, b) for a, b in zip(fused.projection_weights(), separate))


CHECKPOINTS = Path(fastdiff.__file__).parent / "checkpoints"


def _attention_before(layer, weights, x, context=None):
    """Attention.forward before its projections were stored fused: the to_q / to_k / to_v weights of
    the checkpoint file, concatenated on every call."""
    B, L, _ = x.shape
    H, D = layer.heads, layer.dim_head
    w_q, w_k, w_v = weights
    if context is None:
        qkv = F.linear(x, torch.cat([w_q, w_k, w_v])).view(B, L, 3, H, D)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q = F.linear(x, w_q).view(B, L, H, D).transpose(1, 2)
        k, v = F.linear(context, torch.cat([w_k, w_v])).view(B, -1, 2, H, D).permute(2, 0, 3, 1, 4).unbind(0)
    o = fastdiff.ops.attention(q, k, v)
    return layer.to_out(o.transpose(1, 2).reshape(B, L, H * D))


def _shipped(name: str):
    """The shipped pipeline folder's network with its weights, and a small input for it."""
    from fastdiff.pipelines import Text2Image, load_weights, read_spec

    path = CHECKPOINTS / name
    if not (path / "model.safetensors").is_file():
        pytest.skip(f"the shipped checkpoint {name} is not installed")
    spec = read_spec(path)
    if name == "tiny-style":
        from fastdiff.apps.stylize import Stylizer as kind
    elif name == "tiny-video":
        from fastdiff.apps.video import VideoPipeline as kind
    else:
        kind = Text2Image
    model = kind.build_unet(spec, path).eval()
    state = load_weights(path)
    model.load_state_dict(state)  # strict: every name of the file, and nothing else
    c = model.config
    x = torch.randn(1, c.in_channels, *((2,) if name == "tiny-video" else ()), 8, 8)
    extra = {"style": torch.rand(1, 3, 8, 8) * 2 - 1} if hasattr(model, "style_encoder") else {}
    args = (x, torch.tensor([600]), torch.randn(1, 5, c.context_dim), torch.randn(1, c.pooled_dim))
    return model, state, args, extra


@pytest.mark.parametrize("name", ["tiny-shapes", "tiny-style", "tiny-video"])
def test_shipped_checkpoints_give_the_same_outputs(name, monkeypatch):
    """Each shipped checkpoint loads, saves back to the same tensors, and gives bit for bit the
    outputs of the attention layers as they were (separate weights, concatenated per call)."""
    model, state, args, extra = _shipped(name)
    saved = model.state_dict()
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in state)
    with torch.no_grad():
        out = model(*args, **extra)
        for prefix, layer in model.named_modules():
            if isinstance(layer, Attention):
                weights = [state[f"{prefix}.to_{p}.weight"] for p in "qkv"]
                monkeypatch.setattr(layer, "forward", functools.partial(_attention_before, layer, weights))
        before = model(*args, **extra)
    assert torch.equal(out, before)
