"""compress run RECIPE: the whole pipeline from a YAML recipe."""
from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("run", help="run a recipe: load, calibrate, compress, evaluate, save",
                       description="Run a YAML recipe end to end and write the checkpoint, report.json and "
                                   "report.md into the output folder.",
                       epilog="example: compress run recipes/quickstart.yaml --set passes.0.gptq.group_size=64")
    p.add_argument("recipe", help="path to a recipe YAML file")
    p.add_argument("--output", "-o", help="output folder (overrides the recipe's `output`)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="edit the recipe before validation, e.g. passes.0.gptq.bits=3 (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--dry-run", action="store_true", help="validate the recipe and print it resolved, then stop")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run: a per-block run after its last finished block (from "
                        ".<output>.partial/), fine-tuning passes from the checkpoints left in <output>.ckpt/ (earlier "
                        "passes run again); without it stale partial results are discarded with a warning")
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    import yaml

    from compress.recipe import load_recipe

    overrides = list(args.overrides) + (["save.overwrite=true"] if args.overwrite else [])
    recipe = load_recipe(args.recipe, overrides, args.output)
    if args.dry_run:
        print(yaml.safe_dump(recipe.to_dict(), sort_keys=False), end="")
        return 0
    from compress.eval.report import summary_table
    from compress.runner import run

    from compress.distributed import PeerFailed

    try:
        result = run(recipe, resume=args.resume)
    except PeerFailed:
        return 2  # the failing process printed the error; repeating it from every process helps no one
    if not result.report:  # a process other than 0 of a distributed run: process 0 reports
        return 0
    print(summary_table(result.report))
    print(f"report: {result.output / 'report.md'}")
    return 0
