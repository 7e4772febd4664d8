"""How far ``cuda_w4a16.default_config`` (the config used where nothing was tuned) lands from the tuned
best, read from the tuning sweeps ``bench/speed/kernel_bench.py`` writes (every candidate's time per shape and
row count). Prints, per file and for each layout's rule, the loss on every point, the mean and the
worst. No GPU needed.

    python bench/speed/default_config_fit.py bench/results/kernel_bench_h100_2026-12-07.json \\
        bench/results/kernel_bench_stacked_h100_2026-12-07.json bench/results/kernel_bench_row-major_h100_2026-12-06.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: compress and bench.*

from compress.kernels import cuda_w4a16 as cw  # noqa: E402


def losses(rows: list[dict], tiled: bool) -> list[float]:
    """Time of the rule's config over the sweep's best, per point (M <= 16) of a sweep."""
    out = []
    for r in rows:
        if r["batch"] > 16:
            continue
        times = {cw.CudaConfig(**{k: v for k, v in s["config"].items() if k != "kernel"}): s["ms"] for s in r["sweep"]}
        out.append(times[cw.default_config(r["batch"], r["out"], tiled=tiled)] / min(times.values()))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweeps", nargs="+", help="kernel_bench JSON files")
    args = ap.parse_args(argv)
    for path in args.sweeps:
        data = json.loads(Path(path).read_text())
        print(f"{path} (weights {data.get('tile_major') or 'row'})")
        for tiled in (False, True):
            ls = losses(data["rows"], tiled)
            print(f"  {'tile-major' if tiled else 'row-major'} rule: mean {statistics.mean(ls):.3f}, worst "
                  f"{max(ls):.3f} over {len(ls)} points: " + " ".join(f"{v:.2f}" for v in ls))
    return 0


if __name__ == "__main__":
    sys.exit(main())
