"""Bad input, every sub-command: numbers (finite, in range, bounded by what fits), output paths,
devices and unreadable files end in one line naming the argument or file, exit status 2, before
any model loads.  The shared checks of `fastdiff.checks` are tested here too."""
import json
import math
import re
import sys

import pytest
import torch

from fastdiff import checks, cli, pipelines
from fastdiff.pipelines import DEFAULT_CHECKPOINT

pytest.importorskip("transformers")


@pytest.fixture
def no_model(monkeypatch):
    """Loading any pipeline fails the test: what is checked here must be refused before that."""

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(pipelines.Pipeline, "from_pretrained", classmethod(loaded))
    monkeypatch.setattr(pipelines, "cached_pipeline", loaded)


def one_line_error(capsys, argv) -> str:
    """Run the command; it must exit 2 with one line on stderr, no traceback."""
    rc = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith(f"fastdiff {argv[0]}: error: ") and len(err.strip().splitlines()) == 1, err
    return err


# ----------------------------------------------------------------------------- fastdiff.checks


def test_check_int_and_number():
    assert checks.check_int(3, "n", 1, 3) == 3
    for bad in (0, 4, True, 2.0, "2", None):
        with pytest.raises(ValueError, match=r"^n must be an int in \[1, 3\], got"):
            checks.check_int(bad, "n", 1, 3)
    assert checks.check_number(0.5, "s", 0, 1, low_open=True) == 0.5
    for bad in (0, 1.5, math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match=r"^s must be a finite number in \(0, 1\], got"):
            checks.check_number(bad, "s", 0, 1, low_open=True)
    for bad in ("0.5", None, True):
        with pytest.raises(TypeError, match="^s must be a number"):
            checks.check_number(bad, "s")
    assert checks.check_seed(2**63 - 3, "seed", 3) == 2**63 - 3
    with pytest.raises(ValueError, match="seed"):
        checks.check_seed(2**63 - 2, "seed", 3)  # seed + 2 is not an int64


def test_check_fits_in_memory():
    checks.check_fits_in_memory(1024, "a little")
    ram = checks.physical_memory()
    assert ram is not None and ram > 2**20
    with pytest.raises(ValueError, match=r"^a lot: that needs about .* of memory, more than this machine's .*; less"):
        checks.check_fits_in_memory(ram + 1, "a lot", "less")


def test_output_paths_are_checked_without_creating_anything(tmp_path):
    (tmp_path / "file").write_text("")
    assert checks.check_out_dir(tmp_path / "new" / "deeper", "--out") == tmp_path / "new" / "deeper"
    assert checks.check_out_file(tmp_path / "new" / "a.png", "--out") == tmp_path / "new" / "a.png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing created, probe removed
    with pytest.raises(NotADirectoryError, match="exists and is not a folder"):
        checks.check_out_dir(tmp_path / "file", "--out")
    with pytest.raises(NotADirectoryError, match="'.*file' is a file, not a folder"):
        checks.check_out_file(tmp_path / "file" / "a.png", "--out")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        checks.check_out_file(tmp_path, "--out")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc refuses new files on Linux only")
def test_unwritable_folder():
    with pytest.raises(PermissionError, match="--out '/proc/fastdiff-out' is not writable"):
        checks.check_out_dir("/proc/fastdiff-out", "--out")
    with pytest.raises(PermissionError, match="not writable"):
        checks.check_out_file("/proc/out.png", "--out")


def test_devices():
    assert checks.resolve_device("cpu") == torch.device("cpu")
    assert checks.resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device must be cpu, cuda, cuda:N or mps, got 'banana'"):
        checks.resolve_device("banana")
    with pytest.raises(ValueError, match="must be cpu, cuda"):
        checks.resolve_device("meta")
    with pytest.raises(ValueError, match="CUDA"):
        checks.resolve_device(f"cuda:{torch.cuda.device_count()}")  # one past the last GPU (or no GPU at all)


# ----------------------------------------------------------------------------- every sub-command


def _prompts(tmp_path):
    (tmp_path / "p.txt").write_text("a red circle\n")
    return tmp_path / "p.txt"


NAN_AND_RANGE = [
    # (sub-command and its required arguments, bad option, value, message)
    ("sample a", "--guidance", "nan", "argument --guidance: must be a finite number, got nan"),
    ("sample a", "--guidance", "inf", "argument --guidance: must be a finite number"),
    ("sample a", "--steps", "0", "argument --steps: must be an int >= 1, got 0"),
    ("sample a", "--num-images", "1e9", "argument --num-images: must be an int >= 1, got '1e9'"),
    ("sample a", "--batch-size", "100000", r"argument --batch-size: must be an int in \[1, 4096\]"),
    ("sample a", "--seed", "-1", "argument --seed: must be an int >= 0"),
    ("sample a", "--threads", "0", r"argument --threads: must be an int in \[1, 1024\], got 0"),
    ("sample a", "--device", "banana", "argument --device: must be cpu, cuda, cuda:N or mps, got 'banana'"),
    ("sample a", "--dtype", "float8", "argument --dtype: invalid choice"),
    ("demo", "--steps", "-3", "argument --steps: must be an int >= 1"),
    ("demo", "--device", "banana", "argument --device: must be cpu"),
    ("generate --out {tmp}/o --prompts {prompts}", "--guidance", "nan", "argument --guidance: must be a finite"),
    ("generate --out {tmp}/o --prompts {prompts}", "--per-prompt", "0", "argument --per-prompt: must be an int >= 1"),
    ("generate --out {tmp}/o --prompts {prompts}", "--threads", "0", "argument --threads"),
    ("augment --classes a --per-class 2 --out {tmp}/o", "--guidance", "inf", "argument --guidance: must be a finite"),
    ("augment --classes a --out {tmp}/o", "--per-class", "0", "argument --per-class: must be an int >= 1"),
    ("inpaint --image i.png --mask m.png --prompt a", "--guidance", "nan", "argument --guidance: must be a finite"),
    ("inpaint --image i.png --mask m.png --prompt a", "--resample", "1000000000", r"argument --resample: .*\[0, 100\]"),
    ("stylize --content c.png --style-prompt red", "--guidance", "nan", "argument --guidance: must be a finite"),
    ("stylize --content c.png --style-prompt red", "--strength", "nan", r"argument --strength: .*in \(0, 1\]"),
    ("video --prompt a", "--guidance", "inf", "argument --guidance: must be a finite"),
    ("video --prompt a", "--fps", "nan", r"argument --fps: must be a finite number in \(0, 1000.0\]"),
    ("video --prompt a", "--scale", "0", "argument --scale: must be an int >= 1"),
    ("video --prompt a", "--frames", "-1", "argument --frames: must be an int >= 1"),
    ("bench", "--only", "nothing", "argument --only: invalid choice"),
]


@pytest.mark.parametrize("command, option, value, message", NAN_AND_RANGE)
def test_bad_numbers_fail_in_one_line_before_any_work(capsys, tmp_path, no_model, command, option, value, message):
    argv = command.format(tmp=tmp_path, prompts=_prompts(tmp_path)).split() + [option, value]
    assert re.search(message, one_line_error(capsys, argv))
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
@pytest.mark.parametrize("command", ["demo", "sample a", "video --prompt a"])
def test_cuda_on_a_machine_without_one(capsys, no_model, command):
    err = one_line_error(capsys, command.split() + ["--device", "cuda"])
    assert "argument --device: 'cuda': no CUDA GPU is available here" in err


def test_existing_file_or_folder_in_the_way_of_an_output(capsys, tmp_path, no_model):
    (tmp_path / "file").write_text("")
    folder = tmp_path / "folder.png"
    folder.mkdir()
    image = tmp_path / "i.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(image)
    content = ["--content", image, "--style-prompt", "red"]
    for argv, message in [
        (["sample", "a", "--out", tmp_path / "file"], "--out '.*file' exists and is not a folder"),
        (["demo", "--out", tmp_path / "file"], "--out '.*file' exists and is not a folder"),
        (["demo", "--out", tmp_path / "file" / "sub"], "is a file, not a folder"),
        (["inpaint", "--image", image, "--mask", image, "--prompt", "a", "--out", folder], "--out '.*folder.png' is a"),
        (["stylize", *content, "--out", folder], "--out '.*folder.png' is a folder"),
        (["stylize", *content, "--out", tmp_path / "x.notanimage"], "image file extension"),
        (["video", "--prompt", "a", "--out", tmp_path / "clip.gif" / "x.gif"], "is a file, not a folder"),
        (["generate", "--prompts", image, "--out", tmp_path / "g"], "must be a .txt or .jsonl"),
        (["bench", "--report-only", "--out", tmp_path / "file"], "--out '.*file' exists and is not a folder"),
    ]:
        if argv[0] == "video":
            (tmp_path / "clip.gif").write_text("")
        assert re.search(message, one_line_error(capsys, argv)), argv


def test_counts_that_cannot_fit_are_refused_at_once(capsys, tmp_path, no_model):
    prompts = _prompts(tmp_path)
    cases = [
        (["sample", "a", "--num-images", "1000000000000"], "1000000000000 images at once"),
        (["generate", "--prompts", prompts, "--out", tmp_path / "g", "--per-prompt", "1000000000000"],
         "--per-prompt 1000000000000 = 1000000000000 images: that needs about"),
        (["augment", "--classes", "a", "b", "--per-class", "1000000000000", "--out", tmp_path / "a"],
         "--per-class 1000000000000 = 2000000000000 images: that needs about"),
        (["inpaint", "--image", "i.png", "--mask", "m.png", "--prompt", "a", "--num-images", "1000000000000"],
         "--num-images 1000000000000"),
        (["video", "--prompt", "a", "--scale", "100000"], "--scale 100000 makes 3200000x3200000 frames; a .gif"),
        (["generate", "--prompts", prompts, "--out", tmp_path / "g", "--seed", str(2**63 - 1), "--per-prompt", "2"],
         "--seed must be an int in [0, 9223372036854775806]"),
    ]
    for argv, message in cases:
        assert message in one_line_error(capsys, argv), argv
    assert not (tmp_path / "g").exists() and not (tmp_path / "a").exists()


def test_api_refuses_nan_guidance_and_counts_that_cannot_fit(tmp_path):
    from fastdiff import bulk
    from fastdiff.apps import augment, inpaint, stylize, video

    for call in (
        lambda: augment.augment(["a"], 1, tmp_path / "a", guidance_scale=math.nan),
        lambda: inpaint.inpaint("i.png", "m.png", "a", guidance_scale=math.nan),
        lambda: stylize.stylize("c.png", style_prompt="red", guidance_scale=math.inf),
        lambda: video.generate_video("a", guidance_scale=math.nan),
    ):
        with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
            call()
    with pytest.raises(ValueError, match="that needs about"):
        bulk.jobs_from_prompts(["a", "b"], 10**12)
    with pytest.raises(ValueError, match="that needs about"):
        augment.build_jobs(["a"], 10**12)
    with pytest.raises(ValueError, match="scale 100000 makes"):
        video.check_frame_size(16, 32, 32, 100_000, ".gif")


# ----------------------------------------------------------------------------- unreadable files


def _pipeline_folder(tmp_path, name="ckpt", spec=None, weights: bytes | None = None):
    """A copy of the shipped pipeline folder with ``spec`` as pipeline.json and ``weights`` as its weights."""
    folder = tmp_path / name
    folder.mkdir()
    text = (DEFAULT_CHECKPOINT / "pipeline.json").read_text() if spec is None else spec
    (folder / "pipeline.json").write_text(text)
    (folder / "model.safetensors").write_bytes(
        (DEFAULT_CHECKPOINT / "model.safetensors").read_bytes() if weights is None else weights
    )
    return folder


def test_damaged_checkpoints_fail_in_one_line(capsys, tmp_path):
    real = (DEFAULT_CHECKPOINT / "model.safetensors").read_bytes()
    spec = json.loads((DEFAULT_CHECKPOINT / "pipeline.json").read_text())
    other_shape = json.dumps({**spec, "unet": {**spec["unet"], "model_channels": 16}})
    noise = torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes()
    cases = [
        (dict(weights=real[: len(real) // 2]), "model.safetensors: not a readable safetensors file"),
        (dict(weights=b""), "model.safetensors: not a readable safetensors file"),
        (dict(weights=noise), "model.safetensors: not a readable safetensors file"),
        (dict(spec="[1, 2]"), "pipeline.json: expected a JSON object, got list"),
        (dict(spec="{not json"), "pipeline.json: not valid JSON"),
        (dict(spec=json.dumps({k: v for k, v in spec.items() if k != "schedule"})), "pipeline.json: missing schedule"),
        (dict(spec=json.dumps({**spec, "resolution": "32"})), "pipeline.json: 'resolution' must be a JSON int"),
        (dict(spec=json.dumps({**spec, "unet": {**spec["unet"], "channels": 3}})), "unknown UNetConfig fields"),
        (dict(spec=other_shape), "the weights do not match pipeline.json's model"),
    ]
    commands = (["sample", "a", "--out", tmp_path / "o"], ["demo", "--out", tmp_path / "o"],
                ["generate", "--prompts", _prompts(tmp_path), "--out", tmp_path / "g"])  # fmt: skip
    for i, (kwargs, message) in enumerate(cases):
        folder = _pipeline_folder(tmp_path, f"c{i}", **kwargs)
        for command in commands:
            assert message in one_line_error(capsys, [*command, "--checkpoint", folder]), (message, command)


def test_unreadable_style_and_content_images(capsys, tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "ok.png")
    (tmp_path / "half.png").write_bytes((tmp_path / "ok.png").read_bytes()[:40])
    red = ["--style-prompt", "red"]
    for argv, message in [
        (["--content", tmp_path / "notes.png", *red], "--content '.*notes.png' is not a readable image"),
        (["--content", tmp_path / "half.png", *red], "--content '.*half.png' is not a readable image"),
        (["--content", tmp_path / "ok.png", "--style-image", tmp_path / "notes.png"], "--style-image '.*' is not a"),
        (["--content", tmp_path / "missing.png", *red], "--content '.*missing.png' does not exist"),
    ]:
        err = one_line_error(capsys, ["stylize", *argv, "--out", tmp_path / "out.png"])
        assert re.search(message, err), err


def test_prompt_file_with_a_line_that_is_not_utf8(capsys, tmp_path, no_model):
    (tmp_path / "p.txt").write_bytes(b"a red circle\n\xff\xfe broken\n")
    err = one_line_error(capsys, ["sample", "--prompts-file", tmp_path / "p.txt"])
    assert "p.txt, line 2: not UTF-8 text" in err
    err = one_line_error(capsys, ["generate", "--prompts", tmp_path / "p.txt", "--out", tmp_path / "g"])
    assert "p.txt, line 2: not UTF-8 text" in err


def test_bench_report_only_with_a_corrupt_result(capsys, tmp_path):
    report_only = ["bench", "--report-only", "--out", tmp_path]
    for content, message in [
        ('{"rows": [', "noising.json: not a benchmark result (not valid JSON"),
        ('{"rows": [{"op": 1}], "environment": {}}', "noising.json: a row is not a benchmark row"),
        ("[]", "noising.json: not a benchmark result"),
    ]:
        (tmp_path / "noising.json").write_text(content)
        assert message in one_line_error(capsys, report_only)
    (tmp_path / "noising.json").unlink()
    assert "no <entry>.json" in one_line_error(capsys, report_only)
