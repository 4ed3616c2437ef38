"""Data augmentation: job construction, layout and manifest, resume after a kill, regeneration
from the manifest, bad inputs, and the measured benefit for a small classifier."""
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import augment_experiment  # noqa: E402

from fastdiff import cli, pipelines  # noqa: E402
from fastdiff.apps import augment as aug  # noqa: E402
from fastdiff.data import COLOURS, POSITIONS, SIZES, parse_caption  # noqa: E402
from conftest import skip_without_shipped_model  # noqa: E402
from test_bulk import interrupt_at_batch  # noqa: E402

FAST = dict(steps=4, batch_size=4, progress=False)


@pytest.fixture(scope="module")
def pipe():
    skip_without_shipped_model(pipelines.DEFAULT_CHECKPOINT)
    # The cache the command line uses too (it records the weights' SHA-256): one load per process.
    return aug._pipeline(str(pipelines.DEFAULT_CHECKPOINT.resolve()), None)


pytestmark = pytest.mark.usefixtures("reference_ops")


def _lines(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]


def test_jobs_prompts_and_seeds():
    jobs = aug.build_jobs(["circle", "square"], 3, seed=5)
    assert [j.name for j in jobs] == [f"{c}/{i:06d}" for i in range(3) for c in ("circle", "square")]
    for j in jobs:
        want = parse_caption(j.prompt)  # the default template gives exact shapes captions
        assert want["shape"] == j.extra["label"] == j.name.split("/")[0]
        assert {k: want[k] for k in ("colour", "size", "position")} == j.extra["attributes"]
    # an image depends on (seed, class, index) only: not on the other classes, their order or per_class
    alone = aug.build_jobs(["square"], 2, seed=5)
    assert [(j.prompt, j.seed) for j in alone] == [(j.prompt, j.seed) for j in jobs if j.name.startswith("square")][:2]
    assert len({j.seed for j in jobs}) == len(jobs)
    assert aug.build_jobs(["circle"], 1, seed=6)[0].seed != jobs[0].seed
    # the attributes are spread over the vocabulary
    many = aug.build_jobs(["circle"], 300)
    for field, values in (("colour", COLOURS), ("size", SIZES), ("position", POSITIONS)):
        assert {j.extra["attributes"][field] for j in many} == set(values)
    # free text and a template without drawn fields
    [free] = aug.build_jobs(["red ball/2"], 1, prompt_template="a photo of a {class}")
    assert (free.name, free.prompt) == ("red_ball_2/000000", "a photo of a red ball/2")
    assert free.extra["attributes"] == {}


def test_layout_manifest_and_resume_after_a_kill(pipe, tmp_path, monkeypatch):
    out = tmp_path / "synth"
    interrupt_at_batch(monkeypatch, pipe, 2)
    with pytest.raises(KeyboardInterrupt):
        aug.augment(["circle", "triangle"], 3, out, pipe=pipe, **FAST)
    assert len(list(out.rglob("*.png"))) == 4 and not (out / "manifest.jsonl").exists()
    first = {p: p.read_bytes() for p in out.rglob("*.png")}
    monkeypatch.undo()

    summary = aug.augment(["circle", "triangle"], 3, out, pipe=pipe, **FAST)
    assert (summary["written"], summary["skipped"]) == (2, 4)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.suffix == ".png")
    assert files == [f"{c}/{i:06d}.png" for c in ("circle", "triangle") for i in range(3)]
    assert not [p for p in out.rglob(".*") if p.name.endswith(".tmp")]
    assert all(first[p] == p.read_bytes() for p in first)  # nothing written twice
    lines = _lines(out)
    assert sorted(x["file"] for x in lines) == files  # one line per file: no duplicates, no gaps
    for x in lines:
        assert x["label"] == x["file"].split("/")[0] and x["steps"] == 4 and x["sampler"] == "dpmpp_2m"
        assert parse_caption(x["prompt"])["shape"] == x["label"]
    with Image.open(out / files[0]) as img:
        assert img.size == (32, 32) and img.mode == "RGB"

    again = aug.augment(["circle", "triangle"], 3, out, pipe=pipe, **FAST)  # complete: nothing to do
    assert (again["written"], again["skipped"]) == (0, 6)
    more = aug.augment(["circle", "triangle"], 4, out, pipe=pipe, **FAST)  # a larger --per-class appends
    assert (more["written"], more["skipped"]) == (2, 6)
    assert all(first[p] == p.read_bytes() for p in first)

    # the manifest regenerates any image, byte for byte
    for file in ("triangle/000001.png", "circle/000003.png"):
        again_img = aug.regenerate(out, file, pipe=pipe)
        assert np.array_equal(np.asarray(again_img), np.asarray(Image.open(out / file).convert("RGB")))
        (tmp_path / "re.png").unlink(missing_ok=True)
        again_img.save(tmp_path / "re.png", format="PNG")
        assert (tmp_path / "re.png").read_bytes() == (out / file).read_bytes()


def test_cli_end_to_end(pipe, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["augment", "--classes", "square", "blue circle", "--per-class", "2", "--out", str(out), "--steps", "3",
            "--batch", "3", "--prompt-template", "a large {class} {position}", "--seed", "9"]  # fmt: skip
    assert cli.main(argv) == 0
    assert "wrote 4 images" in capsys.readouterr().out
    lines = _lines(out)
    assert [x["file"] for x in lines] == ["square/000000.png", "blue_circle/000000.png", "square/000001.png",
                                          "blue_circle/000001.png"]  # fmt: skip
    assert [x["label"] for x in lines] == ["square", "blue circle"] * 2
    assert all(re.fullmatch(r"a large (square|blue circle) (at|in) the .+", x["prompt"]) for x in lines)
    assert all((out / x["file"]).is_file() for x in lines)
    assert cli.main(argv) == 0 and "wrote 0 images (4 already there)" in capsys.readouterr().out
    # a deleted image is made again, its line replaced: the folder stays resumable
    merged, image = (out / "manifest.jsonl").read_text(), (out / "square/000001.png").read_bytes()
    (out / "square/000001.png").unlink()
    for written in (1, 0):
        assert cli.main(argv) == 0 and f"wrote {written} images" in capsys.readouterr().out
        assert (out / "manifest.jsonl").read_text() == merged and (out / "square/000001.png").read_bytes() == image


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--classes", "circle", "--per-class", "0"], "argument --per-class: must be an int >= 1, got 0"),
        (["--classes", "circle", "--per-class", "-2"], "argument --per-class: must be an int >= 1"),
        (["--classes", "circle", "circle", "--per-class", "2"], "'circle' is given twice"),
        (["--classes", "a b", "a/b", "--per-class", "2"], "would share the folder 'a_b'"),
        (["--classes", "circle", "--per-class", "2", "--prompt-template", "{shape}"], "unknown field"),
        (["--classes", "circle", "--per-class", "2", "--prompt-template", "a shape"], "must contain {class}"),
        (["--classes", "circle", "--per-class", "2", "--batch", "0"], "argument --batch: must be an int in [1, 4096]"),
        (["--classes", "circle", "--per-class", "2", "--guidance", "nan"], "argument --guidance: must be a finite"),
        (["--classes", "circle", "--per-class", "2", "--out", "FILE"], "exists and is not a folder"),
        (["--classes", "circle", "--per-class", "2", "--out", "FILE/sub"], "is a file, not a folder"),
    ],
)
def test_cli_bad_inputs(tmp_path, capsys, argv, message):
    (tmp_path / "FILE").write_text("a file where the folder should go")
    argv = [a.replace("FILE", str(tmp_path / "FILE")) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    assert cli.main(["augment", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastdiff augment: error: ") and len(err.strip().splitlines()) == 1
    assert message in err, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_bad_inputs_in_the_api(tmp_path):
    with pytest.raises(ValueError, match="at least one class"):
        aug.augment([], 3, tmp_path / "x")
    with pytest.raises(TypeError, match="list of strings"):
        aug.build_jobs("circle", 3)
    with pytest.raises(ValueError, match="per_class must be an int >= 1"):
        aug.build_jobs(["circle"], 0)
    # argparse: --classes needs at least one value
    assert cli.main(["augment", "--classes", "--per-class", "3", "--out", str(tmp_path / "y")]) == 2
    with pytest.raises(FileNotFoundError, match="no manifest.jsonl"):
        aug.regenerate(tmp_path, "circle/000000.png")


def test_synthetic_set_helps_a_few_shot_classifier(pipe, tmp_path):
    """3 real images per class vs the same plus 25 synthetic per class (10 sampler steps), 2 repeats of
    100 classifier steps, 150 held-out real images: real + synthetic must win by >= 10 points on average
    (measured: 55 % against 77 %; one repeat's accuracy has a standard error of ~4 points)."""
    torch.set_num_threads(1)
    aug.augment(augment_experiment.CLASSES, 25, tmp_path / "s", pipe=pipe, steps=10, batch_size=75, progress=False)
    synthetic = augment_experiment.load_synthetic(tmp_path / "s")
    held = augment_experiment.held_out(150, seed=999)
    r = augment_experiment.compare(synthetic, real_per_class=3, held=held, seeds=2, train_steps=100)
    assert r["real_plus_synthetic_mean"] >= r["real_only_mean"] + 0.10, r
    assert r["real_plus_synthetic_mean"] >= 0.65, r
