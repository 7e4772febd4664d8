"""One-row INT4 products on this CPU: torch's int4 kernel, our C kernel (``cpu_native``; also its 8-bit path
with one scale per row, what ``compress bench --lm-head int8`` runs), fp32/bf16/fp16 F.linear, and an int4 GEMV written in torch ops and compiled by Inductor (the dequantization fused
into the reduction).

Why: on an AVX2-only CPU the INT4 checkpoint decodes only 1.10x faster than fp32 (docs/design/experiments.md).
This asks whether a GEMV of our own without a C++ extension could help. One thread; the weights
stay in cache across repeats (hot), so the fp32 rows are a lower bound for a real decode step,
where fp32 weights stream from DRAM.

    python bench/probes/cpu_gemv_probe.py
    # an AVX2-only CPU, emulated on an AVX-512 one (torch's kernels, MKL, oneDNN and ours held to AVX2):
    ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 \
        COMPRESS_CPU_MARCH=x86-64-v3 python bench/probes/cpu_gemv_probe.py
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: compress and bench.*

from compress.algos.quant import default_g_idx  # noqa: E402
from compress.kernels import cpu_native  # noqa: E402


def timed(f, n: int) -> float:
    for _ in range(max(3, n // 10)):
        f()
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t0) / n * 1e3


def gemv(x: torch.Tensor, wq: torch.Tensor, s: torch.Tensor, z: torch.Tensor, group: int) -> torch.Tensor:
    """y = W x for W = (q - z) s; wq uint8 [N, K / 2] (two codes per byte), s and z [N, K / group]."""
    n = wq.shape[0]
    q = torch.stack(((wq & 15).float(), (wq >> 4).float()), -1).view(n, -1, group)
    xg = x.view(1, -1, group)
    return (((q * xg).sum(-1) - z * xg.sum(-1)) * s).sum(-1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="1536x576,576x1536,576x576,49152x576",
                    help="comma list of OUTxIN (SmolLM2's; 49152x576 its lm_head)")
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=300)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    compiled = torch.compile(gemv, dynamic=False)
    ok, why = cpu_native.available()
    print(f"{'shape':>10} {'int4 kernel':>12} {'C kernel':>9} {'C int8':>7} {'fp32':>8} {'bf16':>8} {'fp16':>8} {'compiled int4':>14}   "
          f"(ms per call, 1 thread, {torch.__version__}; {why})")
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        g = args.group
        codes = torch.randint(0, 16, (n, k), dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        sz = torch.randn(k // g, n, 2).bfloat16()
        xb, xf, w = torch.randn(1, k).bfloat16(), torch.randn(1, k), torch.randn(n, k)
        wb, wh = w.bfloat16(), w.half()
        wq = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
        s, z, x1 = torch.rand(n, k // g), torch.randint(0, 16, (n, k // g)).float(), torch.randn(k)
        err = float((compiled(x1, wq, s, z, g) - gemv(x1, wq, s, z, g)).abs().max())
        wn = cpu_native.repack(codes.to(torch.uint8), s, z.to(torch.uint8), default_g_idx(k, g), 4, None) if ok else None
        w8 = cpu_native.repack(torch.randint(0, 256, (n, k), dtype=torch.uint8), torch.rand(n, 1),
                               torch.randint(0, 256, (n, 1), dtype=torch.uint8), default_g_idx(k, -1), 8,
                               None) if ok else None
        row = [timed(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, g, sz), args.repeats),
               timed(lambda: cpu_native.matmul(xf, wn), args.repeats) if ok else float("nan"),
               timed(lambda: cpu_native.matmul(xf, w8), args.repeats) if ok else float("nan"),
               timed(lambda: torch.nn.functional.linear(xf, w), args.repeats),
               timed(lambda: torch.nn.functional.linear(xb, wb), args.repeats),
               timed(lambda: torch.nn.functional.linear(xf.half(), wh), args.repeats),
               timed(lambda: compiled(x1, wq, s, z, g), args.repeats)]
        print(f"{shape:>10} {row[0]:12.3f} {row[1]:9.3f} {row[2]:7.3f} {row[3]:8.3f} {row[4]:8.3f} {row[5]:8.3f} "
              f"{row[6]:14.3f}   "
              f"(compiled vs eager max abs diff {err:.1e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
