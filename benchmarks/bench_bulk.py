"""Bulk generation (``fastdiff generate``): images/s of `fastdiff.bulk.run_jobs` end to end.

One call = a fresh output folder, ``batches`` batches of the shipped 32×32 ``tiny-shapes``
model with classifier-free guidance, every image encoded to PNG, fsynced, renamed into
place and given its manifest line, and the final manifest check.  images/s = images / s.
Implementations (same jobs, same settings):

    overlap         a writer thread encodes/writes batch k while batch k + 1 samples
                    (GPU: each batch's denoising loop replayed from one CUDA graph)
    inline          the same, writing inline after each batch
    overlap-eager   GPU only: overlap without CUDA graphs

GPU: batch 64 and 256, 20 DPM-Solver++ steps, 4 batches per call.  CPU: batch 8, 4 steps,
2 batches — the numbers describe PyTorch's reference path on this CPU.  The harness
times only the first implementation of a case on a CPU, so there each implementation
is its own case.
"""
from __future__ import annotations

import atexit
import itertools
import shutil
import tempfile
from pathlib import Path

from benchmarks.harness import Case
from fastdiff import bulk
from fastdiff.pipelines import DEFAULT_CHECKPOINT

PROMPTS = [f"a {s} {c} {p}" for s in ("small", "large") for c in ("red", "blue", "green") for p in ("circle", "square")]


def _runner(pipe, jobs, root: Path, **settings):
    """A zero-argument call that generates ``jobs`` into a new folder each time (nothing to resume)."""
    counter = itertools.count()

    def call():
        return bulk.run_jobs(pipe, jobs, root / f"run-{next(counter)}", progress=False, **settings)

    return call


def cases(device: str, quick: bool) -> list[Case]:
    gpu = device == "cuda"
    pipe = bulk.load_pipeline(DEFAULT_CHECKPOINT, device)
    steps = (5 if quick else 20) if gpu else 4
    batch_sizes = ((64,) if quick else (64, 256)) if gpu else (8,)
    batches = 4 if gpu else 2
    root = Path(tempfile.mkdtemp(prefix="fastdiff-bench-bulk-"))
    atexit.register(shutil.rmtree, root, True)
    out = []
    for B in batch_sizes:
        n = B * batches
        jobs = bulk.jobs_from_prompts(PROMPTS, per_prompt=-(-n // len(PROMPTS)))[:n]
        settings = dict(batch_size=B, steps=steps, guidance_scale=4.0, sampler="dpmpp_2m")
        impls = {
            "overlap": _runner(pipe, jobs, root / f"B{B}-overlap", overlap=True, cuda_graphs=gpu, **settings),
            "inline": _runner(pipe, jobs, root / f"B{B}-inline", overlap=False, cuda_graphs=gpu, **settings),
        }
        if gpu:
            eager = _runner(pipe, jobs, root / f"B{B}-eager", overlap=True, cuda_graphs=False, **settings)
            impls["overlap-eager"] = eager
        shape = f"B={B} 3x32x32 {steps}st CFG x{batches}"
        note = f"images/s = {n}/s; PNG + fsync + manifest"
        groups = [impls] if gpu else [{name: fn} for name, fn in impls.items()]
        out += [Case("bulk_generate", shape, "bf16" if gpu else "fp32", g, note=note, items=n) for g in groups]
    return out
