"""``compress report RUNS_DIR``: compare every run in a folder (table, Pareto fronts, plot)."""
from __future__ import annotations

import argparse
import json

HELP = "compare the runs in a folder: table, Pareto fronts, pareto.png"

DESCRIPTION = """\
Find every run folder (one holding a report.json) in RUNS_DIR and up to --max-depth levels below it,
and compare them: passes, perplexity (original and compressed, with the windows scored), zero-shot
accuracies, checkpoint size, parameters, sparsity, and the estimated decode speedup over the original
model (the report's roofline when the recipe had eval.roofline; otherwise estimated here for --device,
prompt 1024, generate 128, batch 1, float16; the table says which). Marks the Pareto-optimal runs
(★speed: lower perplexity and higher speedup; ★size: lower perplexity and smaller checkpoint). Runs
whose perplexity or roofline settings differ from the most common ones are flagged and left off the
fronts, since their numbers are not comparable.

Writes summary.md, summary.json and pareto.png (perplexity vs speedup, perplexity vs size) into
RUNS_DIR or --out. Fields: docs/reports.md.

examples:
  compress report out/
  compress report out/ --device a100-80gb --recompute-speedup --out reports/
  compress report out/ --json | jq '.runs[] | select(.pareto_speed) | .name'
"""


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("report", help=HELP, description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs_dir", metavar="RUNS_DIR", help="folder holding run folders (each with a report.json)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="where summary.md, summary.json and pareto.png go (default: RUNS_DIR)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object instead of the table")
    p.add_argument("--device", default="h100",
                   help="device for speedups estimated here, for runs without a roofline in their report (default: h100)")
    p.add_argument("--recompute-speedup", action="store_true",
                   help="estimate every run's speedup for --device, ignoring the reports' rooflines (all comparable)")
    p.add_argument("--max-depth", type=int, default=3,
                   help="levels of subfolders searched below RUNS_DIR (default: 3)")
    p.set_defaults(func=handler)
    return p


def handler(args: argparse.Namespace) -> int:
    from compress.errors import CompressError
    from compress.eval.runs import render_summary, summarize_runs, write_summary

    if args.max_depth < 0:
        raise CompressError(f"--max-depth must be 0 or more, got {args.max_depth}")
    summary = summarize_runs(args.runs_dir, args.device, args.recompute_speedup, args.max_depth)
    paths = write_summary(summary, args.out or args.runs_dir)
    if args.json:
        print(json.dumps(summary))
    else:
        print(render_summary(summary, plot_name=None), end="")
        print(f"wrote {paths['md']}, {paths['json']}, {paths['png']}")
    return 0
