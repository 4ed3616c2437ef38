"""The ``fastdiff`` command line: ``fastdiff demo | sample | train | audit | bench`` and the applications in `APPS`.

Commands call the library; an application module adds its own arguments.  Errors a user
can fix (bad argument, missing file, unreadable checkpoint) print one line and exit
with status 2, without a traceback, before any work starts: numbers are checked by their
argparse types (`fastdiff.checks`), files and folders by the library as it opens them.
"""
from __future__ import annotations

import argparse
import os
import sys

from fastdiff.checks import MAX_BATCH, MAX_THREADS, check_out_dir, device_arg, int_arg, number_arg


class UsageError(Exception):
    """A mistake in the command's arguments or files: reported in one line."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (``fastdiff sample: error: argument --steps: …``, exit status 2),
    like every other error of the command line; ``--help`` shows the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _threads(n: int | None) -> None:
    if n is not None:
        import torch

        torch.set_num_threads(n)


def _demo(args) -> int:
    from fastdiff.demo import run_demo

    _threads(args.threads)
    return run_demo(out_dir=args.out, checkpoint=args.checkpoint, steps=args.steps, device=args.device)


def _read_prompts_file(path: str) -> list[str]:
    """The non-blank lines of ``--prompts-file``; a line that is not UTF-8 is an error naming the file and line."""
    from fastdiff.data import read_text_lines

    try:
        lines = read_text_lines(path)
    except OSError as e:
        raise UsageError(f"cannot read --prompts-file: {e}") from e
    return [line.strip() for _, line in lines if line.strip()]


def _sample(args) -> int:
    from fastdiff.checks import check_seed
    from fastdiff.pipelines import Text2Image, check_images_fit, save_images

    prompts = list(args.prompt) + (_read_prompts_file(args.prompts_file) if args.prompts_file else [])
    if not prompts:
        raise UsageError("give at least one prompt (positional) or --prompts-file")
    n = len(prompts) * args.num_images
    check_images_fit(n, f"--num-images {args.num_images} × {len(prompts)} prompt(s)")
    check_seed(args.seed, "--seed", n)
    check_out_dir(args.out, "--out")
    _threads(args.threads)
    prompts = [p for p in prompts for _ in range(args.num_images)]
    seeds = [args.seed + i for i in range(len(prompts))]
    pipe = Text2Image.from_pretrained(args.checkpoint, args.device, dtype=args.dtype)
    images = pipe(
        prompts, negative_prompt=args.negative_prompt, guidance_scale=args.guidance, sampler=args.sampler,
        steps=args.steps, seeds=seeds, batch_size=args.batch_size,
    )  # fmt: skip
    grid = save_images(images, args.out, prompts, cols=args.num_images if args.num_images > 1 else None)
    print(f"wrote {len(images)} images and {grid}")
    return 0


# Training tasks: the trainer class of each (``fastdiff train --task``).
TASKS = {
    "text2image": "fastdiff.training:Trainer",
    "style": "fastdiff.apps.stylize:StyleTrainer",
    "video": "fastdiff.apps.video:VideoTrainer",
    "video-layout": "fastdiff.apps.video:VideoLayoutTrainer",
}

# Application sub-commands: modules with HELP, add_arguments(parser) and run(args) -> int.
APPS = {
    "generate": "fastdiff.bulk",
    "inpaint": "fastdiff.apps.inpaint",
    "stylize": "fastdiff.apps.stylize",
    "augment": "fastdiff.apps.augment",
    "video": "fastdiff.apps.video",
}


def _load(ref: str):
    import importlib

    module, _, name = ref.partition(":")
    mod = importlib.import_module(module)
    return getattr(mod, name) if name else mod


def _app_command(run):
    def command(args) -> int:
        _threads(args.threads)
        return run(args)

    return command


def _train(args) -> int:
    from fastdiff import distributed, training

    _threads(args.threads)
    trainer_cls = _load(TASKS[args.task])
    if args.init_from is not None:
        if not hasattr(trainer_cls, "init_from"):
            raise UsageError(f"--init-from is not supported by --task {args.task}")
        if not os.path.isdir(args.init_from):
            raise UsageError(f"--init-from {args.init_from!r} is not a pipeline folder or checkpoint")
        trainer_cls = type(trainer_cls.__name__, (trainer_cls,), {"init_from": args.init_from})
    # Unset options keep TrainConfig's defaults (the shipped model's recipe).
    names = (
        "output_dir", "model", "text_encoder", "resolution", "steps", "batch_size", "grad_accum", "lr", "warmup_steps",
        "ema_decay", "grad_clip", "prediction", "min_snr_gamma", "cond_dropout", "seed", "checkpoint_every",
        "sample_every", "sample_steps", "mixed_precision",
    )  # fmt: skip
    fields = {**trainer_cls.DEFAULTS, **{n: getattr(args, n) for n in names if getattr(args, n) is not None}}
    for n in ("grad_clip", "min_snr_gamma"):  # 0 on the command line disables
        if fields.get(n) == 0:
            fields[n] = None
    if args.sample_prompt:
        fields["sample_prompts"] = tuple(args.sample_prompt)
    if args.gradient_checkpointing:
        fields["gradient_checkpointing"] = True
    try:
        config = training.TrainConfig(**fields)
        check_out_dir(config.output_dir, "--output-dir")
        if args.export:
            check_out_dir(args.export, "--export")
        dataset = trainer_cls.open_dataset(args.data, config)
    except ValueError as e:
        raise UsageError(str(e)) from e
    device = distributed.init(args.device)  # under torchrun: join the process group (DDP)
    rank = distributed.rank()
    try:
        trainer = trainer_cls(config, dataset, device=device, resume=not args.no_resume, allow_changes=args.allow_change)
        final = trainer.train()
    except training.TrainingDiverged as e:
        print(f"fastdiff train: {e}", file=sys.stderr)
        return 1
    finally:
        distributed.cleanup()
    if rank != 0:  # rank 0 wrote the checkpoint; it reports and exports
        return 0
    print(f"final checkpoint: {final}")
    if args.export:
        from fastdiff.pipelines import export_pipeline

        print(f"exported pipeline: {export_pipeline(final, args.export)}")
    return 0


def _audit(args) -> int:
    from fastdiff import audit

    return audit.main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    from fastdiff.bulk import add_dtype_argument
    from fastdiff.nn.unet import PRESETS
    from fastdiff.pipelines import DEFAULT_CHECKPOINT, SAMPLERS
    from fastdiff.training import MODEL_FIELDS, TrainConfig

    parser = OneLineParser(prog="fastdiff", description="Diffusion with hand-written Triton kernels.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--device", type=device_arg, help="cpu, cuda or cuda:N (default: cuda when available)")
        p.add_argument("--threads", type=int_arg(1, MAX_THREADS), default=None,
                       help="CPU threads for PyTorch (default: PyTorch's)")  # fmt: skip

    demo = sub.add_parser("demo", help="generate a grid for several prompts with the shipped model")
    demo.add_argument("--out", default="fastdiff-demo", help="output folder (default: %(default)s)")
    demo.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="pipeline folder (default: the shipped one)")
    demo.add_argument("--steps", type=int_arg(1), default=20, help="sampler steps (default: %(default)s)")
    common(demo)
    demo.set_defaults(func=_demo)

    sample = sub.add_parser("sample", help="text to images with a trained pipeline or checkpoint")
    sample.add_argument("prompt", nargs="*", help="prompts (quote each)")
    sample.add_argument("--prompts-file", help="a text file with one prompt per line")
    sample.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="pipeline or training checkpoint folder")
    sample.add_argument("--negative-prompt", default="", help="the unconditional side of guidance (default: empty)")
    sample.add_argument("--guidance", type=number_arg(), default=4.0, help="classifier-free guidance (1 disables)")
    sample.add_argument("--sampler", choices=SAMPLERS, help="(default: the checkpoint's: dpmpp_2m, or an SD folder's)")
    sample.add_argument("--steps", type=int_arg(1), default=20)
    sample.add_argument("--num-images", type=int_arg(1), default=1, help="images per prompt")
    sample.add_argument("--seed", type=int_arg(0), default=0, help="seed of the first image; image i uses seed + i")
    sample.add_argument("--batch-size", type=int_arg(1, MAX_BATCH), default=16)
    sample.add_argument("--out", default="fastdiff-samples", help="output folder for PNGs and grid.png")
    add_dtype_argument(sample)
    common(sample)
    sample.set_defaults(func=_sample)

    train = sub.add_parser("train", help="train a text-conditioned UNet (resumes from --output-dir)")
    train.add_argument("--task", choices=sorted(TASKS), default="text2image", help="what to train (default: %(default)s)")
    train.add_argument("--data", help="'shapes' (default), an image folder, a .jsonl file or coco:<json>:<dir>")
    d = TrainConfig()
    train.add_argument("--output-dir", help=f"checkpoints go here (default: {d.output_dir})")
    train.add_argument("--model", choices=sorted(PRESETS), help=f"UNet preset (default: {d.model})")
    train.add_argument("--text-encoder", help=f"'minilm' or a local CLIP/BERT folder (default: {d.text_encoder})")
    for flag, typ in (
        ("resolution", int), ("steps", int), ("batch-size", int), ("grad-accum", int), ("lr", float),
        ("warmup-steps", int), ("ema-decay", float), ("cond-dropout", float), ("seed", int),
        ("checkpoint-every", int), ("sample-steps", int),
    ):  # fmt: skip
        train.add_argument(f"--{flag}", type=typ, help=f"(default: {getattr(d, flag.replace('-', '_'))})")
    train.add_argument("--grad-clip", type=float, help=f"global gradient-norm clip, 0 disables (default: {d.grad_clip})")
    train.add_argument("--min-snr-gamma", type=float, help=f"min-SNR-γ weighting, 0 disables (default: {d.min_snr_gamma})")
    train.add_argument("--prediction", choices=("epsilon", "v", "sample"), help=f"(default: {d.prediction})")
    train.add_argument("--sample-every", type=int, help="steps between sample grids in <output-dir>/samples (default: never)")
    train.add_argument("--sample-prompt", action="append", default=[], help="a prompt of the sample grid (repeat)")
    train.add_argument("--mixed-precision", choices=("auto", "bf16", "no"), help="(default: bf16 on CUDA, fp32 on CPU)")
    train.add_argument("--gradient-checkpointing", action="store_true")
    train.add_argument("--no-resume", action="store_true", help="start afresh even if --output-dir has checkpoints")
    train.add_argument(
        "--allow-change", action="append", default=[], metavar="FIELD", type=lambda name: name.replace("-", "_"),
        choices=MODEL_FIELDS, help="resume although this field of the model's recipe changed (repeatable): "
        + ", ".join(MODEL_FIELDS),
    )  # fmt: skip
    train.add_argument("--init-from", help="start from this pipeline folder or checkpoint (tasks that fine-tune: video)")
    train.add_argument("--export", help="also write the final EMA weights as a pipeline folder here")
    common(train)
    train.set_defaults(func=_train)

    for name, module in APPS.items():
        app = _load(module)
        p = sub.add_parser(name, help=app.HELP)
        app.add_arguments(p)
        common(p)
        p.set_defaults(func=_app_command(app.run))

    audit = sub.add_parser("audit", help="compile every kernel for sm_80/sm_90/sm_100 and report registers/spills")
    audit.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the audit (see --help)")
    audit.set_defaults(func=_audit)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``fastdiff <command> …``; returns the exit status (argparse's too: 0 for --help, 2 for a bad argument)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return _report_errors(argv[0] if argv else "", _dispatch, argv)


def _dispatch(argv: list[str]) -> int:
    if argv[:1] == ["bench"]:  # the benchmark suite has its own argument parser
        from fastdiff.bench import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


def _report_errors(command: str, func, *args) -> int:
    """``func(*args)``, with the errors a user can act on printed in one line instead of a traceback."""
    import torch

    try:
        return func(*args)
    except SystemExit as e:  # argparse: --help (0), or a bad argument (2) whose one-line error it printed
        return e.code
    except (UsageError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ValueError,
            TypeError, ImportError) as e:  # fmt: skip
        # Bad paths and arguments surface from the library as these: one line, exit status 2.
        print(f"fastdiff {command}: error: {e}", file=sys.stderr)
        return 2
    except (MemoryError, torch.OutOfMemoryError) as e:
        first = str(e).strip().split("\n")[0]
        print(f"fastdiff {command}: out of memory ({first or type(e).__name__}): try a smaller batch", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fastdiff {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
