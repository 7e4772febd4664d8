"""CPU: where dequantize + dense GEMM overtakes the int4 kernels, by activation rows.

``compress.kernels.dispatch.CPU_DENSE_MIN_ROWS`` switches a CPU INT4 layer from an int4 kernel
(memory-light) to dequantizing its weight for the call and running a dense GEMM (compute-bound
shapes), in bf16 where the CPU multiplies bf16 natively (AMX / AVX512-BF16) and in float32 otherwise.
This times, per layer shape and row count: torch's int4 kernel (bf16), our C kernel (``cpu_native``,
fp32), the C kernel's dense path (``cpu_native.dense_matmul``: blocks dequantized in C + fp32 GEMM),
and torch dequantize + dense bf16 GEMM (``cpu_int4.dense_linear``); one thread by
default, RTN INT4 weights with group 64 (the SmolLM2 default run), median of ``--repeats`` calls.

    python bench/speed/cpu_crossover.py                       # SmolLM2-135M shapes, 1 thread
    python bench/speed/cpu_crossover.py --shapes 11008x4096 --rows 8,16,32 --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: compress and bench.*

from compress.algos.quant import default_g_idx, rtn_quantize  # noqa: E402
from compress.kernels import cpu_int4, cpu_native  # noqa: E402


def median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="1536x576,576x1536,576x576,192x576", help="out x in, comma list")
    ap.add_argument("--rows", default="1,4,8,12,16,18,20,22,24,32,48", help="activation rows, comma list")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)
    ok, why = cpu_int4.available()
    if not ok:
        raise SystemExit(f"torch's CPU int4 kernel is unavailable here: {why}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [int(r) for r in args.rows.split(",")]
    native = cpu_native.available()
    if not native[0]:
        raise SystemExit(f"the C kernel is unavailable here: {native[1]}")
    print(f"torch {torch.__version__}, {args.threads} thread(s), group {args.group_size}, native bf16 GEMM: "
          f"{cpu_int4.fast_bf16_matmul()}, {native[1]}; ms per call: torch int4 / C int4 / dequantize (C) + "
          "dense fp32 / torch dequantize + dense bf16 (* marks the fastest)")
    print(f"{'out x in':>11} " + " ".join(f"{'M=' + str(m):>30}" for m in rows))
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        q, s, z = rtn_quantize(torch.randn(n, k) * 0.02, 4, args.group_size, False)
        g = default_g_idx(k, args.group_size)
        wt = cpu_int4.repack(q, s, z, g, 4, None)
        wn = cpu_native.repack(q, s, z, g, 4, None)
        scratch = cpu_native.Scratch()  # as accelerate() gives each model
        bf16 = cpu_int4.dense_linear(q, s, z, g, None, torch.bfloat16)
        fns = [lambda x: cpu_int4.int4_matmul(x, wt), lambda x: cpu_native.matmul(x, wn),
               lambda x: cpu_native.dense_matmul(x, wn, torch.float32, scratch), bf16]
        cells = []
        for m in rows:
            x = torch.randn(m, k)
            t = [median_ms(lambda f=f: f(x), args.repeats) for f in fns]
            best = min(range(len(t)), key=t.__getitem__)
            cells.append("/".join(f"{v:6.3f}{'*' if i == best else ''}" for i, v in enumerate(t)))
        print(f"{shape:>11} " + " ".join(f"{c:>30}" for c in cells), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
