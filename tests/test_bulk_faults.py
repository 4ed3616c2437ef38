"""Fault injection for `fastdiff generate`: SIGKILL at random points (at least `KILLS` kills),
runs racing on one folder, and after each folder is finished its bytes and manifest equal
those of an uninterrupted run.

Each run is the command itself (``fastdiff.cli.main``) in its own process, forked from a
server process that has imported torch, transformers and fastdiff once (multiprocessing's
"forkserver"), so a run costs its start, model load and sampling (~2–4 s on a shared
2-core CPU), not also the ~15 s of a fresh interpreter's imports: that is what makes dozens
of kills affordable.  Kill times are drawn from the test's printed seed.
"""
import multiprocessing
import multiprocessing.forkserver
import os
import random
import sys
import time

import pytest

import fastdiff
from fastdiff import cli
from fastdiff.pipelines import DEFAULT_CHECKPOINT
from conftest import skip_without_shipped_model
from test_bulk import line_counts, snapshot, write_prompts

KILLS = 20  # at least this many runs are SIGKILLed while running
SD_KILLS = 3  # on a Stable Diffusion folder (the same machinery: the folder's digest cache is what differs)


def generate(argv: list[str], log: str) -> None:
    """A forked child: ``fastdiff generate`` with its stderr in ``log``; exits with the command's status."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 2)
    with fastdiff.use_backend("reference"):
        sys.exit(cli.main(argv))


@pytest.fixture(scope="module")
def forkserver():
    skip_without_shipped_model(DEFAULT_CHECKPOINT)
    ctx = multiprocessing.get_context("forkserver")
    # What a run imports on its way to the first image, imported once in the server.
    apps = [module.partition(":")[0] for module in cli.APPS.values()]  # the parser imports every application
    ctx.set_forkserver_preload([__name__, *apps, "transformers.models.bert.modeling_bert", "safetensors.torch"])
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")  # the server's environment is this process's at its start
        warm = ctx.Process(target=os.getpid)  # starts the server: the imports happen here, once
        warm.start()
        warm.join()
    yield ctx
    multiprocessing.forkserver._forkserver._stop()  # its imports hold memory the other tests may want


class Runs:
    """Starts ``fastdiff generate`` runs of one job list into folders under ``root`` (``extra``: more arguments)."""

    def __init__(self, ctx, root, *extra):
        self.ctx, self.root, self.count = ctx, root, 0
        prompts = write_prompts(root / "prompts.txt", 4)  # 4 prompts × 2 = 8 images, 4 batches of 2
        self.argv = ["generate", "--prompts", str(prompts), "--per-prompt", "2", "--batch", "2", "--steps", "2",
                     "--device", "cpu", "--threads", "1", "--no-progress", *extra]  # fmt: skip

    def start(self, out):
        self.count += 1
        log = self.root / f"run{self.count}.log"
        p = self.ctx.Process(target=generate, args=([*self.argv, "--out", str(out)], str(log)))
        p.start()
        p.log = log
        return p


def assert_finished_like(out, ref) -> None:
    """``out`` holds the uninterrupted run's images and manifest, one line per image, nothing else."""
    assert snapshot(out) == snapshot(ref)
    assert (out / "manifest.jsonl").read_bytes() == (ref / "manifest.jsonl").read_bytes()
    assert line_counts(out) == dict.fromkeys(snapshot(ref), 1)
    assert not list(out.rglob(".*.tmp")) and not list(out.glob(".lock*"))


def test_sigkilled_and_racing_runs_end_in_the_uninterrupted_bytes(tmp_path, forkserver, _fresh_seed):
    rng = random.Random(_fresh_seed)
    runs = Runs(forkserver, tmp_path)
    ref = tmp_path / "ref"
    t0 = time.monotonic()
    p = runs.start(ref)
    p.join()
    duration = time.monotonic() - t0  # one whole run: kills are drawn from [0, duration)
    assert p.exitcode == 0, p.log.read_text()
    assert len(snapshot(ref)) == 8
    print(f"one run: {duration:.2f} s")

    kills, refused, finished, rounds = 0, 0, 0, 0
    out = tmp_path / "out0"
    while kills < KILLS:
        rounds += 1
        assert rounds < 6 * KILLS, f"only {kills} kills landed in {rounds} rounds"
        racing = rounds % 3 == 0  # every third round: two runs started together on one folder
        procs = [runs.start(out) for _ in range(2 if racing else 1)]
        start = time.monotonic()
        for p, at in sorted(((p, rng.uniform(0, duration)) for p in procs), key=lambda pa: pa[1]):
            time.sleep(max(0.0, start + at - time.monotonic()))
            p.kill()  # SIGKILL; a no-op on a run that has ended
        for p in procs:
            p.join()
            assert p.exitcode in (0, 2, -9), (p.exitcode, p.log.read_text())
            kills += p.exitcode == -9
            if p.exitcode == 2:  # the other run held the folder
                assert "is in use by pid" in p.log.read_text(), p.log.read_text()
                refused += 1
        if 0 in [p.exitcode for p in procs]:
            assert_finished_like(out, ref)
            finished += 1
            out = tmp_path / f"out{finished}"

    # A run that holds the folder refuses a second one, naming it; then it is killed too.
    holder = runs.start(out)
    lock = out / ".lock.rank-0"
    while holder.is_alive() and not (lock.exists() and f'"pid": {holder.pid},' in lock.read_text()):
        time.sleep(0.005)
    second = runs.start(out)
    second.join()
    holder.kill()
    holder.join()
    if holder.exitcode == -9:  # (it may have finished first on a folder with little left to do)
        assert second.exitcode == 2 and f"is in use by pid {holder.pid} on host" in second.log.read_text()

    last = runs.start(out)  # uninterrupted
    last.join()
    assert last.exitcode == 0, last.log.read_text()
    assert_finished_like(out, ref)
    print(f"{kills} kills in {rounds} rounds, {refused} refused by a racing run, {finished + 1} folders finished")


def holding(p, out) -> float:
    """Wait until run ``p`` holds ``out`` (its lock names its pid): it has started work; returns the time."""
    lock = out / ".lock.rank-0"
    while p.is_alive() and not (lock.exists() and f'"pid": {p.pid},' in lock.read_text()):
        time.sleep(0.005)
    return time.monotonic()


def test_sigkilled_runs_on_an_sd_folder_end_in_the_uninterrupted_bytes(tmp_path, forkserver, _fresh_seed):
    """The same on a tiny Stable Diffusion folder, whose first run also hashes the folder's files and
    writes their digests' cache: the first kill lands at a random point after the lock is taken (mostly
    loading and hashing), the others while images are being written."""
    pytest.importorskip("diffusers")
    from test_sd import write_folder

    rng = random.Random(_fresh_seed)
    runs = Runs(forkserver, tmp_path, "--checkpoint", str(write_folder(tmp_path / "sd")))
    ref = tmp_path / "ref"
    p = runs.start(ref)
    work = -holding(p, ref)
    p.join()
    work += time.monotonic()  # from taking the lock to the end: load, hash, sample, write
    assert p.exitcode == 0, p.log.read_text()
    out, kills, rounds, finished = tmp_path / "out0", 0, 0, 0
    while kills < SD_KILLS:
        rounds += 1
        assert rounds < 6 * SD_KILLS, f"only {kills} kills landed in {rounds} rounds"
        first = not out.exists()
        p = runs.start(out)
        if first:
            time.sleep(max(0.0, holding(p, out) + rng.uniform(0, work) - time.monotonic()))
        else:  # just after the next one or two images land
            target = len(snapshot(out)) + rng.randint(1, 2)
            while p.is_alive() and len(snapshot(out)) < target:
                time.sleep(0.005)
            time.sleep(rng.uniform(0, 0.05))
        p.kill()
        p.join()
        assert p.exitcode in (0, -9), (p.exitcode, p.log.read_text())
        kills += p.exitcode == -9
        if p.exitcode == 0:  # the run finished before its kill (a loaded machine): on to a fresh folder
            assert_finished_like(out, ref)
            finished += 1
            out = tmp_path / f"out{finished}"
    last = runs.start(out)
    last.join()
    assert last.exitcode == 0, last.log.read_text()
    assert_finished_like(out, ref)
    print(f"{kills} kills in {rounds} rounds")
