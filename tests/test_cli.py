"""The command line: help, one-line errors without tracebacks, and a small train → sample run
(with a tiny CLIP text encoder written by the test, so nothing is downloaded)."""
import pytest

from fastdiff import cli

pytest.importorskip("transformers")


def run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("command", ["demo", "sample", "train"])
def test_help(capsys, command):
    assert cli.main([command, "--help"]) == 0
    assert "usage: fastdiff " + command in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sample", "a", "--checkpoint", "/no/such/dir"], "no pipeline.json"),
        (["sample", "--checkpoint", "."], "at least one prompt"),
        (["sample", "a", "--prompts-file", "/no/such/file.txt"], "cannot read --prompts-file"),
        (["demo", "--checkpoint", "/no/such/dir"], "no pipeline.json"),
        (["train", "--data", "/no/such/folder"], "data must be"),
        (["train", "--steps", "0"], "steps must be"),
        (["train", "--data", "coco:x"], "coco:<captions json>:<image dir>"),
        (["train", "--text-encoder", "/no/such/encoder", "--output-dir", "{tmp}"], "text encoder must be"),
    ],
)
def test_errors_are_one_line_without_traceback(capsys, tmp_path, argv, message):
    rc, out, err = run(capsys, *[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert rc == 2
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bad_choice_is_an_argparse_error_in_one_line(capsys):
    assert cli.main(["sample", "a", "--sampler", "plms"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastdiff sample: error: argument --sampler: invalid choice") and len(err.splitlines()) == 1


def test_train_then_sample(capsys, tmp_path):
    from test_text import write_tiny_clip

    import fastdiff

    write_tiny_clip(tmp_path / "clip", sd_layout=True)
    run_dir, export, samples = tmp_path / "run", tmp_path / "pipe", tmp_path / "samples"
    with fastdiff.use_backend("reference"):
        rc, out, err = run(
            capsys, "train", "--data", "shapes", "--text-encoder", str(tmp_path / "clip"), "--output-dir", str(run_dir),
            "--resolution", "16", "--steps", "2", "--batch-size", "2", "--checkpoint-every", "1", "--export", str(export),
        )  # fmt: skip
        assert rc == 0, err
        assert "final checkpoint" in out and (export / "model.safetensors").is_file()
        rc, out, err = run(
            capsys, "sample", "a red circle", "a blue square", "--checkpoint", str(export), "--steps", "2",
            "--num-images", "2", "--out", str(samples),
        )  # fmt: skip
    assert rc == 0, err
    assert (samples / "grid.png").is_file() and len(list(samples.glob("0*.png"))) == 4
    with fastdiff.use_backend("reference"):
        rc, out, err = run(
            capsys, "sample", "a red circle", "--checkpoint", str(export), "--steps", "2", "--dtype", "bfloat16",
            "--out", str(tmp_path / "bf16"),
        )  # fmt: skip
    assert rc == 0, err
    assert len(list((tmp_path / "bf16").glob("0*.png"))) == 1
