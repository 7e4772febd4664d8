"""W4A16 kernels vs fp16 cuBLAS vs torch's tinygemm int4 kernel, on Llama-sized matrices (GPU).

For each (out, in) shape and batch M: tunes our CUDA kernel (``cuda_w4a16``, every candidate
config) and checks the chosen config and the untuned default against a float64 reference on
fresh random inputs (outputs poisoned with NaN first), then times (per-call device time of 64 calls
captured in one CUDA graph, cycling over enough weight copies that they do not fit in L2, so weights
come from HBM and no host launch overhead counts: the setting of graph-captured decode; median of 5
replays):

- ``fp16``: ``F.linear`` on the fp16 weight (cuBLAS);
- ``ours``: the CUDA kernel with the best tuned config; ``ours_default``: its untuned default;
  ``ours_nopdl``: the best config launched without programmatic dependent launch (on sm_90+ ``ours``
  lets each call's weight copies start while the previous call finishes, as consecutive layers do);
- ``triton``: the Triton kernel (plane width 16) with its default config, the previous path;
- ``tinygemm``: ``torch.ops.aten._weight_int4pack_mm`` (bf16, g128), as a reference row (not with
  ``--act-order``: its groups must be contiguous);
- with ``--act-order`` (groups along a random column permutation, as GPTQ's desc_act writes them):
  ``ours`` is the eager path, one ``index_select`` launch and then the kernel;
- for M > 16: ``ours`` is the public path, dequantize (CUDA kernel) + cuBLAS.

Achieved GB/s counts the bytes each method must read or write once: weights (int4 codes + fp16
scales + uint8 zeros for ours; fp16 for cuBLAS; codes + bf16 scales-and-zeros for tinygemm),
activations and outputs. Also measures the device-to-device copy bandwidth as the ceiling.

    python bench/speed/kernel_bench.py --out $OUT/kernel_bench.json
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

from compress.algos.quant import default_g_idx, dequantize_weight, rtn_quantize, rtn_quantize_permuted  # noqa: E402
from compress.kernels import cuda_w4a16 as cw  # noqa: E402
try:
    from compress.kernels import triton_w4a16 as tw  # noqa: E402
except ImportError as e:  # no Triton: a CPU-only install
    sys.exit(f"kernel_bench needs a CUDA GPU with Triton installed ({e})")
from compress.kernels.gpu_timing import graph_time_ms  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (8192, 8192)]
BATCHES = [1, 4, 16]


def copy_bandwidth() -> float:
    """Device-to-device copy GB/s (bytes read + written), the memory ceiling (median of 20)."""
    a = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    times = []
    for _ in range(20):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        b.copy_(a)
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1))
    return 2 * a.numel() / statistics.median(times) / 1e6


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm())


def poisoned_err(fn, m: int, n: int, ref: torch.Tensor) -> float:
    """Relative error of ``fn(out)`` written into a NaN-filled buffer (NaN if anything is unwritten)."""
    out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.float16)
    y = fn(out)
    return rel_err(y, ref) if bool(torch.isfinite(y).all()) else float("nan")


def tinygemm_setup(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, gs: int):
    """torch's CUDA int4 kernel: codes packed two per byte, bf16 [K/gs, N, 2] scales and zeros
    with w = (q - 8) * scale + zero (the CPU kernel's convention, checked by the error column)."""
    packed_u8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
    packed = torch.ops.aten._convert_weight_to_int4pack(packed_u8.contiguous(), 8)
    sz = torch.stack([s.t(), ((8 - z.float()) * s).t()], -1).to(torch.bfloat16).contiguous()
    return packed, sz


def quantized_weight(n: int, k: int, gs: int, symmetric: bool, act_order: bool = False):
    """RTN codes of a random [n, k] weight seeded by its shape (so every benchmark times the same
    weight): (q, s, z, g_idx, the dequantized weight in fp64, the same in fp16 for cuBLAS)."""
    torch.manual_seed(n * 7 + k)
    w = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
    if act_order:
        q, s, z, g = rtn_quantize_permuted(w, 4, gs, symmetric, torch.randperm(k))
    else:
        q, s, z = rtn_quantize(w, 4, gs, symmetric)
        g = default_g_idx(k, gs, device="cuda")
    s = s.to(torch.float16)
    wref = dequantize_weight(q, s, z, g).double()
    return q, s, z, g, wref, wref.to(torch.float16)  # the fp16 baseline multiplies the same weight


def run_shape(n: int, k: int, gs: int, symmetric: bool, batches: list[int], copy_gbps: float,
              act_order: bool = False) -> list[dict]:
    q, s, z, g, wref, wdq16 = quantized_weight(n, k, gs, symmetric, act_order)
    tg = None
    if not act_order:
        try:
            tg = tinygemm_setup(q.int(), s, z, gs)
        except Exception as e:  # a torch build without the CUDA int4 kernel: leave the row out
            print(f"tinygemm unavailable: {e}", flush=True)
    wt = tw.repack(q, s, z, g, 4, symmetric, None, "cuda", kernel="cuda")
    wtt = tw.repack(q, s, z, g, 4, symmetric, None, "cuda", width=16, kernel="triton")
    rows = []
    for m in batches:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        ref = x.double() @ wref.t()
        row = {"out": n, "in": k, "batch": m, "group_size": gs, "symmetric": symmetric, "act_order": act_order}
        t0 = time.time()
        if m <= 16:
            best, sweep = tw.tune(wt, m)
            row["sweep"] = sorted(sweep, key=lambda r: r["ms"])
            default_cfg = cw.default_config(m, n, tiled=wt.codes_tiled)
            row["best_config"], row["default_config"] = best.as_dict(), default_cfg.as_dict()
            xe = torch.randn(m, k, device="cuda", dtype=torch.float16)  # fresh input for the checks
            ref_e = xe.double() @ wref.t()
            row["err_ours_best"] = poisoned_err(lambda o: cw.matmul(xe, wt, best, o), m, n, ref_e)
            row["err_ours_default"] = poisoned_err(lambda o: cw.matmul(xe, wt, default_cfg, o), m, n, ref_e)
            tcfg = tw.default_config(m, n, wtt.n_blocks)
            row["triton_config"] = tcfg.as_dict()
            row["err_triton"] = rel_err(tw.launch(x, wtt, tcfg), ref)
        else:
            row["err_ours_best"] = rel_err(tw.w4a16_matmul(x, wt), ref)
        row["tune_s"] = time.time() - t0
        row["err_fp16"] = rel_err(F.linear(x, wdq16), ref)
        xb = x.to(torch.bfloat16)
        if tg is not None:
            row["err_tinygemm"] = rel_err(torch.ops.aten._weight_int4pack_mm(xb, tg[0], gs, tg[1]), ref)
        copies16 = [wdq16] + [wdq16.clone() for _ in range(tw.copies_for(n * k * 2) - 1)]
        ncopy = tw.copies_for(wt.nbytes())
        copies4 = [wt] + [wt.clone() for _ in range(ncopy - 1)]
        t = {"fp16": graph_time_ms([lambda c=c: F.linear(x, c) for c in copies16])}
        if m <= 16:
            t["ours"] = graph_time_ms([lambda c=c: cw.matmul(x, c, best) for c in copies4])
            t["ours_default"] = graph_time_ms([lambda c=c: cw.matmul(x, c, default_cfg) for c in copies4])
            if wt.pdl:  # the same launches without programmatic dependent launch
                for c in copies4:
                    c.pdl = False
                t["ours_nopdl"] = graph_time_ms([lambda c=c: cw.matmul(x, c, best) for c in copies4])
                for c in copies4:
                    c.pdl = True
            del copies4
            copiest = [wtt] + [wtt.clone() for _ in range(ncopy - 1)]
            t["triton"] = graph_time_ms([lambda c=c: tw.launch(x, c, tcfg) for c in copiest])
            del copiest
        else:
            t["ours"] = graph_time_ms([lambda c=c: tw.w4a16_matmul(x, c) for c in copies4])
            del copies4
        if tg is not None:
            tgs = [tg] + [(tg[0].clone(), tg[1].clone()) for _ in range(tw.copies_for(n * k // 2) - 1)]
            t["tinygemm"] = graph_time_ms([lambda c=c: torch.ops.aten._weight_int4pack_mm(xb, c[0], gs, c[1])
                                              for c in tgs])
            del tgs
        del copies16
        act = m * k * 2 + m * n * 2
        ours_bytes = wt.nbytes() + act + (n * k * 4 if m > 16 else 0)  # + writing and reading W for dequant
        nbytes = {"fp16": n * k * 2 + act, "ours": ours_bytes, "ours_default": ours_bytes, "ours_nopdl": ours_bytes,
                  "triton": wtt.nbytes() + act, "tinygemm": n * k // 2 + wt.n_groups * n * 4 + act}
        row["us"] = {key: v * 1e3 for key, v in t.items()}
        row["gbps"] = {key: nbytes[key] / (t[key] * 1e6) for key in t}
        row["speedup_vs_fp16"] = {key: t["fp16"] / t[key] for key in t if key != "fp16"}
        row["floor_us"] = (wt.nbytes() + act) / copy_gbps / 1e3
        rows.append(row)
        sp = row["speedup_vs_fp16"]
        print(f"{n:>6}x{k:<6} M={m:<4} fp16 {t['fp16']*1e3:7.1f}us  ours {t['ours']*1e3:7.1f}us ({sp['ours']:.2f}x, "
              f"{row['gbps']['ours']:.0f} GB/s; no PDL {sp.get('ours_nopdl', float('nan')):.2f}x) triton {sp.get('triton', float('nan')):.2f}x tinygemm "
              f"{sp.get('tinygemm', float('nan')):.2f}x err {row['err_ours_best']:.1e} "
              f"best {row.get('best_config')} [{row['tune_s']:.0f}s tune]", flush=True)
    torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/kernel_bench.json")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--symmetric", action="store_true")
    ap.add_argument("--act-order", action="store_true",
                    help="groups along a random column permutation (GPTQ desc_act; the kernel then runs "
                         "after an index_select launch)")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--large-m", default="512", help="extra prefill-sized batches (comma list, '' for none)")
    ap.add_argument("--shapes", default=None, help="e.g. 4096x4096,8192x8192 (default: the five Llama shapes)")
    ap.add_argument("--tile-major", default=None, choices=sorted(cw.TILE_LAYOUTS),
                    help="the layout repack writes for our kernel (cuda_w4a16.TILE_MAJOR; default: $COMPRESS_TILE_LAYOUT, else both_evf)")
    args = ap.parse_args(argv)
    if args.tile_major is not None:
        cw.TILE_MAJOR = cw.TILE_LAYOUTS[args.tile_major]
    args.tile_major = cw.tile_layout_name()  # for the JSON
    if not torch.cuda.is_available():
        print("kernel_bench needs a CUDA GPU", file=sys.stderr)
        return 2
    batches = [int(b) for b in args.batches.split(",") if b] + [int(b) for b in args.large_m.split(",") if b]
    shapes = SHAPES if not args.shapes else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    t0 = time.time()
    import triton

    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "date": time.strftime("%Y-%m-%d"), "copy_gbps": copy_bandwidth(), "rows": [],
              "timing": "CUDA graph of 64 calls over rotated weight copies (>= 4x L2), median of 5 replays",
              "tile_major": args.tile_major}
    print(f"device {result['device']}, copy bandwidth {result['copy_gbps']:.0f} GB/s", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for n, k in shapes:
        result["rows"] += run_shape(n, k, args.group_size, args.symmetric, batches, result["copy_gbps"], args.act_order)
        out.write_text(json.dumps(result, indent=1))  # partial results survive a timeout
    result["seconds"] = time.time() - t0
    out.write_text(json.dumps(result, indent=1))
    print("\nshape          M  fp16_us ours_us  x_fp16  GB/s  default_x triton_x tinygemm_x  err")
    nan = float("nan")
    for r in result["rows"]:
        sp = r["speedup_vs_fp16"]
        print(f"{r['out']:>6}x{r['in']:<6} {r['batch']:>3} {r['us']['fp16']:7.1f} {r['us']['ours']:7.1f} "
              f"{sp['ours']:6.2f} {r['gbps']['ours']:6.0f} {sp.get('ours_default', nan):8.2f} {sp.get('triton', nan):8.2f} "
              f"{sp.get('tinygemm', nan):8.2f}  {r['err_ours_best']:.1e}")
    big = [r["speedup_vs_fp16"]["ours"] for r in result["rows"] if r["batch"] == 1 and r["out"] * r["in"] > 4096 * 4096]
    if big:
        print(f"batch-1 speedup on the larger shapes: median {statistics.median(big):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
