"""Side by side: llm-compressor's GPTQ, Wanda or SparseGPT vs ours on the same model, calibration
tokens and perplexity code.

Run in an environment with llm-compressor installed (it pins its own transformers; a separate venv
that sees this package is simplest):

    python -m venv /tmp/lc --system-site-packages && /tmp/lc/bin/pip install llmcompressor torch==2.13.0
    /tmp/lc/bin/python bench/quality/llmcompressor_compare.py --group-size 64 --nsamples 32 --max-windows 20
    /tmp/lc/bin/python bench/quality/llmcompressor_compare.py --method wanda --sparsity 0.5 --threads 1 \\
        --nsamples 64 --max-windows 20 --out bench/results/llmcompressor_vs_compress_wanda50_cpu_2026-11-22.json

One ``CalibrationData`` is built and its token ids feed both tools. Each tool compresses its own
deep copy of the model in memory; both are scored with compress's perplexity (for GPTQ that is
llm-compressor's fake-quantized forward, which is what its saved checkpoint computes). For the
pruning methods the achieved sparsity of every linear layer of both models is counted and printed.

Settings matched on both sides: GPTQ W4A16 symmetric, static act-order, group size; pruning the
same sparsity and mask (our "N:M" keeps N of M; llm-compressor's ``mask_structure`` "N:M" prunes N
of M, so ours N:M is passed as "(M-N):M"; for 2:4 and 4:8 the strings coincide); dampening 0.01
of mean(diag H) and block size 128 (both tools' defaults); every linear of the decoder blocks,
lm_head left dense. llm-compressor's pruning modifiers need ``ignore=["re:.*lm_head"]``: they
compare ``ignore`` with names that end in "." ("lm_head."), so ``ignore=["lm_head"]`` silently
prunes lm_head, and with SmolLM2's tied embeddings the input embedding with it.

Differences between the implementations (llm-compressor 0.14.0.1 source, modifiers/pruning/):
- Order inside a decoder block: ours is true-sequential (q/k/v, then o, then gate/up, then down;
  each group's inputs come from the already-pruned groups before it, compress/sequential.py).
  llm-compressor's sequential pipeline runs each decoder layer once with hooks on all of its
  linears, then prunes them all, so o_proj/down_proj see the inputs of the still-dense block.
  Across blocks both propagate the pruned block's outputs (its ``propagate_error`` default).
- Wanda: the same score |W|·||X_j||₂ compared within each output row, floor(s·in) pruned per
  row, stable sort. Theirs keeps a float32 running mean of ||x_j||², ours a float64 sum (same
  ranking up to rounding). N:M: theirs picks by ``topk`` (ties unspecified), ours by stable sort.
- SparseGPT: the same blocked OBS update and the same adaptive mask per block of 128 columns over
  all rows, saliency w²/[H_F⁻¹]_ii. Theirs prunes every weight <= the value at sorted index
  floor(s·block numel), i.e. one more per block (plus ties): a tiny overshoot of s. Ours prunes
  exactly floor(s·rows·end) - floor(s·rows·start) per block, so each matrix ends at exactly s.
  Their Hessian is averaged over sequences, ours over tokens (a global scale: no effect). On a
  failed Cholesky they fall back to the identity (magnitude pruning) with a warning.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: compress and bench.*
from torch import nn

from compress.adapters import get_adapter  # noqa: E402
from compress.calibration import build_calibration  # noqa: E402
from compress.context import PassContext  # noqa: E402
from compress.eval.perplexity import eval_text, perplexity, tokenize_stream  # noqa: E402
from compress.modeling import load_model  # noqa: E402
from compress.passes.gptq import GPTQ, GPTQConfig  # noqa: E402
from compress.passes.sparsegpt import SparseGPT, SparseGPTConfig  # noqa: E402
from compress.passes.wanda import Wanda, WandaConfig  # noqa: E402

BLOCK_SIZE = 128  # both tools' default for GPTQ and SparseGPT
IGNORE = ["lm_head"]
# llm-compressor's pruning modifiers match `ignore` against names with a trailing "." ("lm_head."), so
# a plain "lm_head" does not match and lm_head is pruned (with tied embeddings, the embedding too).
THEIR_PRUNING_IGNORE = ["re:.*lm_head"]


def run_ours(args, model: nn.Module, calib) -> nn.Module:
    ctx = PassContext(adapter=get_adapter(model), device=torch.device("cpu"), calibration_factory=lambda: calib)
    if args.method == "gptq":
        pas = GPTQ(GPTQConfig(bits=4, group_size=args.group_size, act_order=True, static_groups=True,
                              dampening=args.dampening))
    elif args.method == "wanda":
        pas = Wanda(WandaConfig(sparsity=args.sparsity, mask=args.mask, ignore=IGNORE))
    else:
        pas = SparseGPT(SparseGPTConfig(sparsity=args.sparsity, mask=args.mask, ignore=IGNORE,
                                        block_size=BLOCK_SIZE, dampening=args.dampening))
    pas.apply(model, ctx)
    return model


def llmcompressor_modifier(args):
    if args.method == "gptq":
        from llmcompressor.modifiers.gptq import GPTQModifier

        weights = {"num_bits": 4, "type": "int", "symmetric": True,
                   "strategy": "channel" if args.group_size == -1 else "group", "actorder": "static"}
        if args.group_size != -1:
            weights["group_size"] = args.group_size
        return GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
                            ignore=IGNORE, dampening_frac=args.dampening, block_size=BLOCK_SIZE)
    if args.mask == "unstructured":
        structure = "0:0"
    else:
        n, m = (int(v) for v in args.mask.split(":"))
        structure = f"{m - n}:{m}"  # theirs counts the pruned weights of each group
    common = dict(sparsity=args.sparsity, mask_structure=structure, targets=["Linear"], ignore=THEIR_PRUNING_IGNORE)
    if args.method == "wanda":
        from llmcompressor.modifiers.pruning import WandaPruningModifier

        return WandaPruningModifier(**common)
    from llmcompressor.modifiers.pruning import SparseGPTModifier

    return SparseGPTModifier(**common, dampening_frac=args.dampening, block_size=BLOCK_SIZE)


def run_llmcompressor(args, model: nn.Module, tok, calib) -> nn.Module:
    from datasets import Dataset
    from llmcompressor import oneshot

    ds = Dataset.from_dict({"input_ids": calib.input_ids.tolist(),
                            "attention_mask": torch.ones_like(calib.input_ids).tolist()})
    oneshot(model=model, tokenizer=tok, dataset=ds, recipe=llmcompressor_modifier(args),
            num_calibration_samples=calib.nsamples, max_seq_length=calib.seqlen,
            shuffle_calibration_samples=False, pipeline="sequential")
    return model


def linear_sparsity(model: nn.Module) -> dict[str, float]:
    """Fraction of exact zeros in the weight of every nn.Linear (lm_head included)."""
    return {n: float((m.weight == 0).sum()) / m.weight.numel()
            for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def block_sparsity(model: nn.Module, per_layer: dict[str, float]) -> float:
    """Zeros over weights of the decoder blocks' linears (lm_head excluded)."""
    mods = dict(model.named_modules())
    names = [n for n in per_layer if not n.endswith("lm_head")]
    total = sum(mods[n].weight.numel() for n in names)
    return sum(per_layer[n] * mods[n].weight.numel() for n in names) / total


def nm_violations(model: nn.Module, mask: str) -> int:
    """Groups of M consecutive inputs, over the decoder blocks' linears, keeping more than N weights."""
    n, m = (int(v) for v in mask.split(":"))
    return sum(int(((mod.weight.reshape(-1, m) != 0).sum(1) > n).sum())
               for name, mod in model.named_modules() if isinstance(mod, nn.Linear) and not name.endswith("lm_head"))


def print_sparsity(per_tool: dict[str, dict[str, float]]) -> None:
    """One row per decoder block, one column per linear: every tool's sparsity, '/'-separated."""
    tools = list(per_tool)
    names = list(per_tool[tools[0]])
    blocks: dict[str, dict[str, str]] = {}
    for n in names:
        prefix, _, leaf = n.rpartition(".")
        parts = prefix.split(".")
        key = ".".join(parts[:3]) if "layers" in parts else n
        short = leaf if "layers" in parts else "weight"
        blocks.setdefault(key, {})[short] = "/".join(f"{per_tool[t].get(n, float('nan')):.4f}" for t in tools)
    cols = sorted({c for row in blocks.values() for c in row})
    print(f"\nachieved sparsity of every linear ({' / '.join(tools)}):\n")
    print("| module | " + " | ".join(cols) + " |\n|---|" + "---:|" * len(cols))
    for key, row in blocks.items():
        print(f"| {key} | " + " | ".join(row.get(c, "") for c in cols) + " |")


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "unknown")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    ap.add_argument("--method", choices=["gptq", "wanda", "sparsegpt"], default="gptq")
    ap.add_argument("--calibration", default="../shared/assets/data/text/dolly_hhrlhf_train_small.jsonl")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--group-size", type=int, default=64, help="gptq only")
    ap.add_argument("--sparsity", type=float, default=0.5, help="wanda/sparsegpt: fraction of weights pruned")
    ap.add_argument("--mask", choices=["unstructured", "2:4", "4:8"], default="unstructured",
                    help="wanda/sparsegpt: N:M keeps N of every M consecutive inputs (sparsity must be 1 - N/M)")
    ap.add_argument("--dampening", type=float, default=0.01, help="gptq/sparsegpt: fraction of mean(diag H)")
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 is far faster on a busy machine)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if args.mask != "unstructured":
        n, m = (int(v) for v in args.mask.split(":"))
        if abs(args.sparsity - (1 - n / m)) > 1e-9:
            ap.error(f"--sparsity {args.sparsity} contradicts --mask {args.mask} (sparsity {1 - n / m:g})")
    return args


def settings_of(args, calib, windows: str) -> dict:
    s = {"model": args.model, "method": args.method, "calibration": args.calibration, "nsamples": calib.nsamples,
         "seqlen": calib.seqlen, "calibration_sha256": calib.sha256, "eval": f"wikitext2 @ {args.seqlen}, {windows} windows",
         "dampening": args.dampening, "block_size": BLOCK_SIZE, "ignore": IGNORE,
         "llmcompressor_ignore": IGNORE if args.method == "gptq" else THEIR_PRUNING_IGNORE, "threads": args.threads}
    if args.method == "gptq":
        s.update(bits=4, group_size=args.group_size, symmetric=True, act_order="static")
    else:
        s.update(sparsity=args.sparsity, mask=args.mask)
    return s


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import llmcompressor

    loaded = load_model(args.model)
    base, tok = loaded.model, loaded.tokenizer
    ids = tokenize_stream(tok, eval_text("wikitext2"))
    calib = build_calibration(tok, args.calibration, args.nsamples, args.seqlen, seed=0,
                              eval_texts=[eval_text("wikitext2")])

    def score(model, seconds: float) -> dict:
        r = perplexity(model, tok, "wikitext2", args.seqlen, args.max_windows, ids=ids).to_dict()
        r["eval_seconds"] = r.pop("seconds")
        return {**r, "compress_seconds": round(seconds, 2)}

    rows: dict[str, dict] = {"dense": score(base, 0.0)}
    sparsity: dict[str, dict[str, float]] = {}
    tools = {"compress": lambda m: run_ours(args, m, calib),
             "llm-compressor": lambda m: run_llmcompressor(args, m, tok, calib)}
    for tool, run in tools.items():
        t0 = time.perf_counter()
        model = run(copy.deepcopy(base))
        secs = time.perf_counter() - t0
        key = f"{tool} {args.method}"
        rows[key] = score(model, secs)
        if args.method != "gptq":
            sparsity[key] = linear_sparsity(model)
            rows[key]["achieved_sparsity"] = block_sparsity(model, sparsity[key])
            rows[key]["lm_head_sparsity"] = sparsity[key].get("lm_head")
            if args.mask != "unstructured":
                rows[key]["nm_violating_groups"] = nm_violations(model, args.mask)
        del model

    ours, theirs = rows[f"compress {args.method}"], rows[f"llm-compressor {args.method}"]
    diff = 100 * (ours["perplexity"] / theirs["perplexity"] - 1)
    w = rows["dense"]
    what = (f"W4A16 g{args.group_size} symmetric, static act-order" if args.method == "gptq"
            else f"{args.method} {args.sparsity:g} {args.mask}")
    print(f"\n{args.model}, {what}, dampening {args.dampening}, block {BLOCK_SIZE}; calibration {args.nsamples} x "
          f"{args.seqlen} ({calib.sha256[:12]}); WikiText-2 @ {args.seqlen}, {w['windows']}/{w['total_windows']} "
          f"windows; llmcompressor {llmcompressor.__version__}\n")
    print("| method | perplexity | achieved sparsity | compression s |\n|---|---:|---:|---:|")
    for k, r in rows.items():
        sp = f"{r['achieved_sparsity']:.6f}" if "achieved_sparsity" in r else ""
        print(f"| {k} | {r['perplexity']:.3f} | {sp} | {r['compress_seconds']:.0f} |")
    for k, r in rows.items():
        if "nm_violating_groups" in r:
            print(f"{k}: {r['nm_violating_groups']} groups break the {args.mask} pattern")
    print(f"\nours vs theirs: {diff:+.2f}% perplexity ({'within 1% or better' if diff <= 1 else 'worse by more than 1%'})")
    if sparsity:
        print_sparsity(sparsity)
    if args.out:
        result = {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": shlex.join([sys.executable, *sys.argv]),
            "machine": cpu_model(),
            "versions": {"torch": torch.__version__, "llmcompressor": llmcompressor.__version__},
            "settings": settings_of(args, calib, f"{w['windows']}/{w['total_windows']}"),
            "results": rows,
            "ours_vs_theirs_percent": diff,
            "per_linear_sparsity": sparsity,
        }
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
