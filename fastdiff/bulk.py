r"""Bulk offline generation: ``fastdiff generate``, resumable and sharded over torch.distributed.

A run is a list of `Job`\ s — output name, prompt, seed — and `run_jobs` turns it into
image files plus a JSONL manifest, on one process or on every rank of a torchrun job.

Determinism.  Image j is a function of (prompt_j, seed_j) *and of the batch it was
sampled in*: a batched UNet call blocks its matmuls by batch size, so the same image
in another batch differs in the last bits.  The batch composition is therefore fixed
by the job list alone::

    batch k   = jobs[k·B : (k+1)·B]          (B = batch_size)
    rank r of W processes the batches k with k ≡ r (mod W)

so a run that is killed and resumed, or sharded over any number of ranks, writes
the same bytes as one uninterrupted process (on the same device type and threads).

Files under ``out_dir``::

    <job.name>.<png|webp>          written atomically: a temporary file in the same
                                   folder, fsync, os.replace — a file that exists is whole
    manifest.rank-<r>.jsonl        one line per image made by rank r (each rank appends
                                   only to its own file: no cross-process append races)
    manifest.jsonl                 the merged manifest, in job order, written by rank 0
                                   once every job is checked to have its image and line
    .lock.rank-<r>                 while a run is in progress: rank r's lock (`folder_lock`)
    .checkpoint-digests.json       a Stable Diffusion folder's files' SHA-256, by path, size,
                                   mtime, ctime and inode (`checkpoint_digest`)

A manifest line (file, prompt, seed, sampler, steps, guidance, negative_prompt,
checkpoint_sha256, dtype, batch, batch_size, Job.extra, and the image's ``bytes`` and
``sha256``) is appended (flush + fsync) only after its image is in place.  ``sampler`` is
the one that ran: the pipeline's default (a Stable Diffusion folder's scheduler) when none
was asked for.

Locking.  Each rank holds ``.lock.rank-<r>`` for the whole run, so a second run on the
same folder is refused in one line naming the holder's pid and host, and a lock left by a
killed process is taken over (`fastdiff.lockfile`).  Any two runs of one process or of a
process group meet at rank 0's lock.  Independent shards (rank and world size given
without a process group) lock only their own rank, so all shards of one folder must use
the same world size.

Resume.  First the manifest is repaired (`_repair`): for each image only the line that
records its size and SHA-256 is kept, so a regenerated image replaces its line and a
folder with duplicate lines (from older versions) or a line cut off by a kill mends
itself; an image whose bytes differ from its line (truncated, damaged) is deleted.  Then a
batch whose images all have lines is skipped, an incomplete batch is sampled again whole
(same composition → same bytes) and only its missing images are written.  An image
without any line (a kill between rename and append) gets its line again if it decodes
whole.  A rerun with other settings (sampler, steps, guidance, checkpoint, dtype, batch
size) or with another prompt or seed for an existing file is refused.

Throughput: on CUDA the whole denoising loop of a batch (the UNet on the CFG-doubled batch
and the fused sampler step, every step) is one CUDA graph per batch shape, replayed batch
after batch (`fastdiff.pipelines.DenoiseLoop`); the VAE decodes batch k on a side stream
while batch k + 1's loop runs, and a writer thread behind a bounded queue encodes and
writes batch k's images meanwhile (``overlap=False``: decode and write inline).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastdiff import distributed
from fastdiff.checks import MAX_BATCH, SEED_LIMIT, check_fits_in_memory, check_int, check_out_dir, check_seed
from fastdiff.checks import int_arg, number_arg
from fastdiff.durable import fsync_path, write_atomic
from fastdiff.lockfile import LockFile, LockHeld

HELP = "generate images in bulk from a prompt file: resumable, sharded under torchrun"
FORMATS = ("png", "webp")
MANIFEST = "manifest.jsonl"
# Keys of a manifest line that Job.extra (and a JSONL prompt's other fields) may not replace.
RESERVED = (
    "file", "prompt", "seed", "sampler", "steps", "guidance", "negative_prompt", "checkpoint_sha256", "dtype", "batch",
    "batch_size", "bytes", "sha256",
)  # fmt: skip
# Settings every image of one output folder must share (checked on resume).
SETTINGS = ("sampler", "steps", "guidance", "negative_prompt", "checkpoint_sha256", "dtype", "batch_size")
# What a line written before a setting was recorded had: weights were always float32 then.
FORMER_SETTINGS = {"dtype": "float32"}
DIGESTS = ".checkpoint-digests.json"
CHECKPOINT_HELP = "pipeline or training checkpoint folder, or a diffusers Stable Diffusion folder"
# Memory one job costs while a run holds it: the Job (~200 bytes), its manifest line as a dict
# (~600 bytes) and the planning around them, measured at ~1 KB; twice that as the bound.
BYTES_PER_JOB = 2048


@dataclass(frozen=True)
class Job:
    """One image to make."""

    name: str  # output file name relative to out dir, without extension, e.g. "circle/000012"
    prompt: str  # the text condition
    seed: int  # the image's own seed: its initial noise and every sampler noise draw
    extra: dict = field(default_factory=dict)  # extra manifest fields, e.g. {"label": "circle"}


# ----------------------------------------------------------------------------- prompts and jobs


def read_prompts(path: str | os.PathLike) -> list[dict]:
    """Prompts from a ``.txt`` file (one per line) or a ``.jsonl`` file (one object per line).

    A JSONL object needs a non-empty string ``"prompt"``; its other fields are copied into
    the manifest lines of that prompt's images.  Returns ``[{"prompt": ..., ...}, ...]``.
    An empty, malformed or non-UTF-8 line is an error naming the file and line number.
    """
    from fastdiff.data import read_text_lines

    path = Path(path)
    if path.suffix not in (".txt", ".jsonl"):
        raise ValueError(f"--prompts must be a .txt or .jsonl file, got {str(path)!r}")
    try:
        lines = read_text_lines(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"--prompts: no such file {str(path)!r}") from None
    except OSError as e:
        raise ValueError(f"--prompts: cannot read {str(path)!r}: {e}") from None
    parse = _jsonl_prompt if path.suffix == ".jsonl" else _text_prompt
    prompts = [parse(line, f"{path}, line {n}") for n, line in lines]
    if not prompts:
        raise ValueError(f"--prompts: {str(path)!r} holds no prompts")
    return prompts


def _text_prompt(line: str, where: str) -> dict:
    if not line.strip():
        raise ValueError(f"{where}: empty prompt")
    return {"prompt": line.strip()}


def _jsonl_prompt(line: str, where: str) -> dict:
    if not line.strip():
        raise ValueError(f"{where}: empty line (one JSON object per line)")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object with a \"prompt\", got {type(obj).__name__}")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: \"prompt\" must be a non-empty string, got {prompt!r}")
    clash = sorted(k for k in obj if k != "prompt" and k in RESERVED)
    if clash:
        raise ValueError(f"{where}: fields {clash} are reserved for the manifest")
    return {**obj, "prompt": prompt.strip()}


def jobs_from_prompts(prompts: list, per_prompt: int, seed: int = 0) -> list[Job]:
    """``per_prompt`` jobs per prompt, prompt-major; job i has seed ``seed + i``.

    ``prompts``: strings or `read_prompts` dicts.  Names are ``"<i // 1000>/<i>"``
    zero-padded (``00000/00000012``): at most 1000 files per folder.
    """
    check_int(per_prompt, "--per-prompt", 1)
    if not prompts:
        raise ValueError("prompts must not be empty")
    n = len(prompts) * per_prompt
    check_fits_memory_of_jobs(n, f"{len(prompts)} prompts × --per-prompt {per_prompt}")
    check_seed(seed, "--seed", n)
    jobs = []
    for p in prompts:
        entry = {"prompt": p} if isinstance(p, str) else dict(p)
        text = entry.pop("prompt")
        for _ in range(per_prompt):
            i = len(jobs)
            jobs.append(Job(f"{i // 1000:05d}/{i:08d}", text, seed + i, entry))
    return jobs


def check_fits_memory_of_jobs(n: int, what: str) -> None:
    """Refuse a job list of ``n`` images that the machine cannot hold (`BYTES_PER_JOB` each)."""
    check_fits_in_memory(n * BYTES_PER_JOB, f"{what} = {n} images", "split the prompts over several --out folders")


# ----------------------------------------------------------------------------- the model


def load_pipeline(
    checkpoint: str | os.PathLike, device: str | torch.device | None = None, dtype: str | None = None
):  # fmt: skip
    """`Text2Image.from_pretrained` (``dtype``: see there); a fastdiff pipeline also gets its
    ``checkpoint_sha256`` (the SHA-256 of its weights file), which goes into every manifest line."""
    from fastdiff.pipelines import Text2Image, weights_file
    from fastdiff.sd import is_diffusers_folder

    path = Path(checkpoint)
    if not path.is_dir():
        raise FileNotFoundError(f"--checkpoint: no such folder {str(path)!r}")
    pipe = Text2Image.from_pretrained(path, device, dtype=dtype)
    if not is_diffusers_folder(path):
        pipe.checkpoint_sha256 = file_sha256(weights_file(path))
    return pipe


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_digest(pipe, cache_dir: str | os.PathLike | None = None, *, write_cache: bool = True) -> str:
    """What a manifest line's ``checkpoint_sha256`` says the images were made with.

    A fastdiff pipeline: the SHA-256 of its weights file (`load_pipeline` sets it).  A Stable
    Diffusion folder: the SHA-256 of "<file in the folder>\\t<its SHA-256>\\n" over every file the
    pipeline was read from (``source_files``), sorted — a copy of the folder elsewhere has the
    same digest.  Hashing gigabytes at every start would be slow, so each file's SHA-256 is
    kept in ``cache_dir``/.checkpoint-digests.json (``write_cache``: may write it) under its path,
    size, mtime, ctime and inode, and read again only when one of them changed (a rewrite,
    or a copy over it, changes the ctime).  Else: a SHA-256 of the UNet's weights.
    """
    known = getattr(pipe, "checkpoint_sha256", None)
    if known:
        return known
    files = getattr(pipe, "source_files", ())
    if files:
        pipe.checkpoint_sha256 = _files_digest(Path(pipe.spec["source"]), files, cache_dir, write_cache)
        return pipe.checkpoint_sha256
    h = hashlib.sha256()
    for name, tensor in sorted(pipe.unet.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return "weights:" + h.hexdigest()


def _files_digest(root: Path, files, cache_dir, write_cache: bool) -> str:
    cache_file = Path(cache_dir) / DIGESTS if cache_dir is not None else None
    cache = _read_digests(cache_file)
    lines, changed = [], False
    for name, file in sorted((f.relative_to(root).as_posix(), f) for f in files):
        st = file.stat()
        stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        key = os.path.realpath(file)
        if not isinstance(cache.get(key), dict) or cache[key].get("stamp") != stamp:
            cache[key] = {"stamp": stamp, "sha256": file_sha256(file)}
            changed = True
        lines.append(f"{name}\t{cache[key]['sha256']}\n")
    if changed and write_cache and cache_file is not None:
        write_atomic(cache_file, json.dumps(cache, indent=1).encode())
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def _read_digests(cache_file: Path | None) -> dict:
    """The digest cache; a missing or unreadable one is empty (it is only a cache)."""
    try:
        data = json.loads(cache_file.read_text()) if cache_file is not None else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# ----------------------------------------------------------------------------- the folder lock


def _journal(out: Path, rank: int) -> Path:
    """Rank ``rank``'s manifest file: only that rank appends to it."""
    return out / f"manifest.rank-{rank}.jsonl"


def _folder_ranks(out: Path) -> list[int]:
    """The ranks that left a manifest file or a lock file in ``out`` (an earlier run may have had more)."""
    if not out.is_dir():
        return []
    found = (re.fullmatch(r"manifest\.rank-(\d+)\.jsonl|\.lock\.rank-(\d+)", p.name) for p in out.iterdir())
    return sorted({int(m[1] or m[2]) for m in found if m})


def _grouped(world: int) -> bool:
    """True when this rank is one of a process group of ``world`` ranks (they meet at barriers)."""
    return distributed.initialized() and distributed.world_size() == world


def _owns_folder(world: int) -> bool:
    """One process, or every rank of a process group: the run may rewrite every manifest file of the folder."""
    return world == 1 or _grouped(world)


_HELD: dict[tuple[str, int], list[LockFile]] = {}  # (folder, rank) → the locks this process holds on it


@contextlib.contextmanager
def folder_lock(out_dir: str | os.PathLike, rank: int | None = None, world_size: int | None = None):
    """Hold ``out_dir`` exclusively for this rank during the block; a second run is refused (`LockHeld`).

    Rank r locks ``.lock.rank-<r>`` (`fastdiff.lockfile`: the lock dies with its process, so a
    killed run's lock is taken over).  In a run that owns the whole folder (one process, or every
    rank of a process group) rank 0 also locks the files of ranks ≥ world_size that an earlier
    run left, since it rewrites their manifests.  In a process group all ranks learn whether
    every rank got its locks: all start, or all refuse.  Re-entrant in one process: the command
    line takes the lock before it loads the model, and `run_jobs` finds it held.
    """
    out = Path(out_dir)
    rank, world = _rank_world(rank, world_size)
    key = (os.path.realpath(out), rank)
    if key in _HELD:
        yield
        return
    ranks = [rank]
    if rank == 0 and _owns_folder(world):
        ranks += [r for r in _folder_ranks(out) if r >= world]
    locks, error = [], None
    try:
        for r in ranks:
            locks.append(LockFile(out / f".lock.rank-{r}", f"--out {str(out)!r}").acquire())
    except (LockHeld, OSError) as e:
        error = str(e)
    if _grouped(world):
        error = next((e for e in distributed.all_gather_object(error) if e), None)
    if error:
        for lock in locks:
            lock.release()
        raise LockHeld(error)
    _HELD[key] = locks
    try:
        yield
    finally:
        del _HELD[key]
        for lock in reversed(locks):
            lock.release()


# ----------------------------------------------------------------------------- manifest


def _read_lines(path: Path) -> list[dict]:
    """The complete lines of one manifest file; a last line without its newline (a kill mid-append) is left out."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    lines = []
    for raw in data.split(b"\n")[:-1]:  # the piece after the last newline is unfinished
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(obj, dict) and isinstance(obj.get("file"), str):
            lines.append(obj)
    return lines


def _all_lines(out: Path) -> list[dict]:
    """Every rank's lines, rank by rank."""
    return [line for r in _folder_ranks(out) for line in _read_lines(_journal(out, r))]


def _by_file(lines: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for line in lines:
        grouped.setdefault(line["file"], []).append(line)
    return grouped


def _encode(lines: list[dict]) -> str:
    # allow_nan=False: a NaN would make a line that no JSON reader accepts
    return "".join(json.dumps(line, ensure_ascii=False, allow_nan=False) + "\n" for line in lines)


def _file_record(path: Path) -> dict:
    """What a manifest line records about its image: size in bytes and SHA-256."""
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def _describing(lines: list[dict], path: Path, check_hash: bool) -> dict | None:
    """The first of ``lines`` (all for one file) whose recorded size — and with ``check_hash`` SHA-256 —
    are those of the image at ``path``; None when the image is missing or no line fits it."""
    try:
        size = path.stat().st_size
    except OSError:
        return None
    digest = None
    for line in lines:
        if line.get("bytes") != size or not isinstance(line.get("sha256"), str):
            continue
        if check_hash:
            digest = digest or file_sha256(path)
            if line["sha256"] != digest:
                continue
        return line
    return None


def read_manifest(out_dir: str | os.PathLike) -> list[dict]:
    """The merged manifest of an output folder: every rank's lines, one per file, sorted by file name.

    Reads the per-rank files, so it also works on a run that is still going or was killed.
    Where a file has several lines (shards run with different world sizes), the one that
    records the image's size wins.
    """
    out = Path(out_dir)
    merged = {f: _describing(lines, out / f, False) or lines[0] for f, lines in _by_file(_all_lines(out)).items()}
    return [merged[f] for f in sorted(merged)]


def _faults(out: Path, jobs: list[Job], image_format: str, check_hash: bool) -> list[str]:
    by_file = _by_file(_all_lines(out))
    faults = []
    for j in jobs:
        name = f"{j.name}.{image_format}"
        if not (out / name).is_file():
            faults.append(f"{name}: no image")
        elif name not in by_file:
            faults.append(f"{name}: no manifest line")
        elif _describing(by_file[name], out / name, check_hash) is None:
            faults.append(f"{name}: the image is not the one its manifest line records")
    return faults


def verify_manifest(out_dir: str | os.PathLike, jobs: list[Job], image_format: str = "png") -> None:
    """Check that every job has its image and a manifest line recording that image's size and SHA-256;
    raises RuntimeError listing the faults."""
    out = Path(out_dir)
    _raise_faults(out, _faults(out, jobs, image_format, check_hash=True))


def _raise_faults(out: Path, faults: list[str]) -> None:
    if faults:
        more = f" (and {len(faults) - 5} more)" if len(faults) > 5 else ""
        raise RuntimeError(f"manifest check failed in {str(out)!r}: " + "; ".join(faults[:5]) + more)


def _rewrite(path: Path, text: str) -> None:
    """Replace ``path`` by ``text``, durably (the folder is fsynced after the rename)."""
    write_atomic(path, text.encode("utf-8"))
    fsync_path(path.parent)


def _repair(out: Path, files: set[str], ranks: list[int]) -> None:
    """Leave in the manifest files of ``ranks`` at most one line for each of ``files``: the line
    whose size and SHA-256 are those of the image on disk.

    Dropped: duplicates (a regenerated image, or a folder of an older version), lines of missing
    images, lines without size and hash (older versions: the image gets a new line when it
    decodes whole), and a last line cut off by a kill.  An image that no line describes while
    some line says what it should be is truncated or damaged: it is deleted, to be made again.
    Lines of other files are kept as they are.
    """
    per_rank = {r: _read_lines(_journal(out, r)) for r in _folder_ranks(out)}
    by_file = _by_file([line for r in sorted(per_rank) for line in per_rank[r]])
    kept = {}  # the line each file keeps: one of the objects read above, found again by identity below
    for name in files & by_file.keys():
        path, lines = out / name, by_file[name]
        line = _describing(lines, path, check_hash=True)
        if line is not None:
            kept[name] = line
        elif any("sha256" in x for x in lines) and path.is_file():
            path.unlink()
    for r in ranks:
        journal = _journal(out, r)
        lines = per_rank.get(r, [])
        keep = [x for x in lines if x["file"] not in files or kept.get(x["file"]) is x]
        text = _encode(keep)
        old = journal.read_bytes() if journal.exists() else b""
        if text.encode() != old:
            _rewrite(journal, text)


class _Manifest:
    """This rank's manifest file, opened for appending; each append is flushed and fsynced."""

    def __init__(self, path: Path):
        self.file = open(path, "a", encoding="utf-8")

    def append(self, lines: list[dict]) -> None:
        if lines:
            self.file.write(_encode(lines))
            self.file.flush()
            os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


def _write_merged(out: Path, jobs: list[Job], image_format: str) -> Path:
    by_file = _by_file(_all_lines(out))
    names = [f"{j.name}.{image_format}" for j in jobs]
    _rewrite(out / MANIFEST, _encode([_describing(by_file[f], out / f, False) for f in names]))
    return out / MANIFEST


# ----------------------------------------------------------------------------- image files


def write_image_atomic(path: Path, pixels: torch.Tensor, image_format: str) -> dict:
    """(H, W, C) uint8 → ``path`` via a temporary file in the same folder, fsync and os.replace.

    Returns the manifest's record of the file: its size and SHA-256.
    """
    from PIL import Image

    arr = pixels.numpy()
    img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    buffer = io.BytesIO()
    if image_format == "png":
        img.save(buffer, format="PNG")
    else:
        img.save(buffer, format="WEBP", quality=90)
    data = buffer.getvalue()
    write_atomic(path, data)  # one writer per file: batches never share a job
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _decodes(path: Path) -> bool:
    """True when the image at ``path`` decodes to the end (a truncated PNG or WebP does not)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
        return True
    except Exception:  # any decoder error: the file is not a whole image
        return False


class _Writer:
    """Encodes and writes a batch's images, then appends their manifest lines.

    overlap=True: a thread behind a queue of ``depth`` batches does it while the next
    batch samples (PIL's encoders release the GIL); an error there is raised in the
    caller at its next ``put`` or at ``close``.  overlap=False: inline.
    """

    def __init__(self, manifest: _Manifest, image_format: str, overlap: bool, bar=None, depth: int = 2):
        self.manifest, self.image_format, self.bar = manifest, image_format, bar
        self.written = 0
        self.error: BaseException | None = None
        self.queue: queue.Queue | None = queue.Queue(maxsize=depth) if overlap else None
        self.thread = threading.Thread(target=self._loop, name="fastdiff-writer", daemon=True) if overlap else None
        if self.thread is not None:
            self.thread.start()

    def put(self, item: tuple) -> None:
        if self.queue is None:
            self._write(*item)
            return
        while True:
            if self.error is not None:
                raise RuntimeError(f"writing images failed: {self.error}") from self.error
            try:
                self.queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join()
        self.manifest.close()
        if self.error is not None:
            raise RuntimeError(f"writing images failed: {self.error}") from self.error

    def _loop(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:  # after an error, drain without writing
                try:
                    self._write(*item)
                except BaseException as e:
                    self.error = e

    def _write(self, pixels: torch.Tensor, done, files: list[tuple[Path, dict]]) -> None:
        if done is not None:
            done.synchronize()  # the pixels' copy from the GPU has landed
        folders = {path.parent for path, _ in files if path is not None}
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for b, (path, line) in enumerate(files):
            if path is not None:
                lines.append({**line, **write_image_atomic(path, pixels[b], self.image_format)})
        for folder in folders:
            fsync_path(folder)  # the renames are durable before their manifest lines
        self.manifest.append(lines)
        self.written += len(lines)
        if self.bar is not None:
            self.bar.update(len(lines))


# ----------------------------------------------------------------------------- run_jobs


def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    rank = distributed.rank() if rank is None else rank
    world_size = distributed.world_size() if world_size is None else world_size
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"rank must be in [0, world_size), got rank={rank!r}, world_size={world_size!r}")
    return rank, world_size


def _check_jobs(jobs: list[Job]) -> None:
    if not jobs:
        raise ValueError("jobs must not be empty")
    seen = set()
    for j in jobs:
        if not isinstance(j, Job):
            raise TypeError(f"jobs must be Job objects, got {type(j).__name__}")
        parts = j.name.replace("\\", "/").split("/")
        if not j.name or j.name.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"job name must be a relative path without '.' or '..' parts, got {j.name!r}")
        if j.name in seen:
            raise ValueError(f"job names must be unique, {j.name!r} appears twice")
        seen.add(j.name)
        if not isinstance(j.prompt, str):
            raise TypeError(f"job {j.name!r}: prompt must be a string, got {type(j.prompt).__name__}")
        if not isinstance(j.seed, int) or not 0 <= j.seed < SEED_LIMIT:
            raise ValueError(f"job {j.name!r}: seed must be an int in [0, 2**63), got {j.seed!r}")
        clash = sorted(k for k in j.extra if k in RESERVED)
        if clash:
            raise ValueError(f"job {j.name!r}: extra fields {clash} are reserved for the manifest")
        try:
            json.dumps(j.extra, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise TypeError(f"job {j.name!r}: extra must be JSON-serialisable for the manifest: {e}") from None


def prepare_out(out_dir: str | os.PathLike) -> Path:
    """Create ``out_dir`` after checking that it can be written to — before any sampling."""
    out = check_out_dir(out_dir, "--out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PermissionError(f"--out {str(out)!r} cannot be created: {e.strerror or e}") from None
    return out


def _check_settings(out: Path, settings: dict, by_file: dict[str, Job]) -> None:
    """Refuse a folder whose lines were made with other settings, or for other prompts and seeds."""
    for line in _all_lines(out):
        job = by_file.get(line["file"])
        if job is None:
            continue  # an image of a longer job list: left alone
        for key in SETTINGS:
            made = line.get(key, FORMER_SETTINGS.get(key))
            if made != settings[key]:
                raise ValueError(
                    f"--out {str(out)!r} holds a run made with {key}={made!r}, this run has "
                    f"{key}={settings[key]!r}: resume with the same settings or use another --out"
                )
        if line.get("prompt") != job.prompt or line.get("seed") != job.seed:
            raise ValueError(
                f"--out {str(out)!r}: {line['file']} was made for prompt {line.get('prompt')!r} seed "
                f"{line.get('seed')!r}, this run has {job.prompt!r} seed {job.seed}: use another --out"
            )


def _to_pixels(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [−1, 1] → (B, H, W, C) uint8 on x's device (the rounding of `fastdiff.data.to_pil`)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


class _Decoder:
    """A batch's sample → its pixels on the CPU ((B, H, W, C) uint8) and the CUDA event to wait
    for before reading them (None: ready).

    With ``overlap`` on CUDA the VAE decodes on a side stream, ordered after the loop that made
    the sample, while the main stream goes on with the next batch's loop; the pixels come back
    by an asynchronous copy into pinned memory, and the writer thread waits for the event.
    Otherwise the decode runs inline.
    """

    def __init__(self, pipe, overlap: bool):
        self.pipe = pipe
        self.stream = torch.cuda.Stream(pipe.device) if overlap and pipe.device.type == "cuda" else None

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, object]:
        if self.stream is None:
            return _to_pixels(self.pipe.decode(x)).cpu(), None
        self.stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(self.stream):
            x.record_stream(self.stream)  # made on the main stream: its memory is kept until the decode is done
            pixels = _to_pixels(self.pipe.decode(x)).to("cpu", non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return pixels, done


def _my_batches(n_jobs: int, batch_size: int, rank: int, world: int) -> range:
    """The batch indices rank ``rank`` of ``world`` makes: k ≡ rank (mod world)."""
    return range(rank, -(-n_jobs // batch_size), world)


def _my_jobs(jobs: list[Job], batch_size: int, rank: int, world: int) -> list[Job]:
    batches = _my_batches(len(jobs), batch_size, rank, world)
    return [j for k in batches for j in jobs[k * batch_size : (k + 1) * batch_size]]


def run_jobs(
    pipe,
    jobs: list[Job],
    out_dir: str | os.PathLike,
    *,
    batch_size: int = 16,
    sampler: str | None = None,
    steps: int = 20,
    guidance_scale: float = 4.0,
    negative_prompt: str = "",
    image_format: str = "png",
    overlap: bool = True,
    progress: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
    cuda_graphs: bool | None = None,
) -> dict:
    """Make every job's image in ``out_dir`` (skipping those already there); see the module docstring.

    pipe: a `fastdiff.pipelines.Text2Image` (`load_pipeline` also records its weights'
    hash).  sampler: None for the pipeline's default (a Stable Diffusion folder's scheduler
    decides).  rank / world_size: this process's shard; None takes them from
    torch.distributed when it is initialised, else 0 / 1.  cuda_graphs: replay each batch's
    denoising loop from a CUDA graph (`fastdiff.pipelines.DenoiseLoop`: None captures on CUDA
    and falls back to eager sampling with a warning; True requires it).  Returns a summary:
    written, skipped (already done), seconds, images_per_s, batches (sampled here), rank,
    world_size.  Raises `fastdiff.lockfile.LockHeld` when another run holds the folder.
    """
    from fastdiff.pipelines import check_batching, dtype_name

    rank, world = _rank_world(rank, world_size)
    _check_jobs(jobs)
    check_batching(batch_size, guidance_scale)
    if image_format not in FORMATS:
        raise ValueError(f"image_format must be one of {FORMATS}, got {image_format!r}")
    if image_format == "webp":
        from PIL import features

        if not features.check("webp"):
            raise ValueError("image_format 'webp' needs Pillow built with WebP support; use 'png'")
    loop = pipe.denoise_loop(sampler, steps, guidance_scale, cuda_graph=cuda_graphs)  # checks sampler and steps
    out = prepare_out(out_dir)
    with folder_lock(out, rank, world):
        settings = {
            "sampler": sampler or pipe.default_sampler, "steps": steps, "guidance": float(guidance_scale),
            "negative_prompt": negative_prompt, "dtype": dtype_name(pipe.dtype), "batch_size": batch_size,
            "checkpoint_sha256": checkpoint_digest(pipe, out, write_cache=rank == 0),
        }  # fmt: skip
        _check_settings(out, settings, {f"{j.name}.{image_format}": j for j in jobs})
        _repair_folder(out, jobs, batch_size, rank, world, image_format)
        return _run_batches(pipe, loop, jobs, out, settings, rank, world, image_format, overlap, progress)


def _repair_folder(out: Path, jobs: list[Job], batch_size: int, rank: int, world: int, image_format: str) -> None:
    """`_repair` before planning: in a run that owns the folder rank 0 repairs every manifest file
    for every job while the other ranks wait; an independent shard repairs its own file for its own jobs."""
    if _owns_folder(world):
        if rank == 0:
            _repair(out, {f"{j.name}.{image_format}" for j in jobs}, _folder_ranks(out))
        distributed.barrier()
    else:
        _repair(out, {f"{j.name}.{image_format}" for j in _my_jobs(jobs, batch_size, rank, world)}, [rank])


def _run_batches(pipe, loop, jobs, out, settings, rank, world, image_format, overlap, progress) -> dict:
    batch_size = settings["batch_size"]
    start = time.perf_counter()
    manifest = _Manifest(_journal(out, rank))
    todo, skipped, readd = _plan_batches(jobs, out, batch_size, rank, world, image_format, settings)
    manifest.append(readd)  # whole images that were written but lost their line
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        total = sum(1 for _, files in todo for path, _ in files if path is not None)
        bar = tqdm(total=total, desc=f"generate (rank 0 of {world})", unit="img", dynamic_ncols=True, smoothing=0.1)
    decode = _Decoder(pipe, overlap)
    writer = _Writer(manifest, image_format, overlap, bar)
    try:
        for k, files in todo:
            batch = jobs[k * batch_size : (k + 1) * batch_size]
            negatives = [settings["negative_prompt"]] * len(batch)
            x = pipe.sample_batch(loop, [j.prompt for j in batch], negatives, [j.seed for j in batch])
            writer.put((*decode(x), files))
    finally:
        writer.close()
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    _finish(out, jobs, rank, world, image_format, batch_size)
    return {
        "written": writer.written, "skipped": skipped, "seconds": seconds,
        "images_per_s": writer.written / seconds if seconds > 0 else 0.0, "batches": len(todo), "rank": rank,
        "world_size": world,
    }  # fmt: skip


def _plan_batches(jobs, out, batch_size, rank, world, image_format, settings):
    """This rank's incomplete batches as (k, [(path, or None if present, line)]), images done, lines to re-add.

    After `_repair`, an image with a line recording its size is done.  An image without any
    line (a kill between its rename and its line's append, or a folder of an older version)
    gets its line again when it decodes whole; otherwise it is made again.
    """
    todo, skipped, readd = [], 0, []
    by_file = _by_file(_all_lines(out))
    for k in _my_batches(len(jobs), batch_size, rank, world):
        files = []
        for j in jobs[k * batch_size : (k + 1) * batch_size]:
            name = f"{j.name}.{image_format}"
            path = out / name
            line = {"file": name, "prompt": j.prompt, "seed": j.seed, **settings, "batch": k, **j.extra}
            done = _describing(by_file.get(name, []), path, check_hash=False) is not None
            if not done and path.is_file() and _decodes(path):
                readd.append({**line, **_file_record(path)})
                done = True
            files.append((None if done else path, line))
        missing = sum(path is not None for path, _ in files)
        skipped += len(files) - missing
        if missing:
            todo.append((k, files))
    return todo, skipped, readd


def _finish(out: Path, jobs: list[Job], rank: int, world: int, image_format: str, batch_size: int) -> None:
    """Check the manifest (every job's image and its line) and write the merged ``manifest.jsonl``.

    Under a process group rank 0 does it after every rank is done; independent shards
    (rank/world given without a group) check only their own batches.  The check compares
    sizes: the hashes of the images found were checked by `_repair`, those written here
    were computed from the encoded bytes.
    """
    if not _owns_folder(world):
        _raise_faults(out, _faults(out, _my_jobs(jobs, batch_size, rank, world), image_format, check_hash=False))
        return
    distributed.barrier()
    if rank == 0:
        _raise_faults(out, _faults(out, jobs, image_format, check_hash=False))
        _write_merged(out, jobs, image_format)


# ----------------------------------------------------------------------------- command line


def add_sampling_arguments(parser) -> None:
    """--batch --checkpoint --dtype --sampler --steps --guidance --negative-prompt: what bulk writers sample with."""
    from fastdiff.pipelines import DEFAULT_CHECKPOINT, SAMPLERS

    parser.add_argument("--batch", type=int_arg(1, MAX_BATCH), default=16,
                        help="images per sampling batch (default: %(default)s)")  # fmt: skip
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help=CHECKPOINT_HELP)
    add_dtype_argument(parser)
    parser.add_argument("--sampler", choices=SAMPLERS,
                        help="(default: the checkpoint's: dpmpp_2m, or a Stable Diffusion folder's scheduler's)")
    parser.add_argument("--steps", type=int_arg(1), default=20, help="sampler steps (default: %(default)s)")
    parser.add_argument("--guidance", type=number_arg(), default=4.0, help="classifier-free guidance (1 disables)")
    parser.add_argument("--negative-prompt", default="", help="the unconditional side of guidance (default: empty)")


def add_dtype_argument(parser) -> None:
    """--dtype: the weights of the UNet (and of a Stable Diffusion folder's VAE)."""
    from fastdiff.pipelines import DTYPES

    parser.add_argument("--dtype", choices=tuple(DTYPES),
                        help="weights of the networks (default: float16 for a Stable Diffusion folder on CUDA, "
                             "else float32)")  # fmt: skip


def add_arguments(parser) -> None:
    parser.add_argument(
        "--prompts", required=True, help='prompt file: .txt (one per line) or .jsonl ({"prompt": ...} per line)'
    )
    parser.add_argument("--out", required=True, help="output folder (a rerun into it resumes)")
    parser.add_argument("--per-prompt", type=int_arg(1), default=1, help="images per prompt (default: %(default)s)")
    add_sampling_arguments(parser)
    parser.add_argument("--seed", type=int_arg(0), default=0,
                        help="base seed: image i (in prompt-major order) uses seed + i")  # fmt: skip
    parser.add_argument("--format", choices=FORMATS, default="png", help="image format (default: %(default)s)")
    parser.add_argument("--no-overlap", action="store_true", help="write images inline, not in a writer thread")
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                        help="replay each batch's denoising loop from a CUDA graph (default: on for CUDA)")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    # Everything that can be checked cheaply is checked before the model loads (numbers by their
    # argparse types); the folder is locked before the model loads too.
    jobs = jobs_from_prompts(read_prompts(args.prompts), args.per_prompt, args.seed)
    prepare_out(args.out)
    if args.cuda_graphs and distributed.device(args.device).type != "cuda":
        raise ValueError("--cuda-graphs needs a CUDA device (--device cuda)")
    device = distributed.init(args.device)
    try:
        with folder_lock(args.out):
            pipe = load_pipeline(args.checkpoint, device, args.dtype)
            summary = run_jobs(
                pipe, jobs, args.out, batch_size=args.batch, sampler=args.sampler, steps=args.steps,
                guidance_scale=args.guidance, negative_prompt=args.negative_prompt, image_format=args.format,
                overlap=not args.no_overlap, progress=not args.no_progress, cuda_graphs=args.cuda_graphs,
            )  # fmt: skip
    finally:
        distributed.cleanup()
    if summary["rank"] == 0:
        print(
            f"rank 0 of {summary['world_size']}: wrote {summary['written']} images ({summary['skipped']} already "
            f"done) in {summary['seconds']:.1f} s, {summary['images_per_s']:.1f} images/s; "
            f"{len(jobs)} jobs checked, manifest: {Path(args.out) / MANIFEST}"
        )
    return 0
