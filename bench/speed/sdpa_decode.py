"""Decode-shaped attention time per backend (GPU): one query token over a static KV cache.

Why: in a compiled Llama-2-7B decode step attention is 14% of the INT4 step's GPU time
(docs/design/experiments.md); this says which ``scaled_dot_product_attention`` backend is fastest for the
shape, to pass as ``bench/speed/e2e_decode.py --sdpa``. CUDA-graph timing of 64 calls, median of 5.

    python bench/speed/sdpa_decode.py --kv 193 1024 4096
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: compress and bench.*



def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kv", type=int, nargs="+", default=[193, 1024, 4096], help="cached positions")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from compress.kernels.gpu_timing import graph_time_ms

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    print(f"{'kv':>6} " + " ".join(f"{k:>10}" for k in backends) + "   (us per call, fp16, batch 1, "
          f"{args.heads} heads x {args.head_dim})")
    for kv in args.kv:
        q = torch.randn(1, args.heads, 1, args.head_dim, device="cuda", dtype=torch.float16)
        k = torch.randn(1, args.heads, kv, args.head_dim, device="cuda", dtype=torch.float16)
        v = torch.randn_like(k)
        mask = torch.zeros(1, 1, 1, kv, device="cuda", dtype=torch.float16)  # transformers passes a mask
        row = []
        for name, b in backends.items():
            try:
                with sdpa_kernel([b]):
                    row.append(f"{1e3 * graph_time_ms([lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)]):10.1f}")
            except RuntimeError:
                row.append(f"{'n/a':>10}")
        print(f"{kv:>6} " + " ".join(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
