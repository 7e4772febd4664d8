"""bitsandbytes NF4 / INT8 as comparison rows beside our INT4 (issue 5).

``quality``: WikiText-2 perplexity of the same model in fp32, bitsandbytes NF4 (4-bit NormalFloat, absmax
blocks of 64), bitsandbytes LLM.int8 (outlier threshold 6.0) and our RTN / GPTQ settings from
``bench/quality/quant_bench.py``, all scored by our perplexity code on the same token stream. bitsandbytes
quantizes at load time through transformers' ``BitsAndBytesConfig``; the model is written once to a
temporary safetensors folder so a .gguf or hub model takes the same path.

``speed`` (CUDA only): decode latency of a Llama-2-7B-shaped model with random fp16 weights: fp16,
bitsandbytes NF4 (fp16 compute) and INT8, and our INT4 Triton path, eager and with the decode step in a
CUDA graph (a path that cannot be captured is recorded as such).

    python bench/quality/bnb_compare.py quality --max-windows 16 --threads 1 --out bench/results/bnb_quality_cpu.json
    python bench/quality/bnb_compare.py quality --device cuda --model SmolLM2.gguf --eval-text wiki.test.raw --out $OUT/bnb_quality.json
    python bench/quality/bnb_compare.py speed --out $OUT/bnb_speed.json

Needs ``pip install bitsandbytes`` (0.50 runs NF4 and INT8 on the CPU as well as on CUDA); it is not a
dependency of compress.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: compress and bench.*

from compress.adapters import get_adapter  # noqa: E402
from compress.calibration import build_calibration  # noqa: E402
from compress.context import PassContext  # noqa: E402
from compress.eval.perplexity import eval_text, perplexity, tokenize_stream  # noqa: E402
from compress.modeling import load_model  # noqa: E402

BNB = {
    "bnb-nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False),
    "bnb-int8": dict(load_in_8bit=True, llm_int8_threshold=6.0),
}
# bits per weight of the stored format (codes + per-block scales), for the table
BITS = {"bnb-nf4": 4 + 32 / 64, "bnb-int8": 8 + 32 / 4096, "rtn-w4g64": 4 + 16 / 64, "gptq-w4g64": 4 + 16 / 64,
        "rtn-w4g128": 4 + 16 / 128, "gptq-w4g128": 4 + 16 / 128}


def _machine(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(0)
    return f"{platform.machine()} {platform.processor()}, {torch.get_num_threads()} threads"


def _bnb_model(folder: str, name: str, device: str, compute: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kw = dict(BNB[name])
    if "load_in_4bit" in kw:
        kw["bnb_4bit_compute_dtype"] = compute
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(**kw),
                                                device_map=device, dtype=compute)


def quality(args: argparse.Namespace) -> dict[str, Any]:
    from quant_bench import SETTINGS

    dev = torch.device(args.device)
    loaded = load_model(args.model, device=args.device)
    base, tok = loaded.model, loaded.tokenizer
    text = eval_text(args.eval_text)
    ids = tokenize_stream(tok, text)
    rows = []

    def score(name: str, model: nn.Module, seconds: float) -> None:
        res = perplexity(model, tok, args.eval_text, args.seqlen, args.max_windows, ids=ids)
        rows.append({"setting": name, "perplexity": res.perplexity, "seconds": round(seconds, 1),
                     "bits_per_weight": BITS.get(name, 32.0), "windows": res.windows,
                     "total_windows": res.total_windows})
        print(f"{name}: {res.perplexity:.3f}", flush=True)

    score("fp32", base, 0.0)
    with tempfile.TemporaryDirectory() as tmp:
        base.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        for name in args.bnb.split(","):
            t0 = time.perf_counter()
            model = _bnb_model(tmp, name, args.device, torch.float32)
            score(name, model, time.perf_counter() - t0)
            del model
            gc.collect()
    calib = None
    for name in [s for s in args.ours.split(",") if s]:
        steps = SETTINGS[name] if isinstance(SETTINGS[name], list) else [SETTINGS[name]]
        if calib is None and any(c.needs_calibration for c, _ in steps):
            calib = build_calibration(tok, args.calibration, args.nsamples, args.calib_seqlen, seed=0, eval_texts=[text])
        model = copy.deepcopy(base)
        ctx = PassContext(adapter=get_adapter(model), device=dev,
                          calibration_factory=None if calib is None else (lambda: calib))
        t0 = time.perf_counter()
        for cls, cfg in steps:
            cls(cfg).apply(model, ctx)
        score(name, model, time.perf_counter() - t0)
        del model
    print(f"\n| setting | bits/weight | perplexity |\n|---|---:|---:|")
    for r in rows:
        print(f"| {r['setting']} | {r['bits_per_weight']:.2f} | {r['perplexity']:.3f} |")
    return {"meta": {"model": args.model, "seqlen": args.seqlen, "eval_text": args.eval_text,
                     "calibration": None if calib is None else calib.describe(), "machine": _machine(dev),
                     "torch": torch.__version__, "bitsandbytes": _bnb_version(), "command": " ".join(sys.argv),
                     "date": time.strftime("%Y-%m-%d")}, "rows": rows}


def _bnb_version() -> str:
    import bitsandbytes

    return bitsandbytes.__version__


def _replace_with_bnb(model: nn.Module, name: str) -> None:
    """Swap every decoder nn.Linear (lm_head kept fp16) for its bitsandbytes module, quantized on .cuda()."""
    import bitsandbytes as bnb

    for mod_name, lin in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]:
        w = lin.weight.data.cpu()
        if name == "bnb-nf4":
            new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.float16,
                                    quant_type="nf4")
            new.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
        else:
            new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=False, has_fp16_weights=False,
                                      threshold=6.0)
            new.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
        parent, _, child = mod_name.rpartition(".")
        setattr(model.get_submodule(parent), child, new.cuda())  # .cuda() quantizes
        del lin, w
    torch.cuda.empty_cache()


def speed(args: argparse.Namespace) -> dict[str, Any]:
    from bench.speed.e2e_decode import LLAMA2_7B, quantize_linears

    from compress.kernels import accelerate, tune_triton
    from compress.kernels.gpu_timing import random_llama, time_generation

    if not torch.cuda.is_available():
        raise SystemExit("speed needs a CUDA GPU")
    rows = []
    for name in args.speed_settings.split(","):
        model = random_llama(dict(LLAMA2_7B), torch.float16, "cuda")
        if name.startswith("bnb"):
            _replace_with_bnb(model, name)
        elif name.startswith("ours"):
            quantize_linears(model, 128, symmetric=False)
            accelerate(model, backend="auto")
            tune_triton(model, [1])
        for mode in ("eager", "cuda_graph"):
            try:
                r = time_generation(model, args.prompt, args.generate, 1, mode=mode, repeats=3, warmup=1)
                row = {"setting": name, "mode": mode, "prefill_ms": r["prefill_ms"],
                       "decode_ms_per_token": r["decode_ms_per_token"],
                       "decode_tokens_per_s": 1e3 / r["decode_ms_per_token"]}
            except Exception as e:  # a path that cannot run this way is a result, not a crash
                row = {"setting": name, "mode": mode, "error": f"{type(e).__name__}: {str(e)[:200]}"}
            rows.append(row)
            print(row, flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    base = {r["mode"]: r["decode_ms_per_token"] for r in rows if r["setting"] == "fp16" and "error" not in r}
    print("\n| setting | mode | prefill ms | decode ms/token | tokens/s | vs fp16 |\n|---|---|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['setting']} | {r['mode']} | - | - | - | {r['error'][:60]} |")
            continue
        ratio = base.get(r["mode"], float("nan")) / r["decode_ms_per_token"]
        r["speedup_decode"] = ratio
        print(f"| {r['setting']} | {r['mode']} | {r['prefill_ms']:.1f} | {r['decode_ms_per_token']:.2f} | "
              f"{r['decode_tokens_per_s']:.1f} | {ratio:.2f}x |")
    return {"meta": {"model": "llama-2-7b shape, random fp16 weights", "prompt": args.prompt,
                     "generate": args.generate, "machine": _machine(torch.device("cuda")), "torch": torch.__version__,
                     "bitsandbytes": _bnb_version(), "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d")},
            "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["quality", "speed"])
    ap.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--eval-text", default="wikitext2", help="wikitext2 (../shared/assets) or a path to wiki.test.raw")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--bnb", default="bnb-nf4,bnb-int8")
    ap.add_argument("--ours", default="rtn-w4g64,gptq-w4g64", help="settings of bench/quality/quant_bench.py")
    ap.add_argument("--calibration", default="../shared/assets/data/text/dolly_hhrlhf_train_small.jsonl")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=2048)
    ap.add_argument("--prompt", type=int, default=1024, help="speed: prompt tokens")
    ap.add_argument("--generate", type=int, default=32, help="speed: decoded tokens")
    ap.add_argument("--speed-settings", default="fp16,bnb-nf4,bnb-int8,ours-int4-g128",
                    help="speed: settings to time (one process per setting is safest: a failed CUDA-graph capture "
                         "can leave the CUDA RNG unusable for the next model)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = quality(args) if args.what == "quality" else speed(args)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
