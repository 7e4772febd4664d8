"""Command line: parses arguments into the same objects the Python API uses; no logic of its own.

Each subcommand lives in ``compress/commands/<name>.py`` with ``register(subparsers)``.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from compress.errors import CompressError

# explicit list: a subcommand exists because it is named here
SUBCOMMANDS = ["run", "eval", "passes", "roofline", "bench", "report", "prepare_default"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compress",
        description="Compress Hugging Face causal LMs (GPTQ/RTN quantization, pruning) and measure the cost in "
                    "quality and the gain in speed.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in SUBCOMMANDS:
        importlib.import_module(f"compress.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not args.debug:
        for noisy in ("transformers", "httpx", "urllib3", "huggingface_hub"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return int(args.func(args) or 0)
    except CompressError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
