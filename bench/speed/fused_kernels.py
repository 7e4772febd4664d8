"""What the decoder-block fusions cost inside the W4A16 CUDA kernel (GPU).

For the four launches of a fused Llama-2-7B block (``compress.kernels.fused_block``): q/k/v stacked
(12288 x 4096) with the RMSNorm prologue, o_proj (4096 x 4096) with the residual add, gate/up
stacked and interleaved (22016 x 4096) with the RMSNorm prologue and the SiLU-gate epilogue,
down_proj (4096 x 11008) with the residual add: tunes the plain kernel and the fused variant over
the same candidate configs (each checked against its float32 reference on fresh random inputs) and
prints the best times side by side (CUDA-graph timing over weight copies that do not fit in L2, as
``bench/speed/kernel_bench.py``). What the fusions save (the Inductor kernels they replace, their launch
gaps) only shows end to end: ``python3 bench/speed/e2e_decode.py gpu --variants fused_pdl,stacked_pdl``.

    python3 bench/speed/fused_kernels.py --batches 1,4 --out $OUT/fused_kernels.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: compress and bench.*

from compress.algos.quant import default_g_idx, rtn_quantize  # noqa: E402
from compress.kernels import fused_block  # noqa: E402
from compress.kernels import triton_w4a16 as tw  # noqa: E402

LAUNCHES = [  # name, out, in, fusion
    ("qkv + input norm", 12288, 4096, dict(norm=True)),
    ("o_proj + residual", 4096, 4096, dict(residual=True)),
    ("gate/up + norm + silu*up", 22016, 4096, dict(norm=True, silu_mul=True)),
    ("down_proj + residual", 4096, 11008, dict(residual=True)),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    print(f"{'launch':26} {'M':>3} {'plain us':>9} {'fused us':>9} {'fused/plain':>11}  fused config")
    for name, n, k, fusion in LAUNCHES:
        q, s, z = rtn_quantize(torch.randn(n, k, device="cuda", dtype=torch.float16), 4, args.group_size, False)
        wt = tw.repack(q, s, z, default_g_idx(k, args.group_size, device=q.device), 4, False, None, "cuda",
                       kernel="cuda")
        wt.glu_interleaved = fusion.get("silu_mul", False)
        norm = None
        if fusion.get("norm"):
            norm = LlamaRMSNorm(k, eps=1e-5).to("cuda", torch.float16)
            norm.weight.data = (1 + 0.2 * torch.randn(k, device="cuda")).half()
        fl = fused_block.FusedLinear(wt, norm=norm, silu_mul=fusion.get("silu_mul", False),
                                     residual=fusion.get("residual", False))
        for m in batches:
            _, plain = tw.tune(wt, m)
            cfg, fused = fl.tune(m)
            p_us, f_us = 1e3 * min(r["ms"] for r in plain), 1e3 * min(r["ms"] for r in fused)
            rows.append(dict(launch=name, n=n, k=k, m=m, plain_us=p_us, fused_us=f_us, fused_config=cfg.as_dict(),
                             fused_err=min(r["err"] for r in fused)))
            print(f"{name:26} {m:3d} {p_us:9.2f} {f_us:9.2f} {f_us / p_us:11.3f}  {cfg.as_dict()}", flush=True)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "group_size": args.group_size,
           "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
