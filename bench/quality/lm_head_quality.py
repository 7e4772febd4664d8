"""What quantizing the lm_head costs in perplexity (CPU, SmolLM2-135M-Instruct).

``bench/speed/e2e_decode.py --quantize-lm-head`` measures the speed side (the lm_head is 2% of a 7B
model's weights but 21% of SmolLM2's, tied to the embedding); this is the quality side: WikiText-2
perplexity (the GPTQ/Wanda protocol, first ``--max-windows`` windows of 2048 tokens) of

- ``fp32``: the model as shipped;
- ``lm_head``: only the lm_head RTN INT4 (untied from the embedding, which stays fp32);
- ``decoder``: every decoder linear RTN INT4, lm_head fp32 (what ``e2e_decode.py cpu`` times);
- ``decoder+lm_head``: both;
- ``lm_head8`` / ``decoder+lm_head8``: the lm_head RTN 8-bit instead (``compress.kernels.lm_head``,
  what ``compress bench --lm-head int8`` runs; ``--lm-head8-group``, default one scale per row).

Quantized layers run the exact float32 dequantize path (``QuantizedLinear``'s own forward), so the
numbers are the quantization's alone, not a kernel's arithmetic.

    python bench/quality/lm_head_quality.py --max-windows 16 --threads 2 --out bench/results/lm_head_quality.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: compress and bench.*

from bench.bench_common import write_results  # noqa: E402
from bench.speed.e2e_decode import SMOLLM2, quantize_linears  # noqa: E402

from compress.eval.perplexity import eval_text, perplexity, tokenize_stream  # noqa: E402
from compress.modeling import load_model  # noqa: E402

SETTINGS = ("fp32", "lm_head", "decoder", "decoder+lm_head", "lm_head8", "decoder+lm_head8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=SMOLLM2, help="model folder (default: the prepared SmolLM2-135M-Instruct)")
    ap.add_argument("--group-size", type=int, default=64, help="RTN group (default 64: 576 = 9 x 64)")
    ap.add_argument("--lm-head8-group", type=int, default=-1, help="group of the 8-bit lm_head (default -1: per row)")
    ap.add_argument("--max-windows", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--settings", default=",".join(SETTINGS), help="comma list of " + ", ".join(SETTINGS))
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    settings = [s for s in args.settings.split(",") if s]
    if not settings or any(s not in SETTINGS for s in settings):
        raise SystemExit(f"--settings: choose from {', '.join(SETTINGS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    ids = None
    for name in settings:
        loaded = load_model(args.model, device="cpu")  # fresh each time: quantizing works in place
        model, tok = loaded.model.float().eval(), loaded.tokenizer
        if ids is None:
            ids = tokenize_stream(tok, eval_text("wikitext2"))
        leaves = {nm.split(".")[-1] for nm, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        skip = {"fp32": leaves, "lm_head": leaves - {"lm_head"}, "decoder": {"lm_head"}, "decoder+lm_head": set(),
                "lm_head8": leaves, "decoder+lm_head8": {"lm_head"}}[name]
        n = quantize_linears(model, args.group_size, symmetric=False, skip=tuple(skip))  # RTN INT4, in place
        if name.endswith("lm_head8"):
            from compress.kernels.lm_head import quantize_lm_head

            quantize_lm_head(model, bits=8, group_size=args.lm_head8_group)
        t0 = time.time()
        with torch.inference_mode():
            res = perplexity(model, tok, "wikitext2", args.seqlen, args.max_windows, ids=ids)
        head_bits = 8 if name.endswith("lm_head8") else 4 if name.endswith("lm_head") else None  # None: float
        rows.append({"setting": name, "quantized_layers": n, "lm_head_bits": head_bits, "perplexity": res.perplexity,
                     "windows": res.windows, "seconds": time.time() - t0})
        print(f"{name:17} {n:4d} INT4 layers  perplexity {res.perplexity:.3f} ({res.windows} windows)", flush=True)
    write_results(args.out, {"model": args.model, "group_size": args.group_size, "seqlen": args.seqlen,
                             "lm_head8_group": args.lm_head8_group,
                             "max_windows": args.max_windows, "torch": torch.__version__,
                             "date": time.strftime("%Y-%m-%d")}, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
