"""Run the W4A16 GEMM (``compress.kernels.triton_gemm``) in Triton's interpreter on the CPU against the
fp64 product of the dequantized weight, on weights packed by ``triton_w4a16.repack`` itself: both
code layouts, act-order, symmetric, per-channel, bias, and the unpack variants. A check for machines
without a GPU, not a benchmark.

    pip install --target /tmp/tsite triton==3.6.0 "numpy<2.3"   # numpy 2.3+ breaks the interpreter's loops
    PYTHONPATH=/tmp/tsite:. TRITON_INTERPRET=1 python3 bench/probes/gemm_interpreter_check.py

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

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: compress and bench.*

from compress.algos.quant import default_g_idx, dequantize_weight, rtn_quantize, rtn_quantize_permuted  # noqa: E402
from compress.kernels import cuda_w4a16 as cw  # noqa: E402
from compress.kernels import triton_gemm as tg  # noqa: E402
from compress.kernels.packed import W4A16Weight  # noqa: E402

try:
    from compress.kernels import triton_w4a16 as tw  # noqa: E402
except ImportError:  # no Triton: main() says what to install
    tw = None

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
                  dtype: torch.dtype) -> tuple[W4A16Weight, torch.Tensor]:
    """``triton_w4a16.repack(..., kernel="cuda")`` itself, run on the CPU (only its device checks
    need a GPU; the packing is plain torch), and the dequantized weight it stands for (fp64)."""
    w = torch.randn(n, k)
    if act:
        q, s, z, g = rtn_quantize_permuted(w, 4, gs, sym, torch.randperm(k))
    else:
        q, s, z = rtn_quantize(w, 4, gs, sym)
        g = default_g_idx(k, gs)
    s = s.to(dtype)
    b = torch.randn(n) if bias else None
    cw.TILE_MAJOR = cw.TILE_LAYOUTS["both_evf" if tiled else "row"]
    wt = tw.repack(q, s, z, g, 4, sym, b, "cpu", kernel="cuda", pdl=False)
    return wt, dequantize_weight(q, s, z, g).double()


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") != "1" or tw is None:
        print("needs Triton importable and TRITON_INTERPRET=1 (see the docstring)", file=sys.stderr)
        return 2
    cw.unsupported_reason = lambda *args: None  # no CUDA device here: let repack pack for the CUDA kernel
    torch.manual_seed(0)
    worst = 0.0
    for (n, k, gs, sym, act, bias), tiled, dtype, m, cfg in itertools.product(
            SHAPES, [False, True], [torch.float16, torch.bfloat16], [17, 40], CONFIGS):
        wt, w64 = packed_weight(n, k, gs, sym, act, bias, tiled, dtype)
        x = torch.randn(m, k, dtype=dtype)
        ref = x.double() @ w64.t() + (0 if wt.bias is None else wt.bias.double())
        err = float((tg.gemm(x, wt, cfg).double() - ref).norm() / ref.norm())
        if dtype == torch.float16:
            worst = max(worst, err)
        print(f"{n}x{k} g{gs} sym={sym} act={act} bias={bias} tiled={tiled} {str(dtype)[6:]} M={m} "
              f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k} magic={cfg.magic} gather={cfg.gather}: {err:.2e}", flush=True)
    print(f"fp16 worst relative error {worst:.2e} ({'ok' if worst < 3e-3 else 'FAILED'}, bound 3e-3)")
    return 0 if worst < 3e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
