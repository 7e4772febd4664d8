"""``compress roofline``: estimate latency and memory of a model on a device, compressed or not."""
from __future__ import annotations

import argparse
import json
from typing import Any

from compress.errors import CompressError

HELP = "estimate prefill/decode latency, memory and compression speedup on a device (roofline)"

DESCRIPTION = """\
Roofline estimate for a generate task (prompt P, generate G, batch B) on a target device: every
operator of the forward pass takes max(FLOPs / achievable peak, bytes / achievable bandwidth);
prefill is one forward over the prompt (time to first token), decode is averaged over the G steps as
the KV cache grows. With compressed settings (--weight-bits, --sparsity) it also estimates the
uncompressed model and prints the speedup. Weight bytes include per-group scales and zero points;
KV bytes use the KV heads (grouped-query attention). Assumptions: docs/roofline.md.

MODEL_OR_CONFIG is a built-in shape name (e.g. llama-2-7b, smollm2-135m), a local model folder, a
config.json path, or a hub id (needs the hub). Devices are YAML files: built-in names (--list-devices),
a path (--device my.yaml), or extra files/folders given with --device-file.

examples:
  compress roofline llama-2-7b --device h100 --prompt 1024 --generate 128
  compress roofline llama-2-7b --device a100-80gb --weight-bits 4 --group-size 128 --json
  compress roofline ./my-model --device h100 --sparsity 2:4 --per-op
  compress roofline smollm2-135m --device this-machine --dtype float32 --kv-cache dynamic
  compress roofline llama-2-7b --device h100 --implementation fused --no-overhead   # the bytes-only floor
  compress roofline smollm2-135m --device h100 --execution eager --max-cache-len 4096
"""


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("roofline", help=HELP, description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", metavar="MODEL_OR_CONFIG",
                   help="built-in shape name, model folder, config.json, or hub id")
    g = p.add_argument_group("task")
    g.add_argument("--device", default="h100", help="device name/alias or path to a device YAML (default: h100)")
    g.add_argument("--device-file", action="append", default=[], metavar="PATH",
                   help="extra device YAML file or folder of them (repeatable); names there win over built-ins")
    g.add_argument("--prompt", type=int, default=1024, help="prompt tokens per sequence (default: 1024)")
    g.add_argument("--generate", type=int, default=128, help="tokens generated per sequence (default: 128)")
    g.add_argument("--batch", type=int, default=1, help="sequences decoded together (default: 1)")
    g.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="activation/compute dtype; uncompressed weights are stored in it (default: float16)")
    g.add_argument("--kv-cache", default="static", choices=["static", "dynamic"],
                   help="static: rows written in place; dynamic: transformers DynamicCache copies it each step")
    g.add_argument("--prefill-logits", default="all", choices=["all", "last"],
                   help="lm_head over every prompt token (plain forward) or only the last (default: all)")
    g.add_argument("--no-overhead", action="store_true",
                   help="leave out the device's measured fixed costs (per kernel, per matrix product, per forward, "
                        "per layer, per weight row)")
    g.add_argument("--implementation", default="transformers", choices=["transformers", "fused", "compress"],
                   help="transformers: the kernel counts and memory traffic of transformers' PyTorch modules "
                        "(unfused RMSNorm, rotary, cache update, SiLU*mul); fused: one kernel per operator, each "
                        "activation read and written once, the floor LLM-Viewer counts; compress: compress's "
                        "compiled runtime (accelerate + decode attention: its W4A16 kernel with q/k/v and gate/up "
                        "stacked and norms, SiLU and residuals inside, dequantize + cuBLAS for prefill) "
                        "(default: transformers)")
    g.add_argument("--execution", default="graph", choices=["graph", "eager"],
                   help="graph: each forward replayed from a CUDA graph (or compiled), no host cost; eager: a "
                        "forward takes at least the device's measured host time for Python and kernel launches "
                        "(default: graph)")
    g.add_argument("--max-cache-len", type=int, default=None, metavar="N",
                   help="slots of the static KV cache (default: prompt + generate); transformers' decode "
                        "attends to all N behind a mask, so a larger cache costs decode time")
    c = p.add_argument_group("compression (of the decoder's linear layers)")
    c.add_argument("--weight-bits", type=int, default=None, help="weight-only quantization bits (2-8)")
    c.add_argument("--group-size", type=int, default=128, help="columns per scale group, -1 per row (default: 128)")
    c.add_argument("--symmetric", action="store_true", help="symmetric grid: no zero points stored")
    c.add_argument("--sparsity", default=None, help='"2:4" or an unstructured fraction such as 0.5')
    c.add_argument("--sparse-format", default="dense", choices=["dense", "bitmask", "csr"],
                   help="storage of unstructured sparsity; dense (default) gives no speedup")
    c.add_argument("--quantize-lm-head", action="store_true", help="also quantize lm_head")
    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    o.add_argument("--per-op", action="store_true", help="per-operator tables (and per-op rows in --json)")
    o.add_argument("--list-devices", action="store_true", help="list known devices and exit")
    p.set_defaults(func=handler)
    return p


def _sparsity(text: str | None) -> float | str | None:
    if text is None or text == "2:4":
        return text
    try:
        return float(text)
    except ValueError:
        raise CompressError(f'--sparsity must be "2:4" or a fraction such as 0.5, got {text!r}') from None


def _compression(args: argparse.Namespace) -> dict[str, Any] | None:
    if args.weight_bits is None and args.sparsity is None:
        return None
    return {"weight_bits": args.weight_bits, "group_size": args.group_size, "symmetric": args.symmetric,
            "sparsity": _sparsity(args.sparsity), "sparse_format": args.sparse_format,
            "quantize_lm_head": args.quantize_lm_head}


def handler(args: argparse.Namespace) -> int:
    # Imported here so that `compress --help` does not pay for pydantic models and YAML parsing.
    from compress.eval.roofline import estimate, format_table
    from compress.eval.roofline_devices import catalog

    if args.list_devices:
        seen = set()
        for dev in catalog(args.device_file).values():
            if dev.name not in seen:
                seen.add(dev.name)
                alias = f" (aliases: {', '.join(dev.aliases)})" if dev.aliases else ""
                print(f"{dev.name:<14}{dev.title}{alias}")
        return 0
    if args.model is None:
        raise CompressError("roofline needs MODEL_OR_CONFIG (a built-in name, folder, config.json or hub id)")
    spec = {"device": args.device, "device_files": list(args.device_file), "prompt": args.prompt,
            "generate": args.generate, "batch": args.batch, "dtype": args.dtype, "kv_cache": args.kv_cache,
            "prefill_logits": args.prefill_logits, "overhead": not args.no_overhead,
            "implementation": args.implementation, "execution": args.execution, "max_cache_len": args.max_cache_len}
    res = estimate(args.model, spec, compression=_compression(args))
    if args.json:
        print(json.dumps(res.to_dict(per_op=args.per_op)))
    else:
        print(format_table(res, per_op=args.per_op))
    return 0
