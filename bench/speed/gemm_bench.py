"""Prefill-sized W4A16 products on the GPU: our GEMM (``compress.kernels.triton_gemm``, codes unpacked
in its tiles) against fp16 cuBLAS on the dequantized weight and against dequantize + cuBLAS (the
path for more than 16 rows until session 13).

For each shape and row count, every candidate config of the GEMM is first checked against the fp64
product of the dequantized weight on a fresh random input written into a NaN-filled buffer, then
timed like ``bench/speed/kernel_bench.py`` (CUDA graph of 64 calls over rotated weight copies, median of 5
replays; ``compress.kernels.gpu_timing.graph_time_ms``). Prints a table, writes JSON.

    python3 bench/speed/gemm_bench.py [--rows 32,128,512,2048] [--shapes 4096x4096,...] [--tile-major row]
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

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: compress and bench.*

from compress.kernels import cuda_w4a16 as cw  # noqa: E402

try:
    from compress.kernels import triton_gemm as tg  # noqa: E402
    from compress.kernels import triton_w4a16 as tw  # noqa: E402
except ImportError as e:
    sys.exit(f"gemm_bench needs a CUDA GPU with Triton installed ({e})")
from compress.kernels.gpu_timing import graph_time_ms  # noqa: E402
from bench.speed.kernel_bench import quantized_weight, rel_err  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (8192, 8192)]
ROWS = [32, 128, 512, 2048]


def run_shape(n: int, k: int, gs: int, rows: list[int], symmetric: bool) -> list[dict]:
    q, s, z, g, wref, wdq16 = quantized_weight(n, k, gs, symmetric)  # kernel_bench's weight of this shape
    wt = tw.repack(q, s, z, g, 4, symmetric, None, "cuda", kernel="cuda")
    copies16 = [wdq16] + [wdq16.clone() for _ in range(tw.copies_for(n * k * 2) - 1)]
    copies4 = [wt] + [wt.clone() for _ in range(tw.copies_for(wt.nbytes()) - 1)]
    out = []
    for m in rows:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        xe = torch.randn(m, k, device="cuda", dtype=torch.float16)  # fresh input for the checks
        ref_e = xe.double() @ wref.t()
        row = {"out": n, "in": k, "rows": m, "group_size": gs, "symmetric": symmetric, "sweep": []}
        t0 = time.time()
        for cfg in tg.candidate_configs(m):
            buf = torch.full((m, n), float("nan"), device="cuda", dtype=torch.float16)
            try:
                err = rel_err(tg.gemm(xe, wt, cfg, buf), ref_e)
            except Exception as e:  # e.g. a tile that needs more shared memory than the GPU has
                row["sweep"].append({"config": cfg.as_dict(), "error": f"{type(e).__name__}: {e}"[:300], "ms": None})
                continue
            if not err < 5e-3:  # NaN (unwritten) or wrong: reported, never timed
                row["sweep"].append({"config": cfg.as_dict(), "err": err, "ms": None})
                continue
            ms = graph_time_ms([lambda c=c, cfg=cfg: tg.gemm(x, c, cfg) for c in copies4])
            row["sweep"].append({"config": cfg.as_dict(), "err": err, "ms": ms})
        timed = [r for r in row["sweep"] if r["ms"] is not None]
        best = min(timed, key=lambda r: r["ms"]) if timed else None
        dflt = tg.default_config(m, n)
        row["default_config"] = dflt.as_dict()
        row["err_default"] = rel_err(tg.gemm(xe, wt, dflt), ref_e)
        row["err_dequant"] = rel_err(tw.dequant_matmul(xe, wt), ref_e)
        t = {"fp16": graph_time_ms([lambda c=c: F.linear(x, c) for c in copies16]),
             "dequant": graph_time_ms([lambda c=c: tw.dequant_matmul(x, c) for c in copies4]),
             "gemm_default": graph_time_ms([lambda c=c: tg.gemm(x, c, dflt) for c in copies4])}
        if best is not None:
            t["gemm_best"] = best["ms"]
            row["best_config"] = best["config"]
        row["us"] = {key: v * 1e3 for key, v in t.items()}
        row["speedup_vs_fp16"] = {key: t["fp16"] / v for key, v in t.items() if key != "fp16"}
        row["tflops"] = {key: 2 * m * n * k / (v * 1e9) for key, v in t.items()}
        row["sweep_s"] = time.time() - t0
        out.append(row)
        sp = row["speedup_vs_fp16"]
        print(f"{n:>6}x{k:<6} M={m:<5} fp16 {row['us']['fp16']:8.1f}us  dequant {sp['dequant']:.2f}x  gemm default "
              f"{sp['gemm_default']:.2f}x  best {sp.get('gemm_best', float('nan')):.2f}x {row.get('best_config')} "
              f"err {row['err_default']:.1e} [{row['sweep_s']:.0f}s]", flush=True)
    del copies4, copies16
    torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/gemm_bench.json")
    ap.add_argument("--rows", default=",".join(map(str, ROWS)), help="activation rows (comma list, each > 16)")
    ap.add_argument("--shapes", default=None, help="e.g. 4096x4096,8192x8192 (default: the five Llama shapes)")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--symmetric", action="store_true")
    ap.add_argument("--tile-major", default=None, choices=sorted(cw.TILE_LAYOUTS),
                    help="the layout repack writes (default: $COMPRESS_TILE_LAYOUT, else both_evf)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gemm_bench needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.tile_major is not None:
        cw.TILE_MAJOR = cw.TILE_LAYOUTS[args.tile_major]
    rows = [int(r) for r in args.rows.split(",") if r]
    if any(r <= 16 for r in rows):
        print("--rows: the GEMM is for more than 16 rows (fewer run the CUDA kernel)", file=sys.stderr)
        return 2
    shapes = SHAPES if not args.shapes else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    t0 = time.time()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "tile_major": cw.tile_layout_name(), "group_size": args.group_size, "symmetric": args.symmetric,
              "timing": "CUDA graph of 64 calls over rotated weight copies (>= 4x L2), median of 5 replays",
              "rows": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for n, k in shapes:
        result["rows"] += run_shape(n, k, args.group_size, rows, args.symmetric)
        out.write_text(json.dumps(result, indent=1))  # partial results survive a timeout
    result["seconds"] = time.time() - t0
    out.write_text(json.dumps(result, indent=1))
    print("\nshape           M   fp16_us  dequant_x  gemm_default_x  gemm_best_x  best_TFLOP/s")
    for r in result["rows"]:
        sp = r["speedup_vs_fp16"]
        print(f"{r['out']:>6}x{r['in']:<6} {r['rows']:>5} {r['us']['fp16']:9.1f} {sp['dequant']:9.2f} "
              f"{sp['gemm_default']:14.2f} {sp.get('gemm_best', float('nan')):12.2f} "
              f"{r['tflops'].get('gemm_best', float('nan')):12.0f}")
    for m in rows:
        best = [r["speedup_vs_fp16"].get("gemm_best", float("nan")) for r in result["rows"] if r["rows"] == m]
        deq = [r["speedup_vs_fp16"]["dequant"] for r in result["rows"] if r["rows"] == m]
        print(f"M={m}: median over shapes, gemm (best) {statistics.median(best):.2f}x, "
              f"dequant {statistics.median(deq):.2f}x of fp16")
    return 0


if __name__ == "__main__":
    sys.exit(main())
