"""Stable Diffusion folders in the applications, on tiny random folders: bulk generation (images at
the VAE's resolution, the manifest's folder digest and its cache, resume after an interruption,
shards, dtype), the denoising loop that CUDA graphs capture (run eagerly: the capture itself
needs a GPU), inpainting with a plain and a 9-channel UNet and image-to-image against diffusers'
pipelines, and one-line errors for bad input."""
import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fastdiff
from fastdiff import bulk, cli
from fastdiff.apps import inpaint as ip
from fastdiff.apps import stylize as st
from fastdiff.data import to_pil
from fastdiff.pipelines import DenoiseLoop, Text2Image
from test_bulk import interrupt_at_batch, snapshot
from test_sd import IMAGE_ATOL, NEGATIVES, PROMPTS, copy_folder, sd_scheduler_config, write_folder

diffusers = pytest.importorskip("diffusers")


pytestmark = pytest.mark.usefixtures("reference_ops")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("sd") / "tiny-sd")


@pytest.fixture(scope="module")
def inpaint_folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("sd") / "tiny-sd-inpaint", inpainting=True)


@pytest.fixture(scope="module")
def pipe(folder):
    return Text2Image.from_pretrained(folder, "cpu")


@pytest.fixture
def posterior_mean(monkeypatch):
    """diffusers draws an image's latents from the VAE's posterior, fastdiff takes its mean: here diffusers does too."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())


def to_np(x: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [−1, 1] → diffusers' "np" output."""
    return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def images_and_masks(n=2, h=16, w=24):
    """Images in [−1, 1], masks (1 = repaint) with a ragged region, the initial latents (VAE f = 2)."""
    known = torch.rand(n, 3, h, w) * 2 - 1
    mask = torch.zeros(n, 1, h, w)
    mask[:, :, 3:13, 5:19] = 1
    mask[0, :, 3, ::3] = 0
    return known, mask, torch.randn(n, 4, h // 2, w // 2)


# ----------------------------------------------------------------------------- the denoising loop


@pytest.mark.parametrize("sampler, guidance", [("ddim", 7.5), ("euler_a", 7.5), ("dpmpp_2m", 1.0)])
def test_denoise_loop_is_denoise_bit_for_bit(pipe, sampler, guidance):
    """What a CUDA graph captures, run eagerly through its static buffers: every batch equals
    `Text2Image.denoise` exactly — two batches of one shape, another shape, the first batch again."""
    loop = pipe.denoise_loop(sampler, 2, guidance)
    sampling = pipe.sampling(sampler, 2)

    def batch(n, h, w, k):
        g = torch.Generator().manual_seed(k)
        prompts = [PROMPTS[k % 2]] * n
        cond = pipe.encode_prompt(prompts, [NEGATIVES[k % 2]] * n, loop.guided)
        return torch.randn(n, 4, h, w, generator=g), torch.randint(0, 2**40, (n,), generator=g), cond

    outs = []
    for x, seeds, cond in [batch(2, 8, 8, 0), batch(2, 8, 8, 1), batch(1, 4, 12, 2), batch(2, 8, 8, 0)]:
        outs.append(loop.run(x, seeds, cond))
        assert torch.equal(outs[-1], pipe.denoise(x, seeds, cond, sampling, loop.guidance_scale))
    assert torch.equal(outs[0], outs[3]) and not torch.allclose(outs[0], outs[1])
    assert len(loop.shapes) == 2 and loop.guided == (guidance != 1.0)


def test_cuda_graph_capture_is_guarded(pipe, monkeypatch):
    """No capture off CUDA; a capture that fails warns and samples eagerly (default), or raises naming the switch."""
    with pytest.raises(ValueError, match="cuda_graph=True needs a pipeline on a CUDA device; this one is on cpu"):
        pipe.denoise_loop(None, 2, 7.5, cuda_graph=True)

    def refused(self, static):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(DenoiseLoop, "_captured", refused)
    x, seeds = torch.randn(1, 4, 8, 8), torch.tensor([3])
    cond = pipe.encode_prompt(PROMPTS[:1], NEGATIVES[:1], True)
    loop = DenoiseLoop(pipe, pipe.sampling(None, 2), 7.5, cuda_graph=None)
    loop.capture = True  # as on a CUDA device
    with pytest.warns(UserWarning, match="CUDA graph capture failed, sampling eagerly: RuntimeError: operation not"):
        out = loop.run(x, seeds, cond)
    assert not loop.capture and torch.equal(out, pipe.denoise(x, seeds, cond, pipe.sampling(None, 2), 7.5))
    strict = DenoiseLoop(pipe, pipe.sampling(None, 2), 7.5)
    strict.capture = strict.strict = True  # as cuda_graph=True on a CUDA device
    with pytest.raises(RuntimeError, match=r"capturing the denoising loop in a CUDA graph failed .*\(--no-cuda-graphs"):
        strict.run(x, seeds, cond)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_the_cuda_graph_replays_the_eager_loop_and_decodes_beside_it(folder, tmp_path):
    """On a GPU, with the kernels and fp16 weights: the captured loop gives the eager loop's samples,
    batch after batch (its static buffers refilled), and bulk generation with the decode on a side
    stream writes the bytes of the inline run."""
    with fastdiff.use_backend("auto"):
        pipe = Text2Image.from_pretrained(folder, "cuda")
        assert pipe.dtype == torch.float16
        graphed, eager = pipe.denoise_loop(None, 3, 7.5, cuda_graph=True), pipe.denoise_loop(None, 3, 7.5)
        outs = []
        for k, (n, h, w) in enumerate([(2, 8, 8), (2, 8, 8), (1, 8, 12)]):
            x, seeds = torch.randn(n, 4, h, w, device="cuda"), torch.arange(k, k + n, device="cuda")
            cond = pipe.encode_prompt([PROMPTS[k % 2]] * n, [NEGATIVES[k % 2]] * n, True)
            outs.append(graphed.run(x, seeds, cond))
            torch.testing.assert_close(outs[-1], eager.run(x, seeds, cond), rtol=1e-3, atol=1e-3)
        assert len(graphed.shapes) == 2 and graphed.capture and not torch.allclose(outs[0], outs[1])
        jobs = bulk.jobs_from_prompts(PROMPTS, per_prompt=3)
        for overlap in (True, False):
            bulk.run_jobs(pipe, jobs, tmp_path / str(overlap), batch_size=4, steps=3, overlap=overlap, progress=False)
        assert snapshot(tmp_path / "True") == snapshot(tmp_path / "False")


# ----------------------------------------------------------------------------- bulk generation


def folder_digest(folder: Path) -> str:
    """The manifest's checkpoint_sha256 of a folder every file of which a load reads."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    lines = [f"{p.relative_to(folder).as_posix()}\t{hashlib.sha256(p.read_bytes()).hexdigest()}\n" for p in files]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def test_generate_on_an_sd_folder(folder, pipe, tmp_path, capsys, monkeypatch):
    """Images at the VAE's resolution equal to the pipeline's, the folder's scheduler as sampler, the
    folder's digest in every line; a rerun resumes without reading the weights again (the digest cache)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\nzz\n")
    out = tmp_path / "out"
    argv = ["generate", "--prompts", str(prompts), "--per-prompt", "2", "--batch", "3", "--steps", "2",
            "--checkpoint", str(folder), "--device", "cpu", "--no-progress", "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0, capsys.readouterr().err
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [x["file"] for x in lines] == [f"00000/{i:08d}.png" for i in range(4)]
    assert {(x["sampler"], x["dtype"], x["checkpoint_sha256"]) for x in lines} == {
        ("ddim", "float32", folder_digest(folder))
    }
    for batch in ([0, 1, 2], [3]):  # --batch 3: jobs 0–2, then 3
        made = pipe([lines[i]["prompt"] for i in batch], seeds=[lines[i]["seed"] for i in batch], steps=2,
                    batch_size=3, progress=False)  # fmt: skip
        for i, image in zip(batch, made):
            assert np.array_equal(np.asarray(Image.open(out / lines[i]["file"])), np.asarray(image))
            assert image.size == (16, 16)
    hashed = []
    real = bulk.file_sha256
    monkeypatch.setattr(bulk, "file_sha256", lambda path: hashed.append(Path(path)) or real(path))
    capsys.readouterr()
    assert cli.main(argv) == 0
    assert "wrote 0 images (4 already done)" in capsys.readouterr().out
    assert not [p for p in hashed if folder in p.parents]


def test_an_sd_folder_is_known_by_its_bytes(folder, tmp_path):
    """A copy of the folder resumes the run; other bytes under the same size and mtime, or another
    dtype, are refused before any work; lines written before dtype was recorded read as float32."""
    jobs = bulk.jobs_from_prompts(["a red circle"], per_prompt=2)
    kw = dict(batch_size=2, steps=1, progress=False)
    out = tmp_path / "out"
    bulk.run_jobs(Text2Image.from_pretrained(folder, "cpu"), jobs, out, **kw)
    copy = copy_folder(folder, tmp_path / "copy")
    assert bulk.run_jobs(Text2Image.from_pretrained(copy, "cpu"), jobs, out, **kw)["skipped"] == 2
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    stat, data = weights.stat(), bytearray(weights.read_bytes())
    data[-1] ^= 1  # the last byte of the last tensor
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(ValueError, match="holds a run made with checkpoint_sha256="):
        bulk.run_jobs(Text2Image.from_pretrained(copy, "cpu"), jobs, out, **kw)
    journal = out / "manifest.rank-0.jsonl"
    older = [{k: v for k, v in json.loads(line).items() if k != "dtype"} for line in journal.read_text().splitlines()]
    journal.write_text("".join(json.dumps(line) + "\n" for line in older))
    assert bulk.run_jobs(Text2Image.from_pretrained(folder, "cpu"), jobs, out, **kw)["skipped"] == 2
    with pytest.raises(ValueError, match="holds a run made with dtype='float32', this run has dtype='bfloat16'"):
        bulk.run_jobs(Text2Image.from_pretrained(folder, "cpu", dtype="bfloat16"), jobs, out, **kw)


def test_an_interrupted_sd_run_ends_in_the_uninterrupted_bytes(pipe, tmp_path, monkeypatch):
    jobs = bulk.jobs_from_prompts(PROMPTS, per_prompt=3)  # 6 images, batches of 2
    kw = dict(batch_size=2, steps=2, progress=False)
    ref = tmp_path / "ref"
    bulk.run_jobs(pipe, jobs, ref, **kw)
    out = tmp_path / "out"
    interrupt_at_batch(monkeypatch, pipe, 3)
    with pytest.raises(KeyboardInterrupt):
        bulk.run_jobs(pipe, jobs, out, **kw)
    monkeypatch.undo()
    assert len(snapshot(out)) == 4
    assert bulk.run_jobs(pipe, jobs, out, **kw)["written"] == 2
    assert snapshot(out) == snapshot(ref)
    assert (out / "manifest.jsonl").read_bytes() == (ref / "manifest.jsonl").read_bytes()
    for rank in (0, 1):  # independent shards
        bulk.run_jobs(pipe, jobs, tmp_path / "shards", rank=rank, world_size=2, **kw)
    assert snapshot(tmp_path / "shards") == snapshot(ref)


def test_dtype_casts_the_unet_and_the_vae(folder, pipe):
    half = Text2Image.from_pretrained(folder, "cpu", dtype="bfloat16")
    assert {p.dtype for p in [*half.unet.parameters(), *half.vae.parameters()]} == {torch.bfloat16}
    assert half.text_encoder.model.dtype == torch.float32
    kw = dict(seeds=[3, 4], steps=2, output_type="np", progress=False)
    assert 0 < np.abs(half(PROMPTS, **kw) - pipe(PROMPTS, **kw)).max() < 0.05
    with pytest.raises(ValueError, match="dtype must be one of float32, float16, bfloat16, got 'half'"):
        Text2Image.from_pretrained(folder, "cpu", dtype="half")


# ----------------------------------------------------------------------------- inpainting


@pytest.mark.parametrize("inpainting, steps", [(True, 3), (False, 1)], ids=["9-channel", "4-channel"])
def test_inpainting_matches_diffusers(folder, inpaint_folder, posterior_mean, inpainting, steps):
    """StableDiffusionInpaintPipeline's images for the same latents, images, masks, prompts and
    guidance: with an inpainting UNet at any step count; with a plain UNet after one step (after
    more, diffusers re-noises the known latents with the initial noise, fastdiff with fresh noise)."""
    path = inpaint_folder if inpainting else folder
    known, mask, latents = images_and_masks()
    theirs = diffusers.StableDiffusionInpaintPipeline.from_pretrained(
        path, safety_checker=None, requires_safety_checker=False
    )  # fmt: skip
    theirs.set_progress_bar_config(disable=True)
    ref = theirs(
        PROMPTS, image=(known + 1) / 2, mask_image=mask, negative_prompt=["zz"] * 2, latents=latents,
        num_inference_steps=steps, guidance_scale=7.5, height=16, width=24, output_type="np",
    ).images  # fmt: skip
    pipe = Text2Image.from_pretrained(path, "cpu")
    assert pipe.inpainting == inpainting
    kw = dict(seeds=[0, 1], negative_prompt="zz", guidance_scale=7.5, steps=steps, latents=latents, progress=False)
    ours = to_np(ip.inpaint_tensors(pipe, known, mask, PROMPTS, **kw))
    assert ours.shape == ref.shape == (2, 16, 24, 3)
    assert np.abs(ours - ref).max() < IMAGE_ATOL
    flipped = to_np(ip.inpaint_tensors(pipe, known, 1 - mask, PROMPTS, **kw))
    assert np.abs(flipped - ref).max() > 100 * IMAGE_ATOL


def test_a_plain_unet_inpaints_on_latents_and_the_kept_pixels_are_pasted_back(pipe):
    known, mask, noise = images_and_masks(1)
    z, m, channels = ip.sample_space(pipe, known, mask, guided=True)
    assert channels is None and m.shape == (1, 1, 8, 12) and torch.equal(m, mask[..., ::2, ::2])
    cond = pipe.encode_prompt(PROMPTS[:1], NEGATIVES[:1], True)
    x = pipe.denoise(noise, torch.tensor([5]), cond, pipe.sampling("dpmpp_2m", 3), 7.5, known=z, mask=m)
    keep = (m == 0).expand_as(x)
    assert torch.equal(x[keep], z[keep]) and not torch.allclose(x[~keep], z[~keep], atol=1e-2)
    # `inpaint` returns the decoded image where the mask is 1, the input's pixels where it is 0
    known = ip.prepare_inputs(to_pil(known[0]), mask[0, 0], 16, multiple=pipe.size_multiple)[0]
    [image] = ip.inpaint(known, mask[0], "a red circle", pipe=pipe, steps=2, seed=5, progress=False)
    raw = ip.inpaint_tensors(pipe, known[None], mask, ["a red circle"], seeds=[5], steps=2, progress=False)[0]
    repaint = mask[0, 0, :, :, None].bool().numpy()
    decoded, given = np.asarray(to_pil(raw)), np.asarray(to_pil(known))
    assert np.array_equal(np.asarray(image), np.where(repaint, decoded, given))
    assert not np.array_equal(decoded[~repaint[..., 0]], given[~repaint[..., 0]])  # the VAE alone would not keep them
    jumped = ip.inpaint_tensors(pipe, known[None], mask, ["a red circle"], seeds=[5], steps=2, resample=1,
                                progress=False)  # fmt: skip
    assert not torch.allclose(jumped, raw, atol=1e-3)  # RePaint's jumps run on the latents too


def test_an_inpainting_folder_samples_only_by_inpainting(inpaint_folder, tmp_path, capsys):
    pipe = Text2Image.from_pretrained(inpaint_folder, "cpu")
    with pytest.raises(ValueError, match=r"inpainting UNet \(9 input channels\); it generates only by inpainting"):
        pipe(["a red circle"], steps=1, progress=False)
    known, mask, _ = images_and_masks(1)
    with pytest.raises(ValueError, match="resample needs the sampler's blend"):
        ip.inpaint_tensors(pipe, known, mask, ["a"], seeds=[0], steps=2, resample=1, progress=False)
    (tmp_path / "p.txt").write_text("a red circle\n")
    rc = cli.main(["generate", "--prompts", str(tmp_path / "p.txt"), "--checkpoint", str(inpaint_folder),
                   "--device", "cpu", "--out", str(tmp_path / "out")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "inpainting UNet" in err, err
    assert not list((tmp_path / "out").rglob("*.png"))


# ----------------------------------------------------------------------------- image-to-image


@pytest.mark.parametrize(
    "scheduler_cls, spacing, steps, strength",
    [
        (diffusers.DDIMScheduler, "leading", 4, 0.5),  # the folder's own: 2 of 4 steps
        (diffusers.DPMSolverMultistepScheduler, "leading", 5, 0.7),  # int(3.5) = 3 steps, first order first
        (diffusers.EulerDiscreteScheduler, "linspace", 4, 0.75),  # σ-space: the content noised to σ, not scaled
    ],
)
def test_img2img_matches_diffusers(folder, tmp_path, posterior_mean, scheduler_cls, spacing, steps, strength):
    """StableDiffusionImg2ImgPipeline's images for the same content, noise, prompts, strength and steps."""
    scheduler = scheduler_cls.from_config(sd_scheduler_config().config, timestep_spacing=spacing)
    path = copy_folder(folder, tmp_path / "sd")
    scheduler.save_pretrained(path / "scheduler")
    content = torch.rand(2, 3, 16, 24) * 2 - 1
    theirs = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(
        path, safety_checker=None, requires_safety_checker=False
    )  # fmt: skip
    theirs.scheduler = scheduler  # diffusers builds model_index.json's class (DDIM) from the saved config
    theirs.set_progress_bar_config(disable=True)
    ref = theirs(
        PROMPTS, image=(content + 1) / 2, negative_prompt=NEGATIVES, num_inference_steps=steps, strength=strength,
        guidance_scale=7.5, generator=torch.Generator().manual_seed(0), output_type="np",
    ).images  # fmt: skip
    noise = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(0))  # diffusers' draw
    pipe = Text2Image.from_pretrained(path, "cpu")
    kw = dict(strength=strength, guidance_scale=7.5, steps=steps, noise=noise, progress=False)
    ours = to_np(st.img2img_tensors(pipe, content, PROMPTS, negative_prompt=NEGATIVES, **kw))
    assert np.abs(ours - ref).max() < IMAGE_ATOL
    swapped = to_np(st.img2img_tensors(pipe, content, PROMPTS, negative_prompt=NEGATIVES[::-1], **kw))
    assert np.abs(swapped - ref).max() > 100 * IMAGE_ATOL


# ----------------------------------------------------------------------------- the commands


@pytest.fixture
def files(tmp_path):
    """A 24×16 image and its mask, an 18×18 pair, a prompt file."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)).save(tmp_path / "image.png")
    mask = np.zeros((16, 24), np.uint8)
    mask[4:12, 6:20] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    Image.new("RGB", (18, 18)).save(tmp_path / "odd.png")
    Image.new("L", (18, 18), 255).save(tmp_path / "odd-mask.png")
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    return tmp_path


def test_inpaint_and_stylize_commands_on_an_sd_folder(folder, files, capsys):
    out = files / "inpainted.png"
    rc = cli.main(["inpaint", "--image", str(files / "image.png"), "--mask", str(files / "mask.png"), "--prompt", "a",
                   "--checkpoint", str(folder), "--steps", "2", "--out", str(out), "--device", "cpu"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    src, res = np.asarray(Image.open(files / "image.png")), np.asarray(Image.open(out).convert("RGB"))
    keep = np.asarray(Image.open(files / "mask.png")) < 128
    assert res.shape == src.shape and (res[keep] == src[keep]).all() and (res[~keep] != src[~keep]).any()
    out = files / "stylized.png"
    rc = cli.main(["stylize", "--content", str(files / "image.png"), "--style-prompt", "red", "--checkpoint",
                   str(folder), "--steps", "4", "--strength", "0.5", "--out", str(out), "--device", "cpu"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert Image.open(out).size == (24, 16)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["stylize", "--content", "image.png", "--style-image", "image.png", "--style-prompt", "red"],
         "--style-image: a Stable Diffusion folder has no style-image conditioning"),
        (["stylize", "--content", "odd.png", "--style-prompt", "red"],
         "--content is 18×18; on this folder an image's sides must be multiples of 4"),
        (["stylize", "--content", "image.png", "--style-prompt", "red", "--strength", "0.1", "--steps", "5"],
         r"strength 0.1 of 5 steps runs int\(5·0.1\) = 0 steps"),
        (["inpaint", "--image", "odd.png", "--mask", "odd-mask.png", "--prompt", "a"],
         "--image is 18x18 pixels but the model takes sides that are multiples of 4; pass --resize"),
        (["inpaint", "--image", "image.png", "--mask", "odd-mask.png", "--prompt", "a"],
         "--mask is 18x18 pixels but --image is 24x16"),
        (["generate", "--prompts", "prompts.txt", "--cuda-graphs"], "--cuda-graphs needs a CUDA device"),
        (["generate", "--prompts", "prompts.txt", "--dtype", "half"], "argument --dtype: invalid choice: 'half'"),
    ],
    ids=["style-image", "content-size", "no-steps", "image-size", "mask-size", "cuda-graphs", "dtype"],
)
def test_bad_input_on_an_sd_folder_is_one_line(folder, files, capsys, argv, message):
    argv = [a if not a.endswith((".png", ".txt")) else str(files / a) for a in argv]
    out = files / ("out" if argv[0] == "generate" else "out.png")
    rc = cli.main([*argv, "--checkpoint", str(folder), "--device", "cpu", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert re.search(message, err), err
    assert not out.is_file() and not list(files.rglob("out/**/*.png"))
