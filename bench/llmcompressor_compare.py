"""Side by side: llm-compressor's GPTQ vs ours on the same model, calibration tokens and perplexity code.

Run in an environment with llm-compressor installed (it pins its own transformers; a separate venv
that sees this package is simplest):

    python -m venv /tmp/lc --system-site-packages && /tmp/lc/bin/pip install llmcompressor torch==2.13.0
    /tmp/lc/bin/python bench/llmcompressor_compare.py --group-size 64 --nsamples 32 --max-windows 20

llm-compressor quantizes a copy of the model in memory (W4A16, symmetric, static act-order, the same
dampening and block size); we score its fake-quantized forward with compress's perplexity, which is
what its saved checkpoint computes. Ours runs compress's GPTQ on another copy with the same windows.
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from compress.adapters import get_adapter
from compress.calibration import build_calibration
from compress.context import PassContext
from compress.eval.perplexity import eval_text, perplexity, tokenize_stream
from compress.modeling import load_model
from compress.passes.gptq import GPTQ, GPTQConfig


def run_llmcompressor(model, tok, calib, group_size: int, dampening: float, actorder: str | None):
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier

    ds = Dataset.from_dict({"input_ids": calib.input_ids.tolist(),
                            "attention_mask": torch.ones_like(calib.input_ids).tolist()})
    weights = {"num_bits": 4, "type": "int", "symmetric": True,
               "strategy": "channel" if group_size == -1 else "group", "actorder": actorder}
    if group_size != -1:
        weights["group_size"] = group_size
    mod = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
                       ignore=["lm_head"], dampening_frac=dampening, block_size=128)
    t0 = time.perf_counter()
    oneshot(model=model, tokenizer=tok, dataset=ds, recipe=mod, num_calibration_samples=calib.nsamples,
            max_seq_length=calib.seqlen, shuffle_calibration_samples=False, pipeline="sequential")
    return model, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    ap.add_argument("--calibration", default="../shared/assets/data/text/dolly_hhrlhf_train_small.jsonl")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--dampening", type=float, default=0.01)
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 is far faster on a busy machine)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_model(args.model)
    base, tok = loaded.model, loaded.tokenizer
    ids = tokenize_stream(tok, eval_text("wikitext2"))
    calib = build_calibration(tok, args.calibration, args.nsamples, args.seqlen, seed=0,
                              eval_texts=[eval_text("wikitext2")])
    rows = {}
    ours = copy.deepcopy(base)
    ctx = PassContext(adapter=get_adapter(ours), device=torch.device("cpu"), calibration_factory=lambda: calib)
    t0 = time.perf_counter()
    GPTQ(GPTQConfig(bits=4, group_size=args.group_size, act_order=True, static_groups=True,
                    dampening=args.dampening)).apply(ours, ctx)
    rows["compress gptq"] = (time.perf_counter() - t0, perplexity(ours, tok, "wikitext2", args.seqlen, args.max_windows, ids=ids))
    del ours
    theirs, secs = run_llmcompressor(copy.deepcopy(base), tok, calib, args.group_size, args.dampening, "static")
    rows["llm-compressor gptq"] = (secs, perplexity(theirs, tok, "wikitext2", args.seqlen, args.max_windows, ids=ids))
    import llmcompressor

    w = next(iter(rows.values()))[1]
    print(f"\n{args.model}, W4A16 g{args.group_size} symmetric, static act-order, dampening {args.dampening}; "
          f"calibration {args.nsamples} x {args.seqlen} ({calib.sha256[:12]}); WikiText-2 @ {args.seqlen}, "
          f"{w.windows}/{w.total_windows} windows; llmcompressor {llmcompressor.__version__}\n")
    print("| method | perplexity | quantization s |\n|---|---:|---:|")
    for k, (s, r) in rows.items():
        print(f"| {k} | {r.perplexity:.3f} | {s:.0f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({k: {"seconds": s, **r.to_dict()} for k, (s, r) in rows.items()}, f, indent=2)


if __name__ == "__main__":
    main()
