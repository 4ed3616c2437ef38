"""Data augmentation: a synthetic labelled dataset from class names.

    fastdiff augment --classes circle square triangle --per-class 100 --out synth

    from fastdiff.apps.augment import augment
    augment(["circle", "square", "triangle"], 100, "synth")

Layout (an image folder that `fastdiff.data.ImageFolder`, torchvision's ``ImageFolder`` and
``fastdiff train --data`` read as is)::

    OUT/<class>/<index>.png          index 000000 … per_class − 1
    OUT/manifest.jsonl               one line per file, in job order

A manifest line holds the file, prompt, seed, sampler settings (sampler, steps, guidance,
negative prompt, checkpoint SHA-256, batch, batch size) and ``label`` (the class as given) plus
``attributes`` (the values drawn for the template), so any image can be made again
(`regenerate`).  Writing, the manifest and resuming are `fastdiff.bulk.run_jobs`: images are
written atomically, and a killed run rerun with the same arguments continues without
duplicates or gaps.  Jobs are ordered (index, class), so a rerun with a larger ``--per-class``
(same classes, same ``--batch``) keeps every image already there and adds the new indices.
Under torchrun the batches are sharded over the ranks.

Prompts.  Each class becomes prompts through a template (``--prompt-template``) whose
fields are ``{class}`` (required) and any of ``{colour}``, ``{size}``, ``{position}``,
drawn per image from the shapes vocabulary (`fastdiff.data.COLOURS`, ``SIZES``,
``POSITIONS``).  The default, "a {size} {colour} {class} {position}", turns "circle" into
captions such as "a small red circle at the top left".  A class may be any free text: it is
put into the template as given, and its folder name is the text with every character other
than letters, digits, "-" and "_" replaced by "_" (so "red ball" → ``red_ball``, which
``ImageFolder`` reads back as the caption "red ball").  For classes that already say
everything, use ``--prompt-template "{class}"``.

Seeds.  Image i of class c is a function of (--seed, c, i) alone: a random.Random keyed by
the string "<seed>/<c>/<i>" (SHA-512 seeded, the same on every machine) draws the template's
attributes, and the image's sampler seed is the first 62 bits of SHA-256 of that string.
Neither depends on the other classes, their order, or --per-class.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import re
import string
from pathlib import Path

from fastdiff.checks import check_int, int_arg
from fastdiff.data import COLOURS, POSITIONS, SIZES

HELP = "write a synthetic labelled image-folder dataset (with a JSONL manifest) from class names; resumable"
DEFAULT_TEMPLATE = "a {size} {colour} {class} {position}"
FIELDS = {"colour": list(COLOURS), "size": list(SIZES), "position": list(POSITIONS)}  # drawn per image


# ----------------------------------------------------------------------------- jobs


def folder_name(label: str) -> str:
    """The class's folder: characters other than letters, digits, '-' and '_' become '_'."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", label.strip())


def check_template(template: str, what: str = "prompt_template") -> list[str]:
    """The drawn fields the template uses; ValueError for an unknown field or a missing {class}."""
    if not isinstance(template, str):
        raise TypeError(f"{what} must be a string, got {type(template).__name__}")
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ValueError(f"{what} {template!r} is not a valid template ({e})") from None
    unknown = sorted(set(names) - {"class", *FIELDS})
    if unknown or "" in names:
        raise ValueError(
            f"{what} {template!r}: unknown field(s) {unknown or ['{}']}; use {{class}} and any of "
            + ", ".join("{" + f + "}" for f in FIELDS)
        )
    if "class" not in names:
        raise ValueError(f"{what} {template!r} must contain {{class}}")
    return [f for f in FIELDS if f in names]


def check_classes(classes, what: str = "classes") -> list[str]:
    """The class list, stripped; ValueError if empty, blank, repeated or two share a folder name."""
    if isinstance(classes, str) or not isinstance(classes, (list, tuple)):
        raise TypeError(f"{what} must be a list of strings, got {type(classes).__name__}")
    if not classes:
        raise ValueError(f"{what} must name at least one class")
    labels, folders = [], {}
    for c in classes:
        if not isinstance(c, str) or not c.strip() or not folder_name(c).strip("_"):
            raise ValueError(f"{what}: every class needs a name with a letter or digit, got {c!r}")
        label = c.strip()
        if label in labels:
            raise ValueError(f"{what}: {label!r} is given twice")
        other = folders.setdefault(folder_name(label), label)
        if other != label:
            raise ValueError(f"{what}: {other!r} and {label!r} would share the folder {folder_name(label)!r}")
        labels.append(label)
    return labels


def image_seed(seed: int, label: str, index: int) -> int:
    """The sampler seed of image ``index`` of class ``label``: 62 bits of SHA-256("<seed>/<label>/<index>")."""
    digest = hashlib.sha256(f"{seed}/{label}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


def class_prompt(template: str, label: str, seed: int, index: int) -> tuple[str, dict]:
    """(prompt, drawn attributes) of image ``index`` of class ``label``."""
    rng = random.Random(f"{seed}/{label}/{index}")
    attributes = {f: rng.choice(values) for f, values in FIELDS.items()}  # all drawn: fixed RNG order
    used = {f: attributes[f] for f in check_template(template)}
    return template.format(**{"class": label}, **used), used


def build_jobs(classes, per_class: int, *, seed: int = 0, prompt_template: str = DEFAULT_TEMPLATE) -> list:
    """``per_class`` `fastdiff.bulk.Job`\\ s per class, in the order (index, class); names "<folder>/<index:06d>"."""
    from fastdiff.bulk import Job, check_fits_memory_of_jobs

    labels = check_classes(classes)
    check_int(per_class, "per_class", 1)
    check_int(seed, "seed", 0)
    check_template(prompt_template)
    check_fits_memory_of_jobs(len(labels) * per_class, f"{len(labels)} classes × per_class {per_class}")
    jobs = []
    for i in range(per_class):  # index-major: a larger per_class appends jobs, earlier batches keep their make-up
        for label in labels:
            prompt, attributes = class_prompt(prompt_template, label, seed, i)
            extra = {"label": label, "attributes": attributes}
            jobs.append(Job(f"{folder_name(label)}/{i:06d}", prompt, image_seed(seed, label, i), extra))
    return jobs


# ----------------------------------------------------------------------------- API


@functools.lru_cache(maxsize=2)
def _pipeline(checkpoint: str, device: str | None, dtype: str | None = None):
    """`bulk.load_pipeline` (which records the weights' SHA-256 for the manifest), loaded once per process."""
    from fastdiff.bulk import load_pipeline

    return load_pipeline(checkpoint, device, dtype)


def augment(
    classes,
    per_class: int,
    out_dir: str | os.PathLike,
    *,
    pipe=None,
    checkpoint: str | os.PathLike | None = None,
    device: str | None = None,
    dtype: str | None = None,
    seed: int = 0,
    prompt_template: str = DEFAULT_TEMPLATE,
    batch_size: int = 16,
    sampler: str | None = None,
    steps: int = 20,
    guidance_scale: float = 4.0,
    negative_prompt: str = "",
    overlap: bool = True,
    progress: bool = True,
) -> dict:
    """Write (or complete) the dataset in ``out_dir``; returns `bulk.run_jobs`'s summary.

    ``pipe``: a loaded `Text2Image` (else ``checkpoint``, default the shipped model, or a
    diffusers Stable Diffusion folder, is loaded once per process, with ``dtype`` weights).
    sampler: None for the pipeline's default.  Everything is checked before the model loads.
    """
    from fastdiff.bulk import prepare_out, run_jobs
    from fastdiff.pipelines import DEFAULT_CHECKPOINT, check_batching, resolve_dtype

    jobs = build_jobs(classes, per_class, seed=seed, prompt_template=prompt_template)
    check_batching(batch_size, guidance_scale)
    check_int(steps, "steps", 1)
    resolve_dtype(dtype, None)  # a bad name is refused before the model loads
    prepare_out(out_dir)
    if pipe is None:
        pipe = _pipeline(str(Path(checkpoint or DEFAULT_CHECKPOINT).resolve()), device, dtype)
    return run_jobs(
        pipe, jobs, out_dir, batch_size=batch_size, sampler=sampler, steps=steps, guidance_scale=guidance_scale,
        negative_prompt=negative_prompt, image_format="png", overlap=overlap, progress=progress,
    )  # fmt: skip


def regenerate(out_dir: str | os.PathLike, file: str, pipe=None, device: str | None = None):
    """Make ``file`` (e.g. "circle/000012.png") again from ``out_dir/manifest.jsonl``: a PIL image.

    Re-samples the image's whole batch (the manifest's ``batch``: same prompts, seeds and
    composition, in job order), so the pixels equal the file's on the same device type.
    ``pipe`` (default: the shipped model) must hold the weights the manifest names.
    """
    from PIL import Image

    from fastdiff.bulk import MANIFEST, checkpoint_digest
    from fastdiff.pipelines import DEFAULT_CHECKPOINT

    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {str(out_dir)!r} (an unfinished run: rerun it to complete)")
    lines = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    line = next((x for x in lines if x["file"] == file), None)
    if line is None:
        raise FileNotFoundError(f"{file!r} is not in {str(path)!r}")
    batch = [x for x in lines if x["batch"] == line["batch"]]  # the file is in job order
    if pipe is None:
        pipe = _pipeline(str(DEFAULT_CHECKPOINT.resolve()), device)
    if checkpoint_digest(pipe, out_dir, write_cache=False) != line["checkpoint_sha256"]:
        raise ValueError(f"{file!r} was made with other weights (checkpoint_sha256 {line['checkpoint_sha256']})")
    x = pipe.generate_tensors(
        [b["prompt"] for b in batch], seeds=[b["seed"] for b in batch], batch_size=len(batch),
        negative_prompt=line["negative_prompt"], guidance_scale=line["guidance"], sampler=line["sampler"],
        steps=line["steps"], progress=False,
    )  # fmt: skip
    pixels = ((x[batch.index(line)].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(pixels)


# ----------------------------------------------------------------------------- command line


def add_arguments(parser) -> None:
    from fastdiff.bulk import add_sampling_arguments

    parser.add_argument("--classes", nargs="+", required=True, help="class names (quote free text: \"red ball\")")
    parser.add_argument("--per-class", type=int_arg(1), required=True, help="images per class")
    parser.add_argument("--out", required=True, help="OUT/<class>/<index>.png + manifest.jsonl (a rerun resumes)")
    parser.add_argument("--prompt-template", default=DEFAULT_TEMPLATE,
                        help="prompt of each image: {class} plus any of {colour} {size} {position}, drawn per image "
                             "(default: %(default)r)")  # fmt: skip
    add_sampling_arguments(parser)
    parser.add_argument("--seed", type=int_arg(0), default=0,
                        help="dataset seed: image i of class c depends on (seed, c, i)")  # fmt: skip


def run(args) -> int:
    from fastdiff import distributed
    from fastdiff.bulk import MANIFEST, check_fits_memory_of_jobs, folder_lock, prepare_out

    # Everything that can be checked cheaply is checked before the model loads (numbers by their
    # argparse types); the folder is locked before the model loads too.
    check_classes(args.classes, "--classes")
    check_template(args.prompt_template, "--prompt-template")
    check_fits_memory_of_jobs(len(args.classes) * args.per_class, f"--classes × --per-class {args.per_class}")
    prepare_out(args.out)
    device = distributed.init(args.device)
    try:
        with folder_lock(args.out):
            summary = augment(
                args.classes, args.per_class, args.out, checkpoint=args.checkpoint, device=device, dtype=args.dtype,
                seed=args.seed, prompt_template=args.prompt_template, batch_size=args.batch, sampler=args.sampler,
                steps=args.steps, guidance_scale=args.guidance, negative_prompt=args.negative_prompt,
            )  # fmt: skip
    finally:
        distributed.cleanup()
    if summary["rank"] == 0:
        total = len(args.classes) * args.per_class
        print(
            f"wrote {summary['written']} images ({summary['skipped']} already there) in {summary['seconds']:.1f} s; "
            f"{total} images in {len(args.classes)} class folders under {args.out}; {Path(args.out) / MANIFEST}"
        )
    return 0
