"""compress eval MODEL: perplexity (and zero-shot tasks) of a model or a compressed checkpoint."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model or checkpoint (perplexity, zero-shot tasks)",
                       description="Evaluate a hub id, local folder, .gguf file or a compress checkpoint "
                                   "(compressed-tensors or GPTQ, loaded into compress's quantized layers).",
                       epilog="example: compress eval out/smollm2-w4g128 --max-windows 20")
    p.add_argument("model", help="hub id, local folder, .gguf file or checkpoint folder")
    p.add_argument("--dataset", default="wikitext2", help="perplexity text: wikitext2 or a .txt/.raw path (default: wikitext2)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per window (default: 2048)")
    p.add_argument("--max-windows", type=int, default=None, help="score only the first N windows (partial run)")
    p.add_argument("--no-perplexity", action="store_true", help="skip perplexity")
    p.add_argument("--tasks", default=None, help="comma-separated zero-shot tasks, e.g. arc_easy,piqa")
    p.add_argument("--limit", type=int, default=None, help="examples per task (partial run)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--allow-pickle", action="store_true", help="allow pickle (.bin) weights")
    p.add_argument("--trust-remote-code", action="store_true", help="run model code shipped with the checkpoint")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=handle)


def load_any(model: str, device: str, dtype: str, allow_pickle: bool = False, trust_remote_code: bool = False):
    """A compress checkpoint through ``load_quantized``; anything else through ``load_model``."""
    import torch

    from compress.errors import CompressError
    from compress.formats import load_quantized
    from compress.modeling import load_model, resolve_device

    cfg = Path(model) / "config.json"
    if cfg.is_file() and json.loads(cfg.read_text()).get("quantization_config", {}).get("quant_method") in ("compressed-tensors", "gptq"):
        dt = None if dtype == "auto" else getattr(torch, dtype)
        m, tok = load_quantized(model, device=str(resolve_device(device)), dtype=dt)
        if tok is None:
            raise CompressError(f"{model} has no tokenizer files")
        return m, tok
    loaded = load_model(model, dtype, device, trust_remote_code, allow_pickle)
    return loaded.model, loaded.tokenizer


def handle(args: argparse.Namespace) -> int:
    from compress.errors import CompressError
    from compress.eval.perplexity import perplexity

    if args.seqlen <= 0 or (args.max_windows is not None and args.max_windows <= 0):
        raise CompressError("--seqlen and --max-windows must be positive")
    model, tok = load_any(args.model, args.device, args.dtype, args.allow_pickle, args.trust_remote_code)
    result: dict = {"model": args.model}
    if not args.no_perplexity:
        result["perplexity"] = perplexity(model, tok, args.dataset, args.seqlen, args.max_windows).to_dict()
    if args.tasks:
        from compress.eval.tasks import run_tasks

        names = [t.strip() for t in args.tasks.split(",") if t.strip()]
        task_results = run_tasks(model, tok, names, limit=args.limit)
        result["tasks"] = task_results.to_dict()
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    if "perplexity" in result:
        r = result["perplexity"]
        print(f"perplexity {r['perplexity']:.3f} on {r['dataset']} @ {r['seqlen']} "
              f"({r['windows']}/{r['total_windows']} windows{', partial' if r['partial'] else ''})")
    if args.tasks:
        print(task_results.to_markdown())
    return 0
