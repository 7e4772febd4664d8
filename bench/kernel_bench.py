"""W4A16 kernel vs fp16 cuBLAS vs torch's tinygemm int4 kernel, on Llama-sized matrices (GPU).

For each (out, in) shape and batch M: checks our kernel against a float64 reference on fresh
random inputs (poisoned output buffer where the kernel writes directly), tunes its config, then times
(per-call device time of 64 calls captured in one CUDA graph, cycling over enough weight copies
that they do not fit in L2, so weights come from HBM and no host launch overhead counts: the
setting of graph-captured decode; median of 5 replays):

- ``fp16``: ``F.linear`` on the fp16 weight (cuBLAS);
- ``ours``: our kernel with the best tuned config and plane width (and the untuned default);
- ``tinygemm``: ``torch.ops.aten._weight_int4pack_mm`` (bf16, g128), as a reference row;
- for M > 16 also ``dequant``: our dequantize kernel + cuBLAS.

Achieved GB/s counts the bytes each method must read or write once: weights (int4 codes + fp16
scales + uint8 zeros for ours; fp16 for cuBLAS; codes + bf16 scales-and-zeros for tinygemm),
activations and outputs. Also measures the device-to-device copy bandwidth as the ceiling.

    python bench/kernel_bench.py --out $OUT/kernel_bench.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress.algos.quant import default_g_idx, dequantize_weight, rtn_quantize  # noqa: E402
from compress.kernels import triton_w4a16 as tw  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (8192, 8192)]
BATCHES = [1, 4, 16]


def bench_ms(fn) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth() -> float:
    """Device-to-device copy GB/s (bytes read + written), the memory ceiling."""
    a = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = bench_ms(lambda: b.copy_(a))
    return 2 * a.numel() / ms / 1e6


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm())


def tinygemm_setup(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, gs: int):
    """torch's CUDA int4 kernel: codes packed two per byte, bf16 [K/gs, N, 2] scales and zeros
    with w = (q - 8) * scale + zero (the CPU kernel's convention, checked by the error column)."""
    packed_u8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
    packed = torch.ops.aten._convert_weight_to_int4pack(packed_u8.contiguous(), 8)
    sz = torch.stack([s.t(), ((8 - z.float()) * s).t()], -1).to(torch.bfloat16).contiguous()
    return packed, sz


def run_shape(n: int, k: int, gs: int, symmetric: bool, batches: list[int], widths: list[int]) -> list[dict]:
    torch.manual_seed(n * 7 + k)
    w = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
    q, s, z = rtn_quantize(w, 4, gs, symmetric)
    g = default_g_idx(k, gs, device="cuda")
    wref = dequantize_weight(q, s, z, g).double()
    wdq16 = wref.to(torch.float16)  # the fp16 baseline multiplies the same (dequantized) weight
    try:
        tg = tinygemm_setup(q.int(), s, z, gs)
    except Exception as e:  # a torch build without the CUDA int4 kernel: leave the row out
        print(f"tinygemm unavailable: {e}", flush=True)
        tg = None
    # Plane width is a packing choice made at load: tune batch 1 for each, keep the fastest.
    per_width = {}
    for width in widths:
        wt_w = tw.repack(q, s, z, g, 4, symmetric, None, "cuda", width=width)
        cfg, sweep = tw.tune(wt_w, 1)
        per_width[width] = (min(r["ms"] for r in sweep), wt_w, sorted(sweep, key=lambda r: r["ms"])[:6])
    width = min(per_width, key=lambda wd: per_width[wd][0])
    wt = per_width[width][1]
    groups = wt.n_groups
    rows = []
    for m in batches:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        ref = x.double() @ wref.t()
        row = {"out": n, "in": k, "batch": m, "group_size": gs, "symmetric": symmetric, "width": width,
               "batch1_ms_per_width": {wd: v[0] for wd, v in per_width.items()}}
        default_cfg = tw.default_config(m, n, wt.n_blocks)
        row["err_ours_default"] = rel_err(tw.launch(x, wt, default_cfg), ref)
        if default_cfg.split_k == 1:
            poisoned = torch.full((m, n), float("nan"), device="cuda", dtype=torch.float16)
            row["all_written"] = bool(torch.isfinite(tw.launch(x, wt, default_cfg, out=poisoned)).all())
        row["err_fp16"] = rel_err(F.linear(x, wdq16), ref)
        xb = x.to(torch.bfloat16)
        if tg is not None:
            row["err_tinygemm"] = rel_err(torch.ops.aten._weight_int4pack_mm(xb, tg[0], gs, tg[1]), ref)
        if m == 1:
            best, row["sweep"] = wt.configs[1], per_width[width][2]
        elif m <= 16:
            best, sweep = tw.tune(wt, m)
            row["sweep"] = sorted(sweep, key=lambda r: r["ms"])[:6]
        else:
            best = default_cfg
        row["best_config"] = best.as_dict()
        row["err_ours_best"] = rel_err(tw.launch(x, wt, best), ref)
        copies16 = [wdq16] + [wdq16.clone() for _ in range(tw.copies_for(n * k * 2) - 1)]
        copies4 = [wt] + [wt.clone() for _ in range(tw.copies_for(wt.nbytes()) - 1)]
        t = {
            "fp16": tw.graph_time_ms([lambda c=c: F.linear(x, c) for c in copies16]),
            "ours": tw.graph_time_ms([lambda c=c: tw.launch(x, c, best) for c in copies4]),
            "ours_default": tw.graph_time_ms([lambda c=c: tw.launch(x, c, default_cfg) for c in copies4]),
        }
        if tg is not None:
            tgs = [tg] + [(tg[0].clone(), tg[1].clone()) for _ in range(tw.copies_for(n * k // 2) - 1)]
            t["tinygemm"] = tw.graph_time_ms([lambda c=c: torch.ops.aten._weight_int4pack_mm(xb, c[0], gs, c[1])
                                              for c in tgs])
        act = m * k * 2 + m * n * 2
        nbytes = {"fp16": n * k * 2 + act, "ours": wt.nbytes() + act, "ours_default": wt.nbytes() + act,
                  "tinygemm": n * k // 2 + groups * n * 4 + act}
        if m > 16:
            row["err_dequant"] = rel_err(tw.dequant_matmul(x, wt), ref)
            t["dequant"] = tw.graph_time_ms([lambda c=c: tw.dequant_matmul(x, c) for c in copies4])
            nbytes["dequant"] = wt.nbytes() + n * k * 4 + act
        del copies16, copies4
        row["us"] = {key: v * 1e3 for key, v in t.items()}
        row["gbps"] = {key: nbytes[key] / (t[key] * 1e6) for key in t}
        row["speedup_vs_fp16"] = {key: t["fp16"] / t[key] for key in t if key != "fp16"}
        row["speedup_vs_fp16"].setdefault("tinygemm", float("nan"))
        rows.append(row)
        print(f"{n:>6}x{k:<6} M={m:<4} fp16 {t['fp16']*1e3:8.1f}us  ours {t['ours']*1e3:8.1f}us "
              f"({row['speedup_vs_fp16']['ours']:.2f}x, {row['gbps']['ours']:.0f} GB/s, width {width})  "
              f"tinygemm {row['speedup_vs_fp16']['tinygemm']:.2f}x  err {row['err_ours_best']:.1e}", flush=True)
    torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/kernel_bench.json")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--symmetric", action="store_true")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--large-m", default="512", help="extra prefill-sized batches (comma list, '' for none)")
    ap.add_argument("--widths", default="16,32,64", help="plane widths to try (packing layouts)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernel_bench needs a CUDA GPU", file=sys.stderr)
        return 2
    batches = [int(b) for b in args.batches.split(",") if b] + [int(b) for b in args.large_m.split(",") if b]
    t0 = time.time()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "copy_gbps": copy_bandwidth(), "rows": [],
              "timing": "CUDA graph of 64 calls over rotated weight copies (>= 4x L2), median of 5 replays"}
    import triton

    result["triton"] = triton.__version__
    print(f"device {result['device']}, copy bandwidth {result['copy_gbps']:.0f} GB/s", flush=True)
    for n, k in SHAPES:
        result["rows"] += run_shape(n, k, args.group_size, args.symmetric, batches,
                                    [int(w) for w in args.widths.split(",")])
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))  # partial results survive a timeout
    result["seconds"] = time.time() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("\nshape            M   fp16_us  ours_us  x_fp16  GB/s  tinygemm_x  err")
    for r in result["rows"]:
        print(f"{r['out']:>6}x{r['in']:<6} {r['batch']:>4} {r['us']['fp16']:8.1f} {r['us']['ours']:8.1f} "
              f"{r['speedup_vs_fp16']['ours']:6.2f} {r['gbps']['ours']:6.0f} {r['speedup_vs_fp16']['tinygemm']:8.2f}"
              f"  {r['err_ours_best']:.1e}")
    big = [r["speedup_vs_fp16"]["ours"] for r in result["rows"] if r["batch"] == 1 and r["out"] * r["in"] > 4096 * 4096]
    print(f"batch-1 speedup on the larger shapes: median {statistics.median(big):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
