"""``fastdiff train`` on bad input: one line, exit status 2, before any work (nothing written,
no text encoder loaded); and a recipe change on resume, refused or allowed (--allow-change)."""
import json
from pathlib import Path

import pytest
from test_training import HashEncoder

import fastdiff
from fastdiff import cli, text, training
from fastdiff.data import ShapesDataset

SMALL_RUN = ["--data", "shapes", "--resolution", "16", "--steps", "1", "--batch-size", "1"]


@pytest.fixture(autouse=True)
def _no_text_encoder_download(monkeypatch):
    """A run that gets past the checks trains with the stand-in encoder (the default one loads for seconds)."""
    monkeypatch.setattr(text, "load_text_encoder", lambda spec, device=None: HashEncoder())
    with fastdiff.use_backend("reference"):
        yield


def train(capsys, run: Path, *flags) -> tuple[int, str, str]:
    rc = cli.main(["train", "--output-dir", str(run), *SMALL_RUN, *flags])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line(rc: int, err: str, message: str) -> None:
    assert rc == 2, err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


BAD_FLAGS = [
    (["--grad-clip", "-1"], "grad_clip must be a finite number > 0"),
    (["--checkpoint-every", "0"], "checkpoint_every must be an int in [1, "),
    (["--sample-steps", "0"], "sample_steps must be an int in [1, "),
    (["--sample-steps", "1001"], "sample_steps must be at most num_timesteps (1000)"),
    (["--lr", "nan"], "lr must be a finite number > 0, got nan"),
    (["--lr=-inf"], "lr must be a finite number > 0, got -inf"),
    (["--ema-decay", "1"], "ema_decay must be a finite number in [0, 1)"),
    (["--cond-dropout", "-0.5"], "cond_dropout must be a finite number in [0, 1)"),
    (["--min-snr-gamma", "-1"], "min_snr_gamma must be a finite number > 0"),
    (["--seed", "-1"], "seed must be an int in [0, "),
    (["--batch-size", "1000000000"], "batch_size must be an int in [1, 65536]"),
    (["--grad-accum", "0"], "grad_accum must be an int in [1, "),
    (["--steps", "100000000"], "steps must be an int in [1, 9999999]"),
    (["--resolution", "100000"], "resolution must be an int in [1, 4096]"),
    (["--resolution", "18"], "resolution must be a multiple of 4"),
    (["--warmup-steps", "-1"], "warmup_steps must be an int in [0, "),
    (["--sample-every", "-1"], "sample_every must be an int in [0, "),
]


@pytest.mark.parametrize("flags, message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_training_numbers_are_one_line_before_any_work(capsys, tmp_path, flags, message):
    rc, out, err = train(capsys, tmp_path / "run", *flags)
    assert_one_line(rc, err, message)
    assert not (tmp_path / "run").exists()


def test_bad_output_paths_are_one_line_before_any_work(capsys, tmp_path):
    (tmp_path / "file").write_text("")
    run, file = tmp_path / "run", tmp_path / "file"
    for flags, message in [
        (["--output-dir", str(file)], f"--output-dir '{file}' exists and is not a folder"),
        (["--output-dir", str(file / "run")], f"--output-dir '{file / 'run'}' cannot be created: '{file}' is a file"),
        (["--export", str(file)], f"--export '{file}' exists and is not a folder"),
        (["--export", "/proc/fastdiff-pipe"], "--export '/proc/fastdiff-pipe' is not writable"),  # even to root
    ]:
        rc, out, err = train(capsys, run, *flags)
        assert_one_line(rc, err, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_a_recipe_change_on_resume_is_refused_unless_allowed(capsys, tmp_path):
    run = tmp_path / "run"
    # the checkpoint the command line would write: TrainConfig's defaults and the SMALL_RUN flags
    cfg = training.TrainConfig(output_dir=str(run), resolution=16, steps=1, batch_size=1, progress=False)
    training.Trainer(cfg, ShapesDataset(resolution=16, length=3), text_encoder=HashEncoder()).save()
    rc, out, err = train(capsys, run, "--prediction", "epsilon")
    assert_one_line(rc, err, "would change prediction from 'v' to 'epsilon'")
    assert "--allow-change prediction" in err
    rc, out, err = train(capsys, run, "--allow-change", "banana")
    assert_one_line(rc, err, "invalid choice: 'banana'")
    allowed = ["--prediction", "epsilon", "--allow-change", "prediction"]
    rc, out, err = train(capsys, run, *allowed, "--export", str(tmp_path / "pipe"))
    assert rc == 0, err
    assert f"resuming from {run / 'step_0000000'} (step 0 of 1)" in out
    assert json.loads((tmp_path / "pipe" / "pipeline.json").read_text())["prediction"] == "epsilon"
