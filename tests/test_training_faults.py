"""Training under faults: checkpoint writes killed with SIGKILL, corrupt checkpoints, a
``latest`` that leads elsewhere, and recipe changes on resume.

Every run that resumes must end with the bytes of the uninterrupted run (the module's
`uninterrupted` fixture: 3 steps, a checkpoint after each, all three kept)."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_training import SMALL, HashEncoder, config, trainer

import fastdiff
from fastdiff import training
from fastdiff.data import ShapesDataset

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
FAULT = dict(steps=3, batch_size=2, grad_accum=1, checkpoint_every=1, keep_checkpoints=3)
STEPS = ("step_0000001", "step_0000002", "step_0000003")


pytestmark = pytest.mark.usefixtures("reference_ops")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The run every faulty one must reproduce; its folder is only read."""
    out = tmp_path_factory.mktemp("uninterrupted")
    with fastdiff.use_backend("reference"):
        trainer(config(out, **FAULT)).train()
    assert sorted(p.name for p in training.checkpoint_folders(out)) == list(STEPS)
    return out


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def assert_same_checkpoint(got: Path, want: Path) -> None:
    """Weights, EMA, optimiser state and pipeline.json byte for byte."""
    for name in training.CHECKPOINT_FILES:
        assert (got / name).read_bytes() == (want / name).read_bytes(), f"{got.name}/{name}"


def corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "zero-byte":
        path.write_bytes(b"")
    elif how == "random":  # the same size: only the hash tells
        path.write_bytes(os.urandom(len(data)))
    elif how == "one flipped bit":  # still parses: the weights would load silently wrong
        pos = len(data) - 5
        path.write_bytes(data[:pos] + bytes([data[pos] ^ 0x10]) + data[pos + 1 :])
    elif how == "missing":
        path.unlink()
    else:
        raise AssertionError(how)


# ----------------------------------------------------------------------------- corrupt checkpoints


@pytest.mark.parametrize(
    "name, how",
    [
        ("model.safetensors", "truncated"),
        ("ema.safetensors", "zero-byte"),
        ("optimizer.safetensors", "random"),
        ("model.safetensors", "one flipped bit"),
        ("state.json", "truncated"),
        ("pipeline.json", "missing"),
    ],
)
def test_resume_walks_back_over_a_corrupt_newest_checkpoint(uninterrupted, tmp_path, capsys, name, how):
    run = copy_run(uninterrupted, tmp_path / "run")
    corrupt(run / STEPS[2] / name, how)
    t = trainer(config(run, **FAULT))
    out, err = capsys.readouterr()
    assert t.step == 2 and t.checkpoint == run / STEPS[1]
    assert f"resuming from {run / STEPS[1]} (step 2 of 3)" in out
    assert f"warning: skipped {run / STEPS[2]}: {name}" in err
    t.train()
    assert_same_checkpoint(run / STEPS[2], uninterrupted / STEPS[2])
    assert training.latest_checkpoint(run) == run / STEPS[2]


def test_resume_walks_back_several_and_refuses_when_none_loads(uninterrupted, tmp_path, capsys):
    run = copy_run(uninterrupted, tmp_path / "run")
    corrupt(run / STEPS[2] / "model.safetensors", "truncated")
    corrupt(run / STEPS[1] / "ema.safetensors", "one flipped bit")
    dead = copy_run(run, tmp_path / "dead")
    corrupt(dead / STEPS[0] / "state.json", "zero-byte")
    with pytest.raises(ValueError, match=f"no checkpoint in output_dir '{dead}' loads .*--no-resume"):
        trainer(config(dead, **FAULT))
    t = trainer(config(run, **FAULT))
    assert t.step == 1 and f"resuming from {run / STEPS[0]}" in capsys.readouterr().out
    t.train()
    for step in STEPS[1:]:
        assert_same_checkpoint(run / step, uninterrupted / step)


def test_checkpoints_written_without_records_have_their_files_parsed(uninterrupted, tmp_path):
    run = copy_run(uninterrupted, tmp_path / "run")
    for step in STEPS:  # as written before sizes and hashes were recorded
        state = json.loads((run / step / "state.json").read_text())
        del state["files"]
        (run / step / "state.json").write_text(json.dumps(state))
    corrupt(run / STEPS[2] / "ema.safetensors", "truncated")
    search = training.find_checkpoint(run)
    assert search.path == run / STEPS[1]
    assert search.skipped == [(run / STEPS[2], "ema.safetensors: Error while deserializing header: "
                               "incomplete metadata, file not fully covered")]  # fmt: skip


# ----------------------------------------------------------------------------- `latest`


@pytest.mark.parametrize(
    "pointer",
    [
        "../other/step_0000002",
        "{other}/step_0000002",
        "step_0000003/../../other/step_0000002",
        "step_0000009",  # a link to ../other/step_0000002
        b"\xff\xfe\x00",
        "",
    ],
)
def test_latest_must_name_a_step_folder_inside_the_run(uninterrupted, tmp_path, capsys, pointer):
    # Another run's step 2 sits beside ours; following `latest` there would resume at step 2.
    run = copy_run(uninterrupted, tmp_path / "run")
    other = copy_run(uninterrupted, tmp_path / "other")
    (run / "step_0000009").symlink_to(other / "step_0000002", target_is_directory=True)
    if isinstance(pointer, bytes):
        (run / "latest").write_bytes(pointer)
    else:
        (run / "latest").write_text(pointer.format(other=other))
    t = trainer(config(run, **FAULT))
    assert t.checkpoint == run / STEPS[2] and t.step == 3
    assert f"warning: ignoring {run / 'latest'}" in capsys.readouterr().err


def test_folders_newer_than_latest_are_passed_over(uninterrupted, tmp_path, capsys):
    # What a kill between the folder's rename and the move of `latest` leaves.
    run = copy_run(uninterrupted, tmp_path / "run")
    (run / "latest").write_text(STEPS[1])
    search = training.find_checkpoint(run)
    assert search.path == run / STEPS[1] and search.warning is None
    assert search.skipped == [(run / STEPS[2], f"newer than {STEPS[1]}, which latest names")]


# ----------------------------------------------------------------------------- killed writes


KILLED = r"""
import json, os, signal, sys
from pathlib import Path
import fastdiff
from fastdiff import training
from fastdiff.data import ShapesDataset
from test_training import config, trainer

out, fault, name, nth = Path(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4])
real, calls = getattr(training, name, None), [0]


def killed_at_nth_call(*args):
    calls[0] += 1
    if calls[0] == nth:
        os.kill(os.getpid(), signal.SIGKILL)  # no finally, no atexit: as if killed from outside
    return real(*args)


if name:
    setattr(training, name, killed_at_nth_call)
with fastdiff.use_backend("reference"):
    trainer(config(out, **fault)).train()
"""


def run_killed(script: Path, out: Path, name: str = "", nth: int = 0) -> subprocess.CompletedProcess:
    """Train ``out`` in a fresh process that SIGKILLs itself before the nth call of ``training.<name>``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FASTDIFF_BACKEND": "reference", "PYTHONPATH": f"{ROOT}:{TESTS}"}
    cmd = [sys.executable, str(script), str(out), json.dumps(FAULT), name, str(nth)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_checkpoint_writes_killed_with_sigkill_then_resumed_equal_the_uninterrupted_run(uninterrupted, tmp_path):
    script, run = tmp_path / "killed.py", tmp_path / "run"
    script.write_text(KILLED)
    leftovers = lambda: sorted(p.name.rsplit("-", 1)[0] for p in run.glob(".*"))  # noqa: E731 (names less the pid)
    # 1. killed writing step 2's EMA (the 5th safetensors file): only its model is in the temporary folder;
    #    the folder's lock file stays, but its lock died with the process
    proc = run_killed(script, run, "_save_tensors", 5)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert training.latest_checkpoint(run) == run / STEPS[0] and leftovers() == [".lock", ".tmp-step_0000002"]
    # 2. killed after step 2's folder was renamed into place, before `latest` moved to it
    proc = run_killed(script, run, "replace_durably", 2)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert "removed" in proc.stderr and f"resuming from {run / STEPS[0]}" in proc.stdout
    assert (run / STEPS[1] / "state.json").is_file() and (run / "latest").read_text() == STEPS[0]
    assert leftovers() == [".latest", ".lock"]
    # 3. left alone: resumes at step 1 (step 2 is newer than `latest`), finishes, removes what the kills left
    #    (the dead processes' lock taken over, then given up)
    proc = run_killed(script, run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"skipped {run / STEPS[1]}: newer than" in proc.stderr and "removed" in proc.stderr
    assert f"resuming from {run / STEPS[0]} (step 1 of 3)" in proc.stdout
    assert leftovers() == [] and (run / "latest").read_text() == STEPS[2]
    for step in STEPS:
        assert_same_checkpoint(run / step, uninterrupted / step)


def test_files_and_latest_are_fsynced_before_their_renames(tmp_path, monkeypatch):
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("reads fsync's file names from /proc")
    t = trainer(config(tmp_path, steps=1, batch_size=2, grad_accum=1))
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(Path(src).resolve()), str(Path(dst).resolve())))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    final = t.save()
    renames = [i for i, e in enumerate(events) if e[0] == "replace"]
    assert len(renames) == 2  # the folder, then `latest`
    folder, pointer = events[renames[0]], events[renames[1]]
    home = str(tmp_path.resolve())
    synced_before = lambda i: {e[1] for e in events[:i] if e[0] == "fsync"}  # noqa: E731
    for name in (*training.CHECKPOINT_FILES, "state.json"):
        assert f"{folder[1]}/{name}" in synced_before(renames[0]), name
    assert folder[1] in synced_before(renames[0]) and folder[2] == str(final.resolve())
    assert pointer[1] in synced_before(renames[1]) and pointer[2] == f"{home}/latest"
    # each rename is made durable by an fsync of the folder that holds it
    assert ("fsync", home) in events[renames[0] : renames[1]] and events[-1] == ("fsync", home)


# ----------------------------------------------------------------------------- recipe changes


@pytest.mark.parametrize(
    "change",
    [
        dict(prediction="epsilon"),
        dict(resolution=32),
        dict(schedule="linear"),
        dict(num_timesteps=500),
        dict(zero_terminal_snr=True),
        dict(model_overrides={**SMALL, "dropout": 0.1}),
        dict(text_encoder="another-encoder"),
        dict(model="sd15", model_overrides={**SMALL, "dim_head": 8}),
    ],
    ids=lambda change: next(iter(change)),
)
def test_resume_refuses_a_change_of_what_the_model_means(uninterrupted, change):
    field = next(iter(change))
    with pytest.raises(ValueError, match=rf"would change {field} from .*--allow-change {field}"):
        trainer(config(uninterrupted, **FAULT, **change))


def test_an_allowed_change_resumes_and_the_checkpoint_says_the_new_recipe(uninterrupted, tmp_path):
    run = copy_run(uninterrupted, tmp_path / "run")
    # lr and steps do not change what the model means: no permission needed for them
    t = trainer(config(run, **{**FAULT, "steps": 4}, prediction="epsilon", lr=5e-4), allow_changes=["prediction"])
    assert t.step == 3
    final = t.train()
    assert json.loads((final / "pipeline.json").read_text())["prediction"] == "epsilon"
    with pytest.raises(ValueError, match="would change prediction from 'epsilon' to 'v'"):
        trainer(config(run, **{**FAULT, "steps": 4}))
    with pytest.raises(ValueError, match="allow_changes"):
        trainer(config(run, **FAULT), allow_changes=["lr"])


def test_another_tasks_checkpoint_is_refused_in_one_line(uninterrupted):
    class Wider(training.Trainer):  # stands for a task whose network has other weights
        def build_model(self):
            model = super().build_model()
            model.extra = torch.nn.Linear(2, 2)
            return model

    data = ShapesDataset(resolution=16, length=7)
    with pytest.raises(ValueError, match=f"checkpoint {uninterrupted / STEPS[2]} does not fit this run's model") as e:
        Wider(config(uninterrupted, **FAULT), data, text_encoder=HashEncoder())
    assert "extra.weight" in str(e.value) and "\n" not in str(e.value)
