"""Measured fp16 prefill and decode latency of Llama-shaped models (random weights) on the GPU, for
validating the roofline estimator (``compress roofline``).

For each model shape, prompt length and mode (eager, cuda_graph) it records the median prefill
latency (one forward over the prompt, logits for every prompt token) and decode time per token
(static KV cache, greedy), via ``compress.kernels.gpu_timing.time_generation``. Writes a JSON list
of {"device", "model": <config dict>, "dtype", "batch", "prompt", "generate", "prefill_ms",
"decode_ms_per_token", "mode", ...} to bench/results/gpu_latency_<device>.json (or --out).

    python bench/gpu_latency.py --out $OUT/gpu_latency_h100.json
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress.kernels.gpu_timing import random_llama, time_generation  # noqa: E402

MODELS = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, head_dim=64, tie_word_embeddings=True),
    "llama-3.2-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                         num_key_value_heads=8, vocab_size=128256, head_dim=128, tie_word_embeddings=True),
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, head_dim=128, tie_word_embeddings=False),
    "llama-2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40, vocab_size=32000, head_dim=128, tie_word_embeddings=False),
}


def device_tag() -> str:
    name = torch.cuda.get_device_name().lower()
    for tag in ("h200", "h100", "a100", "l40s", "l4"):
        if tag in name:
            return tag
    return name.replace(" ", "-")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--prompts", default="128,1024")
    ap.add_argument("--generate", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", default="cuda_graph,eager")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_latency needs a CUDA GPU", file=sys.stderr)
        return 2
    tag = device_tag()
    out = Path(args.out or f"bench/results/gpu_latency_{tag}.json")
    rows = []
    for name in args.models.split(","):
        cfg = dict(MODELS[name], max_position_embeddings=4096)
        t0 = time.time()
        model = random_llama(cfg, torch.float16, "cuda")
        for prompt in (int(p) for p in args.prompts.split(",")):
            for mode in args.modes.split(","):
                r = time_generation(model, prompt, args.generate, 1, mode=mode, repeats=args.repeats, warmup=1)
                rows.append({
                    "device": tag, "device_name": r["device"], "model_name": name,
                    "model": dict(cfg, model_type="llama"), "dtype": "float16", "batch": 1, "prompt": prompt,
                    "generate": args.generate, "prefill_ms": r["prefill_ms"],
                    "decode_ms_per_token": r["decode_ms_per_token"], "mode": mode,
                    "prefill_ms_runs": r["prefill_ms_runs"], "decode_ms_per_token_runs": r["decode_ms_per_token_runs"],
                    "kv_cache": "static", "prefill_logits": "all", "tokens_match_eager": r["tokens_match_eager"],
                    "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                })
                print(f"{name:13} P={prompt:<5} {mode:10} prefill {r['prefill_ms']:8.2f} ms  decode "
                      f"{r['decode_ms_per_token']:7.3f} ms/token", flush=True)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(rows, indent=1))  # partial results survive a timeout
        del model
        gc.collect()
        torch.cuda.empty_cache()
        print(f"  ({time.time() - t0:.0f}s)", flush=True)
    print("\nmodel         prompt  mode        prefill_ms  decode_ms/token")
    for r in rows:
        print(f"{r['model_name']:13} {r['prompt']:6}  {r['mode']:10} {r['prefill_ms']:10.2f} {r['decode_ms_per_token']:10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
