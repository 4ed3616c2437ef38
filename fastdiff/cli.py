"""The ``fastdiff`` command line: ``fastdiff demo``, ``fastdiff audit``."""
from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    from fastdiff.demo import run_ops_demo

    return run_ops_demo()


def _audit(args) -> int:
    from fastdiff import audit

    return audit.main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastdiff", description="Diffusion with hand-written Triton kernels.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the demo")
    demo.set_defaults(func=_demo)
    audit = sub.add_parser("audit", help="compile every kernel for sm_80/sm_90 and report registers/spills")
    audit.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the audit (see --help)")
    audit.set_defaults(func=_audit)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
