"""compress passes: every registered pass with its options and defaults."""
from __future__ import annotations

import argparse
import json


def register(sub) -> None:
    p = sub.add_parser("passes", help="list passes with their options and defaults",
                       description="List every registered pass, its options, types and defaults.")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    from compress.passes.base import describe_config
    from compress.registry import PASSES

    info = {name: {"kind": cls.kind, "needs_calibration": getattr(cls, "needs_calibration", False),
                   "doc": (cls.__module__ and __import__(cls.__module__, fromlist=["_"]).__doc__ or "").strip().splitlines()[0],
                   "options": describe_config(cls.config_class)} for name, cls in PASSES.items()}
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    for name, d in info.items():
        print(f"{name}  [{d['kind']}{', needs calibration' if d['needs_calibration'] else ''}]  {d['doc']}")
        for o in d["options"]:
            default = "(required)" if o["required"] else f"= {o['default']!r}"
            print(f"    {o['name']}: {o['type']} {default}  {o['description']}")
        print()
    return 0
