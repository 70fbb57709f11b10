"""The ``tailkd`` command: one entry point mapping subcommands to plain functions.

Errors a user can cause end in one line ``tailkd: error: ...`` and exit code 2; anything
unexpected ends in one line and exit code 1. ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys

from tailkd import __version__
from tailkd.errors import TailkdError


def _cmd_distill(args: argparse.Namespace) -> int:
    from tailkd.config import config_from_args
    from tailkd.train import distill

    distill(config_from_args(args))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from tailkd.config import add_config_flags

    parser = argparse.ArgumentParser(
        prog="tailkd",
        description="Knowledge distillation of causal language models: Tail-Aware Distillation (TAD), "
        "DRKL and the usual baselines, offline by default.",
    )
    parser.add_argument("--version", action="version", version=f"tailkd {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "distill", parents=[common], help="distil a teacher into a student (built-in offline default)",
        description="Distil a teacher into a student. With no arguments: the built-in SmolLM2-135M teacher, "
        "a 6-layer student built from it, TAD (K=10, beta=2) on a built-in news corpus, on this machine.",
    )
    add_config_flags(p)
    p.set_defaults(func=_cmd_distill)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    debug = getattr(args, "debug", False)
    try:
        return int(args.func(args) or 0)
    except TailkdError as exc:
        if debug:
            raise
        print(f"tailkd: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print("tailkd: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place that turns surprises into one line
        if debug:
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"tailkd: error: {type(exc).__name__}: {msg} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
