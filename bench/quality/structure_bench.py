"""Structural pruning of SmolLM2-135M-Instruct (or any model): WikiText-2 perplexity, parameter count and
CPU latency of width-pruned (each importance criterion) and depth-pruned copies against the original.
Prints a Markdown table and writes JSON.

    python bench/quality/structure_bench.py --max-windows 20 --out bench/results/structure_smollm2.json

Every setting prunes a fresh copy of the same loaded model with the same calibration windows and is scored
by the same perplexity code on the same token stream. Width settings prune MLP channels at each ratio
(``--head-ratio`` adds head pruning: SmolLM2 has 3 KV groups of 3 query heads, so the smallest step is a
third of the heads). Latency (``compress.eval.latency.measure_latency``: prefill then greedy decode, batch 1,
median of repeats) depends only on the shapes, so it is measured once per ratio / depth, not per criterion.
No fine-tuning follows the pruning: these are one-shot numbers.
"""
from __future__ import annotations

import argparse
import copy
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: compress and bench.*

from compress.adapters import get_adapter  # noqa: E402
from compress.context import PassContext  # noqa: E402
from compress.eval.latency import measure_latency  # noqa: E402
from compress.eval.perplexity import perplexity  # noqa: E402
from compress.passes.depth_prune import DepthPrune, DepthPruneConfig  # noqa: E402
from compress.passes.width_prune import WidthPrune, WidthPruneConfig, count_params  # noqa: E402

from bench.bench_common import load_inputs, write_results  # noqa: E402


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    ap.add_argument("--calibration", default="../shared/assets/data/text/dolly_hhrlhf_train_small.jsonl")
    ap.add_argument("--nsamples", type=int, default=32, help="calibration windows (activation norms, block influence)")
    ap.add_argument("--seqlen", type=int, default=2048, help="perplexity window length")
    ap.add_argument("--calib-seqlen", type=int, default=2048, help="calibration window length")
    ap.add_argument("--max-windows", type=int, default=None, help="perplexity windows (default: full test)")
    ap.add_argument("--width-ratios", default="0.1,0.2,0.3", help="comma list of mlp_ratio values")
    ap.add_argument("--criteria", default="magnitude,activation,taylor", help="comma list of importance criteria")
    ap.add_argument("--head-ratio", type=float, default=0.0, help="head_ratio applied with every width setting")
    ap.add_argument("--head-mode", default="kv_groups", choices=["kv_groups", "per_group"])
    ap.add_argument("--taylor-samples", type=int, default=2)
    ap.add_argument("--depths", default="2,4,6", help="comma list of numbers of blocks removed")
    ap.add_argument("--depth-metric", default="block_influence", choices=["block_influence", "perplexity"])
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5, help="latency repeats (median reported); 0 skips latency")
    ap.add_argument("--clock", default="wall", choices=["wall", "thread"],
                    help="latency clock: thread = CPU time of the calling thread (needs --threads 1; robust on a busy machine)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (latency is only meaningful on the CPU here)")
    ap.add_argument("--eval-text", default="wikitext2", help="wikitext2 (../shared/assets) or a path to wiki.test.raw")
    ap.add_argument("--no-ppl", action="store_true", help="skip perplexity (latency and parameter counts only)")
    ap.add_argument("--out", default=None, help="write JSON results here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    inputs = load_inputs(args.model, args.device, args.eval_text, args.calibration, args.nsamples, args.calib_seqlen)
    base, tok, ids, calib = inputs.model, inputs.tokenizer, inputs.ids, inputs.calibration

    def latency(model) -> dict[str, Any]:
        if args.repeats <= 0:
            return {}
        r = measure_latency(model, args.prefill, args.decode, batch=1, repeats=args.repeats, warmup=1, clock=args.clock)
        return {"prefill_ms": r["prefill_ms"], "decode_ms_per_token": r["decode_ms_per_token"]}

    def score(name: str, model, extra: dict[str, Any], timed: bool) -> dict[str, Any]:
        res = None if args.no_ppl else perplexity(model, tok, args.eval_text, args.seqlen, args.max_windows, ids=ids)
        row = {"setting": name, "perplexity": res.perplexity if res else float("nan"), "params": count_params(model),
               **extra, "windows": res.windows if res else 0, "total_windows": res.total_windows if res else 0,
               **(latency(model) if timed else {})}
        lat = f", prefill {row['prefill_ms']:.0f} ms, decode {row['decode_ms_per_token']:.1f} ms/token" if "prefill_ms" in row else ""
        print(f"{name}: ppl {row['perplexity']:.3f}, {row['params']:,} params{lat}", flush=True)
        return row

    rows = [score("original", base, {"prune_seconds": 0.0}, True)]
    for ratio in _floats(args.width_ratios):
        for j, crit in enumerate(args.criteria.split(",")):
            cfg = WidthPruneConfig(mlp_ratio=ratio, head_ratio=args.head_ratio, head_mode=args.head_mode,
                                   importance=crit, taylor_samples=args.taylor_samples)
            rows.append(_run(f"width {ratio:.0%} {crit}" + (f" heads {args.head_ratio:.0%}" if args.head_ratio else ""),
                             WidthPrune(cfg), base, calib, score, timed=j == 0, dev=dev))
    for n in _ints(args.depths):
        rows.append(_run(f"depth -{n} {args.depth_metric}", DepthPrune(DepthPruneConfig(num_blocks=n, metric=args.depth_metric)),
                         base, calib, score, timed=True, dev=dev))

    meta = {"model": args.model, "calibration": calib.describe(), "seqlen": args.seqlen,
            "latency": {"prefill": args.prefill, "decode": args.decode, "batch": 1, "repeats": args.repeats,
                        "clock": args.clock},
            "machine": torch.cuda.get_device_name(0) if dev.type == "cuda" else
                       f"{platform.machine()} {platform.processor()}, {torch.get_num_threads()} threads",
            "command": " ".join(sys.argv),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    print(f"\n{args.model}; WikiText-2 seqlen {args.seqlen}, {rows[0]['windows']}/{rows[0]['total_windows']} windows; "
          f"calibration {args.nsamples} x {args.calib_seqlen}; latency prefill {args.prefill} + decode {args.decode}, batch 1, "
          f"median of {args.repeats} (once per shape)\n")
    print("| setting | perplexity | params (M) | prune s | prefill ms | decode ms/token |\n|---|---:|---:|---:|---:|---:|")
    for r in rows:
        pf, dc = r.get("prefill_ms"), r.get("decode_ms_per_token")
        print(f"| {r['setting']} | {r['perplexity']:.3f} | {r['params'] / 1e6:.2f} | {r['prune_seconds']:.0f} | "
              f"{'-' if pf is None else f'{pf:.0f}'} | {'-' if dc is None else f'{dc:.1f}'} |")
    write_results(args.out, meta, rows)


def _run(name: str, pass_, base, calib, score, timed: bool, dev: torch.device) -> dict[str, Any]:
    model = copy.deepcopy(base)
    ctx = PassContext(adapter=get_adapter(model), device=dev, calibration_factory=lambda: calib)
    t0 = time.perf_counter()
    report = pass_.apply(model, ctx)
    extra = {"prune_seconds": round(time.perf_counter() - t0, 1), "summary": report.summary}
    return score(name, model, extra, timed)


if __name__ == "__main__":
    main()
