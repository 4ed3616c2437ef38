"""Stable Diffusion folders: parity with diffusers' StableDiffusionPipeline on a tiny random SD
pipeline saved with ``save_pretrained``, the UNet/VAE conversions (both ways for the UNet), the
scheduler mapping against diffusers' schedulers, fp16 variants, and one-line errors naming
the file for every bad folder."""
import json
import re
import shutil

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff import cli, schedule as schedules
from fastdiff.nn.unet import UNet
from fastdiff.nn.vae import VAE
from fastdiff.ops.fused_step import COEFFICIENTS
from fastdiff.pipelines import Text2Image
from fastdiff.sd import convert, scheduler as sd_scheduler
from fastdiff.sd.pipeline import StableDiffusion

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

# Images in [0, 1].  The issue asks for 1e-2; the pipelines agree to float rounding (~2e-6),
# and a wrong set_alpha_to_one moves the tiny model's images by ~5e-3, so the bound is tighter.
IMAGE_ATOL = 1e-4
PROMPTS, NEGATIVES = ["a red circle", "zz"], ["ci", "red"]


# The kernels are proven against these references in their own tests; here, the wiring.
pytestmark = pytest.mark.usefixtures("reference_ops")


def tiny_unet(linear_projection=False, heads=(1, 2), context_dim=24, in_channels=4):
    """A two-level SD UNet (attention at the lower level and in the middle; 32 channels per head);
    ``in_channels=9``: an inpainting UNet."""
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=context_dim, attention_head_dim=heads, norm_num_groups=8,
        use_linear_projection=linear_projection,
    ).eval()  # fmt: skip


def tiny_vae():
    torch.manual_seed(1)
    return diffusers.AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=8, sample_size=12,
    ).eval()  # fmt: skip


def sd_scheduler_config(cls=None, **overrides):
    """Stable Diffusion 1.x's schedule (scaled_linear, steps_offset 1) as a diffusers scheduler."""
    cls = cls or diffusers.DDIMScheduler
    sd = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    if cls is diffusers.DDIMScheduler:
        sd.update(clip_sample=False, set_alpha_to_one=False)
    return cls(**{**sd, **overrides})


def write_folder(root, scheduler=None, linear_projection=False, inpainting=False):
    """A tiny random SD pipeline saved as diffusers saves it (safetensors, model_index.json);
    ``inpainting``: a StableDiffusionInpaintPipeline with a 9-channel UNet."""
    from test_text import write_tiny_clip

    text_encoder, tokenizer = write_tiny_clip(root.parent / f"{root.name}-clip", sd_layout=False)
    cls = diffusers.StableDiffusionInpaintPipeline if inpainting else diffusers.StableDiffusionPipeline
    pipe = cls(
        unet=tiny_unet(linear_projection, in_channels=9 if inpainting else 4), vae=tiny_vae(), text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler or sd_scheduler_config(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("sd") / "tiny-sd")


def copy_folder(folder, dest):
    shutil.copytree(folder, dest)
    return dest


def diffusers_images(path, scheduler, latents, steps, guidance):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = scheduler
    pipe.set_progress_bar_config(disable=True)
    height, width = (2 * n for n in latents.shape[2:])  # the tiny VAE's f = 2
    out = pipe(
        PROMPTS, negative_prompt=NEGATIVES, latents=latents, num_inference_steps=steps, guidance_scale=guidance,
        height=height, width=width, output_type="np",
    )  # fmt: skip
    return out.images


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize(
    "sampler, scheduler_cls, spacing, steps",
    [
        ("ddim", diffusers.DDIMScheduler, "leading", 2),  # the folder's own scheduler
        ("ddim", diffusers.DDIMScheduler, "trailing", 3),  # N ∤ T: DDIM lands on t − ⌊T/N⌋
        ("euler", diffusers.EulerDiscreteScheduler, "linspace", 2),  # x_T scaled by init_noise_sigma
        ("dpmpp_2m", diffusers.DPMSolverMultistepScheduler, "leading", 3),
    ],
)
def test_images_match_diffusers(folder, tmp_path, sampler, scheduler_cls, spacing, steps):
    """fastdiff's images equal StableDiffusionPipeline's for the same latents, prompts, negative
    prompts, steps and guidance, with the folder's scheduler config driving both."""
    scheduler = scheduler_cls.from_config(sd_scheduler_config().config, timestep_spacing=spacing)
    path = copy_folder(folder, tmp_path / "sd")
    scheduler.save_pretrained(path / "scheduler")  # the folder now holds this scheduler's config
    latents = torch.randn(2, 4, 8, 12)  # non-square: 16×24 images
    ref = diffusers_images(path, scheduler, latents, steps, guidance=7.5)
    pipe = Text2Image.from_pretrained(path, "cpu")
    assert isinstance(pipe, StableDiffusion) and pipe.default_sampler == sampler
    ours = pipe(PROMPTS, negative_prompt=NEGATIVES, latents=latents, steps=steps, guidance_scale=7.5, output_type="np",
                progress=False)  # fmt: skip
    assert ours.shape == ref.shape == (2, 16, 24, 3) and ours.dtype == np.float32
    assert np.abs(ours - ref).max() < IMAGE_ATOL
    # the bound has power: the same run with the negative prompts swapped is far from it
    swapped = pipe(PROMPTS, negative_prompt=NEGATIVES[::-1], latents=latents, steps=steps, guidance_scale=7.5,
                   output_type="np", progress=False)  # fmt: skip
    assert np.abs(swapped - ref).max() > 100 * IMAGE_ATOL


def test_output_types_and_seeded_latents(folder):
    pipe = Text2Image.from_pretrained(folder, "cpu")
    assert pipe.resolution == 16 and pipe.sample_shape == (4, 8, 8)
    kw = dict(steps=1, seeds=[3, 4], progress=False)
    x = pipe(PROMPTS, output_type="pt", **kw)
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32
    arr = pipe(PROMPTS, output_type="np", **kw)
    np.testing.assert_allclose(arr, (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy(), atol=1e-6)
    images = pipe(PROMPTS, **kw)
    assert [im.size for im in images] == [(16, 16)] * 2
    with pytest.raises(ValueError, match="output_type"):
        pipe(PROMPTS, output_type="latent", **kw)
    with pytest.raises(ValueError, match=r"latents must have shape \(2, 4, h, w\)"):
        pipe(PROMPTS, latents=torch.randn(2, 4, 5, 6), **kw)


def test_vae_encode_decode_match_diffusers():
    theirs = tiny_vae()
    ours = VAE(convert.vae_config_from_diffusers(dict(theirs.config), "vae/config.json"))
    ours.load_state_dict(convert.vae_from_diffusers(theirs.state_dict(), ours))
    x = torch.rand(2, 3, 10, 14) * 2 - 1
    with torch.no_grad():
        dist = theirs.encode(x).latent_dist
        mean, logvar = ours.encode(x)
        torch.testing.assert_close(mean, dist.mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(logvar, dist.logvar, rtol=1e-4, atol=1e-5)
        z = torch.randn(2, 4, 5, 7)
        torch.testing.assert_close(ours.decode(z), theirs.decode(z).sample, rtol=1e-4, atol=1e-5)


def test_vae_reads_legacy_attention_names():
    """Older folders name the VAE attention query/key/value/proj_attn, as 1×1 convolutions."""
    theirs = tiny_vae()
    legacy = {}
    for name, t in theirs.state_dict().items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if f"attentions.0.{new}." in name:
                name, t = name.replace(new, old), t[..., None, None] if t.ndim == 2 else t
        legacy[name] = t
    ours = VAE(convert.vae_config_from_diffusers(dict(theirs.config), "vae/config.json"))
    ours.load_state_dict(convert.vae_from_diffusers(legacy, ours))
    z = torch.randn(1, 4, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(ours.decode(z), theirs.decode(z).sample, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- UNet conversion


@pytest.mark.parametrize("linear_projection, heads", [(False, 2), (True, (1, 2))], ids=["sd1", "sd2"])
def test_unet_conversion_both_ways(linear_projection, heads):
    """diffusers → fastdiff gives the same function; fastdiff → diffusers gives back the same state dict."""
    theirs = tiny_unet(linear_projection, heads, context_dim=20)
    config = convert.unet_config_from_diffusers(dict(theirs.config), "unet/config.json")
    assert config.head_dim(1) == 32
    ours = UNet(config).eval()
    ours.load_state_dict(convert.unet_from_diffusers(theirs.state_dict(), ours))
    x, t, context = torch.randn(3, 4, 6, 10), torch.tensor([0, 517, 999]), torch.randn(3, 7, 20)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, context), theirs(x, t, context).sample, rtol=1e-4, atol=1e-5)
    back = convert.unet_to_diffusers(ours.state_dict(), linear_projection=linear_projection)
    reference = theirs.state_dict()
    assert back.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(back[name], tensor), name


def test_fastdiff_unet_loads_into_diffusers():
    """A fastdiff UNet's own (random) weights, exported, make diffusers' UNet the same function."""
    theirs = tiny_unet(heads=2, context_dim=20)
    ours = UNet(convert.unet_config_from_diffusers(dict(theirs.config), "unet/config.json")).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn_like(p) * 0.1)  # fastdiff zero-initialises output layers: make them count
    theirs.load_state_dict(convert.unet_to_diffusers(ours.state_dict()))
    x, t, context = torch.randn(2, 4, 4, 6), torch.tensor([3, 640]), torch.randn(2, 5, 20)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x, t, context).sample, ours(x, t, context), rtol=1e-4, atol=1e-5)


def test_sd15_config_converts_to_the_sd15_preset():
    """diffusers' default UNet2DConditionModel config is SD 1.x's: it converts to the sd15 preset."""
    ours = convert.unet_config_from_diffusers({"cross_attention_dim": 768}, "unet/config.json")
    assert ours == fastdiff.nn.UNetConfig.preset("sd15")
    sd2 = convert.unet_config_from_diffusers(
        {"cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True},
        "unet/config.json",
    )  # fmt: skip
    assert sd2.dim_head == 64 and sd2.context_dim == 1024


# ----------------------------------------------------------------------------- scheduler mapping


SCHEDULE_CASES = [
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1),
    dict(beta_schedule="linear", beta_start=0.0002, beta_end=0.03, num_train_timesteps=500),
    dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"),
    dict(beta_schedule="scaled_linear", rescale_betas_zero_snr=True, prediction_type="v_prediction"),
]


def read_config_of(scheduler, tmp_path):
    scheduler.save_config(tmp_path)
    return sd_scheduler.read_scheduler_config(tmp_path / "scheduler_config.json")


@pytest.mark.parametrize("case", SCHEDULE_CASES)
@pytest.mark.parametrize("spacing", schedules.SPACINGS)
def test_schedule_and_timesteps_match_diffusers(tmp_path, case, spacing):
    """ᾱ_t, the timesteps each sampler visits, Euler's initial-noise scale and DDIM's landing
    timesteps equal diffusers' for every beta schedule and spacing, at awkward step counts."""
    ddim = diffusers.DDIMScheduler(timestep_spacing=spacing, **case)
    config = read_config_of(ddim, tmp_path)
    schedule = schedules.make_schedule(**config.schedule_spec())
    torch.testing.assert_close(schedule.alphas_cumprod, ddim.alphas_cumprod.double(), rtol=1e-5, atol=1e-7)
    for sampler, cls in [("ddim", diffusers.DDIMScheduler), ("euler", diffusers.EulerDiscreteScheduler),
                         ("dpmpp_2m", diffusers.DPMSolverMultistepScheduler)]:  # fmt: skip
        theirs = cls(timestep_spacing=spacing, **case)
        for steps in (1, 7, 30):
            theirs.set_timesteps(steps)
            run = sd_scheduler.sampling(config, schedule, sampler, steps)
            assert run.plan.timesteps.double().tolist() == pytest.approx(theirs.timesteps.double().tolist()), sampler
            if sampler == "euler":
                sigma = float(theirs.sigmas[0])
                # abs 1e-5: one linspace step starts at t = 0, where diffusers' float32 1 − ᾱ is inexact
                expected = float(theirs.init_noise_sigma) / (sigma**2 + 1) ** 0.5
                assert run.noise_scale == pytest.approx(expected, rel=1e-6, abs=1e-5)
    assert config.prediction == ("v" if "v_prediction" in case.values() else "epsilon")


def test_ddim_lands_where_diffusers_does(tmp_path):
    """With trailing spacing and N ∤ T, diffusers' DDIM steps to ᾱ at t − ⌊T/N⌋, not at the next timestep."""
    config = read_config_of(sd_scheduler_config(timestep_spacing="trailing"), tmp_path)
    schedule = schedules.make_schedule(**config.schedule_spec())
    plan = sd_scheduler.sampling(config, schedule, "ddim", 3).plan
    assert plan.timesteps.tolist() == [999, 666, 332]
    x0_coeff = plan.coeffs[:, COEFFICIENTS.index("x0")].double()  # sqrt(ᾱ') of the step's landing timestep
    acp = schedule.alphas_cumprod
    torch.testing.assert_close(x0_coeff, acp[[666, 333, 0]].sqrt(), rtol=1e-6, atol=0)


def test_scheduler_classes_map_to_samplers(tmp_path):
    expected = {
        diffusers.DDIMScheduler: "ddim", diffusers.PNDMScheduler: "dpmpp_2m", diffusers.EulerDiscreteScheduler: "euler",
        diffusers.EulerAncestralDiscreteScheduler: "euler_a", diffusers.DPMSolverMultistepScheduler: "dpmpp_2m",
        diffusers.LMSDiscreteScheduler: "dpmpp_2m", diffusers.HeunDiscreteScheduler: "heun",
        diffusers.DDPMScheduler: "ddpm", diffusers.UniPCMultistepScheduler: "dpmpp_2m",
    }  # fmt: skip
    for cls, sampler in expected.items():
        config = read_config_of(cls(), tmp_path / cls.__name__)
        assert config.sampler == sampler
    file = tmp_path / "scheduler_config.json"
    file.write_text(json.dumps({"_class_name": "PNDMScheduler"}))  # keys left out: the class's defaults
    pndm = sd_scheduler.read_scheduler_config(file)
    assert (pndm.spacing, pndm.set_alpha_to_one, pndm.clip_sample) == ("leading", False, None)
    file.write_text(json.dumps({"_class_name": "LCMScheduler"}))
    with pytest.raises(ValueError, match="scheduler_config.json: unknown scheduler class 'LCMScheduler'"):
        sd_scheduler.read_scheduler_config(file)


# ----------------------------------------------------------------------------- weights files


def test_fp16_variant_loads(folder, tmp_path):
    """A folder with only ``*.fp16.safetensors`` loads (in fp32) the fp16-rounded weights."""
    from safetensors.torch import load_file, save_file

    path = copy_folder(folder, tmp_path / "sd")
    for component, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                            ("text_encoder", "model")):  # fmt: skip
        file = path / component / f"{stem}.safetensors"
        save_file({k: v.half() for k, v in load_file(file).items()}, path / component / f"{stem}.fp16.safetensors")
        file.unlink()
    half = Text2Image.from_pretrained(path, "cpu")
    full = Text2Image.from_pretrained(folder, "cpu")
    for (name, a), b in zip(half.unet.state_dict().items(), full.unet.state_dict().values()):
        assert a.dtype == torch.float32 and torch.equal(a, b.half().float()), name
    assert half.text_encoder.model.dtype == torch.float32


def test_pickle_weights_are_refused_unopened(folder, tmp_path):
    """A component whose weights exist only as a pickle is refused, and the pickle never runs."""
    path = copy_folder(folder, tmp_path / "sd")
    (path / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    marker = tmp_path / "unpickled"

    class Bomb:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"weights": Bomb()}, path / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match=r"unet/diffusion_pytorch_model\.bin: pickle weights are not loaded"):
        Text2Image.from_pretrained(path, "cpu")
    assert not marker.exists()


# ----------------------------------------------------------------------------- bad folders


def _drop_vae(path):
    shutil.rmtree(path / "vae")


def _unet_wider_context(path):
    config = json.loads((path / "unet" / "config.json").read_text())
    (path / "unet" / "config.json").write_text(json.dumps({**config, "cross_attention_dim": 32}))


def _unet_tensor_wrong_shape(path):
    from safetensors.torch import load_file, save_file

    file = path / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(file)
    state["conv_in.weight"] = state["conv_in.weight"][:, :, :2].contiguous()
    save_file(state, file)


def _index_without(component):
    def edit(path):
        index = json.loads((path / "model_index.json").read_text())
        del index[component]
        (path / "model_index.json").write_text(json.dumps(index))

    return edit


def _scheduler_class(name):
    def edit(path):
        file = path / "scheduler" / "scheduler_config.json"
        file.write_text(json.dumps({**json.loads(file.read_text()), "_class_name": name}))

    return edit


def _only_safetensors_index_missing_shard(path):
    file = path / "vae" / "diffusion_pytorch_model.safetensors"
    index = {"weight_map": {"decoder.conv_in.weight": "diffusion_pytorch_model-00001-of-00002.safetensors"}}
    (path / "vae" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    file.unlink()


@pytest.mark.parametrize(
    "edit, message",
    [
        (_drop_vae, r"/vae: missing \(listed in model_index.json\)"),
        (_index_without("tokenizer"), r"model_index.json: no tokenizer"),
        (_unet_wider_context, r"unet/diffusion_pytorch_model.safetensors: .* has shape"),
        (_unet_tensor_wrong_shape, r"diffusion_pytorch_model.safetensors: conv_in.weight has shape \(32, 4, 2, 3\)"),
        (_scheduler_class("FancyScheduler"), r"scheduler_config.json: unknown scheduler class 'FancyScheduler'"),
        (_only_safetensors_index_missing_shard, r"00001-of-00002.safetensors: no such file"),
    ],
    ids=["missing-component", "not-in-index", "config-mismatch", "wrong-shape", "scheduler", "shard"],
)
def test_bad_folders_fail_in_one_line_naming_the_file(folder, tmp_path, capsys, edit, message):
    path = copy_folder(folder, tmp_path / "sd")
    edit(path)
    assert_sample_refuses(path, tmp_path, capsys, message)


def assert_sample_refuses(path, tmp_path, capsys, message):
    """`fastdiff sample --checkpoint path` exits 2 with one line matching ``message``, before any work."""
    rc = cli.main(["sample", "a", "--checkpoint", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_other_pipelines_refuse_an_sd_folder(folder):
    from fastdiff.apps.video import VideoPipeline

    with pytest.raises(ValueError, match="is a Stable Diffusion folder, which VideoPipeline cannot run yet"):
        VideoPipeline.from_pretrained(folder, "cpu")


def test_cli_sample_on_an_sd_folder(folder, tmp_path, capsys):
    out = tmp_path / "samples"
    rc = cli.main(["sample", "a red circle", "--checkpoint", str(folder), "--steps", "2", "--num-images", "2",
                   "--out", str(out), "--device", "cpu"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    from PIL import Image

    assert Image.open(out / "000.png").size == (16, 16)
    assert "wrote 2 images" in capsys.readouterr().out

