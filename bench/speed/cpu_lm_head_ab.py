"""What the runtime INT8 lm_head buys in CPU decode: fp32 model vs INT4 decoder with the float lm_head vs
INT4 decoder with the INT8 lm_head (``compress.kernels.lm_head``), timed in interleaved rounds.

Why interleaved: this host's timings drift by up to 2x between runs of a script (docs/benchmarks.md),
so comparing ``bench/speed/e2e_decode.py cpu`` with and without ``--lm-head-int8`` across two runs mixes
the drift into the ratio. Here the three variants take turns, one timed run each per round, and the
medians over rounds are compared.

SmolLM2-135M, RTN INT4 g64 decoder layers on the C kernel (as ``e2e_decode.py cpu``); the lm_head
switches between its float weight (tied to the embedding) and RTN 8-bit codes, one scale and zero
point per output row.

    python bench/speed/cpu_lm_head_ab.py --threads 1 --rounds 7 --out bench/results/cpu_lm_head_ab.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: compress and bench.*

from bench.bench_common import write_results  # noqa: E402
from bench.speed.e2e_decode import SMOLLM2, quantize_linears  # noqa: E402

from compress.eval.latency import measure_latency  # noqa: E402
from compress.kernels import accelerate  # noqa: E402
from compress.kernels.lm_head import quantize_lm_head, restore_lm_head  # noqa: E402
from compress.modeling import load_model  # noqa: E402

VARIANTS = ("fp32", "int4_head_fp32", "int4_head_int8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=SMOLLM2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--generate", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    fp32 = load_model(args.model, device="cpu").model.float().eval()
    q = load_model(args.model, device="cpu").model.float().eval()
    n = quantize_linears(q, args.group_size, symmetric=False)  # RTN INT4, lm_head left in float
    head_int8 = quantize_lm_head(q, bits=8)  # quantized once, swapped in and out below
    report = accelerate(q, backend="cpu-int4", cpu_prefill="fp32", cpu_kernel="native")
    assert report.counts() == {"cpu-int4": n + 1}, report.reasons  # the decoder layers and the lm_head
    int8_module = q.get_output_embeddings()
    restore_lm_head(q, head_int8)

    def use(variant: str) -> torch.nn.Module:
        if variant == "fp32":
            return fp32
        if variant == "int4_head_int8":
            q.set_output_embeddings(int8_module)
        else:
            restore_lm_head(q, head_int8)
        return q

    runs = {v: {"prefill_ms": [], "decode_ms_per_token": []} for v in VARIANTS}
    with torch.inference_mode():
        for v in VARIANTS:  # warm-up: one untimed run each (first-call allocations, kernel build)
            measure_latency(use(v), args.prompt, 4, 1, repeats=1, warmup=0)
        for r in range(args.rounds):
            for v in VARIANTS:
                res = measure_latency(use(v), args.prompt, args.generate, 1, repeats=1, warmup=0)
                runs[v]["prefill_ms"].append(res["prefill_ms"])
                runs[v]["decode_ms_per_token"].append(res["decode_ms_per_token"])
            print(f"round {r + 1}: " + "  ".join(f"{v} {runs[v]['decode_ms_per_token'][-1]:.2f}" for v in VARIANTS)
                  + " ms/token", flush=True)
    rows = []
    base = statistics.median(runs["fp32"]["decode_ms_per_token"])
    base_pf = statistics.median(runs["fp32"]["prefill_ms"])
    print(f"\n{'variant':16} {'prefill ms':>11} {'decode ms/token':>16} {'tokens/s':>9} {'decode vs fp32':>15}")
    for v in VARIANTS:
        dec, pf = statistics.median(runs[v]["decode_ms_per_token"]), statistics.median(runs[v]["prefill_ms"])
        rows.append({"variant": v, "prefill_ms": pf, "decode_ms_per_token": dec, "decode_tokens_per_s": 1e3 / dec,
                     "decode_speedup_vs_fp32": base / dec, "prefill_speedup_vs_fp32": base_pf / pf, "runs": runs[v]})
        print(f"{v:16} {pf:11.1f} {dec:16.2f} {1e3 / dec:9.1f} {base / dec:14.2f}x")
    write_results(args.out, {"model": args.model, "threads": args.threads, "prompt": args.prompt,
                             "generate": args.generate, "rounds": args.rounds, "group_size": args.group_size,
                             "quantized_decoder_layers": n, "lm_head_int8": head_int8.as_dict(),
                             "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
