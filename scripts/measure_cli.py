"""The command-line options the measurement scripts (quality, inpaint_quality, style_quality,
video_quality, augment_experiment) share, so each script declares only its own."""
from __future__ import annotations

import argparse

import torch


def measurement_parser(doc: str) -> argparse.ArgumentParser:
    """A parser with the options every measurement has: --threads and --json."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--json", help="also write the figures here")
    return parser


def add_sampling_options(parser: argparse.ArgumentParser, checkpoint, help: str | None = None) -> None:
    """--checkpoint (default ``checkpoint``), --steps, --guidance, --sampler: how the measured samples are drawn."""
    parser.add_argument("--checkpoint", default=str(checkpoint), help=help)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--sampler", default="dpmpp_2m")


def parse(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse the command line and apply --threads."""
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args
