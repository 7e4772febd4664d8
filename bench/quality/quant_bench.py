"""Perplexity of SmolLM2-135M-Instruct (or any model) under pruning (issue 3) and RTN/GPTQ (issue 2)
settings, with wall time and achieved sparsity. Prints a Markdown table and writes JSON.

    python bench/quality/quant_bench.py --nsamples 32 --max-windows 20 --out bench/results/quant_smollm2.json

Every setting quantizes a fresh copy of the same loaded model with the same calibration windows and is
scored by the same perplexity code on the same token stream.
"""
from __future__ import annotations

import argparse
import copy
import logging
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: compress and bench.*

from compress.adapters import get_adapter  # noqa: E402
from compress.context import PassContext  # noqa: E402
from compress.eval.perplexity import perplexity  # noqa: E402
from compress.passes.alpha_allocation import AlphaAllocation, AlphaAllocationConfig  # noqa: E402
from compress.passes.gptq import GPTQ, GPTQConfig  # noqa: E402
from compress.passes.magnitude import Magnitude  # noqa: E402
from compress.passes.rtn import RTN, RTNConfig  # noqa: E402
from compress.passes.sparsegpt import SparseGPT  # noqa: E402
from compress.passes.wanda import Wanda  # noqa: E402

from bench.bench_common import load_inputs, write_results  # noqa: E402

# name -> list of (pass class, config): pruning settings of issue 3, then quantization of issue 2
PRUNING = {
    f"{cls.name}-{tag}": [(cls, cls.config_class(sparsity=0.5, mask=mask))]
    for cls in (Magnitude, Wanda, SparseGPT) for tag, mask in (("50%", "unstructured"), ("4:8", "4:8"), ("2:4", "2:4"))
}
for cls in (Wanda, SparseGPT):
    PRUNING[f"{cls.name}-70%-uniform"] = [(cls, cls.config_class(sparsity=0.7))]
    for eps in (0.1, 0.2, 0.3, 0.5):
        PRUNING[f"{cls.name}-70%-alpha-eps{eps}"] = [
            (AlphaAllocation, AlphaAllocationConfig(target_sparsity=0.7, epsilon=eps)),
            (cls, cls.config_class(sparsity="plan"))]

SETTINGS = {
    **PRUNING,
    "rtn-w4g128": (RTN, RTNConfig(bits=4, group_size=128)),
    "gptq-w4g128": (GPTQ, GPTQConfig(bits=4, group_size=128, act_order=True)),
    "rtn-w4-channel": (RTN, RTNConfig(bits=4, group_size=-1)),
    "gptq-w4-channel": (GPTQ, GPTQConfig(bits=4, group_size=-1, act_order=True)),
    "rtn-w3g128": (RTN, RTNConfig(bits=3, group_size=128)),
    "gptq-w3g128": (GPTQ, GPTQConfig(bits=3, group_size=128, act_order=True)),
    "rtn-w4g64": (RTN, RTNConfig(bits=4, group_size=64)),
    "gptq-w4g64": (GPTQ, GPTQConfig(bits=4, group_size=64, act_order=True)),
}


def _sparsity(model, ctx) -> float:
    """Fraction of exact zeros over the decoder blocks' linear weights, counted from the model."""
    zeros = total = 0
    for block in ctx.adapter.blocks(model):
        for m in ctx.adapter.block_linears(block).values():
            w = m.dequantize() if hasattr(m, "dequantize") else m.weight
            zeros += int((w == 0).sum())
            total += w.numel()
    return zeros / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    ap.add_argument("--calibration", default="../shared/assets/data/text/dolly_hhrlhf_train_small.jsonl")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--eval-text", default="wikitext2", help="wikitext2 (../shared/assets) or a path to wiki.test.raw")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--max-windows", type=int, default=None, help="perplexity windows (default: full test)")
    ap.add_argument("--settings", default=",".join(SETTINGS), help="comma list of " + ", ".join(SETTINGS).replace("%", "%%"))
    ap.add_argument("--list", action="store_true", help="list the settings and exit")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 is far faster on a busy machine)")
    ap.add_argument("--out", default=None, help="write JSON results here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.list:
        print("\n".join(SETTINGS))
        return
    if args.threads:
        torch.set_num_threads(args.threads)

    inputs = load_inputs(args.model, args.device, args.eval_text, args.calibration, args.nsamples, args.seqlen)
    base, tok, ids, calib = inputs.model, inputs.tokenizer, inputs.ids, inputs.calibration
    dev = torch.device(args.device)
    rows = []
    fp = perplexity(base, tok, args.eval_text, args.seqlen, args.max_windows, ids=ids)
    rows.append({"setting": "fp32", "perplexity": fp.perplexity, "quant_seconds": 0.0, "windows": fp.windows,
                 "total_windows": fp.total_windows})
    print(f"fp32: {fp.perplexity:.3f}", flush=True)
    for name in args.settings.split(","):
        steps = SETTINGS[name] if isinstance(SETTINGS[name], list) else [SETTINGS[name]]
        model = copy.deepcopy(base)
        # RTN uses no data; giving it none keeps its time to the rounding itself
        factory = (lambda: calib) if any(c.needs_calibration for c, _ in steps) else None
        ctx = PassContext(adapter=get_adapter(model), device=dev, calibration_factory=factory)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for cls, cfg in steps:
            report = cls(cfg).apply(model, ctx)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        res = perplexity(model, tok, args.eval_text, args.seqlen, args.max_windows, ids=ids)
        rows.append({"setting": name, "perplexity": res.perplexity, "quant_seconds": round(secs, 1),
                     "mean_rel_output_error": report.summary.get("mean_rel_output_error"),
                     "mean_rel_weight_error": report.summary.get("mean_rel_weight_error"),
                     "sparsity": _sparsity(model, ctx), "windows": res.windows,
                     "total_windows": res.total_windows})
        print(f"{name}: {res.perplexity:.3f} ({secs:.0f} s)", flush=True)
        del model
    meta = {"model": args.model, "calibration": calib.describe(), "seqlen": args.seqlen,
            "machine": torch.cuda.get_device_name(0) if dev.type == "cuda" else
                       f"{platform.machine()} {platform.processor()}, {torch.get_num_threads()} threads",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    print(f"\n{args.model}; WikiText-2 seqlen {args.seqlen}, {rows[0]['windows']}/{rows[0]['total_windows']} windows; "
          f"calibration {args.nsamples} x {args.seqlen} tokens of {args.calibration}\n")
    print("| setting | perplexity | seconds | sparsity | mean rel. weight error |\n|---|---:|---:|---:|---:|")
    for r in rows:
        err = r.get("mean_rel_weight_error")
        print(f"| {r['setting']} | {r['perplexity']:.3f} | {r['quant_seconds']:.0f} | {r.get('sparsity', 0):.3f} | "
              f"{'-' if err is None else f'{err:.4f}'} |")
    write_results(args.out, meta, rows)


if __name__ == "__main__":
    main()
