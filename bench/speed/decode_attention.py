"""Decode attention (one query token over a KV cache): our split kernel against torch SDPA's backends.

Why: attention over the static cache was about a sixth of a compiled Llama-7B INT4 decode step
(docs/design/experiments.md). Shapes as transformers passes them at decode: q [B, H, 1, D] (a transposed view
of the q projection), the cache [B, Hkv, L, D], a boolean mask [B, 1, 1, L] (all slots filled here,
as at the end of a static cache; ``--filled`` leaves a fraction unfilled). SDPA gets the keys and
values repeated to H heads when Hkv < H (as transformers' SDPA path does under torch.compile).
CUDA-graph timing of 64 calls, median of 5 (``gpu_timing.graph_time_ms``); GB/s counts the K and V
bytes of the filled slots once.

    python bench/speed/decode_attention.py --kv 193 1024 4096 --out bench/results/decode_attention_h100.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: compress and bench.*

# warps, positions per warp step, blocks per SM (0: one per head), cluster (thread blocks per head)
CONFIGS = ["8,4,2", "16,8,0", "16,8,0,2", "8,8,0,4", "8,4,0,4", "4,8,0,8", "8,4,0,8", "4,4,0,8", "8,8,0,8"]


def _label(c) -> str:
    return f"{c.warps}:{c.t}:{c.blocks_per_sm:g}" + (f":{c.cluster}" if c.cluster else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kv", type=int, nargs="+", default=[193, 512, 1024, 4096], help="cache positions")
    ap.add_argument("--shapes", default="1x32x32x128,1x32x8x128,8x32x8x128",
                    help="comma list of BATCHxHEADSxKV_HEADSxHEAD_DIM")
    ap.add_argument("--configs", default=",".join(c.replace(",", ":") for c in CONFIGS),
                    help="comma list of WARPS:T:BLOCKS_PER_SM[:CLUSTER] for our kernel (blocks per SM 0: one block per head)")
    ap.add_argument("--filled", type=float, default=1.0, help="fraction of the cache slots unmasked")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from compress.kernels.decode_attention import Config, DecodeAttention, reference
    from compress.kernels.gpu_timing import graph_time_ms

    cfgs = []
    for c in args.configs.split(","):
        w, t, bps, *cl = c.split(":")
        cfgs.append(Config(int(w), int(t), float(bps), int(cl[0]) if cl else 0))
    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "default": None}
    rows = []
    print(f"{'shape':>14} {'kv':>5} " + " ".join(f"{k:>9}" for k in backends) + " "
          + " ".join(f"{_label(c):>10}" for c in cfgs)
          + "  best GB/s  err/sdpa_err   (us per call)", flush=True)
    torch.manual_seed(0)
    for shape in args.shapes.split(","):
        b, h, hk, d = (int(x) for x in shape.split("x"))
        for kv in args.kv:
            q = torch.randn(b, 1, h * d, device="cuda", dtype=torch.float16).view(b, 1, h, d).transpose(1, 2)
            k = torch.randn(b, hk, kv, d, device="cuda", dtype=torch.float16)
            v = torch.randn_like(k)
            filled = max(1, round(args.filled * kv))
            mask = (torch.arange(kv, device="cuda") < filled).view(1, 1, 1, kv).expand(b, 1, 1, kv)
            kk, vv = k.repeat_interleave(h // hk, 1), v.repeat_interleave(h // hk, 1)
            scale = d ** -0.5
            row = {"batch": b, "heads": h, "kv_heads": hk, "head_dim": d, "kv": kv, "filled": filled, "us": {}}
            for name, be in backends.items():
                def call(be=be):
                    return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=scale)
                try:
                    if be is None:
                        row["us"][f"sdpa_{name}"] = 1e3 * graph_time_ms([call])
                    else:
                        with sdpa_kernel([be]):
                            row["us"][f"sdpa_{name}"] = 1e3 * graph_time_ms([call])
                except RuntimeError:
                    row["us"][f"sdpa_{name}"] = None
            da = DecodeAttention()
            for c in cfgs:
                row["us"][f"ours_{_label(c)}"] = 1e3 * graph_time_ms(
                    [lambda c=c: da(q, k, v, mask, scale, c)])
            want = reference(q, k, v, mask, scale)
            got = da(q, k, v, mask, scale)
            sdpa = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=scale).transpose(1, 2)
            err = lambda a: float((a.float() - want).norm() / want.norm())  # noqa: E731
            row["rel_err"], row["sdpa_rel_err"] = err(got), err(sdpa)
            ours = {n: t for n, t in row["us"].items() if n.startswith("ours")}
            best = min(ours, key=ours.get)
            row["best"] = best
            row["best_gb_s"] = 2 * b * hk * filled * d * 2 / (ours[best] * 1e-6) / 1e9
            rows.append(row)
            cells = [f"{row['us'][f'sdpa_{n}']:9.2f}" if row["us"][f"sdpa_{n}"] is not None else f"{'n/a':>9}"
                     for n in backends] + [f"{t:10.2f}" for t in ours.values()]
            print(f"{shape:>14} {kv:>5} " + " ".join(cells) + f"  {row['best_gb_s']:8.0f}  "
                  f"{row['rel_err']:.1e}/{row['sdpa_rel_err']:.1e}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
