"""SDXL folders: parity with diffusers' StableDiffusionXLPipeline and StableDiffusionXLImg2ImgPipeline
on a tiny random SDXL pipeline saved with ``save_pretrained`` (two text towers with tokenizers of their
own, the pooled text and the time ids in the UNet's time embedding, force_zeros_for_empty_prompt,
force_upcast), the UNet conversion both ways, the commands, and one-line errors naming the file
for what fastdiff does not load."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import fastdiff
from fastdiff import cli
from fastdiff.apps import stylize as st
from fastdiff.nn.unet import UNet
from fastdiff.pipelines import Text2Image
from fastdiff.sd import convert
from fastdiff.sd.pipeline import StableDiffusion, StableDiffusionXL
from fastdiff.text import SDXLTextEncoder
from test_sd_apps import folder_digest
from test_sd import IMAGE_ATOL, NEGATIVES, PROMPTS, assert_sample_refuses, copy_folder, sd_scheduler_config
from test_sd import tiny_vae

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("reference_ops")

WIDTHS = (24, 32)  # the two towers' hidden sizes: the UNet's context is 56 wide
POOLED, TIME_DIM = 16, 8  # the second tower's projection; each time id's sinusoid


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_sdxl_folder(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl")


@pytest.fixture(scope="module")
def pipe(folder):
    return Text2Image.from_pretrained(folder, "cpu")


def tiny_sdxl_unet(in_channels=4):
    """SDXL's UNet in miniature: no attention at the first level, two transformer blocks at the
    second (and in the middle), linear projections, the text_time add_embedding; ``in_channels=9``:
    an inpainting UNet."""
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=sum(WIDTHS), attention_head_dim=(1, 2), norm_num_groups=8, use_linear_projection=True,
        transformer_layers_per_block=(1, 2), addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=POOLED + 6 * TIME_DIM,
    ).eval()  # fmt: skip


def write_sdxl_folder(root, inpainting=False):
    """A tiny random StableDiffusionXLPipeline saved as diffusers saves it (``inpainting``: a
    StableDiffusionXLInpaintPipeline with a 9-channel UNet).  The second tokenizer pads with another
    token (as SDXL's pads with "!"), so a tower fed the other's tokens shows."""
    from test_text import write_tiny_clip

    clip = root.parent / f"{root.name}-clip"
    text_encoder, tokenizer = write_tiny_clip(clip, sd_layout=False)
    tokenizer_2 = transformers.CLIPTokenizer(str(clip / "vocab.json"), str(clip / "merges.txt"), pad_token="z")
    tokenizer_2.model_max_length = tokenizer.model_max_length
    config = transformers.CLIPTextConfig(
        vocab_size=text_encoder.config.vocab_size, hidden_size=WIDTHS[1], intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=12, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        projection_dim=POOLED,
    )  # fmt: skip
    torch.manual_seed(2)
    text_encoder_2 = transformers.CLIPTextModelWithProjection(config).eval()
    vae = tiny_vae()
    vae.register_to_config(scaling_factor=0.13025, force_upcast=True)  # SDXL's VAE config
    scheduler = sd_scheduler_config(diffusers.EulerDiscreteScheduler, timestep_spacing="leading")  # SDXL's default
    cls = diffusers.StableDiffusionXLInpaintPipeline if inpainting else diffusers.StableDiffusionXLPipeline
    pipe = cls(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
        unet=tiny_sdxl_unet(9 if inpainting else 4), scheduler=scheduler, add_watermarker=False,
    )  # fmt: skip
    pipe.save_pretrained(root)
    return root


def set_index(path, **fields):
    index = json.loads((path / "model_index.json").read_text())
    (path / "model_index.json").write_text(json.dumps({**index, **fields}))


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize(
    "sampler, scheduler_cls, spacing, steps, negatives, zeros",
    [
        ("euler", diffusers.EulerDiscreteScheduler, "leading", 3, NEGATIVES, True),  # the folder's own scheduler
        ("euler", diffusers.EulerDiscreteScheduler, "leading", 2, None, True),  # empty negatives: zero embeddings
        ("euler", diffusers.EulerDiscreteScheduler, "leading", 2, None, False),  # …or the empty prompt's
        ("ddim", diffusers.DDIMScheduler, "trailing", 3, NEGATIVES, True),
    ],
    ids=["euler", "zero-negatives", "empty-negatives", "ddim"],
)
def test_images_match_diffusers(folder, tmp_path, sampler, scheduler_cls, spacing, steps, negatives, zeros):
    """fastdiff's images equal StableDiffusionXLPipeline's for the same latents, prompts, negative prompts
    (fastdiff's default "" against diffusers' None), steps and guidance."""
    path = copy_folder(folder, tmp_path / "sdxl")
    scheduler = scheduler_cls.from_config(sd_scheduler_config().config, timestep_spacing=spacing)
    scheduler.save_pretrained(path / "scheduler")
    set_index(path, force_zeros_for_empty_prompt=zeros)
    latents = torch.randn(2, 4, 8, 12)  # non-square: 16×24 images, time ids (16, 24, 0, 0, 16, 24)
    theirs = diffusers.StableDiffusionXLPipeline.from_pretrained(path, add_watermarker=False)
    theirs.scheduler = scheduler
    theirs.set_progress_bar_config(disable=True)
    kw = dict(latents=latents, num_inference_steps=steps, guidance_scale=5.0, height=16, width=24, output_type="np")
    ref = theirs(PROMPTS, negative_prompt=negatives, **kw).images
    ours_pipe = Text2Image.from_pretrained(path, "cpu")
    assert isinstance(ours_pipe, StableDiffusionXL) and ours_pipe.default_sampler == sampler
    run = dict(latents=latents, steps=steps, guidance_scale=5.0, output_type="np", progress=False)
    ours = ours_pipe(PROMPTS, negative_prompt=negatives or "", **run)
    assert ours.shape == ref.shape == (2, 16, 24, 3)
    assert np.abs(ours - ref).max() < IMAGE_ATOL
    # the bound has power: other negatives (swapped, or the other empty-prompt rule) land far from it
    other = NEGATIVES[::-1] if negatives else NEGATIVES
    far = ours_pipe(PROMPTS, negative_prompt=other, **run)
    assert np.abs(far - ref).max() > 100 * IMAGE_ATOL
    if negatives is None:
        ours_pipe.zero_empty_negatives = not zeros
        assert np.abs(ours_pipe(PROMPTS, **run) - ref).max() > 100 * IMAGE_ATOL


def test_guidance_at_most_one_is_unguided_as_in_diffusers(folder):
    """diffusers guides only above 1: SDXL-Turbo's guidance 0 is the conditional prediction alone (fastdiff's
    own pipelines read 0 as the unconditional one), and the prompts still tell the images apart."""
    latents = torch.randn(2, 4, 8, 12)
    theirs = diffusers.StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)
    theirs.set_progress_bar_config(disable=True)
    pipe = Text2Image.from_pretrained(folder, "cpu")
    for scale in (0.0, 0.5):
        ref = theirs(PROMPTS, latents=latents, num_inference_steps=2, guidance_scale=scale, height=16, width=24,
                     output_type="np").images  # fmt: skip
        ours = pipe(PROMPTS, latents=latents, steps=2, guidance_scale=scale, output_type="np", progress=False)
        assert np.abs(ours - ref).max() < IMAGE_ATOL
        assert np.abs(ours[0] - ours[1]).max() > 100 * IMAGE_ATOL


def test_time_ids_follow_the_latents_size(pipe):
    """(H, W, 0, 0, H, W) per image from (B, 4, h, w) latents, H, W = 2h, 2w with the tiny VAE."""
    ids = pipe.size_conditions(torch.zeros(3, 4, 8, 12))["time_ids"]
    assert ids.dtype == torch.int64 and ids.tolist() == [[16, 24, 0, 0, 16, 24]] * 3


def test_img2img_matches_diffusers(folder, monkeypatch):
    """StableDiffusionXLImg2ImgPipeline's images for the same content, noise, prompts and strength."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())
    content = torch.rand(2, 3, 16, 24) * 2 - 1
    theirs = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(folder, add_watermarker=False)
    theirs.set_progress_bar_config(disable=True)
    ref = theirs(
        PROMPTS, image=(content + 1) / 2, negative_prompt=NEGATIVES, num_inference_steps=4, strength=0.5,
        guidance_scale=5.0, generator=torch.Generator().manual_seed(0), output_type="np",
    ).images  # fmt: skip
    noise = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(0))  # diffusers' draw
    pipe = Text2Image.from_pretrained(folder, "cpu")
    x = st.img2img_tensors(pipe, content, PROMPTS, negative_prompt=NEGATIVES, strength=0.5, guidance_scale=5.0,
                           steps=4, noise=noise, progress=False)  # fmt: skip
    ours = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert np.abs(ours - ref).max() < IMAGE_ATOL


def test_denoise_loop_is_denoise_bit_for_bit(pipe):
    """What a CUDA graph captures, run eagerly through its static buffers: batches of two latent sizes
    (so two sets of time ids) equal `denoise` exactly."""
    loop, sampling = pipe.denoise_loop(None, 2, 5.0), pipe.sampling(None, 2)
    for n, h, w in [(2, 8, 8), (1, 4, 12), (2, 8, 8)]:
        x, seeds = torch.randn(n, 4, h, w), torch.arange(n)
        cond = pipe.encode_prompt(PROMPTS[:n], ["", "red"][:n], loop.guided)
        assert torch.equal(loop.run(x, seeds, cond), pipe.denoise(x, seeds, cond, sampling, 5.0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_the_cuda_graph_captures_the_time_ids(folder):
    """On a GPU, fp16 UNet and fp32 VAE: the captured loop (time ids made inside it) gives the eager
    loop's samples for two latent sizes, and the images are finite."""
    with fastdiff.use_backend("auto"):
        pipe = Text2Image.from_pretrained(folder, "cuda")
        assert pipe.dtype == torch.float16 and pipe.vae_dtype == torch.float32
        graphed, eager = pipe.denoise_loop(None, 3, 5.0, cuda_graph=True), pipe.denoise_loop(None, 3, 5.0)
        for n, h, w in [(2, 8, 8), (1, 8, 12), (2, 8, 8)]:
            x, seeds = torch.randn(n, 4, h, w, device="cuda"), torch.arange(n, device="cuda")
            cond = pipe.encode_prompt(PROMPTS[:n], NEGATIVES[:n], True)
            out = graphed.run(x, seeds, cond)
            torch.testing.assert_close(out, eager.run(x, seeds, cond), rtol=1e-3, atol=1e-3)
            assert torch.isfinite(pipe.decode(out)).all()
        assert len(graphed.shapes) == 2 and graphed.capture


def test_an_inpainting_folder_matches_diffusers(tmp_path, monkeypatch):
    """A StableDiffusionXLInpaintPipeline folder (9-channel UNet): its images for the same latents,
    images, masks, prompts and guidance (strength 1: from the latents alone)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from fastdiff.apps import inpaint as ip
    from test_sd_apps import images_and_masks, to_np

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())
    path = write_sdxl_folder(tmp_path / "sdxl-inpaint", inpainting=True)
    known, mask, latents = images_and_masks()
    theirs = diffusers.StableDiffusionXLInpaintPipeline.from_pretrained(path, add_watermarker=False)
    theirs.set_progress_bar_config(disable=True)
    ref = theirs(
        PROMPTS, image=(known + 1) / 2, mask_image=mask, negative_prompt=["zz"] * 2, latents=latents, strength=1.0,
        num_inference_steps=3, guidance_scale=5.0, height=16, width=24, output_type="np",
    ).images  # fmt: skip
    pipe = Text2Image.from_pretrained(path, "cpu")
    assert isinstance(pipe, StableDiffusionXL) and pipe.inpainting
    kw = dict(seeds=[0, 1], negative_prompt="zz", guidance_scale=5.0, steps=3, latents=latents, progress=False)
    ours = to_np(ip.inpaint_tensors(pipe, known, mask, PROMPTS, **kw))
    assert ours.shape == ref.shape == (2, 16, 24, 3)
    assert np.abs(ours - ref).max() < IMAGE_ATOL
    flipped = to_np(ip.inpaint_tensors(pipe, known, 1 - mask, PROMPTS, **kw))
    assert np.abs(flipped - ref).max() > 100 * IMAGE_ATOL


# ----------------------------------------------------------------------------- parts


def test_unet_conversion_both_ways():
    """The converted UNet computes diffusers' output (pooled text and time ids included), and its
    state dict converted back loads into diffusers' model exactly."""
    theirs = tiny_sdxl_unet()
    config = convert.unet_config_from_diffusers(dict(theirs.config), "unet/config.json")
    assert (config.transformer_depth, config.attention_levels, config.pooled_dim, config.added_time_ids) == (
        (1, 2), (1,), POOLED, 6
    )
    ours = UNet(config).eval()
    ours.load_state_dict(convert.unet_from_diffusers(theirs.state_dict(), ours))
    x, t, context = torch.randn(2, 4, 8, 12), torch.tensor([999, 10]), torch.randn(2, 5, sum(WIDTHS))
    pooled, ids = torch.randn(2, POOLED), torch.tensor([[16, 24, 0, 0, 16, 24], [32, 32, 4, 2, 16, 24]])
    with torch.no_grad():
        ref = theirs(x, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        out = ours(x, t, context, pooled, ids)
        moved = ours(x, t, context, pooled, ids.flip(1))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert (moved - ref).abs().max() > 1e-3  # the time ids reach the output
    back = diffusers.UNet2DConditionModel(**theirs.config)
    back.load_state_dict(convert.unet_to_diffusers(ours.state_dict(), linear_projection=True), strict=True)
    for name, tensor in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    with pytest.raises(ValueError, match=r"time_ids must have shape \(2, 6\), got None"):
        ours(x, t, context, pooled)
    with pytest.raises(TypeError, match=r"time_ids must be a torch.Tensor, got list"):
        ours(x, t, context, pooled, ids.tolist())


def test_sdxl_config_converts_to_the_sdxl_preset():
    """SDXL 1.0's unet/config.json (the fields that differ from diffusers' defaults) converts to the
    sdxl preset, which has its 2.57 G parameters."""
    config = {
        "addition_embed_type": "text_time", "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
        "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "projection_class_embeddings_input_dim": 2816, "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True,
    }  # fmt: skip
    ours = convert.unet_config_from_diffusers(config, "unet/config.json")
    assert ours == fastdiff.nn.UNetConfig.preset("sdxl")
    with torch.device("meta"):
        assert sum(p.numel() for p in UNet(ours).parameters()) == 2_567_463_684


def test_text_encoder_is_diffusers_encode_prompt(folder):
    """tokens: both towers' penultimate states, each from its own tokenizer; pooled: the second's projection."""
    enc = SDXLTextEncoder.from_diffusers_folder(folder)
    assert (enc.dim, enc.pooled_dim, enc.max_length) == (sum(WIDTHS), POOLED, 12)
    theirs = diffusers.StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)
    ref_tokens, _, ref_pooled, _ = theirs.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    tokens, pooled = enc(PROMPTS)
    torch.testing.assert_close(tokens, ref_tokens)
    torch.testing.assert_close(pooled, ref_pooled)


@pytest.mark.parametrize("upcast", [True, False])
def test_fp16_weights_keep_an_upcast_vae_in_fp32(folder, tmp_path, upcast):
    path = copy_folder(folder, tmp_path / "sdxl")
    config = json.loads((path / "vae" / "config.json").read_text())
    (path / "vae" / "config.json").write_text(json.dumps({**config, "force_upcast": upcast}))
    pipe = Text2Image.from_pretrained(path, "cpu", dtype="float16")
    assert pipe.dtype == torch.float16 and pipe.vae_dtype == (torch.float32 if upcast else torch.float16)


def test_each_tower_reads_its_own_variant(folder, tmp_path):
    """Only the second tower as ``model.fp16.safetensors``: it loads those (fp16-rounded) weights, the
    first tower its full-precision file."""
    from safetensors.torch import load_file, save_file

    path = copy_folder(folder, tmp_path / "sdxl")
    file = path / "text_encoder_2" / "model.safetensors"
    save_file({k: v.half() for k, v in load_file(file).items()}, path / "text_encoder_2" / "model.fp16.safetensors")
    file.unlink()
    half, full = Text2Image.from_pretrained(path, "cpu").text_encoder, SDXLTextEncoder.from_diffusers_folder(folder)
    for tower, rounded in ((0, False), (1, True)):
        for (name, a), b in zip(half.model[tower].state_dict().items(), full.model[tower].state_dict().values()):
            assert a.dtype == torch.float32 and torch.equal(a, b.half().float() if rounded else b), name


# ----------------------------------------------------------------------------- the commands


def test_sample_generate_inpaint_and_stylize_on_an_sdxl_folder(folder, pipe, tmp_path, capsys):
    out = tmp_path / "samples"
    rc = cli.main(["sample", "a red circle", "--checkpoint", str(folder), "--steps", "2", "--num-images", "2",
                   "--out", str(out), "--device", "cpu"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert Image.open(out / "000.png").size == (16, 16)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\nzz\n")
    out = tmp_path / "bulk"
    rc = cli.main(["generate", "--prompts", str(prompts), "--batch", "2", "--steps", "2", "--checkpoint", str(folder),
                   "--device", "cpu", "--no-progress", "--out", str(out)])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert {x["checkpoint_sha256"] for x in lines} == {folder_digest(folder)}  # both towers' files included
    made = pipe([x["prompt"] for x in lines], seeds=[x["seed"] for x in lines], steps=2, progress=False)
    for line, image in zip(lines, made):
        assert np.array_equal(np.asarray(Image.open(out / line["file"])), np.asarray(image))
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)).save(tmp_path / "image.png")
    mask = np.zeros((16, 24), np.uint8)
    mask[4:12, 6:20] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    rc = cli.main(["inpaint", "--image", str(tmp_path / "image.png"), "--mask", str(tmp_path / "mask.png"), "--prompt",
                   "a", "--checkpoint", str(folder), "--steps", "2", "--out", str(tmp_path / "in.png"),
                   "--device", "cpu"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    rc = cli.main(["stylize", "--content", str(tmp_path / "image.png"), "--style-prompt", "red", "--checkpoint",
                   str(folder), "--steps", "4", "--strength", "0.5", "--out", str(tmp_path / "st.png"),
                   "--device", "cpu"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert Image.open(tmp_path / "in.png").size == Image.open(tmp_path / "st.png").size == (24, 16)


def _refiner(path):
    set_index(path, _class_name="StableDiffusionXLImg2ImgPipeline", requires_aesthetics_score=True,
              text_encoder=[None, None])  # fmt: skip


def _tower_class(path):
    set_index(path, text_encoder_2=["transformers", "CLIPTextModel"])


def _no_second_tokenizer(path):
    index = json.loads((path / "model_index.json").read_text())
    del index["tokenizer_2"]
    (path / "model_index.json").write_text(json.dumps(index))


def _time_dim(path):
    file = path / "unet" / "config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), "addition_time_embed_dim": 64}))


def _refiner_unet(path):  # the refiner's add_embedding: 5 time ids (aesthetic score for the target size)
    file = path / "unet" / "config.json"
    config = {**json.loads(file.read_text()), "projection_class_embeddings_input_dim": POOLED + 5 * TIME_DIM}
    file.write_text(json.dumps(config))


def _no_text_projection(path):
    from safetensors.torch import load_file, save_file

    file = path / "text_encoder_2" / "model.safetensors"
    weights = load_file(file)
    del weights["text_projection.weight"]
    save_file(weights, file, metadata={"format": "pt"})


def _malformed_index(path):
    set_index(path, text_encoder=["transformers"])


def _sd_unet(path):
    file = path / "unet" / "config.json"
    config = json.loads(file.read_text())
    del config["addition_embed_type"], config["projection_class_embeddings_input_dim"]
    file.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "edit, message",
    [
        (_refiner, r"model_index.json: StableDiffusionXLImg2ImgPipeline is an SDXL refiner"),
        (_tower_class, r"model_index.json: text_encoder_2 is a CLIPTextModel; fastdiff reads CLIPTextModelWithProj"),
        (_no_second_tokenizer, r"model_index.json: no tokenizer_2 \(an SDXL folder needs"),
        (_time_dim, r"unet/config.json: addition_embed_type 'text_time' needs projection_class_embeddings_input_dim"),
        (_refiner_unet, r"unet/config.json: projection_class_embeddings_input_dim=56 is not text_encoder_2's "
                        r"projection_dim \(16\) \+ 6 time ids"),
        (_no_text_projection, r"text_encoder_2: the weights lack 1 tensors of a CLIPTextModelWithProjection, "
                              r"e.g. 'text_projection.weight'"),
        (_malformed_index, r"model_index.json: no text_encoder \(an SDXL folder needs"),
        (_sd_unet, r"unet/config.json: an SDXL folder needs addition_embed_type 'text_time'"),
    ],
    ids=[
        "refiner", "tower-class", "no-tokenizer-2", "time-dim", "refiner-unet", "no-projection", "malformed", "sd-unet",
    ],  # fmt: skip
)
def test_bad_sdxl_folders_fail_in_one_line_naming_the_file(folder, tmp_path, capsys, edit, message):
    path = copy_folder(folder, tmp_path / "sdxl")
    edit(path)
    assert_sample_refuses(path, tmp_path, capsys, message)


def test_the_sdxl_preset_is_not_trained_nor_loaded_as_a_fastdiff_pipeline():
    """Only an SDXL folder's pipeline makes time ids: the trainer and fastdiff's own pipeline folders refuse them."""
    from fastdiff.training import TrainConfig

    with pytest.raises(ValueError, match="model 'sdxl' takes SDXL's time ids, which the trainer does not supply"):
        TrainConfig(model="sdxl")
    spec = {"unet": fastdiff.nn.UNetConfig.preset("sdxl").to_dict()}
    with pytest.raises(ValueError, match="added_time_ids: only an SDXL folder's pipeline supplies time ids"):
        Text2Image.build_unet(spec, "folder")


def test_an_sd_folder_is_not_sdxl(folder, tmp_path, capsys):
    """An SD folder loads as plain `StableDiffusion` (no time ids); with an SDXL UNet in it, it is refused."""
    import shutil

    from test_sd import write_folder

    path = write_folder(tmp_path / "sd")
    pipe = Text2Image.from_pretrained(path, "cpu")
    assert type(pipe) is StableDiffusion and pipe.size_conditions(torch.zeros(1, 4, 8, 8)) == {}
    shutil.rmtree(path / "unet")
    shutil.copytree(folder / "unet", path / "unet")
    capsys.readouterr()  # the folder's writing
    assert_sample_refuses(path, tmp_path, capsys, r"sd/unet/config.json: an SDXL UNet in an SD 1.x/2.x folder\n$")
