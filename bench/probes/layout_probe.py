"""Does the CUDA W4A16 kernel read HBM better when each warp's bytes are contiguous? (GPU)

Until session 10 the kernel's codes were row-major ([N, KP / 8]): one step of a 16-row tile reads 16 segments of 64
or 128 bytes, one per row, 2 KB apart on a 4096-column layer; its scales and zero points are
[G, N], so a tile's 32 + 16 bytes per group sit N * 2 bytes apart from the next group's. This probe
times, on the same weights and in the same run, five variants the kernel can read (``TILED`` /
``SZT`` in ``cuda/w4a16.cu``):

- ``base``: row-major codes and [G, N] scales and zero points (the layout until session 10);
- ``tiled``: codes tile-major, [N / 16][KP / 256][2][16 rows][4 chunks] x 16 bytes: a tile's step
  is one contiguous 1 or 2 KB region;
- ``szt``: scales and zero points tile-major, [N / 16][G][16];
- ``both``;
- ``both_evf``: both, the weight copies with an L2 evict-first cache policy (``EVF``).

Each layout is tuned over every candidate config (each checked against the dequantized weight),
then the winners and fp16 cuBLAS are timed in interleaved rounds (CUDA graph of 64 calls over
rotated weight copies, as ``bench/speed/kernel_bench.py``); the medians of the rounds are printed.

    python bench/probes/layout_probe.py --out $OUT/layout_probe.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: compress and bench.*

from compress.algos.quant import default_g_idx, rtn_quantize  # noqa: E402
from compress.kernels import cuda_w4a16 as cw  # noqa: E402
from compress.kernels import layout  # noqa: E402
try:
    from compress.kernels import triton_w4a16 as tw  # noqa: E402
except ImportError as e:  # no Triton: a CPU-only install
    sys.exit(f"layout_probe needs a CUDA GPU with Triton installed ({e})")
from compress.kernels.gpu_timing import graph_time_ms  # noqa: E402
from compress.kernels.packed import dequantize_packed  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (8192, 8192)]
VARIANTS = {"base": (False, False, False), "tiled": (True, False, False), "szt": (False, True, False),
            "both": (True, True, False), "both_evf": (True, True, True)}


def variant(wt, codes: bool, sz: bool, evf: bool):
    """``wt`` (any layout) with codes / scales and zero points stored as asked."""
    words, scales, zeros = wt.row_major_words(), wt.group_major(wt.scales), wt.group_major(wt.zeros)
    v = replace(wt, configs={}, launchers={}, _scales_as={}, _in_group_order=None, codes_tiled=codes, sz_tiled=sz,
                evict_first=evf)
    v.words = layout.tile_major(words) if codes else words.clone()
    v.scales = layout.tile_groups(scales) if sz else scales.clone()
    v.zeros = None if zeros is None else (layout.tile_groups(zeros) if sz else zeros.clone())
    return v


def run_shape(n: int, k: int, m: int, rounds: int, symmetric: bool, stages: tuple[int, ...]) -> dict:
    torch.manual_seed(n * 7 + k)
    w = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
    q, s, z = rtn_quantize(w, 4, 128, symmetric)
    base = tw.repack(q, s.to(torch.float16), z, default_g_idx(k, 128, device="cuda"), 4, symmetric, None, "cuda",
                     kernel="cuda")
    wdq = dequantize_packed(base, torch.float32)
    ref = lambda x: x.float() @ wdq.t()  # noqa: E731
    wts = {name: variant(base, *flags) for name, flags in VARIANTS.items()}
    row = {"out": n, "in": k, "batch": m, "symmetric": symmetric, "best": {}, "err": {}, "tune_best_us": {}}
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    rx = ref(x)
    y0 = None  # the first variant's ("base") output: the others must match it bit for bit
    for name, wt in wts.items():
        cands = [c for c in cw.candidate_configs(m, n, cw.smem_limit(wt.words.device)) if c.stages in stages]
        best, sweep = tw.tune(wt, m, candidates=cands, reference=ref)
        row["best"][name] = best.as_dict()
        row["tune_best_us"][name] = min(r["ms"] for r in sweep) * 1e3
        y = cw.matmul(x, wt, best)
        y0 = y if y0 is None else y0
        row["err"][name] = float((y.float() - rx).norm() / rx.norm())
        row.setdefault("bitwise_equal_base", {})[name] = bool(torch.equal(y, y0))
    w16 = wdq.half()
    copies16 = [w16] + [w16.clone() for _ in range(tw.copies_for(n * k * 2) - 1)]
    copies = {name: [wt] + [wt.clone() for _ in range(tw.copies_for(wt.nbytes()) - 1)] for name, wt in wts.items()}
    times: dict[str, list[float]] = {"fp16": [], **{name: [] for name in wts}}
    for _ in range(rounds):
        times["fp16"].append(graph_time_ms([lambda c=c: F.linear(x, c) for c in copies16]))
        for name, wt in wts.items():
            cfg = wt.configs[tw._bucket(m)]
            times[name].append(graph_time_ms([lambda c=c, cfg=cfg: cw.matmul(x, c, cfg) for c in copies[name]]))
    row["us_rounds"] = {key: [t * 1e3 for t in v] for key, v in times.items()}
    row["us"] = {key: statistics.median(v) * 1e3 for key, v in times.items()}
    row["x_fp16"] = {name: row["us"]["fp16"] / row["us"][name] for name in wts}
    row["gbps"] = {name: base.nbytes() / (row["us"][name] * 1e3) for name in wts}
    del copies, copies16
    torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/layout_probe.json")
    ap.add_argument("--shapes", default=None, help="e.g. 14336x4096,8192x8192 (default: the five Llama shapes)")
    ap.add_argument("--batches", default="1")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--symmetric", action="store_true")
    ap.add_argument("--stages", default="2,4", help="pipeline depths among the candidates (2: half the tuning time; "
                    "the larger shapes' winners had 2 in every earlier table)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("layout_probe needs a CUDA GPU", file=sys.stderr)
        return 2
    shapes = SHAPES if not args.shapes else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "rows": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"{'shape':>12} {'M':>2} {'fp16':>6} " + " ".join(f"{v:>14}" for v in VARIANTS), flush=True)
    for n, k in shapes:
        for m in [int(b) for b in args.batches.split(",")]:
            r = run_shape(n, k, m, args.rounds, args.symmetric, tuple(int(v) for v in args.stages.split(",")))
            result["rows"].append(r)
            out.write_text(json.dumps(result, indent=1))
            cells = " ".join(f"{r['us'][v]:6.2f} {r['x_fp16'][v]:5.2f}x" + ("" if r["bitwise_equal_base"][v] else "!")
                             for v in VARIANTS)
            print(f"{n:>6}x{k:<5} {m:>2} {r['us']['fp16']:6.1f} {cells}  best {r['best']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
