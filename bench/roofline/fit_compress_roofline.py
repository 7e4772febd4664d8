"""Fit the roofline's terms for compress's own GPU kernels from their measured per-call times.

The roofline's ``implementation: compress`` (docs/roofline.md) costs each launch of our W4A16
kernel and of our decode attention kernel as a fixed time plus its bytes at a fraction of the
device's bandwidth. This fits both by least squares over kernel-only measurements (no end-to-end
numbers, which the roofline is then checked against):

- W4A16: ``bench/speed/fused_kernels.py``'s fused launches at M = 1 (the four launches of a Llama-2-7B
  block as ``accelerate`` runs them at decode), bytes as the roofline counts them (4-bit codes,
  fp16 scales and 4-bit zero points per 128 columns, activations);
- decode attention: ``bench/speed/decode_attention.py``'s one-sequence rows with as many KV heads as query
  heads, at ``choose_config``'s pick, bytes = keys and values of every slot for every query head.

    python bench/roofline/fit_compress_roofline.py bench/results/fused_kernels_alu_h100_2026-12-06.json \\
        bench/results/decode_attention_h100_2026-12-06.json

Prints the fitted terms and the YAML lines for the device file (compress/eval/devices/h100.yaml).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: compress and bench.*

from compress.eval.roofline_ops import WeightFormat, weight_bytes  # noqa: E402

NOMINAL = {"NVIDIA H100 80GB HBM3": 3.35e12}


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares y = a + b x: (a, b)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("fused_kernels", help="JSON of bench/speed/fused_kernels.py")
    ap.add_argument("decode_attention", help="JSON of bench/speed/decode_attention.py")
    args = ap.parse_args(argv)
    from compress.kernels.decode_attention import choose_config

    fk = json.loads(Path(args.fused_kernels).read_text())
    fmt = WeightFormat(value_bits=4, group_size=fk.get("group_size", 128), scale_bits=16, zero_bits=4)
    xs, ys = [], []
    for r in fk["rows"]:
        n_out = r["n"] // 2 if "silu" in r["launch"] else r["n"]
        moved = weight_bytes(r["k"], r["n"], fmt) + 2 * r["m"] * (r["k"] + n_out)
        xs.append(moved)
        ys.append(r["fused_us"] * 1e-6)
    w_fixed, w_slope = fit(xs, ys)
    nominal = NOMINAL.get(fk["device"])
    print(f"w4a16 ({fk['device']}, {len(xs)} launches): {w_fixed * 1e6:.2f} us + bytes / {1 / w_slope / 1e12:.3f} TB/s"
          + (f" ({1 / w_slope / nominal:.4f} of nominal)" if nominal else ""))
    for x, y in zip(xs, ys):
        print(f"  {x / 1e6:7.2f} MB  measured {y * 1e6:6.2f} us  fit {(w_fixed + w_slope * x) * 1e6:6.2f}")

    da = json.loads(Path(args.decode_attention).read_text())
    xs, ys = [], []
    for r in da["rows"]:
        if r["batch"] != 1 or r["heads"] != r["kv_heads"]:
            continue
        c = choose_config(r["kv"], r["batch"] * r["heads"])
        label = f"{c.warps}:{c.t}:{c.blocks_per_sm:g}" + (f":{c.cluster}" if c.cluster else "")
        xs.append(r["batch"] * r["heads"] * r["kv"] * r["head_dim"] * 2 * 2)
        ys.append(r["us"][f"ours_{label}"] * 1e-6)
    a_fixed, a_slope = fit(xs, ys)
    nominal = NOMINAL.get(da["device"])
    print(f"decode_attention ({da['device']}, {len(xs)} rows): {a_fixed * 1e6:.2f} us + bytes / "
          f"{1 / a_slope / 1e12:.3f} TB/s" + (f" ({1 / a_slope / nominal:.4f} of nominal)" if nominal else ""))
    for x, y in zip(xs, ys):
        print(f"  {x / 1e6:7.2f} MB  measured {y * 1e6:6.2f} us  fit {(a_fixed + a_slope * x) * 1e6:6.2f}")
    if nominal:
        print("\nYAML (achievable.by_op and overhead.by_kernel):")
        print(f"    w4a16: {{value: {1 / w_slope / NOMINAL[fk['device']]:.4e}, ...}}")
        print(f"    decode_attention: {{value: {1 / a_slope / nominal:.4e}, ...}}")
        print(f"    w4a16: {{value: {w_fixed:.4e}, ...}}")
        print(f"    decode_attention: {{value: {a_fixed:.4e}, ...}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
