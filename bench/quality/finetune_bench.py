"""How much of the dense -> pruned perplexity gap ``sparse_finetune`` recovers, with cross-entropy only vs
distillation, for SmolLM2-135M-Instruct (or any model). Prints a Markdown table and writes JSON.

    python bench/quality/finetune_bench.py --device cuda --autocast bf16 --out bench/results/finetune_smollm2.json

Prunings: Wanda 50% unstructured, Wanda 2:4, and width pruning of 20% of the MLP channels (``mlp_ratio
0.2``, ``head_ratio 0``: SmolLM2 has 3 KV groups of 3 query heads, so the smallest head step is a third of
the heads, far more than 20%; ``importance activation``, the best one-shot criterion measured in
docs/structural-pruning.md). Every pruning starts from the same loaded model and calibration windows; each
fine-tune starts from the same pruned copy, trains on ``--train-data`` (not the evaluation text) with the
same seed, and distils from the loaded dense model. All perplexities come from the same code on the same
token stream. ``recovered`` = (pruned - fine-tuned) / (pruned - dense).

CPU smoke run (seconds, numbers meaningless):

    python bench/quality/finetune_bench.py --steps 2 --max-windows 1 --nsamples 2 --calib-seqlen 128 --train-seqlen 64 \\
        --batch-size 1 --seqlen 256 --threads 1
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
from compress.eval.perplexity import perplexity  # noqa: E402
from compress.passes.sparse_finetune import SparseFinetune, SparseFinetuneConfig  # noqa: E402
from compress.passes.wanda import Wanda, WandaConfig  # noqa: E402
from compress.passes.width_prune import WidthPrune, WidthPruneConfig  # noqa: E402

from bench.bench_common import load_inputs, write_results  # noqa: E402

PRUNINGS = {
    "wanda-50%": (Wanda, WandaConfig(sparsity=0.5)),
    "wanda-2:4": (Wanda, WandaConfig(mask="2:4")),
    "width-20%": (WidthPrune, WidthPruneConfig(mlp_ratio=0.2, head_ratio=0.0, importance="activation")),
}
LOSSES = ("ce", "kd")


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _finetune(pruned: torch.nn.Module, base: torch.nn.Module, tok: Any, text: str, loss: str, args: argparse.Namespace,
              dev: torch.device) -> tuple[torch.nn.Module, dict[str, Any], float]:
    model = copy.deepcopy(pruned)
    cfg = SparseFinetuneConfig(dataset=args.train_data, steps=args.steps, lr=args.lr, loss=loss,
                               temperature=args.temperature, seqlen=args.train_seqlen, batch_size=args.batch_size,
                               grad_accum=args.grad_accum, autocast=args.autocast, teacher_cache=args.teacher_cache,
                               checkpoint_every=0, log_every=max(1, args.steps // 10), seed=0)
    # the teacher is the loaded dense model itself: the pass only reads it (no copy needed in a benchmark)
    ctx = PassContext(adapter=get_adapter(model), device=dev, tokenizer=tok, teacher_factory=lambda: base,
                      eval_texts=[text])
    _sync(dev)
    t0 = time.perf_counter()
    rep = SparseFinetune(cfg).apply(model, ctx)
    _sync(dev)
    return model, rep.summary, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="hub id, local folder or .gguf file")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--eval-text", default="wikitext2", help="wikitext2 (../shared/assets) or a path to wiki.test.raw")
    ap.add_argument("--seqlen", type=int, default=2048, help="perplexity window length")
    ap.add_argument("--max-windows", type=int, default=None, help="perplexity windows (default: full test)")
    ap.add_argument("--calibration", default="../shared/assets/data/text/dolly_hhrlhf_train_small.jsonl")
    ap.add_argument("--nsamples", type=int, default=128, help="calibration windows for the pruning")
    ap.add_argument("--calib-seqlen", type=int, default=2048, help="calibration window length")
    ap.add_argument("--train-data", default="../shared/assets/data/text/dolly_hhrlhf_train_small.jsonl",
                    help="fine-tuning text (.txt/.jsonl or a datasets name)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1.0e-4)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--train-seqlen", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--autocast", default="none", choices=["none", "bf16"], help="bf16 autocast of training forwards")
    ap.add_argument("--teacher-cache", default="off", choices=["off", "disk"])
    ap.add_argument("--prunings", default=",".join(PRUNINGS), help="comma list of " + ", ".join(PRUNINGS).replace("%", "%%"))
    ap.add_argument("--losses", default=",".join(LOSSES), help="comma list of ce, kd")
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    ap.add_argument("--out", default=None, help="write JSON results here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    prunings, losses = args.prunings.split(","), args.losses.split(",")
    unknown = [p for p in prunings if p not in PRUNINGS] + [x for x in losses if x not in LOSSES]
    if unknown:
        ap.error(f"unknown pruning or loss: {', '.join(unknown)}")

    t_all = time.perf_counter()
    dev = torch.device(args.device)
    inputs = load_inputs(args.model, args.device, args.eval_text, args.calibration, args.nsamples, args.calib_seqlen)
    base, tok, text, ids, calib = inputs.model, inputs.tokenizer, inputs.text, inputs.ids, inputs.calibration

    def ppl(model: torch.nn.Module) -> tuple[float, float]:
        t0 = time.perf_counter()
        r = perplexity(model, tok, args.eval_text, args.seqlen, args.max_windows, dev, ids=ids)
        return r.perplexity, time.perf_counter() - t0

    dense_ppl, _ = ppl(base)
    print(f"dense: {dense_ppl:.3f}", flush=True)
    rows = []
    for name in prunings:
        cls, pcfg = PRUNINGS[name]
        pruned = copy.deepcopy(base)
        _sync(dev)
        t0 = time.perf_counter()
        cls(pcfg).apply(pruned, PassContext(adapter=get_adapter(pruned), device=dev, calibration_factory=lambda: calib))
        _sync(dev)
        prune_s = time.perf_counter() - t0
        pruned_ppl, _ = ppl(pruned)
        print(f"{name}: pruned {pruned_ppl:.3f} ({prune_s:.0f} s)", flush=True)
        for loss in losses:
            model, s, ft_s = _finetune(pruned, base, tok, text, loss, args, dev)
            ft_ppl, eval_s = ppl(model)
            gap = pruned_ppl - dense_ppl
            rows.append({"pruning": name, "loss": loss, "dense": dense_ppl, "pruned": pruned_ppl, "finetuned": ft_ppl,
                         "recovered": (pruned_ppl - ft_ppl) / gap if gap > 0 else None, "steps": s["steps"],
                         "tokens": s["tokens_seen"], "finetune_seconds": round(ft_s, 1), "eval_seconds": round(eval_s, 1),
                         "prune_seconds": round(prune_s, 1), "loss_start": s["loss_start"], "loss_end": s["loss_end"],
                         "masked_entries": s["masked_entries"], "masked_nonzero_after": s["masked_nonzero_after"]})
            print(f"  {loss}: {ft_ppl:.3f} ({ft_s:.0f} s fine-tuning, loss {s['loss_start']:.3f} -> {s['loss_end']:.3f})",
                  flush=True)
            del model
        del pruned
    meta = {"model": args.model, "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else
            f"{platform.machine()} {platform.processor()}, {torch.get_num_threads()} threads",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "calibration": calib.describe(),
            "eval": {"text": args.eval_text, "seqlen": args.seqlen, "max_windows": args.max_windows},
            "train": {k: getattr(args, k) for k in ("train_data", "steps", "lr", "temperature", "train_seqlen",
                                                    "batch_size", "grad_accum", "autocast", "teacher_cache")},
            "total_seconds": round(time.perf_counter() - t_all, 1)}
    print(f"\n{args.model}; WikiText-2 perplexity at seqlen {args.seqlen} ({args.max_windows or 'all'} windows); "
          f"{args.steps} steps x {args.batch_size * args.grad_accum} x {args.train_seqlen} tokens of {args.train_data}, "
          f"lr {args.lr}; {meta['device']}; total {meta['total_seconds']:.0f} s\n")
    print("| pruning | loss | dense | pruned | fine-tuned | gap recovered | steps | tokens | fine-tune s |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        rec = "-" if r["recovered"] is None else f"{100 * r['recovered']:.0f}%"
        print(f"| {r['pruning']} | {r['loss']} | {r['dense']:.3f} | {r['pruned']:.3f} | {r['finetuned']:.3f} | {rec} | "
              f"{r['steps']} | {r['tokens']} | {r['finetune_seconds']:.0f} |")
    write_results(args.out, meta, rows)


if __name__ == "__main__":
    main()
