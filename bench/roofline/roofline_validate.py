"""Compare roofline estimates with measured latencies, and measure this CPU's.

GPU rows come from bench/roofline/gpu_latency.py (run on the GPU; it prints this comparison too), e.g.
bench/results/roofline_validate_gpu_h100_2026-11-22.json; the device terms they are compared against come from
bench/roofline/measure_gpu.py (docs/roofline.md, Validation).

Measurement files are JSON lists of rows::

    {"device": "h200" | "h100" | "this-machine", "model": <config dict or built-in name or path>,
     "dtype": "float16", "batch": 1, "prompt": 128, "generate": 32,
     "prefill_ms": 24.0, "decode_ms_per_token": 57.5, "mode": "eager" | "cuda_graph" | ...}

Optional keys: "kv_cache" ("static"/"dynamic"; default dynamic for eager rows, static otherwise, as
transformers' DynamicCache copies itself with torch.cat every step), "prefill_logits" ("all"/"last"),
"max_cache_len" (static cache slots), "implementation" ("transformers", the default, or "fused"),
"compression" (a CompressionSpec dict, e.g. {"weight_bits": 4, "group_size": 128}). Rows with mode
"eager" are estimated with ``execution: eager`` (bounded by the device's host_overhead), the others
with ``execution: graph``.

For each row the table gives the estimate with the device's fixed costs (``est``), the pure
roofline floor without them (``floor``), and est/measured. Usage::

    python bench/roofline/roofline_validate.py          # bench/results/{gpu,cpu}_latency_*.json and roofline_validate_gpu_*.json
    python bench/roofline/roofline_validate.py bench/results/gpu_latency_h200.json
    python bench/roofline/roofline_validate.py --measure-cpu bench/results/cpu_latency_this-machine_2026-11-22.json
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from compress.errors import CompressError  # noqa: E402
from compress.eval.roofline import estimate  # noqa: E402

DEFAULT_MODEL = Path.home() / ".cache" / "compress" / "models" / "HuggingFaceTB--SmolLM2-135M-Instruct"
REQUIRED = ("device", "model", "dtype", "batch", "prompt", "generate", "prefill_ms", "decode_ms_per_token", "mode")


def _model_label(row: dict[str, Any]) -> str:
    model = row["model"]
    if row.get("model_name"):
        return str(row["model_name"])
    if isinstance(model, dict):
        return str(model.get("_name_or_path") or model.get("model_type"))
    return str(model)


def validate_rows(rows: list[dict[str, Any]], overrides: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    out = []
    for i, row in enumerate(rows):
        missing = [k for k in REQUIRED if k not in row]
        if missing:
            raise CompressError(f"measurement row {i} lacks {missing}: {json.dumps(row)[:200]}")
        kv = row.get("kv_cache") or ("dynamic" if row["mode"] == "eager" else "static")
        spec = {"device": row["device"], "dtype": row["dtype"], "batch": row["batch"], "prompt": row["prompt"],
                "generate": row["generate"], "kv_cache": kv,
                "prefill_logits": row.get("prefill_logits", "all"),
                "execution": "eager" if row["mode"] == "eager" else "graph",
                "implementation": row.get("implementation", "transformers")}
        if row.get("max_cache_len"):
            spec["max_cache_len"] = row["max_cache_len"]
        spec.update(overrides or {})
        est = estimate(row["model"], spec, compression=row.get("compression"))
        floor = estimate(row["model"], {**spec, "overhead": False}, compression=row.get("compression"))
        out.append({
            "device": row["device"], "model": _model_label(row), "mode": row["mode"],
            "dtype": row["dtype"], "batch": row["batch"], "prompt": row["prompt"], "generate": row["generate"],
            "kv_cache": kv, "compression": row.get("compression"),
            "prefill_measured": row["prefill_ms"], "prefill_est": est.prefill_ms, "prefill_floor": floor.prefill_ms,
            "decode_measured": row["decode_ms_per_token"], "decode_est": est.decode_ms_per_token,
            "decode_floor": floor.decode_ms_per_token,
        })
    return out


def print_table(results: list[dict[str, Any]]) -> None:
    head = (f"{'device':<13}{'model':<36}{'mode':<11}{'B':>3}{'P':>6}{'G':>5} | {'prefill ms':>10}{'est':>9}"
            f"{'est/meas':>9}{'floor':>9} | {'decode ms':>10}{'est':>9}{'est/meas':>9}{'floor':>9}")
    print(head)
    print("-" * len(head))
    for r in results:
        comp = r["compression"]
        label = r["model"][-35:] + ("*" if comp else "")
        print(f"{r['device']:<13}{label:<36}{r['mode']:<11}{r['batch']:>3}{r['prompt']:>6}{r['generate']:>5} | "
              f"{r['prefill_measured']:>10.2f}{r['prefill_est']:>9.2f}{r['prefill_est'] / r['prefill_measured']:>9.2f}"
              f"{r['prefill_floor']:>9.2f} | {r['decode_measured']:>10.2f}{r['decode_est']:>9.2f}"
              f"{r['decode_est'] / r['decode_measured']:>9.2f}{r['decode_floor']:>9.2f}")
    if any(r["compression"] for r in results):
        print("* compressed row (its 'compression' settings were passed to the estimate)")
    for device, mode in sorted({(r["device"], r["mode"]) for r in results}):
        sel = [r for r in results if (r["device"], r["mode"]) == (device, mode)]
        ratios = [r[f"{p}_est"] / r[f"{p}_measured"] for r in sel for p in ("prefill", "decode")]
        inside = sum(0.85 <= x <= 1.15 for x in ratios)
        print(f"{device} {mode}: est/meas {min(ratios):.2f}-{max(ratios):.2f}, {inside} of {len(ratios)} "
              f"within 15 %")


# ----------------------------------------------------------------------------------------------
def measure_cpu(out: Path, model_dir: Path, prompts: list[int], generate: int, repeats: int, warmup: int,
                threads: int | None, clock: str) -> list[dict[str, Any]]:
    """SmolLM2-135M (or ``model_dir``) in fp32 on this CPU, batch 1, via compress.eval.latency."""
    import datetime
    import platform

    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from compress.eval.latency import measure_latency

    if threads:
        torch.set_num_threads(threads)
    config = json.loads((model_dir / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = []
    for p in prompts:
        load = [round(x, 2) for x in os.getloadavg()]
        r = measure_latency(model, prompt=p, generate=generate, batch=1, repeats=repeats, warmup=warmup, clock=clock)
        rows.append({
            "device": "this-machine", "model": config,
            "model_name": config.get("_name_or_path") or model_dir.name.replace("--", "/"),
            "dtype": "float32", "batch": 1, "prompt": p, "generate": generate,
            "prefill_ms": r["prefill_ms"], "decode_ms_per_token": r["decode_ms_per_token"],
            "mode": "eager", "kv_cache": "dynamic", "attn_implementation": model.config._attn_implementation,
            "clock": clock, "wall_prefill_ms": r["wall_prefill_ms"],
            "wall_decode_ms_per_token": r["wall_decode_ms_per_token"],
            "prefill_ms_runs": r["prefill_ms_runs"], "decode_ms_per_token_runs": r["decode_ms_per_token_runs"],
            "repeats": repeats, "warmup": warmup, "threads": r["threads"], "load_average_before": load,
            "date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "command": f"python bench/roofline/roofline_validate.py --measure-cpu {out} --threads {threads} --clock {clock}",
        })
        print(f"prompt {p}: prefill {r['prefill_ms']:.1f} ms, decode {r['decode_ms_per_token']:.2f} ms/token "
              f"(runs: {[round(x, 1) for x in r['decode_ms_per_token_runs']]}, spread "
              f"{statistics.pstdev(r['decode_ms_per_token_runs']):.2f})", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=1) + "\n")
    os.replace(tmp, out)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", help="measurement JSON files (default: bench/results/{gpu,cpu}_latency_*.json and roofline_validate_gpu_*.json)")
    ap.add_argument("--measure-cpu", type=Path, metavar="OUT", help="measure this CPU first and write OUT")
    ap.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL, help="model folder for --measure-cpu")
    ap.add_argument("--prompts", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--generate", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch threads for --measure-cpu (default: torch's)")
    ap.add_argument("--clock", choices=["wall", "thread"], default="wall",
                    help="for --measure-cpu: wall time or the thread's CPU time (needs --threads 1)")
    ap.add_argument("--json", action="store_true", help="print the comparison as JSON")
    args = ap.parse_args()
    try:
        if args.measure_cpu:
            measure_cpu(args.measure_cpu, args.model_dir, args.prompts, args.generate, args.repeats,
                        args.warmup, args.threads, args.clock)
        results_dir = REPO / "bench" / "results"
        # the latency measurements of gpu_latency.py / --measure-cpu (structure_latency_* are other rows)
        files = args.files or sorted(glob.glob(str(results_dir / "gpu_latency_*.json"))
                                     + glob.glob(str(results_dir / "cpu_latency_*.json"))
                                     + glob.glob(str(results_dir / "roofline_validate_gpu_*.json")))
        if args.measure_cpu and not args.files:
            files = [str(args.measure_cpu)]
        rows: list[dict[str, Any]] = []
        for f in files:
            data = json.loads(Path(f).read_text())
            rows += data if isinstance(data, list) else [data]
        if not rows:
            print("no measurement rows found", file=sys.stderr)
            return 1
        results = validate_rows(rows)
    except CompressError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
