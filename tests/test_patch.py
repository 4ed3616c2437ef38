"""fastdiff.patch / unpatch on diffusers models and on users' own modules.

Equality is judged against a float64 copy of the *unpatched* model: the patched model's
error must stay within 2× the unpatched model's own error in the same dtype (plus one
ulp), the tolerance rule of the op tests.  Models are diffusers' tiny test
configurations (so their small head dims fall back) and the same shapes with head dims
the kernel takes; sample sizes 8–16 keep the interpreter to seconds.
"""
import collections
import copy
import importlib
import importlib.util
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

diffusers = pytest.importorskip("diffusers")

import fastdiff  # noqa: E402
from fastdiff import dropin  # noqa: E402
from fastdiff.ops import flash_attention, group_norm  # noqa: E402
from fastdiff.dropin import SDPA, FastAttnProcessor, FusedSDPA, PatchReport, is_patched, patch, unpatch  # noqa: E402
from diffusers import AutoencoderKL, UNet2DConditionModel, UNet2DModel  # noqa: E402
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0  # noqa: E402
from diffusers.models.resnet import ResnetBlock2D  # noqa: E402

from conftest import rel_err  # noqa: E402


LOW = [torch.float16, torch.bfloat16]


# ----------------------------------------------------------------------------- models


def cond_unet(channels=(32, 64), groups=4, heads=1, shift="default", sample=8, cross=32):
    """UNet2DConditionModel as in diffusers' tests; heads=1 gives head dims 32/64 (the kernel's)."""
    return UNet2DConditionModel(
        block_out_channels=channels, norm_num_groups=groups, layers_per_block=1, sample_size=sample,
        in_channels=4, out_channels=4, cross_attention_dim=cross, attention_head_dim=heads,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        resnet_time_scale_shift=shift,
    ).eval()  # fmt: skip


def unet2d(channels=(32, 64), groups=4, head_dim=32, shift="default", layers=1):
    """UNet2DModel as in diffusers' tests (with attention_head_dim=3, channels (4, 8): its tiny config)."""
    return UNet2DModel(
        block_out_channels=channels, norm_num_groups=groups, attention_head_dim=head_dim, layers_per_block=layers,
        in_channels=3, out_channels=3, sample_size=16, resnet_time_scale_shift=shift,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).eval()  # fmt: skip


def vae(channels=(32, 64), groups=4):
    return AutoencoderKL(
        block_out_channels=channels, norm_num_groups=groups, in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    ).eval()  # fmt: skip


def cond_inputs(model, batch=2, tokens=5):
    cfg = model.config
    s = cfg.sample_size
    return (
        torch.randn(batch, cfg.in_channels, s, s),
        torch.randint(0, 1000, (batch,)),
        torch.randn(batch, tokens, cfg.cross_attention_dim),
    )


def run_cond(model, x, t, c, dtype):
    with torch.no_grad():
        return model(x.to(dtype), t, c.to(dtype)).sample


def run_unet2d(model, x, t, dtype):
    with torch.no_grad():
        return model(x.to(dtype), t).sample


def run_vae(model, x, dtype):
    with torch.no_grad():
        return model(x.to(dtype)).sample  # the posterior's mode: deterministic


def count(model, cls) -> int:
    return sum(isinstance(m, cls) for m in model.modules())


def assert_close_to_f64(run, model, dtype):
    """Patched ``model`` in ``dtype`` within 2× the unpatched model's own error vs float64 (+ one ulp)."""
    ref = run(copy.deepcopy(model).double(), torch.float64)
    m = copy.deepcopy(model).to(dtype)
    base = rel_err(run(m, dtype), ref)
    report = patch(m)
    out = run(m, dtype)
    assert out.dtype == dtype
    err = rel_err(out, ref)
    assert err <= 2 * base + torch.finfo(dtype).eps, f"patched {err:.3g} vs unpatched {base:.3g} ({dtype})"
    return report


# ----------------------------------------------------------------------------- diffusers models


@pytest.mark.parametrize("shift", ["default", "scale_shift"])
def test_cond_unet_fp32_matches_and_counts(shift):
    model = cond_unet(shift=shift)
    x, t, c = cond_inputs(model)
    report = assert_close_to_f64(lambda m, dt: run_cond(m, x, t, c, dt), model, torch.float32)
    counts = report.counts()
    assert counts["attention"] == count(model, Attention) > 0
    assert counts["resnet_block"] == count(model, ResnetBlock2D) > 0
    assert counts["output_head"] == 1
    assert report.fell_back == []


@pytest.mark.parametrize("dtype", LOW)
def test_cond_unet_low_precision(dtype):
    model = cond_unet(shift="scale_shift")
    x, t, c = cond_inputs(model, batch=1)
    assert_close_to_f64(lambda m, dt: run_cond(m, x, t, c, dt), model, dtype)


def test_cond_unet_diffusers_tiny_config_falls_back():
    """diffusers' own tiny UNet2DConditionModel: head dims 2 and 4 are not the kernel's, so attention falls back."""
    model = cond_unet(channels=(4, 8), groups=4, heads=2, sample=16, cross=8)
    x, t, c = cond_inputs(model)
    report = assert_close_to_f64(lambda m, dt: run_cond(m, x, t, c, dt), model, torch.float32)
    n_attn = count(model, Attention)
    assert report.fallback_counts() == {"attention": n_attn}
    assert all(" not in (32, 40" in reason for _, _, reason in report.fell_back)
    assert report.counts() == {"resnet_block": count(model, ResnetBlock2D), "output_head": 1}
    assert f"fell back {n_attn:4}" in str(report)


def test_cond_unet_sd_groups_on_reference_backend():
    """32 groups (Stable Diffusion's), on the reference path of the ops."""
    model = cond_unet(groups=32, heads=(1, 2), sample=16)
    x, t, c = cond_inputs(model)
    with fastdiff.use_backend("reference"):
        report = assert_close_to_f64(lambda m, dt: run_cond(m, x, t, c, dt), model, torch.float32)
    assert report.fell_back == [] and report.counts()["attention"] == count(model, Attention)


@pytest.mark.parametrize("shift", ["default", "scale_shift"])
def test_unet2d_matches(shift):
    model = unet2d(shift=shift)
    x, t = torch.randn(2, 3, 16, 16), torch.randint(0, 1000, (2,))
    report = assert_close_to_f64(lambda m, dt: run_unet2d(m, x, t, dt), model, torch.float32)
    assert report.counts() == {
        "attention": count(model, Attention), "resnet_block": count(model, ResnetBlock2D), "output_head": 1,
    }  # fmt: skip


def test_unet2d_diffusers_tiny_config_falls_back():
    """diffusers' UNet2DModel test config: 4/8 channels, 2 groups, head dim 3."""
    model = unet2d(channels=(4, 8), groups=2, head_dim=3, layers=2)
    x, t = torch.randn(2, 3, 16, 16), torch.randint(0, 1000, (2,))
    report = assert_close_to_f64(lambda m, dt: run_unet2d(m, x, t, dt), model, torch.float32)
    assert report.fallback_counts() == {"attention": count(model, Attention)}
    assert report.counts()["resnet_block"] == count(model, ResnetBlock2D)


def test_vae_encoder_decoder_match():
    model = vae()
    x = torch.randn(1, 3, 16, 16)
    report = assert_close_to_f64(lambda m, dt: run_vae(m, x, dt), model, torch.float32)
    paths = {p for _, p in report.patched}
    assert {"encoder.conv_norm_out", "decoder.conv_norm_out"} <= paths
    assert report.counts()["attention"] == 2  # the mid blocks' single-head attention, head dim 64
    assert report.fell_back == []


def test_vae_diffusers_tiny_config_falls_back():
    model = vae(channels=(2, 4), groups=2)
    x = torch.randn(2, 3, 16, 16)
    report = assert_close_to_f64(lambda m, dt: run_vae(m, x, dt), model, torch.float32)
    assert report.fallback_counts() == {"attention": 2}
    assert report.counts()["output_head"] == 2


def test_pipeline_patch_and_unpatch():
    from diffusers import DDPMPipeline, DDPMScheduler

    pipe = DDPMPipeline(unet=unet2d(), scheduler=DDPMScheduler(num_train_timesteps=10))
    classes = [type(m) for m in pipe.unet.modules()]
    report = patch(pipe)
    assert is_patched(pipe) and is_patched(pipe.unet)
    assert all(p.startswith("unet.") for _, p in report.patched) and report.counts()["output_head"] == 1
    with pytest.raises(ValueError, match="component 'unet' is already patched"):
        patch(pipe)
    with fastdiff.use_backend("reference"):
        images = pipe(batch_size=1, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 16, 16, 3) and torch.isfinite(torch.from_numpy(images)).all()
    unpatch(pipe)
    assert not is_patched(pipe)
    assert [type(m) for m in pipe.unet.modules()] == classes


# ----------------------------------------------------------------------------- the processor's hooks


def _attn_cases():
    # (Attention kwargs, 4-D input?, cross-attention context width or None, temb width)
    return [
        (dict(query_dim=32, heads=1, dim_head=32), False, None, None),
        (dict(query_dim=40, heads=2, dim_head=40, cross_attention_dim=24), False, 24, None),
        (dict(query_dim=32, heads=1, dim_head=32, norm_num_groups=4, residual_connection=True,
              rescale_output_factor=1.7, bias=True), True, None, None),
        (dict(query_dim=32, heads=2, dim_head=32, spatial_norm_dim=12, residual_connection=True), True, None, 12),
        (dict(query_dim=32, heads=1, dim_head=64, cross_attention_dim=16, cross_attention_norm="layer_norm"),
         False, 16, None),
        (dict(query_dim=48, heads=1, dim_head=32, cross_attention_dim=16, cross_attention_norm="group_norm",
              cross_attention_norm_num_groups=4), False, 16, None),
        (dict(query_dim=32, heads=2, dim_head=32, qk_norm="layer_norm"), False, None, None),
        (dict(query_dim=32, heads=2, dim_head=32, qk_norm="rms_norm", out_bias=False, dropout=0.0), True, None, None),
    ]  # fmt: skip


@pytest.mark.parametrize("case", range(len(_attn_cases())))
def test_processor_keeps_every_hook(case):
    kwargs, four_d, ctx_dim, temb_dim = _attn_cases()[case]
    attn = Attention(**kwargs).eval()
    for p in attn.parameters():  # norms start at identity: move them so that a skipped hook shows
        p.data.add_(0.1 * torch.randn_like(p))
    C = kwargs["query_dim"]
    x = torch.randn(2, C, 3, 5) if four_d else torch.randn(2, 7, C)
    ctx = torch.randn(2, 6, ctx_dim) if ctx_dim else None
    temb = torch.randn(2, temb_dim, 3, 5) if temb_dim else None
    extra = {"temb": temb} if temb is not None else {}
    assert type(attn.processor) is AttnProcessor2_0
    with torch.no_grad():
        ref = attn(x, encoder_hidden_states=ctx, **extra)
        report = patch(attn)
        assert isinstance(attn.processor, FastAttnProcessor) and report.counts() == {"attention": 1}
        out = attn(x, encoder_hidden_states=ctx, **extra)
    assert out.shape == ref.shape
    assert rel_err(out, ref) < 1e-5


def test_processor_calls_the_op_and_hands_masks_to_the_original(monkeypatch):
    attn = Attention(query_dim=32, heads=1, dim_head=32).eval()
    x, mask = torch.randn(2, 7, 32), torch.zeros(2, 1, 7)
    mask[:, :, 3:] = -1e4
    with torch.no_grad():
        ref, ref_masked = attn(x), attn(x, attention_mask=mask)
        patch(attn)
        calls = []
        real = dropin.attention_unchecked
        monkeypatch.setattr(dropin, "attention_unchecked", lambda *a, **k: calls.append(1) or real(*a, **k))
        out = attn(x)
        assert calls == [1]
        out_masked = attn(x, attention_mask=mask)
        assert calls == [1]  # the masked call never reached the kernel
    assert rel_err(out, ref) < 1e-5
    assert torch.equal(out_masked, ref_masked)  # the original processor, exactly


def test_classic_processor_scale_is_kept():
    """AttnProcessor uses attn.scale (1.0 with scale_qk=False); AttnProcessor2_0 lets SDPA pick 1/sqrt(D)."""
    attn = Attention(query_dim=32, heads=1, dim_head=32, scale_qk=False).eval()
    assert type(attn.processor) is AttnProcessor and attn.scale == 1.0
    x = torch.randn(1, 9, 32)
    with torch.no_grad():
        ref = attn(x)
        patch(attn)
        assert attn.processor.scale == 1.0
        assert rel_err(attn(x), ref) < 1e-5


def test_processor_other_dtype_keeps_sdpa_core():
    attn = Attention(query_dim=32, heads=1, dim_head=32).double().eval()
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    with torch.no_grad():
        ref = attn(x)
        patch(attn)
        assert torch.allclose(attn(x), ref, rtol=1e-12, atol=1e-12)


def test_custom_processor_is_left_alone():
    class MyProcessor(AttnProcessor2_0):
        pass

    attn = Attention(query_dim=32, heads=1, dim_head=32)
    mine = MyProcessor()
    attn.set_processor(mine)
    report = patch(attn)
    assert attn.processor is mine
    assert report.fallback_counts() == {"attention": 1} and "MyProcessor" in report.fell_back[0][2]


# ----------------------------------------------------------------------------- round trip


def _snapshot(model):
    return (
        {k: (v.clone(), v.data_ptr()) for k, v in model.state_dict().items()},
        [(name, type(m)) for name, m in model.named_modules()],
        [m.processor for m in model.modules() if isinstance(m, Attention)],
    )


def test_unpatch_restores_exactly():
    model = cond_unet(shift="scale_shift")
    x, t, c = cond_inputs(model)
    before = run_cond(model, x, t, c, torch.float32)
    state, classes, procs = _snapshot(model)
    patch(model)
    patched_state = model.state_dict()
    assert patched_state.keys() == state.keys()
    assert all(patched_state[k].data_ptr() == ptr for k, (_, ptr) in state.items())  # same tensors, no copies
    assert [type(m) for _, m in model.named_modules()] != [cls for _, cls in classes]
    unpatch(model)
    state2, classes2, procs2 = _snapshot(model)
    assert classes2 == classes
    assert all(a is b for a, b in zip(procs2, procs)) and len(procs2) == len(procs)
    assert all(torch.equal(state2[k][0], v) and state2[k][1] == ptr for k, (v, ptr) in state.items())
    assert torch.equal(run_cond(model, x, t, c, torch.float32), before)
    assert not is_patched(model)
    with pytest.raises(ValueError, match="model was not patched"):
        unpatch(model)


def test_unpatch_keeps_a_processor_set_after_patching():
    model = cond_unet()
    patch(model)
    assert fastdiff.is_patched is is_patched and fastdiff.is_patched(model)
    attns = [m for m in model.modules() if isinstance(m, Attention)]
    mine = AttnProcessor()
    attns[0].set_processor(mine)  # the user's choice, made after patch
    originals = [a.processor.original for a in attns[1:]]
    unpatch(model)
    assert attns[0].processor is mine
    assert [a.processor for a in attns[1:]] == originals and not fastdiff.is_patched(model)


def test_copies_of_a_patched_model_unpatch_on_their_own():
    model = unet2d(channels=(4, 8), groups=2, head_dim=3)
    classes = [type(m) for m in model.modules()]
    patch(model)
    twin = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert pickle.loads(pickle.dumps(PatchReport([("a", "b")]))).patched == [("a", "b")]
    unpatch(twin)
    assert [type(m) for m in twin.modules()] == classes
    assert is_patched(model) and [type(m) for m in model.modules()] != classes  # the original is untouched
    unpatch(loaded)
    assert [type(m) for m in loaded.modules()] == classes


def test_no_module_is_shadowed_by_a_function():
    """``fastdiff.patch`` is the function, its module is ``fastdiff.dropin`` (and ``ops.attention`` /
    ``ops.sampler_step`` are functions of ``ops.flash_attention`` / ``ops.fused_step``): every
    module of every fastdiff package is the attribute of its name (``import fastdiff.X.Y as m``
    gives the module)."""
    import pkgutil
    import sys

    assert fastdiff.patch is patch is dropin.patch and callable(fastdiff.patch)
    assert (fastdiff.unpatch, fastdiff.is_patched) == (dropin.unpatch, dropin.is_patched)
    assert callable(fastdiff.ops.attention) and callable(fastdiff.ops.sampler_step)
    names = [m.name for m in pkgutil.walk_packages(fastdiff.__path__, "fastdiff.")
             if not m.name.endswith("__main__") and importlib.util.find_spec(m.name).origin.endswith(".py")]  # fmt: skip
    assert "fastdiff.dropin" in names and "fastdiff.patch" not in names and "fastdiff.ops.fused_step" in names
    for name in names:
        module = importlib.import_module(name)
        parent, _, leaf = name.rpartition(".")
        assert getattr(sys.modules[parent], leaf) is module is sys.modules[name], name
    # a patched model's classes live in the module, where pickle finds them
    assert dropin.FusedResnetBlock2D.__module__ == "fastdiff.dropin" and FastAttnProcessor.__module__ == "fastdiff.dropin"


def test_patch_twice_and_bad_arguments():
    model = unet2d(channels=(4, 8), groups=2, head_dim=3)
    patch(model)
    with pytest.raises(ValueError, match="model is already patched"):
        patch(model)
    wrapper = nn.Sequential(model)
    with pytest.raises(ValueError, match="sub-module '0'"):
        patch(wrapper)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        patch("unet")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        unpatch(42)


def test_attention_only_and_norm_only():
    model = cond_unet()
    r1 = patch(model, group_norm=False)
    assert set(r1.counts()) == {"attention"}
    unpatch(model)
    r2 = patch(model, attention=False)
    assert set(r2.counts()) == {"resnet_block", "output_head"}
    assert all(type(m.processor) is AttnProcessor2_0 for m in model.modules() if isinstance(m, Attention))


def test_resnet_fallbacks_are_reported():
    block = ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=16, groups=2, non_linearity="mish")
    report = patch(block)
    assert report.counts() == {} and "activation is Mish" in report.fell_back[0][2]

    class MyBlock(ResnetBlock2D):
        def forward(self, x, temb):
            return x

    report = patch(nn.ModuleList([MyBlock(in_channels=8, temb_channels=16, groups=2)]))
    assert report.fallback_counts() == {"resnet_block": 1} and "overrides" in report.fell_back[0][2]


def test_resnet_up_down_shortcut_and_no_temb():
    """The parts of ResnetBlock2D's forward the tiny UNets do not reach."""
    blocks = [
        ResnetBlock2D(in_channels=8, out_channels=16, temb_channels=12, groups=4, up=True, output_scale_factor=2.0),
        ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=12, groups=2, down=True,
                      time_embedding_norm="scale_shift", skip_time_act=True),
        ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=None, groups=4, conv_shortcut=True,
                      use_in_shortcut=True),
    ]  # fmt: skip
    for block in blocks:
        block.eval()
        x = torch.randn(2, 8, 5, 6)
        temb = torch.randn(2, 12) if block.time_emb_proj is not None else None
        with torch.no_grad():
            ref = block(x, temb)
            assert patch(block).counts() == {"resnet_block": 1}
            out = block(x, temb)
        assert out.shape == ref.shape and rel_err(out, ref) < 1e-5


def test_float64_model_keeps_working():
    model = cond_unet(channels=(32, 64), groups=4).double()
    x, t, c = cond_inputs(model, batch=1)
    ref = run_cond(model, x, t, c, torch.float64)
    patch(model)
    out = run_cond(model, x, t, c, torch.float64)
    assert rel_err(out, ref) < 1e-12


# ----------------------------------------------------------------------------- users' own modules


class Block(nn.Module):
    def __init__(self, c, groups, act=nn.SiLU):
        super().__init__()
        self.body = nn.Sequential(nn.GroupNorm(groups, c), act(), nn.Conv2d(c, c, 3, padding=1),
                                  nn.GroupNorm(groups, c, affine=False), nn.SiLU())  # fmt: skip

    def forward(self, x):
        return x + self.body(x)


def test_sequential_group_norm_silu_pairs():
    model = nn.Sequential(Block(8, 2), Block(8, 4, act=nn.ReLU), nn.Sequential(nn.GroupNorm(1, 8), nn.SiLU()))
    x = torch.randn(2, 8, 5, 3)
    with torch.no_grad():
        ref = model(x)
        report = patch(model)
        out = model(x)
    assert sorted(p for _, p in report.patched) == ["0.body.0", "0.body.3", "1.body.3", "2.0"]
    assert report.counts() == {"sequential": 4} and report.fell_back == []
    assert rel_err(out, ref) < 1e-5
    unpatch(model)
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_shared_silu_falls_back():
    act = nn.SiLU()
    model = nn.ModuleDict({"a": nn.Sequential(nn.GroupNorm(2, 4), act), "b": nn.Sequential(nn.Conv2d(4, 4, 1), act)})
    report = patch(model)
    assert report.counts() == {} and report.fallback_counts() == {"sequential": 1}
    assert "shared" in report.fell_back[0][2]
    assert type(act) is nn.SiLU


class UserAttention(nn.Module):
    """A user's attention layer written against the SDPA adapter."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.sdpa = SDPA()

    def forward(self, x, **sdpa_kwargs):
        B, L, C = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        return self.sdpa(q, k, v, **sdpa_kwargs).transpose(1, 2).reshape(B, L, C)


def test_sdpa_adapter(monkeypatch):
    layer = UserAttention(64, heads=2)  # head dim 32: the kernel's
    x = torch.randn(3, 11, 64)
    with torch.no_grad():
        ref = layer(x)
        ref_causal = layer(x, is_causal=True)
        report = patch(layer)
        assert type(layer.sdpa) is FusedSDPA and report.counts() == {"sdpa": 1}
        calls = []
        real = dropin.attention_unchecked
        monkeypatch.setattr(dropin, "attention_unchecked", lambda *a, **k: calls.append(1) or real(*a, **k))
        out = layer(x)
        assert calls == [1]
        assert torch.equal(layer(x, is_causal=True), ref_causal) and calls == [1]  # no causal mask in the kernel
    assert rel_err(out, ref) < 1e-5
    odd = UserAttention(12, heads=4)  # head dim 3: SDPA at run time
    patch(odd)
    with torch.no_grad():
        assert torch.isfinite(odd(torch.randn(1, 4, 12))).all() and calls == [1]
    unpatch(layer)
    assert type(layer.sdpa) is SDPA


def test_sdpa_adapter_is_sdpa_when_unpatched():
    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
    assert torch.equal(SDPA()(q, k, v, scale=0.3), F.scaled_dot_product_attention(q, k, v, scale=0.3))


# ----------------------------------------------------------------------------- host path: checked once


def test_patched_calls_skip_the_public_checks(monkeypatch):
    """What patch can know is checked when patching: a call of the host model reaches the ops' unchecked
    entries and never their public checks (each would raise here)."""
    model = cond_unet(shift="scale_shift")
    layer, seq = UserAttention(64, heads=2), nn.Sequential(nn.GroupNorm(2, 8), nn.SiLU())
    x, t, c = cond_inputs(model)
    h, img = torch.randn(2, 5, 64), torch.randn(2, 8, 3, 3)
    with torch.no_grad():
        refs = run_cond(model, x, t, c, torch.float32), layer(h), seq(img)
    for m in (model, layer, seq):
        patch(m)
    calls = collections.Counter()

    def spy(name):
        real = getattr(dropin, name)

        def call(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(dropin, name, call)

    spy("attention_unchecked")
    spy("group_norm_silu_unchecked")

    def refuse(*args):
        raise AssertionError("a patched call ran an op's public checks")

    for module in (flash_attention, group_norm):
        monkeypatch.setattr(module, "_validate", refuse)
    with torch.no_grad():
        outs = run_cond(model, x, t, c, torch.float32), layer(h), seq(img)
    n_norms = 2 * count(model, ResnetBlock2D) + 1  # two per block, and the output head
    assert calls == {"attention_unchecked": count(model, Attention) + 1, "group_norm_silu_unchecked": n_norms + 1}
    assert all(rel_err(out, ref) < 1e-5 for out, ref in zip(outs, refs))


def same_outcome(patched, unpatched):
    """Both calls return equal tensors, or both raise the same error."""
    try:
        want = unpatched()
    except Exception as e:  # noqa: BLE001 -- whatever PyTorch raises, the patched call must raise too
        with pytest.raises(type(e)) as got:
            patched()
        assert str(got.value) == str(e)
        return
    torch.testing.assert_close(patched(), want, rtol=1e-5, atol=1e-6)


def test_calls_the_kernels_do_not_take_run_pytorchs_path():
    """Per call only what the host passes is checked (dtype, shape, device, size); a call the kernels do
    not take computes, or fails, as the unpatched model does: never a kernel fed what it cannot read."""
    seq = nn.Sequential(nn.GroupNorm(2, 8), nn.SiLU())
    twin = copy.deepcopy(seq)
    patch(seq)
    for x in (torch.randn(2, 6, 3, 3), torch.randn(8), torch.randn(0, 8, 3, 3), torch.randn(2, 8, 3).double()):
        same_outcome(lambda: seq(x), lambda: twin(x))
    seq.double(), twin.double()  # converted after patching: the weights are no longer a kernel dtype
    x = torch.randn(2, 8, 3).double()
    same_outcome(lambda: seq(x), lambda: twin(x))

    block = ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=12, groups=2, time_embedding_norm="scale_shift")
    twin = copy.deepcopy(block.eval())
    patch(block)
    x, temb = torch.randn(2, 8, 5, 6), torch.randn(1, 12)
    with torch.no_grad():
        same_outcome(lambda: block(x, temb), lambda: twin(x, temb))  # one time embedding for the batch: FiLM broadcasts

    layer = UserAttention(64, heads=2)
    patch(layer)
    q = torch.randn(1, 2, 5, 32)
    with torch.no_grad():
        for k, v, scale in (
            (torch.randn(1, 2, 4, 32), torch.randn(1, 2, 4, 64), None),  # v's head dim is not q's
            (torch.randn(2, 4, 32), torch.randn(2, 4, 32), None),  # 3-D key and value
            (torch.randn(1, 1, 4, 32), torch.randn(1, 1, 4, 32), None),  # heads broadcast
            (torch.randn(1, 2, 0, 32), torch.randn(1, 2, 0, 32), None),  # no key
            (q, q.half(), None),  # two dtypes
            (q, q, -0.5),  # a scale the kernel does not take
        ):
            same_outcome(lambda: layer.sdpa(q, k, v, scale=scale), lambda: SDPA()(q, k, v, scale=scale))


def test_what_patch_can_know_is_checked_once_when_patching():
    bad_eps = nn.GroupNorm(2, 8, eps=-1.0)
    report = patch(nn.Sequential(bad_eps, nn.SiLU()))
    assert report.counts() == {} and report.fell_back == [("sequential", "0", "eps -1.0 is not a finite number >= 0")]
    block = ResnetBlock2D(in_channels=8, temb_channels=12, groups=2)
    block.norm2.eps = float("nan")
    report = patch(block)
    assert report.fell_back == [("resnet_block", "", "norm2: eps nan is not a finite number >= 0")]
    # kv_heads: to_k and to_v narrower than to_q
    report = patch(Attention(query_dim=64, heads=2, kv_heads=1, dim_head=32))
    assert "to_q, to_k, to_v widths [64, 32, 32]" in report.fell_back[0][2]
    classic = Attention(query_dim=32, heads=1, dim_head=32, scale_qk=False)
    classic.scale = float("inf")
    assert "scale must be a finite positive number" in patch(classic).fell_back[0][2]
    with pytest.raises(ValueError, match=r"head dim 16 not in \(32, 40"):
        FastAttnProcessor(AttnProcessor2_0(), 16)
    sdpa_scale = FastAttnProcessor(AttnProcessor2_0(), 40)
    assert sdpa_scale.scale is None and sdpa_scale.kernel_scale == 1 / 40**0.5


# ----------------------------------------------------------------------------- GPU: Stable Diffusion's shape


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sd15_unet_on_gpu():
    """SD-1.5-shaped UNet2DConditionModel, random weights, fp16 on the Triton kernels."""
    torch.manual_seed(0)
    model = UNet2DConditionModel(
        sample_size=64, cross_attention_dim=768, attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280)
    ).cuda().eval()
    x, t = torch.randn(2, 4, 64, 64, device="cuda"), torch.tensor([10, 700], device="cuda")
    c = torch.randn(2, 77, 768, device="cuda")
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # a true-fp32 reference
        ref = run_cond(model, x, t, c, torch.float32)
    half = copy.deepcopy(model).half()
    base = rel_err(run_cond(half, x, t, c, torch.float16), ref)
    report = patch(half)
    assert report.fell_back == []
    err = rel_err(run_cond(half, x, t, c, torch.float16), ref)
    assert err <= 2 * base + 1e-3, f"patched {err:.3g} vs unpatched {base:.3g}"
