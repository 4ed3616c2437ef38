"""Bulk generation (`fastdiff.bulk`): resume and manifest repair (deleted, truncated, damaged
images, lines of older versions), sharding, the folder lock, refused settings and bad inputs.
The shipped checkpoint at 1–2 sampler steps; SIGKILLs at random points are in
test_bulk_faults.py, the sharded torchrun run in test_distributed.py."""
import hashlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import fastdiff
from fastdiff import bulk, cli, pipelines
from fastdiff import lockfile as lockfile_module
from fastdiff.lockfile import LockFile, LockHeld
from fastdiff.pipelines import DEFAULT_CHECKPOINT


pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("reference_ops")


@pytest.fixture(scope="module")
def pipe():
    """The shipped pipeline on the CPU, shared with the other test modules of this process."""
    p = pipelines.cached_pipeline(DEFAULT_CHECKPOINT, "cpu")
    p.checkpoint_sha256 = bulk.file_sha256(DEFAULT_CHECKPOINT / "model.safetensors")
    return p


def snapshot(out: Path) -> dict[str, bytes]:
    """Every image file under ``out`` and its bytes."""
    files = sorted(p for p in out.rglob("*") if p.suffix in (".png", ".webp"))
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in files}


def line_counts(out: Path) -> dict[str, int]:
    """Manifest lines per file over every rank's manifest (complete lines only)."""
    counts: dict[str, int] = {}
    for path in out.glob("manifest.rank-*.jsonl"):
        for raw in path.read_text().split("\n")[:-1]:
            name = json.loads(raw)["file"]
            counts[name] = counts.get(name, 0) + 1
    return counts


def interrupt_at_batch(monkeypatch, pipe, k: int) -> None:
    """Make ``pipe`` raise KeyboardInterrupt when bulk generation samples its ``k``-th batch (from 1)."""
    real, calls = pipe.sample_batch, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == k:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pipe, "sample_batch", interrupted)


def write_prompts(path: Path, n: int) -> Path:
    colours, shapes = ("red", "blue", "green", "yellow", "purple"), ("circle", "square", "triangle")
    path.write_text("".join(f"a {colours[i % 5]} {shapes[i % 3]}\n" for i in range(n)))
    return path


# ----------------------------------------------------------------------------- resume and repair


def test_manifest_repair_and_resume_inside_a_batch(tmp_path, pipe):
    jobs = bulk.jobs_from_prompts(["a red circle", "a blue square"], per_prompt=3)  # batches of 4: [0..3], [4, 5]
    settings = dict(batch_size=4, steps=2, progress=False)
    ref = tmp_path / "ref"
    bulk.run_jobs(pipe, jobs, ref, **settings)
    want, merged = snapshot(ref), (ref / "manifest.jsonl").read_text()

    out = tmp_path / "damaged"
    bulk.run_jobs(pipe, jobs, out, overlap=False, **settings)
    manifest = out / "manifest.rank-0.jsonl"
    lines = manifest.read_text().splitlines(keepends=True)
    # image 1 gone (its batch is sampled again whole), image 4 present without its line,
    # and the last line cut half-way, as a kill mid-append leaves it
    (out / "00000/00000001.png").unlink()
    (out / "00000/.00000001.png.tmp").write_bytes(b"half an image")
    kept = [s for s in lines if '"00000/00000001.png"' not in s and '"00000/00000004.png"' not in s]
    manifest.write_text("".join(kept[:-1]) + kept[-1][:20])
    (out / "manifest.jsonl").unlink()
    summary = bulk.run_jobs(pipe, jobs, out, **settings)
    assert (summary["written"], summary["skipped"], summary["batches"]) == (1, 5, 1)
    assert snapshot(out) == want and (out / "manifest.jsonl").read_text() == merged
    assert line_counts(out) == dict.fromkeys(want, 1)
    assert not (out / "00000/.00000001.png.tmp").exists()
    # a finished folder: nothing to do, and the merged reader agrees with the merged file
    assert bulk.run_jobs(pipe, jobs, out, **settings)["written"] == 0
    assert bulk.read_manifest(out) == [json.loads(s) for s in merged.splitlines()]


def test_independent_shards_equal_one_run(tmp_path, pipe):
    # 7 jobs, batches of 2 → 4 batches over 3 ranks: rank 0 gets batches 0 and 3, rank 1 batch 1, rank 2 batch 2
    colours = "red blue green red blue green red".split()
    jobs = [bulk.Job(f"img/{i}", f"a {c} circle", 100 + i, {"label": c}) for i, c in enumerate(colours)]
    settings = dict(batch_size=2, steps=2, progress=False)
    ref = tmp_path / "one"
    bulk.run_jobs(pipe, jobs, ref, **settings)
    out = tmp_path / "shards"
    for r in (2, 0, 1):
        summary = bulk.run_jobs(pipe, jobs, out, rank=r, world_size=3, overlap=r == 1, **settings)
        assert summary["written"] == {0: 3, 1: 2, 2: 2}[r]
    assert snapshot(out) == snapshot(ref)
    for r, batches in {0: {0, 3}, 1: {1}, 2: {2}}.items():
        lines = [json.loads(s) for s in (out / f"manifest.rank-{r}.jsonl").read_text().splitlines()]
        assert {line["batch"] for line in lines} == batches
    merged = bulk.read_manifest(out)
    assert merged == bulk.read_manifest(ref) and [m["label"] for m in merged] == [j.extra["label"] for j in jobs]
    bulk.verify_manifest(out, jobs)
    with pytest.raises(RuntimeError, match="no image"):
        bulk.verify_manifest(out, [*jobs, bulk.Job("img/x", "a", 1)])


def test_webp_and_images_match_the_pipeline(tmp_path, pipe):
    from PIL import Image

    jobs = [bulk.Job("a", "a red circle", 7), bulk.Job("b", "a blue square", 8)]
    bulk.run_jobs(pipe, jobs, tmp_path, batch_size=2, steps=2, image_format="webp", progress=False)
    assert sorted(snapshot(tmp_path)) == ["a.webp", "b.webp"]
    bulk.run_jobs(pipe, jobs, tmp_path, batch_size=2, steps=2, progress=False)
    # the PNG holds exactly the pipeline's image of the same batch
    x = pipe.generate_tensors(["a red circle", "a blue square"], seeds=[7, 8], steps=2, batch_size=2, progress=False)
    with Image.open(tmp_path / "b.png") as img:
        assert img.tobytes() == fastdiff.data.to_pil(x[1]).tobytes()
    with Image.open(tmp_path / "a.webp") as img:
        assert img.size == (32, 32)


def test_a_deleted_or_damaged_image_is_made_again_and_replaces_its_line(tmp_path, pipe):
    jobs = bulk.jobs_from_prompts(["a red circle", "a blue square"], per_prompt=3)  # batches [0..3], [4, 5]
    settings = dict(batch_size=4, steps=2, progress=False)
    ref = tmp_path / "ref"
    bulk.run_jobs(pipe, jobs, ref, **settings)
    want, merged = snapshot(ref), (ref / "manifest.jsonl").read_text()
    for line in map(json.loads, merged.splitlines()):  # each line records its image's size and hash
        data = (ref / line["file"]).read_bytes()
        assert (line["bytes"], line["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())

    out = tmp_path / "out"
    bulk.run_jobs(pipe, jobs, out, **settings)
    (out / "00000/00000001.png").unlink()  # deleted
    full = (out / "00000/00000004.png").read_bytes()
    (out / "00000/00000004.png").write_bytes(full[: len(full) // 2])  # truncated
    damaged = bytearray((out / "00000/00000005.png").read_bytes())
    damaged[-20] ^= 0xFF  # same size, other bytes
    (out / "00000/00000005.png").write_bytes(bytes(damaged))
    for rerun in range(2):  # the folder stays resumable: the second rerun has nothing to do
        summary = bulk.run_jobs(pipe, jobs, out, **settings)
        assert (summary["written"], summary["batches"]) == ((3, 2) if rerun == 0 else (0, 0))
        assert snapshot(out) == want and (out / "manifest.jsonl").read_text() == merged
        assert line_counts(out) == dict.fromkeys(want, 1)
    bulk.verify_manifest(out, jobs)


def test_duplicate_lines_of_an_older_version_are_repaired(tmp_path, pipe):
    jobs = bulk.jobs_from_prompts(["a red circle"], per_prompt=3)
    settings = dict(batch_size=2, steps=2, progress=False)
    bulk.run_jobs(pipe, jobs, tmp_path, **settings)
    want, merged = snapshot(tmp_path), (tmp_path / "manifest.jsonl").read_text()
    # what the older version left after a deleted image was made again: lines without size and
    # hash, one image with two lines (and every later run refused the folder)
    journal = tmp_path / "manifest.rank-0.jsonl"
    old = [{k: v for k, v in json.loads(x).items() if k not in ("bytes", "sha256")} for x in merged.splitlines()]
    journal.write_text("".join(json.dumps(x) + "\n" for x in [*old, old[1]]))
    assert bulk.run_jobs(pipe, jobs, tmp_path, **settings)["written"] == 0
    assert snapshot(tmp_path) == want and (tmp_path / "manifest.jsonl").read_text() == merged
    assert line_counts(tmp_path) == dict.fromkeys(want, 1)


def test_a_finished_folder_keeps_its_manifest_file_on_a_rerun(tmp_path, pipe, monkeypatch):
    """The repair keeps every line that describes its image: a rerun of a finished folder rewrites
    no rank's manifest file and records no image again."""
    jobs = bulk.jobs_from_prompts(["a red circle"], per_prompt=3)
    settings = dict(batch_size=2, steps=2, progress=False)
    bulk.run_jobs(pipe, jobs, tmp_path, **settings)
    journal = tmp_path / "manifest.rank-0.jsonl"
    before = journal.stat()
    rewrite = bulk._rewrite

    def no_journal_rewrite(path, text):
        assert not path.name.startswith("manifest.rank-"), f"{path.name} was rewritten"
        rewrite(path, text)

    monkeypatch.setattr(bulk, "_rewrite", no_journal_rewrite)
    monkeypatch.setattr(bulk, "_file_record", lambda path: pytest.fail(f"{path.name} was read again"))
    assert bulk.run_jobs(pipe, jobs, tmp_path, **settings)["written"] == 0
    assert (journal.stat().st_ino, journal.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_nan_guidance_is_refused_before_anything_is_written(tmp_path, pipe, capsys):
    jobs = bulk.jobs_from_prompts(["a red circle"], per_prompt=2)
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
            bulk.run_jobs(pipe, jobs, tmp_path / "api", steps=2, guidance_scale=bad, progress=False)
    assert not (tmp_path / "api").exists()
    prompts = write_prompts(tmp_path / "p.txt", 1)
    err = cli_error(capsys, "generate", "--prompts", str(prompts), "--out", str(tmp_path / "cli"), "--guidance", "nan")
    assert "argument --guidance: must be a finite number" in err and not (tmp_path / "cli").exists()


# ----------------------------------------------------------------------------- the folder lock


def test_a_second_run_on_a_folder_in_use_is_refused_naming_the_holder(tmp_path, pipe, capsys):
    out = tmp_path / "out"
    out.mkdir()
    prompts = write_prompts(tmp_path / "p.txt", 2)
    argv = ["generate", "--prompts", str(prompts), "--out", str(out), "--steps", "1", "--no-progress"]
    with LockFile(out / ".lock.rank-0", "held here"):  # another run's lock (this process's pid and host)
        err = cli_error(capsys, *argv)
        assert f"--out '{out}' is in use by pid {os.getpid()} on host {socket.gethostname()} (since " in err
        with pytest.raises(LockHeld, match="is in use by pid"):
            bulk.run_jobs(pipe, bulk.jobs_from_prompts(["a"], 1), out, steps=1, progress=False)
    assert not snapshot(out) and not list(out.glob("manifest*"))
    assert cli.main(argv) == 0 and len(snapshot(out)) == 2  # released: the run goes ahead
    assert not list(out.glob(".lock*"))  # and leaves no lock behind


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path):
    """A process holds the lock and is SIGKILLed: its lock file stays, the lock does not."""
    lockfile = Path(lockfile_module.__file__)
    holder = (
        "import importlib.util, sys, time\n"
        f"spec = importlib.util.spec_from_file_location('lockfile', {str(lockfile)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        f"m.LockFile({str(tmp_path / '.lock.rank-0')!r}, 'x').acquire()\n"
        "print('held', flush=True); time.sleep(600)\n"
    )  # loads the lock module alone: no torch import, a fraction of a second
    proc = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(LockHeld, match=f"in use by pid {proc.pid} on host"):
            LockFile(tmp_path / ".lock.rank-0", "--out").acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (tmp_path / ".lock.rank-0").exists()  # left behind by the killed holder ...
    with LockFile(tmp_path / ".lock.rank-0", "--out"):  # ... and taken over
        assert json.loads((tmp_path / ".lock.rank-0").read_text())["pid"] == os.getpid()
    assert not (tmp_path / ".lock.rank-0").exists()


# ----------------------------------------------------------------------------- refusals and bad input


def test_other_settings_in_the_same_folder_are_refused_before_work(tmp_path, pipe):
    jobs = bulk.jobs_from_prompts(["a red circle"], per_prompt=2)
    bulk.run_jobs(pipe, jobs, tmp_path, batch_size=2, steps=2, progress=False)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="steps=2.*steps=3"):
        bulk.run_jobs(pipe, jobs, tmp_path, batch_size=2, steps=3, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        bulk.run_jobs(pipe, jobs, tmp_path, batch_size=1, steps=2, progress=False)
    with pytest.raises(ValueError, match="seed"):
        bulk.run_jobs(pipe, bulk.jobs_from_prompts(["a red circle"], 2, seed=9), tmp_path, batch_size=2, steps=2)
    assert snapshot(tmp_path) == before


def test_writer_errors_reach_the_caller(tmp_path, pipe, monkeypatch):
    def disk_full(path, pixels, image_format):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bulk, "write_image_atomic", disk_full)
    with pytest.raises(RuntimeError, match="writing images failed: .*No space left"):
        bulk.run_jobs(pipe, bulk.jobs_from_prompts(["a"], 4), tmp_path, batch_size=1, steps=1, progress=False)


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("p.txt", "a red circle\n\na blue square\n", r"p.txt, line 2: empty prompt"),
        ("p.txt", "a red circle\n   \n", r"p.txt, line 2: empty prompt"),
        ("p.txt", "", "holds no prompts"),
        ("p.jsonl", '{"prompt": "a"}\n{"prompt": "b"\n', r"p.jsonl, line 2: not valid JSON"),
        ("p.jsonl", '["a"]\n', r"line 1: expected a JSON object"),
        ("p.jsonl", '{"text": "a"}\n', r'line 1: "prompt" must be a non-empty string'),
        ("p.jsonl", '{"prompt": "a", "seed": 3}\n', r"line 1: fields \['seed'\] are reserved"),
        ("p.csv", "a\n", "must be a .txt or .jsonl"),
    ],
)
def test_bad_prompt_files(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        bulk.read_prompts(path)


def test_jsonl_fields_reach_the_manifest(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": " a red circle ", "label": "circle"}\n"not an object"\n')
    with pytest.raises(ValueError, match="line 2"):
        bulk.read_prompts(path)
    path.write_text('{"prompt": " a red circle ", "label": "circle"}\n')
    jobs = bulk.jobs_from_prompts(bulk.read_prompts(path), per_prompt=2, seed=4)
    assert jobs == [bulk.Job("00000/00000000", "a red circle", 4, {"label": "circle"}),
                    bulk.Job("00000/00000001", "a red circle", 5, {"label": "circle"})]  # fmt: skip


def test_bad_jobs_and_arguments(tmp_path, pipe):
    def run(jobs, **kw):
        bulk.run_jobs(pipe, jobs, kw.pop("out", tmp_path), progress=False, **{"steps": 2, **kw})

    job = bulk.Job("a", "x", 1)
    for jobs, message in [
        ([], "must not be empty"),
        ([job, job], "appears twice"),
        ([bulk.Job("../a", "x", 1)], "relative path"),
        ([bulk.Job("/a", "x", 1)], "relative path"),
        ([bulk.Job("a", "x", -1)], "seed"),
        ([bulk.Job("a", "x", 1, {"prompt": "y"})], "reserved"),
    ]:
        with pytest.raises(ValueError, match=message):
            run(jobs)
    with pytest.raises(TypeError, match="JSON"):
        run([bulk.Job("a", "x", 1, {"label": object()})])
    with pytest.raises(ValueError, match="batch_size"):
        run([job], batch_size=0)
    with pytest.raises(ValueError, match="image_format"):
        run([job], image_format="jpg")
    with pytest.raises(ValueError, match="sampler"):
        run([job], sampler="plms")
    with pytest.raises(ValueError, match="rank"):
        run([job], rank=2, world_size=2)
    with pytest.raises(ValueError, match="per-prompt"):
        bulk.jobs_from_prompts(["a"], 0)
    assert not snapshot(tmp_path)


def cli_error(capsys, *argv) -> str:
    assert cli.main(list(argv)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    return err


def test_command_line_errors(tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.txt", 2)
    base = ["generate", "--prompts", str(prompts), "--steps", "2"]
    out = ["--out", str(tmp_path / "out")]
    assert "--prompts: no such file" in cli_error(capsys, "generate", "--prompts", str(tmp_path / "no.txt"), *out)
    (tmp_path / "blank.txt").write_text("\n")
    blank = ["generate", "--prompts", str(tmp_path / "blank.txt"), *out]
    assert "blank.txt, line 1: empty prompt" in cli_error(capsys, *blank)
    assert "argument --per-prompt: must be an int >= 1, got 0" in cli_error(capsys, *base, *out, "--per-prompt", "0")
    assert "argument --batch: must be an int in [1, 4096], got 0" in cli_error(capsys, *base, *out, "--batch", "0")
    (tmp_path / "file").write_text("")
    assert "is not a folder" in cli_error(capsys, *base, "--out", str(tmp_path / "file"))
    assert "is a file, not a folder" in cli_error(capsys, *base, "--out", str(tmp_path / "file" / "sub"))
    assert "--checkpoint: no such folder" in cli_error(capsys, *base, *out, "--checkpoint", str(tmp_path / "none"))
    # weights of the shipped model under a pipeline.json that describes another model
    bad = tmp_path / "mismatch"
    bad.mkdir()
    spec = json.loads((DEFAULT_CHECKPOINT / "pipeline.json").read_text())
    spec["unet"]["model_channels"] = 16
    (bad / "pipeline.json").write_text(json.dumps(spec))
    (bad / "model.safetensors").symlink_to(DEFAULT_CHECKPOINT / "model.safetensors")
    assert "do not match pipeline.json's model" in cli_error(capsys, *base, *out, "--checkpoint", str(bad))
    assert not list((tmp_path / "out").rglob("*.png"))
