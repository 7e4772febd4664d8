"""End-to-end decode speed: uncompressed vs RTN INT4 with our kernels, same model, same workload.

``gpu``: a Llama-2-7B-shaped model with random fp16 weights (built from a LlamaConfig, no download).
Times prefill and decode with a static KV cache, eagerly and with the decode step captured in a
CUDA graph (``compress.kernels.gpu_timing``); then quantizes every decoder linear layer with
``rtn_quantize`` (lm_head stays fp16), and for each ``--variants`` entry installs the GPU kernels via
``accelerate`` with those options (``fused_pdl``: q/k/v and gate/up stacked into one launch each,
programmatic dependent launch, RMSNorms / SiLU gate / residual adds inside the launches
(``compress.kernels.fused_block``), the default; ``stacked_pdl``: the same without the block fusion;
``pdl``: one launch per layer with PDL; ``plain``: one plain launch per layer), tunes them for batch 1, checks the model's logits against the dequantize
reference path, reports GPU memory after the uint8 codes are released, and times it again.

``cpu``: a local model folder (default: the prepared SmolLM2-135M) in float32 vs the same model with
RTN INT4 layers on torch's CPU int4 kernel; eager timing with ``compress.eval.latency``.

    python bench/speed/e2e_decode.py gpu --out $OUT/e2e_gpu.json
    python bench/speed/e2e_decode.py cpu --threads 2 --out bench/results/e2e_cpu.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections import Counter
from typing import Any
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: compress and bench.*

from compress.adapters import get_adapter, set_submodule  # noqa: E402
from compress.algos.quant import default_g_idx, rtn_quantize, rtn_quantize_permuted, shared_permutations  # noqa: E402
from compress.kernels import accelerate, fused_block, tune_triton  # noqa: E402
from compress.kernels.cuda_w4a16 import TILE_LAYOUTS  # noqa: E402
from compress.kernels.dispatch import CPU_PREFILL, LARGE_M, packed_weights  # noqa: E402
from compress.nn.qlinear import QuantizedLinear  # noqa: E402
from compress.modeling import cache_kwargs  # noqa: E402

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
SMOLLM2 = str(Path.home() / ".cache/compress/models/HuggingFaceTB--SmolLM2-135M-Instruct")


def quantize_linears(model: nn.Module, group_size: int, symmetric: bool, skip: tuple[str, ...] = ("lm_head",),
                     act_order: bool = False) -> int:
    """Replace each nn.Linear (except ``skip``) by an RTN-quantized QuantizedLinear, in place. With
    ``act_order`` the groups follow a random column permutation per input, shared by the layers that
    read the same input (q/k/v; gate/up), as GPTQ's act-order gives them: timing only (RTN numerics)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] not in skip]
    perms = {}
    if act_order:
        groups = get_adapter(model).input_groups(model)
        perms = shared_permutations(groups, {n: model.get_submodule(n).in_features for g in groups for n in g},
                                    torch.Generator().manual_seed(0))
    for name in names:
        lin = model.get_submodule(name)
        if act_order:
            q, s, z, g = rtn_quantize_permuted(lin.weight.data, 4, group_size, symmetric, perms[name])
        else:
            q, s, z = rtn_quantize(lin.weight.data, 4, group_size, symmetric)
            g = default_g_idx(lin.in_features, group_size, device=q.device)
        bias = None if lin.bias is None else lin.bias.data
        ql = QuantizedLinear.from_codes(q, s.to(lin.weight.dtype), z, g, 4, group_size, symmetric, bias, act_order)
        set_submodule(model, name, ql)
        del lin
    return len(names)


@torch.inference_mode()
def logits_check(model: nn.Module, vocab: int, tokens: int = 16) -> float:
    """Relative error of the model's logits with the installed kernels vs the dequantize path."""
    ids = torch.randint(0, vocab, (1, tokens), device=next(model.parameters()).device)
    fast = model(ids).logits.double()
    saved = {n: m._backend for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    for n, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            m.set_backend(None)
    with fused_block.suspended(model):  # fused blocks call their kernels directly: the class forward
        ref = model(ids).logits.double()
    for n, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            m.set_backend(saved[n])
    return float((fast - ref).norm() / ref.norm())


@torch.inference_mode()
def linear_share(model: nn.Module, vocab: int, steps: int = 10, rounds: int = 3) -> dict:
    """CPU: one-token decode steps after a 32-token prompt, and the time spent inside the quantized
    layers' installed forwards (wrapped with timers for this; fastest of ``rounds``)."""
    from transformers import DynamicCache

    mods = [m for m in model.modules() if isinstance(m, QuantizedLinear) and m._backend is not None]
    spent = [0.0]

    def timed_backend(fn):
        def run(x):
            t0 = time.perf_counter()
            y = fn(x)
            spent[0] += time.perf_counter() - t0
            return y
        return run

    saved = [m._backend for m in mods]
    for m, fn in zip(mods, saved):
        m._backend = timed_backend(fn)  # attributes of the installed forward are not needed here
    try:
        past = cache_kwargs(model, DynamicCache(config=model.config))
        out = model(torch.randint(0, vocab, (1, 32)), **past, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        for _ in range(3):
            model(tok, **past, use_cache=True)
        best = None
        for _ in range(rounds):
            spent[0] = 0.0
            t0 = time.perf_counter()
            for _ in range(steps):
                model(tok, **past, use_cache=True)
            step, lin = (time.perf_counter() - t0) / steps * 1e3, spent[0] / steps * 1e3
            if best is None or step < best["step_ms"]:
                best = {"step_ms": step, "linear_ms": lin, "linear_calls": len(mods)}
    finally:
        for m, fn in zip(mods, saved):
            m._backend = fn
    return best


def held_mib(model: nn.Module) -> float:
    """MiB of tensor storage the model holds: parameters, buffers and the accelerated layers' packed
    copies (each storage counted once)."""
    tensors = list(model.parameters()) + list(model.buffers())
    for wt in {id(w): w for w in packed_weights(model).values()}.values():
        tensors += [v for v in vars(wt).values() if isinstance(v, torch.Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values()) / 2**20


def save_partial(path: str | None, out: dict) -> None:
    """Write the results so far (``"partial": true``); the final write replaces them."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({**out, "partial": True}, indent=1, default=str))


MODES = ("eager", "cuda_graph", "compile", "compile_pdl")  # compile_pdl: Inductor's kernels with PDL too

VARIANTS = {  # name -> accelerate() options
    "fused_pdl": dict(fuse=True, pdl=True),  # the default of accelerate (stacked launches, fused blocks)
    "stacked_pdl": dict(fuse=True, pdl=True, fuse_blocks=False),  # sessions 3-5's default: no block fusion
    "pdl": dict(fuse=False, pdl=True),
    "plain": dict(fuse=False, pdl=False),  # one launch per layer, plain launches (session 2's path)
}


def kernel_profile(model: nn.Module, prompt: int, compiled: bool, steps: int = 8) -> dict:
    """GPU time per decode step by kernel family (torch.profiler over ``steps`` uncaptured steps of
    the model, compiled or not): where the time goes besides the matmuls."""
    from torch.profiler import ProfilerActivity, profile

    from compress.kernels.gpu_timing import _Steps

    # no dynamo reset: right after time_generation(mode="compile") this reuses its compiled code
    fwd = torch.compile(model, dynamic=False) if compiled else None
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), device="cuda")
    with torch.inference_mode():
        st = _Steps(model, ids, steps + 4, fwd)
        st.prefill()
        for _ in range(2):
            st.step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                st.step()
            torch.cuda.synchronize()
    # (Inductor names its fused kernels after the ops they consume, e.g. "..._w4a16_linear_11": match
    # our kernels by their own names only)
    families = {"w4a16 (ours)": ("w4a16_mma", "w4a16_dequant"), "gemm (cuBLAS)": ("gemm", "gemv", "sm90_", "cutlass", "cublas"),
                "attention": ("attention", "fmha", "flash", "sdpa", "softmax", "decode_attn"),
                "fused elementwise (Triton/Inductor)": ("triton_",)}
    out: dict[str, Any] = {k: {"us_per_step": 0.0, "kernels_per_step": 0.0} for k in [*families, "other"]}
    top = []
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if not t or ev.count == 0:
            continue
        name = ev.key.lower()
        fam = next((f for f, keys in families.items() if any(k in name for k in keys)), "other")
        out[fam]["us_per_step"] += t / steps
        out[fam]["kernels_per_step"] += ev.count / steps
        top.append((t / steps, ev.count / steps, ev.key[:90]))
    out["top"] = [dict(us_per_step=a, per_step=b, kernel=c) for a, b, c in sorted(top, reverse=True)[:15]]
    return out


def print_profile(tag: str, prof: dict) -> None:
    total = sum(v["us_per_step"] for k, v in prof.items() if k != "top")
    print(f"{tag} kernel time per decode step (profiler, uncaptured): {total:.0f} us", flush=True)
    for k, v in prof.items():
        if k != "top":
            print(f"  {k:38} {v['us_per_step']:8.1f} us  {v['kernels_per_step']:6.1f} kernels", flush=True)
    for r in prof["top"][:8]:
        print(f"    {r['us_per_step']:8.1f} us x{r['per_step']:5.1f}  {r['kernel']}", flush=True)


def run_gpu(args: argparse.Namespace) -> dict:
    from compress.kernels.gpu_timing import inductor_pdl_scope, random_llama, time_generation

    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    config = {**LLAMA2_7B, "num_hidden_layers": args.layers or LLAMA2_7B["num_hidden_layers"]}
    out = {"model": "llama-2-7b shape, random weights", "config": config, "prompt": args.prompt, "sdpa": args.sdpa, "attn": args.attn,
           "generate": args.generate, "batch": 1, "group_size": args.group_size, "symmetric": args.symmetric,
           "device": torch.cuda.get_device_name(), "variants": variants, "runs": {}, "int4": {}}
    modes = tuple(m for m in args.modes.split(",") if m)
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise SystemExit(f"--modes: unknown {bad}; choose from {', '.join(MODES)}")
    model = random_llama(config, torch.float16, "cuda", attn_implementation="sdpa" if args.attn == "compress" else args.attn)
    if args.attn == "compress":  # our decode attention kernel, in both models (the INT4 one is this model)
        from compress.kernels import attention
        from compress.kernels.decode_attention import Config

        cfg = None
        if args.attn_config:
            w, t, bps, *cl = args.attn_config.split(":")
            cfg = Config(int(w), int(t), float(bps), int(cl[0]) if cl else 0)
        out["attention_modules"] = attention.install(model, config=cfg)
        out["attn_config"] = "choose_config" if cfg is None else cfg.__dict__

    def profile() -> dict:
        # profile what the last compiled mode compiled (with Inductor's PDL when that mode ran)
        compiled = next((m for m in reversed(modes) if m.startswith("compile")), None)
        with inductor_pdl_scope("compile") if compiled == "compile_pdl" else contextlib.nullcontext():
            return kernel_profile(model, args.prompt, compiled is not None)

    def timed(tag: str) -> None:
        for mode in modes:
            t0 = time.time()
            r = time_generation(model, args.prompt, args.generate, 1, mode=mode.removesuffix("_pdl"),
                                repeats=args.repeats, warmup=1, sdpa=args.sdpa, inductor_pdl=mode == "compile_pdl")
            out["runs"][f"{tag}_{mode}"] = r
            save_partial(args.out, out)  # a run cut off by the device call's limit keeps what it timed
            print(f"{tag:9} {mode:10} prefill {r['prefill_ms']:8.2f} ms  decode {r['decode_ms_per_token']:7.3f} ms/token "
                  f"({r['decode_tokens_per_s']:7.1f} tok/s) tokens_match_eager={r['tokens_match_eager']} "
                  f"[{time.time() - t0:.0f}s]", flush=True)

    timed("fp16")
    if args.profile:
        out["profile_fp16"] = profile()
        print_profile("fp16", out["profile_fp16"])
    out["quantize_lm_head"] = args.quantize_lm_head
    out["act_order"] = args.act_order
    out["quantized_layers"] = quantize_linears(model, args.group_size, args.symmetric,
                                               skip=() if args.quantize_lm_head else ("lm_head",),
                                               act_order=args.act_order)
    torch.cuda.empty_cache()
    for variant in variants:
        t0 = time.time()
        info = out["int4"][variant] = {"options": VARIANTS[variant]}
        report = accelerate(model, backend="triton", large_m=args.large_m, plane_width=args.plane_width,
                            **VARIANTS[variant])
        packed = packed_weights(model)
        info["kernels"] = report.counts()
        info["fused_groups"] = len(report.fused)
        info["fused_blocks"] = report.fused_blocks
        info["packed_kernels"] = dict(Counter(getattr(w, "kernel", "?") for w in {id(w): w for w in packed.values()}.values()))
        info["tuned"] = {str(k): v.as_dict() for k, v in tune_triton(model, (1,)).items()}
        info["prepare_s"] = time.time() - t0
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        info["allocated_gib"] = torch.cuda.memory_allocated() / 2**30  # accelerate released the codes
        info["logits_rel_err_vs_dequant"] = logits_check(model, LLAMA2_7B["vocab_size"])
        for mod in model.modules():  # the reference check restored the codes: release them again
            if isinstance(mod, QuantizedLinear) and hasattr(mod._backend, "restore_codes"):
                mod.release_codes(mod._backend.restore_codes)
        torch.cuda.empty_cache()
        print(f"{variant}: {report.counts()} ({len(report.fused)} fused groups, {report.fused_blocks} fused blocks, "
              f"kernels {info['packed_kernels']}), "
              f"logits rel err vs dequant {info['logits_rel_err_vs_dequant']:.2e}, GPU memory "
              f"{info['allocated_gib']:.2f} GiB", flush=True)
        timed(f"int4_{variant}")
        if args.profile:
            info["profile"] = profile()
            print_profile(f"int4_{variant}", info["profile"])
        for mode in modes:
            f, q = out["runs"][f"fp16_{mode}"], out["runs"][f"int4_{variant}_{mode}"]
            info[f"decode_speedup_{mode}"] = f["decode_ms_per_token"] / q["decode_ms_per_token"]
            info[f"prefill_speedup_{mode}"] = f["prefill_ms"] / q["prefill_ms"]
    first = out["int4"][variants[0]]
    for mode in modes:  # the headline: the first variant (accelerate's default unless --variants says)
        out[f"decode_speedup_{mode}"] = first[f"decode_speedup_{mode}"]
        out[f"prefill_speedup_{mode}"] = first[f"prefill_speedup_{mode}"]
    return out


def run_cpu(args: argparse.Namespace) -> dict:
    from transformers import AutoModelForCausalLM

    from compress.eval.latency import measure_latency

    if args.threads:
        torch.set_num_threads(args.threads)
    out = {"model": args.model, "prompt": args.prompt, "generate": args.generate, "batch": 1,
           "group_size": args.group_size, "symmetric": args.symmetric, "threads": torch.get_num_threads(),
           "device": "cpu", "dtype": args.dtype, "runs": {}}
    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()

    def timed(tag: str) -> None:
        r = measure_latency(model, args.prompt, args.generate, 1, repeats=args.repeats, warmup=1)
        r["decode_tokens_per_s"] = 1e3 / r["decode_ms_per_token"]
        out["runs"][tag] = r
        print(f"{tag:9} prefill {r['prefill_ms']:8.1f} ms (runs {[round(v) for v in r['prefill_ms_runs']]})  "
              f"decode {r['decode_ms_per_token']:7.2f} ms/token ({r['decode_tokens_per_s']:6.1f} tok/s, runs "
              f"{[round(v, 1) for v in r['decode_ms_per_token_runs']]})", flush=True)

    base = "fp32" if dtype == torch.float32 else "bf16"
    out["held_mib"] = {base: held_mib(model)}
    timed(base)
    skip = () if args.quantize_lm_head else ("lm_head",)
    out["quantize_lm_head"] = args.quantize_lm_head
    out["quantized_layers"] = quantize_linears(model, args.group_size, args.symmetric, skip=skip)
    out["lm_head"] = "int4" if args.quantize_lm_head else "int8" if args.lm_head_int8 else "float"
    if args.lm_head_int8:  # RTN 8-bit per output row at load (compress bench --lm-head int8)
        from compress.kernels.lm_head import quantize_lm_head

        out["lm_head_detail"] = quantize_lm_head(model, bits=8).as_dict()
    if args.with_fallback:
        timed("int4_dequant_fallback")
    out["cpu_prefill"] = args.cpu_prefill
    kernels = args.cpu_kernels.split(",")
    out["cpu_kernels"], out["kernels"], out["speedups"] = kernels, {}, {}
    for kernel in kernels:  # the same quantized model, each CPU kernel in turn (accelerate re-installs)
        tag = f"int4_{kernel}"
        report = accelerate(model, backend="cpu-int4", cpu_prefill=args.cpu_prefill, cpu_kernel=kernel)
        out["kernels"][kernel] = {"counts": report.counts(), "reasons": sorted(set(report.reasons.values()))}
        out["held_mib"][tag] = held_mib(model)  # before the reference check brings the uint8 codes back
        print(f"{tag}: {out['held_mib'][tag]:.1f} MiB of tensors held ({base} model: {out['held_mib'][base]:.1f})",
              flush=True)
        err16 = logits_check(model, model.config.vocab_size)
        # 64 tokens: past the dense-prefill threshold (bf16 dense GEMM under cpu_prefill auto on AMX)
        err64 = logits_check(model, model.config.vocab_size, 64)
        for mod in model.modules():  # the check restored the codes the C kernel had released
            if isinstance(mod, QuantizedLinear) and hasattr(mod._backend, "restore_codes"):
                mod.release_codes(mod._backend.restore_codes)
        timed(tag)
        share = out["kernels"][kernel]["decode_step"] = linear_share(model, model.config.vocab_size)
        print(f"{tag}: one-token step {share['step_ms']:.2f} ms after a 32-token prompt, "
              f"{share['linear_ms']:.2f} ms of it inside the {share['linear_calls']} quantized layers", flush=True)
        f, q = out["runs"][base], out["runs"][tag]
        sp = out["speedups"][kernel] = {
            "decode": f["decode_ms_per_token"] / q["decode_ms_per_token"], "prefill": f["prefill_ms"] / q["prefill_ms"],
            "logits_rel_err_vs_dequant_fp32": err16, "logits_rel_err_prefill64": err64}
        print(f"int4 ({kernel}) vs {base}: decode {sp['decode']:.2f}x, prefill {sp['prefill']:.2f}x; logits rel err "
              f"{err16:.2e} (16 tokens), {err64:.2e} (64 tokens)", flush=True)
    first = out["speedups"][kernels[0]]  # the headline: the first kernel listed
    out["decode_speedup"], out["prefill_speedup"] = first["decode"], first["prefill"]
    out["logits_rel_err_vs_dequant_fp32"] = first["logits_rel_err_vs_dequant_fp32"]
    out["logits_rel_err_prefill64"] = first["logits_rel_err_prefill64"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", choices=["gpu", "cpu"])
    ap.add_argument("--model", default=SMOLLM2, help="cpu: model folder (default: prepared SmolLM2-135M)")
    ap.add_argument("--prompt", type=int, default=None, help="default: 128 (gpu), 128 (cpu)")
    ap.add_argument("--generate", type=int, default=None, help="default: 64 (gpu), 32 (cpu)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=None, help="default: 128 (gpu), 64 (cpu: 576 = 4.5 x 128)")
    ap.add_argument("--symmetric", action="store_true")
    ap.add_argument("--large-m", default="auto", choices=LARGE_M,
                    help="gpu: prefill path (accelerate(large_m=...))")
    ap.add_argument("--plane-width", type=int, default=16, choices=[16, 32, 64], help="gpu: Triton packing width")
    ap.add_argument("--variants", default="fused_pdl,plain",
                    help=f"gpu: accelerate() options to time, comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--modes", default="eager,cuda_graph",
                    help="gpu: timing modes, comma list of eager, cuda_graph, compile (torch.compile + CUDA graph), "
                         "compile_pdl (the same with Inductor's kernels launched with PDL, sm_90+)")
    ap.add_argument("--layers", type=int, default=None,
                    help="gpu: decoder layers (default: Llama-2-7B's 32; fewer for quicker A/B runs under compile)")
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "compress", "flex_attention", "eager"],
                    help="gpu: transformers attention implementation (both models; default: sdpa); compress: "
                         "our decode attention kernel (compress.kernels.attention), SDPA for prefill")
    ap.add_argument("--attn-config", default=None,
                    help="gpu, --attn compress: WARPS:T:BLOCKS_PER_SM[:CLUSTER] (decode_attention.Config; default: choose_config by cache length)")
    ap.add_argument("--sdpa", default="default", choices=["default", "flash", "efficient", "cudnn", "math"],
                    help="gpu: attention backend for both models (default: torch's choice)")
    ap.add_argument("--profile", action="store_true",
                    help="gpu: also profile decode steps by kernel family (compiled when --modes has compile)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cpu-prefill", default="auto", choices=CPU_PREFILL,
                    help="cpu: dense arithmetic for prefill-sized inputs (accelerate's cpu_prefill)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="cpu: dtype of the model (its float baseline and the INT4 model's other layers)")
    ap.add_argument("--cpu-kernels", default="native,torch",
                    help="cpu: comma list of accelerate cpu_kernel values to time in turn (native, torch, auto)")
    ap.add_argument("--with-fallback", action="store_true", help="cpu: also time the dequantize fallback")
    ap.add_argument("--act-order", action="store_true",
                    help="gpu: act-order layers (groups along a random column permutation per input, RTN)")
    ap.add_argument("--quantize-lm-head", action="store_true",
                    help="also quantize lm_head (cpu: unties it from the fp32 embedding)")
    ap.add_argument("--lm-head-int8", action="store_true",
                    help="cpu: the lm_head RTN 8-bit, one scale per output row, on the C kernel's 8-bit path "
                         "(compress.kernels.lm_head; as compress bench --lm-head int8)")
    ap.add_argument("--tile-major", default=None, choices=sorted(TILE_LAYOUTS),
                    help="gpu: the layout repack writes for the CUDA kernel (cuda_w4a16.TILE_MAJOR; default: $COMPRESS_TILE_LAYOUT, else both_evf)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    args.prompt = args.prompt or 128
    args.generate = args.generate or (64 if args.target == "gpu" else 32)
    args.group_size = args.group_size or (128 if args.target == "gpu" else 64)
    if args.target == "gpu" and not torch.cuda.is_available():
        print("e2e_decode gpu needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.lm_head_int8 and (args.target == "gpu" or args.quantize_lm_head):
        print("--lm-head-int8 is for the cpu target, without --quantize-lm-head", file=sys.stderr)
        return 2
    if args.target == "gpu":
        from compress.kernels import cuda_w4a16

        if args.tile_major is not None:
            cuda_w4a16.TILE_MAJOR = TILE_LAYOUTS[args.tile_major]
        args.tile_major = cuda_w4a16.tile_layout_name()
    result = run_gpu(args) if args.target == "gpu" else run_cpu(args)
    result["tile_major"] = args.tile_major
    result["torch"] = torch.__version__
    result["date"] = time.strftime("%Y-%m-%d")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    if args.target == "gpu":
        for v, info in result["int4"].items():
            print(f"decode speedup int4 ({v})/fp16: " + ", ".join(
                f"{m} {info[f'decode_speedup_{m}']:.2f}x" for m in MODES if f"decode_speedup_{m}" in info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
