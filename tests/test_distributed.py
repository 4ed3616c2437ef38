"""torch.distributed scale-out, with 2 gloo processes on the CPU started by torchrun:

* sharded `fastdiff generate` writes the same files, bytes and merged manifest as one process;
* DDP training: a 2-process run equals the 1-process run (loss, weights, EMA, optimiser
  moments), also with unreadable examples (a rank whose slice is empty), and checkpoints
  resume across world sizes (2 → 1 and 1 → 2), walking back over a corrupt newest one.

A torchrun launch costs seconds of start-up, so one launch runs every 2-process side: the
training phases, then the `fastdiff generate` command (``fastdiff.cli.main``, what
``python -m fastdiff`` runs) in the same process group.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_training import WithBroken, config, trainer

import fastdiff
from fastdiff import bulk, distributed, pipelines, training
from fastdiff.pipelines import DEFAULT_CHECKPOINT

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("reference_ops")


def torchrun(*argv, timeout=300) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc-per-node 2 …`` on gloo, one thread per process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FASTDIFF_BACKEND": "reference", "PYTHONPATH": f"{ROOT}:{TESTS}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *argv]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_helpers_without_torchrun():
    assert not distributed.initialized()
    assert (distributed.rank(), distributed.world_size()) == (0, 1)
    distributed.barrier()  # no group: nothing to wait for
    assert distributed.all_gather_object(3) == [3]
    assert distributed.device("cpu") == torch.device("cpu")


def test_trainers_without_ddp_support_refuse_torchrun(tmp_path, monkeypatch):
    """A trainer that overrides the loss without the rank slicing says so instead of training wrongly."""
    from test_training import HashEncoder

    from fastdiff.data import ShapesDataset

    class OneProcess(training.Trainer):
        SUPPORTS_DDP = False

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(ValueError, match="OneProcess trains in one process only"):
        OneProcess(config(tmp_path), ShapesDataset(resolution=16, length=7), text_encoder=HashEncoder())
    from fastdiff.apps.stylize import StyleTrainer
    from fastdiff.apps.video import VideoTrainer

    assert not StyleTrainer.SUPPORTS_DDP and not VideoTrainer.SUPPORTS_DDP and training.Trainer.SUPPORTS_DDP


# ----------------------------------------------------------------------------- one torchrun launch

WORKER = r"""
import json, sys
import torch
from pathlib import Path
from fastdiff import cli, distributed
from test_training import WithBroken, config, trainer

torch.set_num_threads(1)
distributed.init("cpu")
phases, generate_argv = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for phase in phases:
    data = WithBroken() if phase.pop("broken", False) else None
    trainer(config(Path(phase.pop("dir")), **phase), data, device="cpu").train()
sys.exit(cli.main(generate_argv))  # the `fastdiff generate` command; it leaves the process group
"""
BROKEN = dict(steps=2, batch_size=3, grad_accum=1)
GENERATE = ["--per-prompt", "3", "--batch", "2", "--steps", "2", "--seed", "5"]


def shipped_pipeline():
    """The shipped pipeline on the CPU, loaded once per test process."""
    pipe = pipelines.cached_pipeline(DEFAULT_CHECKPOINT, "cpu")
    pipe.checkpoint_sha256 = bulk.file_sha256(DEFAULT_CHECKPOINT / "model.safetensors")
    return pipe


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """Run the 2-process side of every test below in one torchrun launch (start-up costs seconds)."""
    root = tmp_path_factory.mktemp("distributed")
    with fastdiff.use_backend("reference"):
        # a 1-process checkpoint for the 2 processes to resume
        trainer(config(root / "one_then_two", steps=2), device="cpu").train()
        # and one whose newest checkpoint is truncated: every rank must walk back to step 1
        trainer(config(root / "corrupt_newest", steps=2, checkpoint_every=1), device="cpu").train()
    newest = root / "corrupt_newest" / "step_0000002" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    phases = [
        {"dir": str(root / "ddp")},  # 4 steps, global batch 3 split 1 + 2, 2 micro-batches per step
        {"dir": str(root / "one_then_two")},
        {"dir": str(root / "corrupt_newest"), "checkpoint_every": 1},
        {"dir": str(root / "two_then_one"), "steps": 2},
        {"dir": str(root / "broken2"), "broken": True, **BROKEN},
    ]
    prompts = root / "prompts.txt"
    prompts.write_text("a red circle\na blue square in the top left\na small green triangle\n")
    generate = ["generate", "--prompts", str(prompts), "--out", str(root / "gen2"), *GENERATE, "--device", "cpu",
                "--threads", "1", "--no-progress"]  # fmt: skip
    (root / "worker.py").write_text(WORKER)
    torchrun(str(root / "worker.py"), json.dumps(phases), json.dumps(generate))
    return root


# ----------------------------------------------------------------------------- generation


def test_sharded_generation_matches_one_process(two_processes):
    root = two_processes
    # 9 jobs in batches of 2: rank 0 sampled batches 0, 2, 4 (a short one), rank 1 batches 1, 3
    jobs = bulk.jobs_from_prompts(bulk.read_prompts(root / "prompts.txt"), 3, seed=5)
    ref, out = root / "gen1", root / "gen2"
    assert bulk.run_jobs(shipped_pipeline(), jobs, ref, batch_size=2, steps=2, progress=False)["written"] == 9
    files = sorted(p.relative_to(ref).as_posix() for p in ref.rglob("*.png"))
    assert files == sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) and len(files) == 9
    assert all((ref / f).read_bytes() == (out / f).read_bytes() for f in files)
    assert (ref / "manifest.jsonl").read_text() == (out / "manifest.jsonl").read_text()
    # each rank wrote the lines of its own batches only: k ≡ r (mod 2)
    for r in (0, 1):
        lines = [json.loads(s) for s in (out / f"manifest.rank-{r}.jsonl").read_text().splitlines()]
        assert sorted(line["batch"] for line in lines) == [b for b in (0, 0, 1, 1, 2, 2, 3, 3, 4) if b % 2 == r]


# ----------------------------------------------------------------------------- training


def ckpt_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Weights, EMA and optimiser state of a checkpoint folder, by name."""
    return {
        f"{part}.{name}": tensor
        for part in ("model", "ema", "optimizer")
        for name, tensor in load_file(str(path / f"{part}.safetensors")).items()
    }


def trainer_tensors(t: training.Trainer) -> dict[str, torch.Tensor]:
    """The same names for a live trainer (the optimiser state as `training` saves it)."""
    opt, _ = training._optimizer_tensors(t.optimizer, t.model)
    parts = {"model": t.model.state_dict(), "ema": t.ema.state_dict(), "optimizer": opt}
    return {f"{part}.{name}": tensor for part, sd in parts.items() for name, tensor in sd.items()}


def assert_same_run(ref: training.Trainer, ckpt: Path) -> dict:
    got, want = ckpt_tensors(ckpt), trainer_tensors(ref)
    assert sorted(got) == sorted(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=2e-4, atol=2e-6, msg=lambda m, n=name: f"{n}: {m}")
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == ref.step
    assert abs(state["loss"] - ref.last_loss) <= 1e-5 * abs(ref.last_loss)
    return state


def test_ddp_training_matches_one_process_and_resumes_across_world_sizes(two_processes, tmp_path):
    root = two_processes
    full = trainer(config(tmp_path / "full"), device="cpu")  # the uninterrupted 1-process run
    full.train()
    assert_same_run(full, training.latest_checkpoint(root / "ddp"))
    # a 1-process checkpoint finished by 2 processes, and a 2-process checkpoint finished by 1
    assert_same_run(full, training.latest_checkpoint(root / "one_then_two"))
    assert_same_run(full, training.latest_checkpoint(root / "corrupt_newest"))
    resumed = trainer(config(root / "two_then_one"), device="cpu")
    assert resumed.step == 2
    resumed.train()
    assert_same_run(full, training.latest_checkpoint(root / "two_then_one"))
    # the comparison can fail: another seed is another run
    other = trainer(config(tmp_path / "other", seed=1), device="cpu")
    other.train()
    with pytest.raises(AssertionError):
        assert_same_run(other, training.latest_checkpoint(root / "ddp"))


def test_ddp_with_unreadable_examples(two_processes, tmp_path):
    # Every rank counts all skipped examples; a rank whose slice holds only broken ones still joins the backward.
    broken = trainer(config(tmp_path, **BROKEN), WithBroken(), device="cpu")
    broken.train()
    state = assert_same_run(broken, training.latest_checkpoint(two_processes / "broken2"))
    assert state["skipped"] == 2
