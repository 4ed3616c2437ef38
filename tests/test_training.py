"""Training: exact resume, atomic checkpoints, NaN handling, skipped data, accumulation.

A small UNet and a stand-in text encoder keep each run to seconds; the ops run their
reference path."""
import dataclasses
import json
import os

import pytest
import torch

from fastdiff import training
from fastdiff.data import ShapesDataset, Skipped
from fastdiff.lockfile import LockHeld

SMALL = dict(model_channels=16, channel_mult=(1, 2), attention_levels=(1,), num_groups=4, ff_mult=1)


pytestmark = pytest.mark.usefixtures("reference_ops")


class HashEncoder(torch.nn.Module):
    """A deterministic text encoder: tokens from the characters, pooled from their mean."""

    dim = pooled_dim = 8
    max_length = 6
    spec = "test"

    def forward(self, prompts):
        codes = torch.zeros(len(prompts), self.max_length, self.dim)
        for b, p in enumerate(prompts):
            for i, ch in enumerate(p[: self.max_length]):
                codes[b, i, ord(ch) % self.dim] = 1.0
        return codes, codes.mean(1)


def config(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path), model="tiny", model_overrides=SMALL, resolution=16, steps=4, batch_size=3,
        grad_accum=2, lr=1e-3, warmup_steps=2, checkpoint_every=2, progress=False, channels_last=True,
    )  # fmt: skip
    return training.TrainConfig(**{**base, **kw})


def trainer(cfg, dataset=None, **kw):
    return training.Trainer(cfg, dataset or ShapesDataset(resolution=16, length=7), text_encoder=HashEncoder(), **kw)


def states(t: training.Trainer):
    """Every tensor of the run's state, in a fixed order: weights, EMA, optimiser moments."""
    opt = t.optimizer.state_dict()["state"]
    moments = [opt[i][k] for i in sorted(opt) for k in sorted(opt[i])]
    return [*t.model.state_dict().values(), *t.ema.state_dict().values(), *moments]


def test_resume_is_exact(tmp_path):
    # 4 steps × 2 micro-batches of 3 over 7 examples: the data order crosses epochs.
    full = trainer(config(tmp_path / "full"))
    full.train()
    first = trainer(config(tmp_path / "split", steps=2))
    first.train()
    resumed = trainer(config(tmp_path / "split"))
    assert resumed.step == 2
    resumed.train()
    assert resumed.step == full.step == 4
    a, b = states(full), states(resumed)
    assert len(a) == len(b)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # a different seed gives a different run (the comparison above can fail)
    other = trainer(config(tmp_path / "other", seed=1))
    other.train()
    assert not all(torch.equal(x, y) for x, y in zip(states(other), a))


def test_checkpoint_contents_and_pruning(tmp_path):
    t = trainer(config(tmp_path, steps=6, keep_checkpoints=2))
    final = t.train()
    assert final.name == "step_0000006"
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_0000004", "step_0000006"]
    assert (tmp_path / "latest").read_text() == "step_0000006"
    state = json.loads((final / "state.json").read_text())
    assert state["step"] == 6 and state["train_config"]["batch_size"] == 3
    spec = json.loads((final / "pipeline.json").read_text())
    assert spec["unet"]["context_dim"] == 8 and spec["prediction"] == "v"


def test_killed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    t = trainer(config(tmp_path, steps=2))
    t.train()
    t.train_step()
    real = training._save_tensors
    calls = []

    def dies_on_second_file(path, tensors):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process is killed half-way through the checkpoint
        real(path, tensors)

    monkeypatch.setattr(training, "_save_tensors", dies_on_second_file)
    with pytest.raises(KeyboardInterrupt):
        t.save()
    monkeypatch.setattr(training, "_save_tensors", real)
    assert training.latest_checkpoint(tmp_path).name == "step_0000002"
    assert not (tmp_path / "step_0000003").exists()
    assert [p.name.rsplit("-", 1)[0] for p in tmp_path.glob(".*")] == [".tmp-step_0000003"]
    resumed = trainer(config(tmp_path, steps=2))
    assert resumed.step == 2
    assert [p.name for p in tmp_path.glob(".*")] == [".lock"]  # the unfinished write is removed; the resumed trainer holds the folder
    # the pointer file lost too: the newest complete folder still wins
    (tmp_path / "latest").unlink()
    assert training.latest_checkpoint(tmp_path).name == "step_0000002"


class NaNAfter(torch.utils.data.Dataset):
    """Shapes whose images turn NaN after ``reads`` examples have been read."""

    def __init__(self, reads):
        self.inner, self.reads, self.count = ShapesDataset(resolution=16, length=12), reads, 0

    def __len__(self):
        return 12

    def __getitem__(self, i):
        item = dict(self.inner[i])
        self.count += 1
        if self.count > self.reads:
            item["image"] = torch.full_like(item["image"], float("nan"))
        return item


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(tmp_path):
    # batch 4: steps 1 and 2 are clean and checkpointed, step 3 reads NaN images
    cfg = config(tmp_path, steps=10, batch_size=4, grad_accum=1, checkpoint_every=1)
    t = trainer(cfg, NaNAfter(reads=8))
    with pytest.raises(training.TrainingDiverged, match="loss became nan at step 3; the last good checkpoint is"):
        t.train()
    last = training.latest_checkpoint(tmp_path)
    assert last.name == "step_0000002" and t.step == 2
    for p in t.model.parameters():  # the weights that were saved are finite
        assert torch.isfinite(p).all()
    assert trainer(cfg, NaNAfter(reads=8)).step == 2


class WithBroken(torch.utils.data.Dataset):
    def __init__(self):
        self.inner = ShapesDataset(resolution=16, length=6)

    def __len__(self):
        return 6

    def __getitem__(self, i):
        return {"skipped": Skipped(f"img{i}.png", "unreadable image")} if i % 3 == 0 else self.inner[i]


def test_unreadable_examples_are_skipped_and_counted(tmp_path):
    t = trainer(config(tmp_path, steps=2, batch_size=3, grad_accum=1), WithBroken())
    t.train()
    # 2 steps × 3 examples = one epoch of 6: exactly the two broken ones
    assert sorted(s.source for s in t.skipped) == ["img0.png", "img3.png"]
    assert json.loads((training.latest_checkpoint(tmp_path) / "state.json").read_text())["skipped"] == 2


def test_grad_accumulation_equals_the_big_batch(tmp_path):
    # One step of 2 × 3 examples vs one step of 6 with the same examples, timesteps and noise
    # is not the same draw, so compare the accumulated gradient with its own micro-batches.
    t = trainer(config(tmp_path, steps=1, batch_size=3, grad_accum=2))
    t.model.train()
    grads = []
    for micro in (0, 1):
        t.model.zero_grad()
        t._micro_loss(t._batch(micro), micro).backward()
        grads.append([p.grad.clone() for p in t.model.parameters()])
    t.optimizer = torch.optim.SGD(t.model.parameters(), lr=0.0)  # keep the weights, read the grads
    t.config.grad_clip = None
    t.train_step()
    for p, g0, g1 in zip(t.model.parameters(), *grads):
        torch.testing.assert_close(p.grad, (g0 + g1) / 2, rtol=1e-5, atol=1e-7)


BAD_VALUES = [
    ("steps", 0), ("steps", 10**8), ("steps", True), ("steps", 2.0), ("batch_size", 10**9), ("grad_accum", 0),
    ("resolution", 0), ("resolution", 10**5), ("num_timesteps", 1), ("num_timesteps", 10**9), ("warmup_steps", -1),
    ("seed", -1), ("seed", 2**64), ("checkpoint_every", 0), ("keep_checkpoints", 0), ("sample_every", -1),
    ("sample_steps", 0), ("sample_steps", 1001), ("lr", 0.0), ("lr", float("nan")), ("lr", float("inf")),
    ("lr", "1e-3"), ("weight_decay", -0.1), ("weight_decay", float("nan")), ("grad_clip", -1.0), ("grad_clip", 0.0),
    ("grad_clip", float("inf")), ("ema_decay", 1.0), ("ema_decay", float("nan")), ("cond_dropout", 1.0),
    ("cond_dropout", -0.1), ("min_snr_gamma", 0.0), ("min_snr_gamma", float("nan")), ("adam_betas", (0.9, 1.0)),
    ("adam_betas", (0.9,)), ("adam_betas", 0.9), ("adam_betas", (float("nan"), 0.9)), ("prediction", "x"),
    ("mixed_precision", "fp8"), ("schedule", "cos"), ("model", "huge"), ("model_overrides", {"widht": 3}),
    ("model_overrides", {"num_groups": 7}), ("output_dir", ""), ("text_encoder", None),
    ("sample_prompts", "a red circle"), ("progress", "no"),
]  # fmt: skip


@pytest.mark.parametrize("name, value", BAD_VALUES, ids=[f"{n}={v!r}" for n, v in BAD_VALUES])
def test_config_refuses_every_bad_value_naming_the_field(name, value):
    with pytest.raises(ValueError, match=f"^{name} "):
        training.TrainConfig(**{name: value})


def test_config_takes_numpy_numbers_and_paths_and_stores_plain_ones(tmp_path):
    import numpy as np

    cfg = training.TrainConfig(output_dir=tmp_path, steps=np.int64(7), lr=np.float32(0.5), grad_clip=None)
    assert type(cfg.steps) is int and type(cfg.lr) is float and cfg.output_dir == str(tmp_path)
    json.dumps(dataclasses.asdict(cfg))  # state.json can hold it


def test_a_folder_in_use_is_refused_until_its_trainer_is_done(tmp_path):
    """Two trainers never share an output folder: the second would delete the first one's checkpoint
    in progress as a killed write's leftovers.  A new folder is taken when training starts."""
    first = trainer(config(tmp_path / "run", steps=2))
    assert not (tmp_path / "run").exists()  # constructing writes nothing
    first._hold_output_dir()  # as train() does first
    with pytest.raises(LockHeld, match=rf"output_dir '{tmp_path / 'run'}' is in use by pid {os.getpid()} on host "):
        trainer(config(tmp_path / "run", steps=2))
    first.train()  # returns the folder
    second = trainer(config(tmp_path / "run", steps=3))  # an existing folder: held from here on
    assert second.step == 2
    with pytest.raises(LockHeld, match="is in use by"):
        trainer(config(tmp_path / "run", steps=3)).train()
    del second  # a trainer dropped before it trains gives the folder up too
    with pytest.raises(ValueError, match="resolution must be a multiple of 4") as refused:
        trainer(config(tmp_path / "run", steps=3, resolution=18), allow_changes=["resolution"])
    # a trainer that failed to build holds nothing, though its traceback (and so the trainer) lives on (`refused`)
    assert trainer(config(tmp_path / "run", steps=3)).train().name == "step_0000003"
    assert refused.traceback  # (still alive up to here)


def test_trainer_refuses_bad_output_folders_and_sizes_before_any_work(tmp_path):
    (tmp_path / "file").write_text("")
    file = tmp_path / "file"
    with pytest.raises(NotADirectoryError, match=f"output_dir '{file}' exists and is not a folder"):
        trainer(config(file))
    with pytest.raises(NotADirectoryError, match=f"output_dir '{file / 'run'}' cannot be created: '{file}' is a file"):
        trainer(config(file / "run"))
    with pytest.raises(PermissionError, match="output_dir '/proc/fastdiff-run' is not writable"):
        trainer(config("/proc/fastdiff-run"))  # /proc refuses new files even to root
    with pytest.raises(ValueError, match="resolution must be a multiple of 4 for this UNet, got 18"):
        trainer(config(tmp_path / "run", resolution=18))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_an_empty_dataset_is_refused(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        empty = torch.utils.data.TensorDataset(torch.zeros(0))
        training.Trainer(training.TrainConfig(output_dir=str(tmp_path)), empty, text_encoder=HashEncoder())
