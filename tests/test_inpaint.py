"""Inpainting: the RePaint loop against the plain sampler, kept pixels bit for bit, the measured
prompt adherence, the command line and its errors."""
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import inpaint_quality  # noqa: E402

import fastdiff  # noqa: E402
from fastdiff import cli, pipelines, samplers  # noqa: E402
from fastdiff.apps import inpaint as ip  # noqa: E402
from fastdiff.data import render_shape  # noqa: E402
from conftest import skip_without_shipped_model  # noqa: E402

PROMPT = "a large green circle at the bottom left"


@pytest.fixture(scope="module")
def pipe():
    skip_without_shipped_model(pipelines.DEFAULT_CHECKPOINT)
    # The cache the command line uses too: one load per test process.
    return pipelines.cached_pipeline(pipelines.DEFAULT_CHECKPOINT)


pytestmark = pytest.mark.usefixtures("reference_ops")


@pytest.fixture
def files(tmp_path):
    """A real shapes image, its mask (the bottom-left box, with a ragged edge) and a text file."""
    render_shape("purple", "square", "large", "at the bottom left", 32).save(tmp_path / "image.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[13:, :19] = 255
    mask[13, ::2] = 100  # below 50 %: kept
    Image.fromarray(mask).save(tmp_path / "mask.png")
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def _model_and_inputs(pipe, n=2):
    ctx, pooled = pipe.prompts.encode([""] * n + [PROMPT] * n, pipe.device)
    known = inpaint_quality.make_cases(n, seed=3)[0]
    mask = torch.zeros(n, 1, 32, 32)
    mask[:, :, 8:30, 2:20] = 1
    return pipe.denoiser(ctx, pooled), known, mask


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "heun", "ddpm"])
def test_loop_without_resampling_is_the_sampler(pipe, sampler):
    model, known, mask = _model_and_inputs(pipe)
    plan = pipelines.make_plan(sampler, pipe.schedule, 4, pipe.prediction)
    seeds = torch.tensor([5, 6])
    x_T = samplers.initial_noise(seeds, (2, 3, 32, 32))
    want = samplers.sample(model, x_T, seeds, plan, guidance_scale=4.0, known=known, mask=mask)
    got = ip.repaint_sample(model, x_T, seeds, plan, pipe.schedule, known=known, mask=mask, guidance_scale=4.0)
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_fused_step_keeps_the_known_region_exactly(pipe, backend):
    """Through the kernel (the interpreter on CPU) and the reference: known pixels come back bit for bit,
    with resampling, for a model whose output is unrelated to the image."""
    known = torch.rand(3, 3, 32, 32) * 2 - 1
    mask = (torch.rand(3, 1, 32, 32) > 0.6).float()
    plan = pipelines.make_plan("ddpm", pipe.schedule, 4, pipe.prediction)
    seeds = torch.tensor([1, 2, 3])
    x_T = samplers.initial_noise(seeds, tuple(known.shape))
    with fastdiff.use_backend(backend):
        x = ip.repaint_sample(lambda x, t: torch.sin(3 * x), x_T, seeds, plan, pipe.schedule, known=known, mask=mask,
                              resample=1, jump=2)  # fmt: skip
    keep = mask.expand_as(known) == 0
    assert torch.equal(x[keep], known[keep])
    assert torch.isfinite(x).all() and not torch.equal(x[~keep], known[~keep])


def test_levels_and_renoise_follow_the_schedule(pipe):
    ts = torch.tensor([999, 700, 400, 100])
    plan = samplers.ddim_plan(pipe.schedule, ts, prediction="v")
    acp = pipe.schedule.alphas_cumprod
    want = [math.sqrt(acp[t]) for t in ts.tolist()] + [1.0]
    assert ip._alpha_levels(plan, pipe.schedule) == pytest.approx(want, rel=1e-6)
    # q(x_a | x_b): mean sqrt(ᾱ_a/ᾱ_b)·x, variance 1 − ᾱ_a/ᾱ_b, fresh per jump, fixed per seed
    x = torch.full((4000, 3, 4, 4), 0.8)
    seeds = torch.arange(4000)
    a = ip._renoise(x, seeds, 0.9, 0.6, 0)
    r = 0.6 / 0.9
    assert float(a.mean()) == pytest.approx(r * 0.8, abs=0.01)
    assert float(a.var()) == pytest.approx(1 - r * r, rel=0.02)
    assert torch.equal(a, ip._renoise(x, seeds, 0.9, 0.6, 0))
    assert not torch.equal(a, ip._renoise(x, seeds, 0.9, 0.6, 1))


def test_resampling_keeps_pixels_and_is_per_image(pipe):
    model, known, mask = _model_and_inputs(pipe)
    kw = dict(seeds=[7, 8], steps=6, resample=2, jump=2, progress=False)
    x = ip.inpaint_tensors(pipe, known, mask, [PROMPT] * 2, **kw)
    plain = ip.inpaint_tensors(pipe, known, mask, [PROMPT] * 2, **{**kw, "resample": 0})
    keep = mask.expand_as(known) == 0
    assert torch.equal(x[keep], known[keep])
    assert not torch.allclose(x, plain, atol=1e-3)  # the jumps change the repainted region
    alone = ip.inpaint_tensors(pipe, known[1:], mask[1:], [PROMPT], **{**kw, "seeds": [8]})
    assert torch.allclose(alone[0], x[1], atol=1e-4)  # the image's noise is its seed's, whatever the batch


def test_api_keeps_unmasked_pixels_bit_identical(pipe, files, tmp_path):
    [img] = ip.inpaint(files / "image.png", files / "mask.png", PROMPT, pipe=pipe, steps=8, seed=1, progress=False)
    img.save(tmp_path / "out.png")
    out = np.asarray(Image.open(tmp_path / "out.png").convert("RGB"))
    src = np.asarray(Image.open(files / "image.png").convert("RGB"))
    keep = np.asarray(Image.open(files / "mask.png")) < 128
    assert (out[keep] == src[keep]).all()
    assert (out[~keep] != src[~keep]).any()
    # PIL image and tensor inputs give the same result
    t_img = ip.prepare_inputs(Image.open(files / "image.png"), Image.open(files / "mask.png"), 32)
    [same] = ip.inpaint(t_img[0], t_img[1], PROMPT, pipe=pipe, steps=8, seed=1, progress=False)
    assert np.array_equal(np.asarray(same), np.asarray(img))


def test_mask_threshold_and_size_checks():
    img = torch.zeros(3, 32, 32)
    soft = torch.full((32, 32), 0.49)
    soft[:4] = 0.5
    _, m = ip.prepare_inputs(img, soft, 32)
    assert m.sum() == 4 * 32 and set(m.unique().tolist()) == {0.0, 1.0}
    with pytest.raises(ValueError, match="mask is 16x16 pixels but image is 32x32"):
        ip.prepare_inputs(img, torch.ones(16, 16), 32)
    with pytest.raises(ValueError, match="resize=True"):
        ip.prepare_inputs(torch.zeros(3, 40, 40), torch.ones(40, 40), 32)
    known, m = ip.prepare_inputs(torch.zeros(3, 40, 40), torch.ones(40, 40), 32, resize=True)
    assert known.shape == (3, 32, 32) and m.shape == (1, 32, 32)
    with pytest.raises(ValueError, match="no pixel to repaint"):
        ip.prepare_inputs(img, torch.zeros(32, 32), 32)
    with pytest.raises(ValueError, match="resample must be"):
        ip.check_settings(10, 1, -1, 1)


def test_filled_region_follows_the_prompt(pipe):
    """30 cases (a shape at P masked by the box around P, prompt: another colour and shape at P),
    10 steps: the analyser reads the prompt's colour, shape and position back in >= 80 % without and
    with resampling (a true rate of 60 % passes with probability < 2 %), and no kept pixel changes."""
    cases = inpaint_quality.make_cases(30, seed=11)
    for resample, jump in ((0, 1), (1, 2)):
        r, _ = inpaint_quality.run_setting(
            pipe, cases, steps=10, sampler="dpmpp_2m", guidance=4.0, resample=resample, jump=jump, seed=0,
            progress=False,
        )  # fmt: skip
        assert r["kept_pixels_changed"] == 0, r
        assert r["kept_pixels"] > 30 * 32 * 32 // 2
        assert r["rates"]["colour+shape+position"] >= 0.8, (resample, r)


def test_cli_end_to_end(pipe, files, tmp_path, capsys):
    out = tmp_path / "res" / "out.png"
    rc = cli.main([
        "inpaint", "--image", str(files / "image.png"), "--mask", str(files / "mask.png"), "--prompt", PROMPT,
        "--out", str(out), "--steps", "5", "--num-images", "2", "--resample", "1", "--jump", "2", "--seed", "3",
    ])  # fmt: skip
    assert rc == 0
    src = np.asarray(Image.open(files / "image.png").convert("RGB"))
    keep = np.asarray(Image.open(files / "mask.png")) < 128
    outs = [np.asarray(Image.open(tmp_path / "res" / f"out_{i:03d}.png").convert("RGB")) for i in range(2)]
    for o in outs:
        assert (o[keep] == src[keep]).all()
    assert not np.array_equal(outs[0], outs[1])  # seeds 3 and 4
    assert "kept from --image" in capsys.readouterr().out


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--image": "missing.png"}, "--image .*missing.png' does not exist"),
        ({"--mask": "missing.png"}, "--mask .*missing.png' does not exist"),
        ({"--mask": "notes.txt"}, "--mask .*notes.txt' is not a readable image"),
        ({"--mask": "small.png"}, "--mask is 16x16 pixels but --image is 32x32"),
        ({"--steps": "0"}, "argument --steps: must be an int >= 1"),
        ({"--jump": "0"}, "argument --jump: must be an int >= 1"),
        ({"--guidance": "nan"}, "argument --guidance: must be a finite number"),
        ({"--out": "FOLDER.png"}, "--out '.*FOLDER.png' is a folder"),
        ({"--out": "out.jpg"}, "--out must be a .png"),
    ],
)
def test_cli_bad_inputs(files, capsys, change, message):
    Image.new("L", (16, 16), 255).save(files / "small.png")
    (files / "FOLDER.png").mkdir()
    args = {"--image": "image.png", "--mask": "mask.png", "--prompt": PROMPT, "--out": "out.png", **change}
    argv = ["inpaint"]
    for k, v in args.items():
        argv += [k, v if k in ("--prompt", "--steps", "--jump", "--guidance") else str(files / v)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastdiff inpaint: error: ") and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err


def test_cli_refuses_another_resolution_unless_asked(pipe, files, tmp_path, capsys):
    Image.new("RGB", (48, 48), (40, 40, 40)).save(files / "big.png")
    Image.new("L", (48, 48), 255).save(files / "bigmask.png")
    argv = ["inpaint", "--image", str(files / "big.png"), "--mask", str(files / "bigmask.png"), "--prompt", PROMPT,
            "--out", str(tmp_path / "big-out.png"), "--steps", "2"]  # fmt: skip
    assert cli.main(argv) == 2
    assert re.search("--image is 48x48 pixels .* pass --resize", capsys.readouterr().err)
    assert cli.main(argv + ["--resize"]) == 0
    assert Image.open(tmp_path / "big-out.png").size == (32, 32)
