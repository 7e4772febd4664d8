"""Run the W4A16 GEMM (``compress.kernels.triton_gemm``) in Triton's interpreter on the CPU against the
fp64 product of the dequantized weight: both code layouts, act-order, symmetric, per-channel, bias,
and the unpack variants. A check for machines without a GPU, not a benchmark.

    pip install --target /tmp/tsite triton==3.6.0 "numpy<2.3"   # numpy 2.3+ breaks the interpreter's loops
    PYTHONPATH=/tmp/tsite:. TRITON_INTERPRET=1 python3 bench/gemm_interpreter_check.py

bf16 rows are printed but not judged: the interpreter's bf16 ``tl.dot`` is wrong on its own (a
one-line bf16 product differs from torch's by 100%), so bf16 waits for ``tests/test_triton_gemm.py``
on a GPU.
"""
from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress.kernels import layout  # noqa: E402
from compress.kernels import triton_gemm as tg  # noqa: E402
from compress.kernels.packed import W4A16Weight, dequantize_packed  # noqa: E402

SHAPES = [  # (out, in, group, symmetric, act_order, bias)
    (64, 256, 128, False, False, False),
    (48, 512, 64, True, True, True),
    (32, 200, 200, False, False, True),  # per-channel, K not a multiple of the step
    (48, 520, 520, False, False, False),  # per-channel, K not a multiple of 32 (a CUDA test shape)
]
CONFIGS = [tg.GemmConfig(32, 32, 64, 4, 2, 2), tg.GemmConfig(16, 64, 128, 4, 2, 8),
           tg.GemmConfig(32, 32, 64, 4, 2, 2, magic=False), tg.GemmConfig(32, 32, 64, 4, 2, 2, gather=True),
           tg.GemmConfig(32, 32, 128, 4, 2, 2, magic=False, gather=True)]


def packed_weight(n: int, k: int, gs: int, sym: bool, act: bool, bias: bool, tiled: bool,
                  dtype: torch.dtype) -> W4A16Weight:
    """What ``triton_w4a16.repack(..., kernel="cuda")`` builds, made on the CPU."""
    g = k // gs
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scales = torch.rand(n, g) * 0.02 + 0.005
    zeros = torch.full((n, g), 8, dtype=torch.uint8) if sym else torch.randint(0, 16, (n, g), dtype=torch.uint8)
    g_idx = torch.arange(k) // gs
    if act:
        g_idx = g_idx[torch.randperm(k)]
    order = layout.contiguous_group_order(g_idx.int(), g)
    words = layout.pack_chunked(layout.ordered_codes(codes, order))
    sg = layout.group_major(scales, dtype)
    zg = None if sym else layout.group_major(zeros, torch.uint8)
    if tiled:
        words, sg = layout.tile_major(words), layout.tile_groups(sg)
        zg = None if zg is None else layout.tile_groups(zg)
    return W4A16Weight(words=words, scales=sg, zeros=zg, perm=None if order.perm is None else order.perm.int(),
                       bias=torch.randn(n) if bias else None, in_features=k, out_features=n,
                       group=order.group_size, width=1, kernel="cuda", codes_tiled=tiled, sz_tiled=tiled)


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") != "1" or tg._gemm_kernel is None:
        print("needs Triton importable and TRITON_INTERPRET=1 (see the docstring)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    worst = 0.0
    for (n, k, gs, sym, act, bias), tiled, dtype, m, cfg in itertools.product(
            SHAPES, [False, True], [torch.float16, torch.bfloat16], [17, 40], CONFIGS):
        wt = packed_weight(n, k, gs, sym, act, bias, tiled, dtype)
        x = torch.randn(m, k, dtype=dtype)
        ref = x.double() @ dequantize_packed(wt, torch.float64).t() + (0 if wt.bias is None else wt.bias.double())
        err = float((tg.gemm(x, wt, cfg).double() - ref).norm() / ref.norm())
        if dtype == torch.float16:
            worst = max(worst, err)
        print(f"{n}x{k} g{gs} sym={sym} act={act} bias={bias} tiled={tiled} {str(dtype)[6:]} M={m} "
              f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k} magic={cfg.magic} gather={cfg.gather}: {err:.2e}", flush=True)
    print(f"fp16 worst relative error {worst:.2e} ({'ok' if worst < 3e-3 else 'FAILED'}, bound 3e-3)")
    return 0 if worst < 3e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
