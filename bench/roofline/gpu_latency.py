"""Measured fp16 prefill and decode latency of Llama-shaped models (random weights) on the GPU, for
validating the roofline estimator (``compress roofline``; compared by bench/roofline/roofline_validate.py).

For each model shape, prompt length and mode (cuda_graph, eager) it records the median prefill
latency (one forward over the prompt, logits for every prompt token) and decode time per token
(transformers ``StaticCache`` of ``prompt + generate + 1`` slots, greedy), via
``compress.kernels.gpu_timing.time_generation``. Writes a JSON list of {"device", "model": <config
dict>, "dtype", "batch", "prompt", "generate", "prefill_ms", "decode_ms_per_token", "mode", ...}.

With ``--profile FILE`` it also profiles one eager prefill and one eager decode step per model and
prompt (torch.profiler: GPU time per transformers module and per aten op, kernel count) and one
replay of the captured decode graph (kernel count, summed kernel time and the span, whose
difference is the time between kernels): where the time goes, for docs/roofline.md. Profiles are
diagnostics only; no roofline parameter is fitted to these models.

    python bench/roofline/gpu_latency.py --out $OUT/gpu_latency.json --profile $OUT/gpu_profile.json
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: compress and bench.*

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
#: module names whose GPU time the profile reports (transformers' Llama attribute names)
LABELS = ("embed_tokens", "rotary_emb", "input_layernorm", "post_attention_layernorm", "self_attn", "q_proj",
          "k_proj", "v_proj", "o_proj", "mlp", "gate_proj", "up_proj", "down_proj", "act_fn", "norm", "lm_head")


def device_tag() -> str:
    name = torch.cuda.get_device_name().lower()
    for tag in ("h200", "h100", "a100", "l40s", "l4"):
        if tag in name:
            return tag
    return name.replace(" ", "-")


# --- profiling ----------------------------------------------------------------------------------
def _label_hooks(model: torch.nn.Module) -> list[Any]:
    """Forward hooks that open a profiler range ``mod::<attribute name>`` around each labelled module."""
    from torch.autograd.profiler import record_function

    handles, stack = [], []
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        label = "decoder_layer" if leaf.isdigit() else leaf
        if label not in LABELS and label != "decoder_layer":
            continue

        def pre(_m: Any, _a: Any, label: str = label) -> None:
            rf = record_function(f"mod::{label}")
            rf.__enter__()
            stack.append(rf)

        def post(_m: Any, _a: Any, _o: Any) -> None:
            stack.pop().__exit__(None, None, None)

        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    return handles


def _dev_time(e: Any, total: bool) -> float:
    for attr in (("device_time_total", "cuda_time_total") if total else ("self_device_time_total",
                                                                         "self_cuda_time_total")):
        v = getattr(e, attr, None)
        if v is not None:
            return float(v)
    return 0.0


def _kernel_events(prof: Any) -> list[Any]:
    out = []
    for e in prof.events():
        dt = getattr(e, "device_type", None)
        if dt is not None and "CUDA" in str(dt) and e.time_range.elapsed_us() >= 0:
            out.append(e)
    return out


def _summarize(prof: Any) -> dict[str, Any]:
    mods = {}
    for e in prof.key_averages():
        if e.key.startswith("mod::"):
            mods[e.key[5:]] = {"count": e.count, "device_us": _dev_time(e, True)}
    ops = []
    for e in prof.key_averages(group_by_input_shape=True):
        t = _dev_time(e, False)
        if e.key.startswith("aten::") and t > 0:
            ops.append({"op": e.key, "shapes": str(getattr(e, "input_shapes", ""))[:200], "count": e.count,
                        "self_device_us": t})
    ops.sort(key=lambda r: -r["self_device_us"])
    kernels = _kernel_events(prof)
    by_name: dict[str, list[float]] = {}
    for k in kernels:
        by_name.setdefault(k.name[:90], []).append(k.time_range.elapsed_us())
    knl = sorted(({"kernel": n, "count": len(v), "us": sum(v)} for n, v in by_name.items()), key=lambda r: -r["us"])
    span = (max(k.time_range.end for k in kernels) - min(k.time_range.start for k in kernels)) if kernels else 0.0
    return {"modules": mods, "aten_ops": ops[:80], "kernels": knl[:60], "kernel_count": len(kernels),
            "kernel_us": sum(k.time_range.elapsed_us() for k in kernels), "span_us": span}


@torch.inference_mode()
def profile_model(model: torch.nn.Module, prompt: int, generate: int) -> dict[str, Any]:
    """Eager prefill and decode step under the profiler, then one replay of the captured decode graph."""
    from torch.profiler import ProfilerActivity, profile

    from compress.kernels.gpu_timing import _Steps

    ids = torch.randint(0, int(model.config.vocab_size), (1, prompt), device="cuda")
    steps = _Steps(model, ids, generate)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        steps.prefill()
        steps.step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    out: dict[str, Any] = {}
    handles = _label_hooks(model)
    try:
        for phase, fn in (("prefill", steps.prefill), ("decode", steps.step)):
            if phase == "decode":
                steps.prefill()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
            out[phase] = _summarize(prof)
    finally:
        for h in handles:
            h.remove()
    steps.prefill()
    g = torch.cuda.CUDAGraph()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        steps.step()
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(g):
        steps.step()
    g.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        g.replay()
        torch.cuda.synchronize()
    kernels = _kernel_events(prof)
    if kernels:
        span = max(k.time_range.end for k in kernels) - min(k.time_range.start for k in kernels)
        out["decode_graph"] = {"kernel_count": len(kernels), "span_us": span,
                               "kernel_us": sum(k.time_range.elapsed_us() for k in kernels)}
    del g, steps
    return out


# --- main ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--prompts", default="128,1024")
    ap.add_argument("--generate", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", default="cuda_graph,eager")
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", default=None, help="also profile each model and prompt; write the summary here")
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip models that would start past this many seconds")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_latency needs a CUDA GPU", file=sys.stderr)
        return 2
    deadline = time.time() + args.budget_s
    tag = device_tag()
    out = Path(args.out or f"bench/results/gpu_latency_{tag}.json")
    rows: list[dict[str, Any]] = []
    profiles: dict[str, Any] = {}
    command = "python bench/roofline/gpu_latency.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for name in args.models.split(","):
        if time.time() > deadline:
            print(f"{name}: skipped (past --budget-s)", flush=True)
            continue
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
                    "kv_cache": "static", "max_cache_len": prompt + args.generate + 1, "prefill_logits": "all",
                    "tokens_match_eager": r["tokens_match_eager"], "torch": torch.__version__,
                    "transformers": __import__("transformers").__version__, "date": time.strftime("%Y-%m-%d"),
                    "command": command,
                })
                print(f"{name:13} P={prompt:<5} {mode:10} prefill {r['prefill_ms']:8.2f} ms  decode "
                      f"{r['decode_ms_per_token']:7.3f} ms/token", flush=True)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(rows, indent=1))  # partial results survive a timeout
            if args.profile:
                try:
                    profiles[f"{name}/P{prompt}"] = profile_model(model, prompt, args.generate)
                except Exception as e:  # noqa: BLE001 - the timings above matter more than the profile
                    profiles[f"{name}/P{prompt}"] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
                Path(args.profile).write_text(json.dumps(profiles, indent=1))
        del model
        gc.collect()
        torch.cuda.empty_cache()
        print(f"  ({time.time() - t0:.0f}s)", flush=True)
    print("\nmodel         prompt  mode        prefill_ms  decode_ms/token")
    for r in rows:
        print(f"{r['model_name']:13} {r['prompt']:6}  {r['mode']:10} {r['prefill_ms']:10.2f} {r['decode_ms_per_token']:10.3f}")
    compare(rows)
    return 0


def compare(rows: list[dict[str, Any]]) -> None:
    """Estimate vs measured for the rows just taken (the roofline of this device's YAML, if it has one)."""
    try:
        from bench.roofline.roofline_validate import print_table, validate_rows

        print()
        print_table(validate_rows(rows))
    except Exception as e:  # noqa: BLE001 - the measurement is saved either way
        print(f"(no roofline comparison: {type(e).__name__}: {str(e)[:200]})")


if __name__ == "__main__":
    sys.exit(main())
