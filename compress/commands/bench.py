"""``compress bench CHECKPOINT``: measured prefill latency and decode speed, compressed vs uncompressed."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from compress.errors import CompressError

log = logging.getLogger(__name__)

#: --lm-head: the checkpoint's own lm_head, or RTN 8-bit codes per output row (compress.kernels.lm_head)
LM_HEAD_MODES = ("float", "int8")

HELP = "measure prefill latency and decode tokens/s of a checkpoint with the fast INT4 kernels"

DESCRIPTION = """\
Loads CHECKPOINT (a compress checkpoint: compressed-tensors or GPTQ) with its quantized layers on the
fastest available kernel (our CUDA W4A16 kernel or Triton on a GPU, our C kernel or torch's int4
kernel on the CPU, else the dequantize fallback; a warning names the path that ran), then times one
prefill over a random prompt and GENERATE greedy decode steps, and does the same for the
uncompressed model.

--lm-head int8 (CPU): the checkpoint's float lm_head is quantized at load to 8-bit codes, one scale
and zero point per output row, and runs on the C kernel; the baseline keeps the float lm_head, and
the JSON's "lm_head" fields say so. What it costs in perplexity: docs/int4-kernels.md.

The uncompressed baseline is --baseline PATH (a folder, .gguf file or hub id) when given, or with
--baseline original the model the checkpoint was made from (its report.json's model.name). Otherwise
a quantized checkpoint is compared with its own layers dequantized to dense float weights (same
shapes and dtype, so the difference is the kernel and the bytes), and a plain checkpoint (structurally
pruned, sparse) with the model it was made from when its report.json names one (its parameter
count against the baseline's is in the JSON), else it is timed alone.

Timing: on a GPU with a transformers StaticCache, the decode step captured in a CUDA graph
(--mode cuda_graph, default) or run eagerly; on the CPU eagerly with a DynamicCache
(compress.eval.latency), or with --mode compile both models torch.compile'd over a StaticCache
(compilation timed apart). Medians over --repeats runs after --warmup runs. Prompt ids are random
(seeded): speed does not depend on the text.

examples:
  compress bench out/llama-w4g128 --device cuda --prompt 512 --generate 128
  compress bench out/smollm2-w4g64 --device cpu --prompt 128 --generate 32 --json
  compress bench out/smollm2-w4g64 --device cpu --lm-head int8
  compress bench out/llama-w4g128 --baseline meta-llama/Llama-2-7b-hf --mode eager
  compress bench out/smollm2-depth4 --device cpu        # a pruned checkpoint against its original
"""


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help=HELP, description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="compress checkpoint folder (or a plain model folder)")
    p.add_argument("--baseline", default=None, metavar="PATH",
                   help="uncompressed model (folder, .gguf or hub id) to compare with, or 'original': the model "
                        "the checkpoint was made from, as its report.json names it (default: a quantized "
                        "checkpoint dequantized; a plain one, e.g. pruned, against 'original' where its "
                        "report.json exists, else timed alone)")
    g = p.add_argument_group("workload")
    g.add_argument("--batch", type=int, default=1, help="sequences decoded together (default: 1)")
    g.add_argument("--prompt", type=int, default=512, help="prompt tokens (default: 512)")
    g.add_argument("--generate", type=int, default=128, help="decode steps timed (default: 128)")
    g.add_argument("--repeats", type=int, default=3, help="timed runs; the median is reported (default: 3)")
    g.add_argument("--warmup", type=int, default=1, help="untimed runs first (default: 1)")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda or cuda:N (default: auto)")
    r.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"],
                   help="activation dtype (default: float16 on CUDA, float32 on the CPU)")
    r.add_argument("--backend", default="auto", choices=["auto", "triton", "cpu-int4", "dequant"],
                   help="kernel for the quantized layers (default: auto)")
    r.add_argument("--mode", default="cuda_graph", choices=["cuda_graph", "eager", "compile"],
                   help="GPU timing: decode step captured in a CUDA graph, eager, or torch.compile'd and then "
                        "captured (default: cuda_graph). CPU: compile = both models torch.compile'd over a static "
                        "KV cache (minutes of compilation each, reported apart); otherwise eager")
    r.add_argument("--no-fuse", dest="fuse", action="store_false",
                   help="GPU: one launch per quantized layer (default: q/k/v and gate/up stacked into one launch each)")
    r.add_argument("--no-fuse-blocks", dest="fuse_blocks", action="store_false",
                   help="GPU: keep RMSNorms, SiLU(gate) * up and residual adds out of the W4A16 launches "
                        "(default: inside them, in decoder blocks the adapter table describes; "
                        "compress.kernels.fused_block)")
    r.add_argument("--no-decode-attention", dest="decode_attention", action="store_false",
                   help="GPU: transformers' SDPA attention at decode (default: our split decode attention kernel, "
                        "compress.kernels.attention, in both the compressed model and the baseline)")
    r.add_argument("--no-pdl", dest="pdl", action="store_false",
                   help="GPU: plain kernel launches (default: programmatic dependent launch on sm_90+)")
    r.add_argument("--inductor-pdl", action="store_true",
                   help="with --mode compile on sm_90+: Inductor's kernels launched with programmatic dependent "
                        "launch too (both models; torch's default is off)")
    r.add_argument("--no-tune", dest="tune", action="store_false",
                   help="GPU: skip timing the kernel configs for the decode batch (about a second per layer shape)")
    r.add_argument("--large-m", default="auto", choices=["auto", "dequant", "gemm"],
                   help="GPU: the path of prefill-sized products (more than 16 rows): our W4A16 GEMM, "
                        "dequantize + cuBLAS, or auto (the GEMM where it measured faster; docs/design/gemm-and-triton.md)")
    r.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    r.add_argument("--cpu-prefill", default="auto", choices=["auto", "bf16", "fp32"],
                   help="CPU INT4 path: arithmetic of the dense product prefill-sized inputs take; auto = bf16 "
                        "where the CPU multiplies bf16 natively (AMX / AVX512-BF16), else fp32 (default: auto)")
    r.add_argument("--cpu-kernel", default="auto", choices=["auto", "native", "torch"],
                   help="CPU INT4 path, few activation rows: native = our C kernel (fp32 arithmetic, built for this "
                        "CPU on first use), torch = torch's int4 kernel (bf16), auto = native where it builds "
                        "(default: auto)")
    r.add_argument("--lm-head", default="float", choices=list(LM_HEAD_MODES),
                   help="CPU: float = the checkpoint's lm_head as stored; int8 = quantized at load (RTN, 8 bits, one "
                        "scale per output row) onto the C kernel, a quarter of the bytes per token; the baseline "
                        "keeps the float lm_head (default: float)")
    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    o.add_argument("--output", default=None, metavar="FILE", help="also write the JSON object to FILE")
    p.set_defaults(func=handler)
    return p


def _is_quantized(folder: Path) -> bool:
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise CompressError(f"not a model folder (no config.json): {folder}")
    qcfg = json.loads(cfg.read_text()).get("quantization_config") or {}
    return qcfg.get("quant_method") in ("compressed-tensors", "gptq")


def _densify(model) -> int:
    """Replace every QuantizedLinear by an nn.Linear holding its dequantized weight (in place)."""
    import torch
    from torch import nn

    from compress.adapters import set_submodule
    from compress.kernels import fused_block
    from compress.nn.qlinear import QuantizedLinear

    fused_block.uninstall(model)  # fused blocks call the packed weights directly
    names = [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    for name in names:
        q = model.get_submodule(name)
        dtype = q.scales.dtype if q.scales.dtype != torch.float32 else next(model.parameters()).dtype
        lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None,
                        device=q.qweight.device, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(q.dequantize().to(dtype))
            if q.bias is not None:
                lin.bias.copy_(q.bias)
        set_submodule(model, name, lin)
    return len(names)


def _measure(model, args: argparse.Namespace, device) -> dict[str, Any]:
    if device.type == "cuda":
        from compress.kernels.gpu_timing import time_generation

        return time_generation(model, args.prompt, args.generate, args.batch, mode=args.mode,
                               repeats=args.repeats, warmup=args.warmup, inductor_pdl=args.inductor_pdl)
    from compress.eval.latency import measure_compiled_latency, measure_latency

    if args.mode == "compile":
        r = measure_compiled_latency(model, args.prompt, args.generate, args.batch, repeats=args.repeats,
                                     warmup=args.warmup)
    else:
        r = measure_latency(model, args.prompt, args.generate, args.batch, repeats=args.repeats,
                            warmup=args.warmup)
        r["mode"] = "eager"
    r["decode_tokens_per_s"] = args.batch * 1e3 / r["decode_ms_per_token"]
    return r


def _install_attention(model, args: argparse.Namespace, device) -> int:
    """Our decode attention on ``model`` (both models get it, so the speedup is the compression's);
    returns the number of attention modules that run it."""
    from compress.kernels import attention

    if device.type != "cuda" or not args.decode_attention:
        return 0
    return attention.install(model, pdl=args.pdl)


def _check_args(args: argparse.Namespace) -> None:
    for name in ("batch", "prompt", "generate", "repeats"):
        if getattr(args, name) <= 0:
            raise CompressError(f"--{name} must be positive, got {getattr(args, name)}")
    if args.warmup < 0:
        raise CompressError(f"--warmup must be >= 0, got {args.warmup}")
    if args.inductor_pdl and args.mode != "compile":
        raise CompressError(f"--inductor-pdl needs --mode compile, got --mode {args.mode}")
    if args.threads is not None and args.threads <= 0:
        raise CompressError(f"--threads must be positive, got {args.threads}")


#: --baseline keyword: the model the checkpoint was made from, as its report.json names it
ORIGINAL = "original"


def _original_model(folder: Path) -> str | None:
    """The model a compress run started from (report.json's model.name), or None without a report."""
    path = folder / "report.json"
    if not path.is_file():
        return None
    try:
        name = json.loads(path.read_text())["model"]["name"]
    except (ValueError, KeyError, TypeError):
        log.warning("%s does not name the model it was made from (model.name)", path)
        return None
    return name if isinstance(name, str) and name else None


def _baseline_source(folder: Path, args: argparse.Namespace, quantized: bool) -> str | None:
    """What to load as the baseline; None: the checkpoint itself (dequantized when quantized).

    Quantized checkpoints default to their own layers dequantized (same shapes: the difference is the
    kernel and the bytes); plain ones (pruned, sparse) to the model they were made from, since their
    point is the shapes or zeros that model did not have."""
    if args.baseline == ORIGINAL:
        name = _original_model(folder)
        if name is None:
            raise CompressError(f"--baseline {ORIGINAL}: {folder / 'report.json'} is missing or names no model "
                                "(model.name); pass --baseline PATH")
        return name
    if args.baseline:
        return args.baseline
    return None if quantized else _original_model(folder)


def _load_plain(path: str, dtype, device, what: str):
    """A float model from a folder, .gguf file or hub id by ``compress.modeling.load_model``
    (safetensors only, no remote code); no tokenizer: prompts are random ids."""
    from compress.modeling import load_model

    try:
        return load_model(path, str(dtype).replace("torch.", ""), str(device), tokenizer=False).model
    except CompressError as e:
        raise CompressError(f"{what}: {e}") from None


def _parameters(model) -> int:
    """Float parameters (a QuantizedLinear's packed codes are buffers, so this is for float models)."""
    return sum(p.numel() for p in model.parameters())


def _check_lm_head_path(model, report) -> None:
    """An 8-bit lm_head off the C kernel (--cpu-kernel torch, no C compiler) would be dequantized on
    every step: several times slower than the float one it replaces, so that is an error."""
    head = model.get_output_embeddings()
    name = next(n for n, m in model.named_modules() if m is head)
    if report.layers.get(name) != "cpu-int4":
        raise CompressError(f"--lm-head int8 needs our C kernel's 8-bit path, but {name} would run "
                            f"{report.layers.get(name)} ({report.reasons.get(name)}), dequantizing its weight "
                            "every step; drop --lm-head int8 or use --cpu-kernel auto|native")


def _record(result: dict[str, Any], key: str, run: dict[str, Any]) -> None:
    """Store the compressed model's run and its headline numbers."""
    result.update({k: run[k] for k in ("prefill_ms", "decode_ms_per_token", "decode_tokens_per_s", "mode")})
    result.setdefault("runs", {})[key] = run


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Load, accelerate and time the checkpoint and its baseline; returns the result dict."""
    import torch

    from compress.kernels import accelerate
    from compress.modeling import resolve_device

    _check_args(args)
    device = resolve_device(args.device)
    if args.inductor_pdl and device.type != "cuda":
        raise CompressError(f"--inductor-pdl needs a CUDA device, got {device}")
    dtype = (torch.float16 if device.type == "cuda" else torch.float32) if args.dtype == "auto" \
        else getattr(torch, args.dtype)
    folder = Path(args.checkpoint)
    quantized = _is_quantized(folder)
    result: dict[str, Any] = {"checkpoint": str(folder), "device": str(device), "dtype": str(dtype).replace("torch.", ""),
                              "batch": args.batch, "prompt": args.prompt, "generate": args.generate,
                              "torch": torch.__version__, "threads": torch.get_num_threads(),
                              "inductor_pdl": args.inductor_pdl, "cpu_prefill": args.cpu_prefill,
                              "cpu_kernel": args.cpu_kernel, "lm_head": args.lm_head}
    if args.lm_head != "float" and not quantized:
        raise CompressError(f"--lm-head {args.lm_head} needs a quantized checkpoint; {folder} has no "
                            "quantization_config")
    source = _baseline_source(folder, args, quantized)
    with torch.inference_mode():
        if quantized:
            from compress.formats import load_quantized

            model, _ = load_quantized(folder, device=str(device), dtype=dtype)
            model.to(device)
            swap = None
            if args.lm_head == "int8":
                from compress.kernels.lm_head import quantize_lm_head

                swap = quantize_lm_head(model, bits=8, group_size=-1, symmetric=False)
                result["lm_head_detail"] = swap.as_dict()
            report = accelerate(model, backend=args.backend, large_m=args.large_m, fuse=args.fuse, pdl=args.pdl,
                                cpu_prefill=args.cpu_prefill, fuse_blocks=args.fuse_blocks,
                                cpu_kernel=args.cpu_kernel)
            if swap is not None:
                _check_lm_head_path(model, report)
            result["kernels"] = report.counts()
            result["large_m"] = args.large_m
            result["kernel_reasons"] = sorted(set(report.reasons.values()))
            result["fused_groups"] = len(report.fused)
            result["fused_blocks"] = report.fused_blocks
            result["decode_attention"] = _install_attention(model, args, device)
            if device.type == "cuda" and args.tune and args.batch <= 16 and (
                    {"cuda", "triton"} & set(report.layers.values())):
                from compress.kernels import tune_triton
                from compress.kernels.fused_block import key_label

                tuned = tune_triton(model, (args.batch,))  # decode rows; prefill dequantizes (M > 16)
                result["tuned"] = {key_label(key): c.as_dict() for key, c in tuned.items()}
            _record(result, "compressed", _measure(model, args, device))
            if swap is not None:  # the baseline is the checkpoint as stored: float lm_head
                from compress.kernels.lm_head import restore_lm_head

                restore_lm_head(model, swap)
            if source is None:
                n = _densify(model)
                result["baseline"] = f"checkpoint dequantized to dense {result['dtype']} ({n} layers)"
                base_model = model
            else:
                base_model = None
            del model
        else:
            # a plain folder (structurally pruned, sparse or dense): timed as it is, against the model
            # it was made from where that is known (report.json), else alone
            result["kernels"] = {}
            model = _load_plain(str(folder), dtype, device, "CHECKPOINT")
            result["parameters"] = _parameters(model)
            if source is None:
                log.warning("%s has no quantization_config and no report.json naming the model it was made from: "
                            "timing it alone (speedups 1.0); pass --baseline PATH to compare", folder)
                base_model = model
                result["baseline"] = str(folder)
            else:
                result["decode_attention"] = _install_attention(model, args, device)
                _record(result, "compressed", _measure(model, args, device))
                base_model = None
            del model
        if base_model is None:
            base_model = _load_plain(source, dtype, device, "--baseline" if args.baseline else
                                     f"the original model named in {folder / 'report.json'} (--baseline PATH "
                                     "to use another)")
            result["baseline"] = source
        result["baseline_parameters"] = _parameters(base_model)
        result["baseline_decode_attention"] = _install_attention(base_model, args, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        base = _measure(base_model, args, device)
        result.setdefault("runs", {})["baseline"] = base
    result["baseline_prefill_ms"] = base["prefill_ms"]
    result["baseline_decode_ms_per_token"] = base["decode_ms_per_token"]
    result["baseline_decode_tokens_per_s"] = base["decode_tokens_per_s"]
    if "compressed" not in result["runs"]:  # timed alone
        _record(result, "compressed", base)
    result["decode_speedup"] = result["decode_tokens_per_s"] / result["baseline_decode_tokens_per_s"]
    result["prefill_speedup"] = result["baseline_prefill_ms"] / result["prefill_ms"]
    return result


def format_table(r: dict[str, Any]) -> str:
    rows = [("", "compressed", "baseline", "ratio"),
            ("prefill ms", f"{r['prefill_ms']:.2f}", f"{r['baseline_prefill_ms']:.2f}", f"{r['prefill_speedup']:.2f}x"),
            ("decode ms/token", f"{r['decode_ms_per_token']:.2f}", f"{r['baseline_decode_ms_per_token']:.2f}",
             f"{r['decode_speedup']:.2f}x"),
            ("decode tokens/s", f"{r['decode_tokens_per_s']:.1f}", f"{r['baseline_decode_tokens_per_s']:.1f}",
             f"{r['decode_speedup']:.2f}x")]
    width = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(width[i]) if i == 0 else c.rjust(width[i]) for i, c in enumerate(row)) for row in rows]
    head = (f"{r['checkpoint']} on {r['device']} ({r['dtype']}, {r['mode']}), batch {r['batch']}, "
            f"prompt {r['prompt']}, generate {r['generate']}; kernels {r['kernels'] or 'none'}; "
            f"baseline: {r['baseline']}")
    if "parameters" in r:  # a plain (pruned or sparse) checkpoint
        head += f"; parameters {r['parameters'] / 1e6:.2f} M vs {r['baseline_parameters'] / 1e6:.2f} M"
    if r.get("lm_head", "float") != "float":
        head += f"; lm_head {r['lm_head']} at load (the baseline's lm_head is float)"
    return head + "\n" + "\n".join(lines)


def handler(args: argparse.Namespace) -> int:
    import torch

    previous = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = run_bench(args)
    finally:
        torch.set_num_threads(previous)
    text = json.dumps(result, indent=2, default=str)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")
    print(text if args.json else format_table(result))
    return 0
