"""Measure a CUDA GPU's roofline terms on generic shapes, for the device YAML (``compress roofline``).

Every probe runs inside a CUDA graph (what the estimate's default ``execution: graph`` means) and is
timed with CUDA events over graph replays (median), inputs larger than L2 rotated so that no kernel
finds its weights in cache, as in a forward pass that streams every weight once:

- ``kernel``: the fixed time of one tiny kernel in a graph (``x.add_(1)`` on 2,048 elements), from
  graphs of 200 and 2,000 such kernels (slope), i.e. launch and drain with no work;
- ``elementwise``: ``torch.add`` of two fp16 tensors of 2^15 .. 2^26 elements: time per kernel vs
  bytes, fitted as fixed time + bytes / streaming rate;
- ``gemv``: fp16 ``F.linear`` with one token over weight shapes k in {1024..8192} x n in {512..16384}
  (cuBLAS matrix-vector): fitted as fixed time + weight bytes / streaming rate;
- ``gemm``: fp16 ``F.linear`` with 128 .. 4096 tokens over a grid of (k, n): FLOP/s per shape;
- ``sdpa``: scaled_dot_product_attention as transformers calls it: decode (1 query, with and
  without a boolean mask, GQA through ``enable_gqa``) and causal prefill;
- ``tiny``: prefill and decode of tiny Llamas (hidden 256; 2, 6 and 10 layers; GQA and MHA; prompt
  128 and 1024) through ``compress.kernels.gpu_timing.time_generation`` in both modes (CUDA graph
  and eager): their arithmetic is negligible, so a line over layers gives the fixed cost per layer
  (slope) and per forward (intercept) of transformers' Llama on this GPU.

None of these shapes is a validation model's forward; the validation models (bench/roofline/gpu_latency.py)
are only compared against, never fitted to. Writes one JSON file::

    python bench/roofline/measure_gpu.py --out $OUT/gpu_calibration.json          # on the GPU machine
    python bench/roofline/measure_gpu.py --render bench/results/gpu_calibration_h100_2026-11-22.json   # here: YAML terms
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

ROTATE_BYTES = 256 * 2**20  # > 5x the H100's 50 MB L2: rotated inputs always come from DRAM


def _fit_line(x: list[float], y: list[float]) -> tuple[float, float]:
    """Least-squares slope and intercept."""
    mx, my = statistics.fmean(x), statistics.fmean(y)
    sxx = sum((a - mx) ** 2 for a in x)
    slope = sum((a - mx) * (b - my) for a, b in zip(x, y)) / sxx
    return slope, my - slope * mx


def graph_ms(fns: list[Callable[[], Any]], replays: int = 10) -> float:
    """Milliseconds per call of ``fns`` (each called once, in order) captured in one CUDA graph."""
    from compress.kernels.gpu_timing import graph_time_ms

    return graph_time_ms(fns, calls=len(fns), replays=replays)


def _views(buf: Any, shape: tuple[int, ...], count: int) -> list[Any]:
    """``count`` non-overlapping views of ``shape`` into the flat buffer (wrapping when it is short)."""
    size = 1
    for s in shape:
        size *= s
    fit = max(1, buf.numel() // size)
    return [buf[(i % fit) * size:(i % fit + 1) * size].view(shape) for i in range(count)]


def _rotations(nbytes: int, cap: int) -> int:
    return max(2, min(cap, -(-ROTATE_BYTES // max(nbytes, 1))))


def measure_kernel() -> dict[str, Any]:
    import torch

    x = torch.randn(2048, device="cuda", dtype=torch.float16)
    per = {}
    for n in (200, 2000):
        per[n] = graph_ms([lambda: x.add_(1e-3)] * n)
    slope = (per[2000] * 2000 - per[200] * 200) / 1800
    return {"per_kernel_s": slope * 1e-3, "ms_per_kernel_200": per[200], "ms_per_kernel_2000": per[2000]}


def measure_elementwise(buf: Any) -> dict[str, Any]:
    import torch

    rows = []
    for p in range(15, 27, 2):
        n = 2**p
        nbytes = 3 * n * 2
        r = _rotations(nbytes, 64)
        a, b = _views(buf, (n,), r), _views(buf, (n,), r + 1)[1:]
        out = torch.empty(n, device="cuda", dtype=torch.float16)
        ms = graph_ms([lambda a=a[i], b=b[i]: torch.add(a, b, out=out) for i in range(r)])
        rows.append({"elements": n, "bytes": nbytes, "us": ms * 1e3})
    slope, icpt = _fit_line([r["bytes"] for r in rows], [r["us"] * 1e-6 for r in rows])
    return {"rows": rows, "fixed_s": icpt, "stream_bytes_per_s": 1.0 / slope}


def measure_gemv(buf: Any) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    rows = []
    for k in (1024, 2048, 4096, 8192):
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        for n in (512, 1024, 2048, 4096, 8192, 16384):
            nbytes = n * k * 2
            ws = _views(buf, (n, k), _rotations(nbytes, 512))
            ms = graph_ms([lambda w=w: F.linear(x, w) for w in ws])
            rows.append({"k": k, "n": n, "bytes": nbytes, "us": ms * 1e3, "gbps": nbytes / ms / 1e6})
    slope, icpt = _fit_line([r["bytes"] for r in rows], [r["us"] * 1e-6 for r in rows])
    big = [r for r in rows if r["bytes"] >= 32 * 2**20]
    s_big, i_big = _fit_line([r["bytes"] for r in big], [r["us"] * 1e-6 for r in big])
    return {"rows": rows, "fixed_s": icpt, "stream_bytes_per_s": 1.0 / slope,
            "fixed_s_large": i_big, "stream_bytes_per_s_large": 1.0 / s_big}


def measure_gemm(buf: Any) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    rows = []
    shapes = ((2048, 2048), (2048, 8192), (8192, 2048), (4096, 4096), (4096, 14336), (14336, 4096),
              (6144, 6144), (8192, 8192))
    for m in (128, 512, 1024, 2048, 4096):
        for k, n in shapes:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            ws = _views(buf, (n, k), _rotations(n * k * 2, 16))
            ms = graph_ms([lambda w=w: F.linear(x, w) for w in ws], replays=5)
            flops = 2.0 * m * k * n
            rows.append({"m": m, "k": k, "n": n, "flops": flops, "bytes": 2.0 * (n * k + m * k + m * n),
                         "us": ms * 1e3, "tflops": flops / ms / 1e9})
    big = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    square = 2.0 * 8192**3 / graph_ms([lambda: big @ big] * 4, replays=5) / 1e9
    return {"rows": rows, "square_8192_tflops": square}


def measure_sdpa(buf: Any) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    rows = []
    for heads, kv_heads, d in ((32, 32, 128), (40, 40, 128), (32, 8, 64), (24, 8, 128)):
        for ctx in (160, 1057, 4096):
            q = torch.randn(1, heads, 1, d, device="cuda", dtype=torch.float16)
            kv_bytes = 2 * kv_heads * ctx * d * 2
            r = _rotations(kv_bytes, 64)
            ks, vs = _views(buf, (1, kv_heads, ctx, d), r), _views(buf, (1, kv_heads, ctx, d), r + 1)[1:]
            mask = torch.ones(1, 1, 1, ctx, device="cuda", dtype=torch.bool)
            rep = heads // kv_heads

            def call(k: Any, v: Any, masked: bool) -> Any:
                if not masked:  # transformers: no mask -> GQA inside SDPA
                    return F.scaled_dot_product_attention(q, k, v, enable_gqa=rep > 1)
                if rep > 1:  # transformers with a mask: repeat_kv (expand + reshape copies K and V)
                    k, v = (t[:, :, None].expand(1, kv_heads, rep, ctx, d).reshape(1, heads, ctx, d) for t in (k, v))
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

            for masked in (False, True):
                ms = graph_ms([lambda k=k, v=v: call(k, v, masked) for k, v in zip(ks, vs)])
                rows.append({"phase": "decode", "heads": heads, "kv_heads": kv_heads, "head_dim": d, "ctx": ctx,
                             "masked": masked, "kv_bytes": kv_bytes, "us": ms * 1e3})
        for p in (128, 1024):
            q, k, v = (torch.randn(1, hh, p, d, device="cuda", dtype=torch.float16)
                       for hh in (heads, kv_heads, kv_heads))
            ms = graph_ms([lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                 enable_gqa=heads != kv_heads)] * 8, replays=5)
            pairs = p * (p + 1) / 2
            rows.append({"phase": "prefill", "heads": heads, "kv_heads": kv_heads, "head_dim": d, "ctx": p,
                         "masked": False, "flops": 4.0 * heads * pairs * d, "us": ms * 1e3})
    return {"rows": rows}


#: generic widths for the transformers-module probes (hidden, query heads, KV heads, FFN width), head
#: dim 128; none is a validation model's width (2048, 3072, 4096, 5120)
MODULE_WIDTHS = ((1536, 12, 3, 4096), (2560, 20, 5, 6912), (6144, 48, 12, 16384))


def measure_modules(buf: Any) -> dict[str, Any]:
    """transformers' own Llama building blocks (as the decoder layer calls them) on [1, M, h] fp16
    inputs, M = 1 (decode: launch-bound) .. 2048 (prefill: bandwidth-bound), each in a CUDA graph over
    rotating inputs: RMSNorm, rotary, the static cache update, SiLU(gate)*up, the residual add, SDPA
    (decode with the static cache's boolean mask; causal prefill) and the rotary cos/sin table."""
    import types

    import torch
    from transformers.activations import ACT2FN
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    f16 = dict(device="cuda", dtype=torch.float16)
    rows: list[dict[str, Any]] = []

    def rot_views(m: int, heads: int, d: int, count: int) -> list[Any]:
        # q_proj(x).view(1, M, H, d).transpose(1, 2), as LlamaAttention does
        return [t.view(1, m, heads, d).transpose(1, 2) for t in _views(buf, (1, m, heads * d), count)]

    def add(module: str, h: int, heads: int, kv: int, inter: int, m: int, fns: list[Any], **extra: Any) -> None:
        rows.append({"module": module, "hidden": h, "heads": heads, "kv_heads": kv, "head_dim": 128,
                     "intermediate": inter, "tokens": m, "us": graph_ms(fns) * 1e3, **extra})

    act = ACT2FN["silu"]
    for h, heads, kvh, inter in MODULE_WIDTHS:
        d = 128
        norm = LlamaRMSNorm(h).to(**f16)
        for m in (1, 128, 1024, 2048):
            r = _rotations(m * h * 2 * 4, 32)
            add("norm", h, heads, kvh, inter, m, [lambda x=x: norm(x) for x in _views(buf, (1, m, h), r)])
            add("residual", h, heads, kvh, inter, m,
                [lambda x=x, y=y: x + y for x, y in zip(_views(buf, (1, m, h), r), _views(buf, (1, m, h), r + 1)[1:])])
            ri = _rotations(m * inter * 2 * 3, 32)
            g, u = _views(buf, (1, m, inter), ri), _views(buf, (1, m, inter), ri + 1)[1:]
            add("mlp_act", h, heads, kvh, inter, m, [lambda a=a, b=b: act(a) * b for a, b in zip(g, u)])
            cos, sin = torch.randn(1, m, d, **f16), torch.randn(1, m, d, **f16)
            rq = _rotations(m * (heads + kvh) * d * 2 * 10, 32)
            qs, ks = rot_views(m, heads, d, rq), rot_views(m, kvh, d, rq + 1)[1:]
            add("rotary", h, heads, kvh, inter, m,
                [lambda q=q, k=k: apply_rotary_pos_emb(q, k, cos, sin) for q, k in zip(qs, ks)])
            # StaticLayer.update (transformers 5.17): positions from a device counter, index_copy_ of K
            # and V; the counter is zeroed first so that replays stay in bounds (one extra kernel)
            slots = max(m + 1, 1057)
            keys, values = torch.zeros(1, kvh, slots, d, **f16), torch.zeros(1, kvh, slots, d, **f16)
            cum = torch.zeros(1, device="cuda", dtype=torch.long)
            kk, vv = rot_views(m, kvh, d, rq), rot_views(m, kvh, d, rq + 1)[1:]

            def update(k: Any, v: Any, m: int = m, keys: Any = keys, values: Any = values, cum: Any = cum) -> None:
                cum.zero_()
                pos = torch.arange(m, device="cuda") + cum
                cum.add_(m)
                keys.index_copy_(2, pos, k)
                values.index_copy_(2, pos, v)

            add("kv_cache_update", h, heads, kvh, inter, m, [lambda k=k, v=v: update(k, v) for k, v in zip(kk, vv)])
            if m > 1:  # prefill attention: is_causal over the prompt (mask None), GQA inside SDPA
                mod = types.SimpleNamespace(num_key_value_groups=heads // kvh, is_causal=True, training=False)
                q, k, v = (torch.randn(1, hh, m, d, **f16) for hh in (heads, kvh, kvh))
                add("attention_prefill", h, heads, kvh, inter, m,
                    [lambda: sdpa_attention_forward(mod, q, k, v, None, scaling=d ** -0.5)] * 4)
        for kv in (kvh, heads):  # decode attention on a static cache: boolean mask over every slot
            mod = types.SimpleNamespace(num_key_value_groups=heads // kv, is_causal=True, training=False)
            q = torch.randn(1, heads, 1, d, **f16)
            for slots in (160, 1057, 4096):
                mask = torch.zeros(1, 1, 1, slots, device="cuda", dtype=torch.bool)
                mask[..., : slots - 31] = True
                r = _rotations(2 * kv * slots * d * 2, 64)
                kc, vc = _views(buf, (1, kv, slots, d), r), _views(buf, (1, kv, slots, d), r + 1)[1:]
                add("attention_decode", h, heads, kv, inter, 1,
                    [lambda k=k, v=v: sdpa_attention_forward(mod, q, k, v, mask, scaling=d ** -0.5)
                     for k, v in zip(kc, vc)], slots=slots)
    return {"rows": rows}


def measure_check_models(generate: int, repeats: int) -> dict[str, Any]:
    """Whole transformers Llamas of shapes that are neither calibration probes nor validation models,
    CUDA graph mode: an out-of-sample check of the summed terms (not used to set any term)."""
    import torch

    from compress.kernels.gpu_timing import random_llama, time_generation

    shapes = {"check-2560": dict(hidden_size=2560, intermediate_size=6912, num_hidden_layers=12, num_attention_heads=20,
                                 num_key_value_heads=5, head_dim=128, vocab_size=50304),
              "check-6144": dict(hidden_size=6144, intermediate_size=16384, num_hidden_layers=6, num_attention_heads=48,
                                 num_key_value_heads=48, head_dim=128, vocab_size=32000)}
    rows = []
    for name, cfg in shapes.items():
        cfg = dict(cfg, max_position_embeddings=4096, tie_word_embeddings=False)
        model = random_llama(cfg, torch.float16, "cuda")
        for prompt in (128, 1024):
            r = time_generation(model, prompt, generate, 1, mode="cuda_graph", repeats=repeats, warmup=1)
            rows.append({"device": "h100", "model_name": name, "model": dict(cfg, model_type="llama"),
                         "dtype": "float16", "batch": 1, "prompt": prompt, "generate": generate,
                         "prefill_ms": r["prefill_ms"], "decode_ms_per_token": r["decode_ms_per_token"],
                         "mode": "cuda_graph", "kv_cache": "static", "max_cache_len": prompt + generate + 1,
                         "prefill_logits": "all", "tokens_match_eager": r["tokens_match_eager"]})
        del model
        torch.cuda.empty_cache()
    return {"rows": rows}


def measure_tiny(generate: int, repeats: int, layer_counts: tuple[int, ...] = (2, 6, 10),
                 modes: tuple[str, ...] = ("cuda_graph", "eager")) -> dict[str, Any]:
    import torch

    from compress.kernels.gpu_timing import random_llama, time_generation

    rows = []
    for variant, kv in (("gqa", 1), ("mha", 4)):
        for layers in layer_counts:
            cfg = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=kv, head_dim=64, vocab_size=512, max_position_embeddings=4096,
                       tie_word_embeddings=False)
            model = random_llama(cfg, torch.float16, "cuda")
            for prompt in (128, 1024):
                for mode in modes:
                    r = time_generation(model, prompt, generate, 1, mode=mode, repeats=repeats, warmup=1)
                    rows.append({"variant": variant, "layers": layers, "prompt": prompt, "mode": mode,
                                 "prefill_ms": r["prefill_ms"], "decode_ms_per_token": r["decode_ms_per_token"]})
            del model
            torch.cuda.empty_cache()
    fits = []
    for variant in ("gqa", "mha"):
        for prompt in (128, 1024):
            for mode in modes:
                sel = sorted((r for r in rows if (r["variant"], r["prompt"], r["mode"]) == (variant, prompt, mode)),
                             key=lambda r: r["layers"])
                for phase, key in (("prefill", "prefill_ms"), ("decode", "decode_ms_per_token")):
                    s, i = _fit_line([r["layers"] for r in sel], [r[key] * 1e-3 for r in sel])
                    fits.append({"variant": variant, "prompt": prompt, "mode": mode, "phase": phase,
                                 "per_layer_s": s, "per_forward_s": i})
    return {"rows": rows, "fits": fits}


def measure(out: Path, stages: list[str], deadline: float) -> dict[str, Any]:
    import torch

    res: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                           "date": time.strftime("%Y-%m-%d"),
                           "command": "python bench/roofline/measure_gpu.py " + " ".join(sys.argv[1:])}
    try:
        import transformers
        res["transformers"] = transformers.__version__
    except ImportError:
        pass
    props = torch.cuda.get_device_properties(0)
    res["sms"] = props.multi_processor_count
    torch.manual_seed(0)
    buf = torch.randn(ROTATE_BYTES // 2 * 2, device="cuda", dtype=torch.float16)  # 512 MiB of random fp16
    funcs = {"kernel": lambda: measure_kernel(), "elementwise": lambda: measure_elementwise(buf),
             "gemv": lambda: measure_gemv(buf), "gemm": lambda: measure_gemm(buf), "sdpa": lambda: measure_sdpa(buf),
             "tiny": lambda: measure_tiny(generate=16, repeats=5),
             "modules": lambda: measure_modules(buf),
             "tiny_eager": lambda: measure_tiny(generate=16, repeats=9, layer_counts=(2, 10), modes=("eager",)),
             "check_models": lambda: measure_check_models(generate=32, repeats=3)}
    for stage in stages:
        if time.time() > deadline:
            res[stage] = {"skipped": "deadline"}
            continue
        t0 = time.time()
        try:
            res[stage] = funcs[stage]()
        except Exception as e:  # noqa: BLE001 - keep the other stages' numbers
            res[stage] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
        res[stage + "_seconds"] = round(time.time() - t0, 1)
        print(f"{stage}: {time.time() - t0:.1f}s {json.dumps(res[stage])[:300]}", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1))
    return res


# ----------------------------------------------------------------------------------------------
def _module_model(r: dict[str, Any]) -> tuple[float, float]:
    """(kernels, bytes) that compress.eval.roofline_ops counts for one module probe (transformers)."""
    from compress.eval.roofline_ops import attention, elementwise, kv_append, norm, rotary
    from compress.eval.roofline_shapes import LayerShape

    m, h, i = r["tokens"], r["hidden"], r["intermediate"]
    ly = LayerShape(n_heads=r["heads"], n_kv_heads=r["kv_heads"], head_dim=r["head_dim"], intermediate=i,
                    rotary_dim=r["head_dim"])
    op = {"norm": lambda: norm("n", m, h, "rms", 2, "transformers"),
          "residual": lambda: elementwise("r", m * h, 1.0, 2, 1, 2),
          "mlp_act": lambda: elementwise("a", m * i, 5.0, 3, 2, 2, kernels=2.0),
          "rotary": lambda: rotary(m, ly, 2, "transformers"),
          "kv_cache_update": lambda: kv_append(1, m, m, ly, 2, "static", "transformers"),
          "attention_decode": lambda: attention(1, 1, r.get("slots", 1), ly, 2, 2, "transformers", "static",
                                                r.get("slots"))}[r["module"]]()
    extra = 1.0 if r["module"] == "kv_cache_update" else 0.0  # the probe zeroes its counter first
    return op.kernels + extra, op.bytes


def _lsq_per_kernel(rows: list[dict[str, Any]], bandwidth: Callable[[str], float]) -> float:
    """Least-squares fixed time per kernel: t = kernels x c + bytes / bandwidth(kind), over ``rows``."""
    num = den = 0.0
    for r in rows:
        k, b = _module_model(r)
        num += k * (r["us"] * 1e-6 - b / bandwidth(r["module"]))
        den += k * k
    return num / den


def fit_terms(res: dict[str, Any], nominal_bw: float, peak_fp16: float) -> dict[str, Any]:
    """The device terms from a calibration file: each from its own probes, none from a validation model.

    - GEMV sweep: streaming rate (slope) and the fixed time of a matrix product (intercept);
    - GEMM grid, 512+ tokens: the fraction of the fp16 peak beyond that fixed time (median);
    - module probes at 1 token: fixed time per kernel in a decode step (least squares);
    - module probes at 128 tokens: fixed time per kernel in a prefill, and at 1024/2048 tokens the
      bandwidth fraction per operator kind beyond it (fitted alternately until both settle);
    - decode-attention probes: the fraction of bandwidth its KV traffic reaches beyond its kernels;
    - prefill-attention probes: the fixed time of one call (128 tokens) and the fraction of the fp16
      peak at 1024/2048 tokens beyond it;
    - tiny eager models (both calls): the host's time per layer and per forward (medians of the fits).
    """
    t: dict[str, Any] = {}
    gemv = res["gemv"]
    t["stream_bw"] = gemv["stream_bytes_per_s"]
    t["per_gemm_s"] = gemv["fixed_s"]
    rows = [r for r in res["gemm"]["rows"] if r["m"] >= 512]
    t["compute"] = statistics.median(r["flops"] / ((r["us"] * 1e-6 - t["per_gemm_s"]) * peak_fp16) for r in rows)
    mods = res.get("modules", {}).get("rows", [])
    elem = ("norm", "mlp_act", "residual", "rotary", "kv_cache_update")
    if mods:
        t["per_kernel_s"] = _lsq_per_kernel([r for r in mods if r["module"] in elem and r["tokens"] == 1],
                                            lambda kind: t["stream_bw"])
        frac = {kind: 1.0 for kind in elem}
        mid = [r for r in mods if r["module"] in elem and r["tokens"] == 128]
        pk = t["per_kernel_s"]
        for _ in range(10):
            for kind in elem:
                eff = []
                for r in mods:
                    if r["module"] == kind and r["tokens"] >= 1024:
                        k, b = _module_model(r)
                        eff.append(b / (r["us"] * 1e-6 - k * pk) / nominal_bw)
                # capped at nominal: L2 hits can make a small chain look faster than DRAM
                frac[kind] = min(statistics.median(eff), 1.0)
            pk = _lsq_per_kernel(mid, lambda kind: frac[kind] * nominal_bw)
        t["prefill_per_kernel_s"] = pk
        t["by_op"] = dict(frac)
        dec = [r for r in mods if r["module"] == "attention_decode"]
        eff = []
        for r in dec:
            k, b = _module_model(r)
            eff.append(b / (r["us"] * 1e-6 - k * t["per_kernel_s"]) / nominal_bw)
        t["by_op"]["attention_decode"] = min(statistics.median(eff), 1.0)
        att = [r for r in mods if r["module"] == "attention_prefill"]

        def flops(r: dict[str, Any]) -> float:
            pairs = r["tokens"] * (r["tokens"] + 1) / 2
            return 4.0 * r["heads"] * pairs * r["head_dim"] + 5.0 * r["heads"] * pairs

        rate = 0.3 * peak_fp16
        for _ in range(10):
            fixed = statistics.median(r["us"] * 1e-6 - flops(r) / rate for r in att if r["tokens"] == 128)
            rate = statistics.median(flops(r) / (r["us"] * 1e-6 - fixed) for r in att if r["tokens"] >= 1024)
        t["per_attention_s"], t["attention"] = fixed, rate / peak_fp16
    eager = [f for key in ("tiny", "tiny_eager") for f in res.get(key, {}).get("fits", []) if f["mode"] == "eager"]
    if eager:
        t["host_per_layer_s"] = statistics.median(f["per_layer_s"] for f in eager)
        t["host_per_forward_s"] = statistics.median(f["per_forward_s"] for f in eager)
    return t


def _q(value: float, source: str) -> str:
    return f"{{value: {value:.4e}, source: \"{source}\"}}"


def render_yaml(template: dict[str, Any], t: dict[str, Any], meta: dict[str, str]) -> str:
    """A device YAML: the template's datasheet numbers, and every measured term with its source."""
    nominal = template["memory_bandwidth"]["value"]
    src = f"bench/roofline/measure_gpu.py on the lent {meta['device']}, {meta['date']} (torch {meta['torch']}, " \
          f"transformers {meta['transformers']}; bench/results/{meta['files']})"
    q = lambda d: f"{{value: {d['value']:.4e}, source: \"{d['source']}\"}}"  # noqa: E731
    by_op_src = {
        "norm": "RMSNorm (8 kernels, fp32 steps)", "mlp_act": "SiLU(gate)*up (2 kernels)",
        "residual": "residual add", "rotary": "apply_rotary_pos_emb (10 kernels: broadcast muls, cat of strided "
        "halves)", "kv_cache_update": "StaticLayer.update (index_copy_ from a strided source)",
        "attention_decode": "sdpa_attention_forward with the static cache's boolean mask, KV traffic incl. repeat_kv"}
    lines = [
        "# Datasheet numbers by hand; measured terms by bench/roofline/measure_gpu.py --render ... --yaml (rerun to refresh).",
        f"name: {template['name']}",
        f"title: {template['title']}",
        f"kind: {template['kind']}",
        f"aliases: [{', '.join(template.get('aliases', []))}]",
        "note: >",
        "  Dense peaks (the datasheet's tensor-core numbers are quoted \"with sparsity\"; dense is half).",
        f"  Measured on the lent {meta['device']} ({meta['date']}): a matrix-vector product costs "
        f"{t['per_gemm_s'] * 1e6:.2f} us + bytes /",
        f"  {t['stream_bw'] / 1e12:.2f} TB/s; each small kernel of transformers' Llama "
        f"{t['per_kernel_s'] * 1e6:.2f} us in a CUDA-graph decode step",
        f"  ({t['prefill_per_kernel_s'] * 1e6:.2f} us in a prefill), a flash attention call "
        f"{t['per_attention_s'] * 1e6:.1f} us; these fixed costs are most of a small model's decode step.",
        "  The terms describe transformers' PyTorch modules (implementation: transformers, the default);",
        "  implementation fused counts one kernel per operator. execution: eager adds the host's launch time.",
        "memory_bandwidth: " + q(template["memory_bandwidth"]),
        "memory_capacity: " + q(template["memory_capacity"]),
        "peak_flops:",
        *[f"  {k}: " + q(v) for k, v in template["peak_flops"].items()],
        "achievable:",
        "  compute: " + _q(t["compute"], f"median over fp16 GEMMs of 512-4096 tokens x 8 weight shapes, beyond "
                                          f"per_gemm_s, / peak; {src}"),
        "  memory: " + _q(t["stream_bw"] / nominal, f"streaming rate of fp16 matrix-vector products (slope over 24 "
                                                     f"shapes, 1-256 MiB), / nominal; {src}"),
        "  attention: " + _q(t["attention"], f"transformers' sdpa_attention_forward, causal prefill of 1024/2048 "
                                              f"tokens, 12-48 heads, beyond per_attention_s, / peak; {src}"),
        "  elementwise: " + _q(t["by_op"]["norm"], f"as by_op.norm (other eager elementwise ops); {src}"),
        "  by_op:",
        *[f"    {k}: " + _q(v, f"{by_op_src[k]} on 1024/2048 x 1536-6144 beyond its kernels' fixed time, / nominal"
                              + (" (capped at 1: L2 hits)" if v >= 1.0 else "") + f"; {src}")
          for k, v in t["by_op"].items() if k != "attention_decode"],
        "    attention_decode: " + _q(t["by_op"]["attention_decode"], f"{by_op_src['attention_decode']}, 160-4096 "
                                                                     f"slots, beyond its kernels, / nominal; {src}"),
        "overhead:",
        "  per_kernel_s: " + _q(t["per_kernel_s"], f"least squares over transformers' modules at 1 token (RMSNorm, "
                                                    f"rotary, cache update, SiLU*mul, residual; widths 1536-6144) in "
                                                    f"CUDA graphs, time per kernel beyond bytes; {src}"),
        "  prefill_per_kernel_s: " + _q(t["prefill_per_kernel_s"], f"the same modules at 128 tokens, beyond bytes "
                                                                    f"at the by_op fractions; {src}"),
        "  per_gemm_s: " + _q(t["per_gemm_s"], f"intercept of the fp16 matrix-vector sweep (cuBLAS); {src}"),
        "  per_attention_s: " + _q(t["per_attention_s"], f"transformers' sdpa_attention_forward, causal prefill of "
                                                          f"128 tokens (cuDNN flash), beyond its FLOPs; {src}"),
        "host_overhead:",
        "  per_forward_s: " + _q(t["host_per_forward_s"], f"eager tiny Llamas (hidden 256), intercept over layers, "
                                                           f"median of 16 fits over two calls (the host's speed varied "
                                                           f"2x between them); {src}"),
        "  per_layer_s: " + _q(t["host_per_layer_s"], f"eager tiny Llamas, slope over 2-10 layers, median of 16 "
                                                       f"fits over two calls; {src}"),
        f"sparse_2_4: {{value: {str(template['sparse_2_4']['value']).lower()}, "
        f"source: \"{template['sparse_2_4']['source']}\"}}",
        "",
    ]
    return "\n".join(lines)


def summarize(res: dict[str, Any]) -> str:
    """The terms the device YAML takes, from a calibration file (read here, no GPU needed)."""
    lines = [f"{res['device']} torch {res['torch']} transformers {res.get('transformers')} {res['date']}"]
    k = res.get("kernel", {})
    if "per_kernel_s" in k:
        lines.append(f"per kernel in a graph: {k['per_kernel_s'] * 1e6:.2f} us")
    for name in ("elementwise", "gemv"):
        s = res.get(name, {})
        if "fixed_s" in s:
            lines.append(f"{name}: {s['fixed_s'] * 1e6:.2f} us + bytes / {s['stream_bytes_per_s'] / 1e12:.3f} TB/s")
            if "fixed_s_large" in s:
                lines.append(f"{name} (>= 32 MiB): {s['fixed_s_large'] * 1e6:.2f} us + bytes / "
                             f"{s['stream_bytes_per_s_large'] / 1e12:.3f} TB/s")
    g = res.get("gemm", {})
    if "rows" in g:
        lines.append(f"gemm: square 8192 {g['square_8192_tflops']:.0f} TFLOP/s")
        for r in g["rows"]:
            lines.append(f"  m {r['m']:5} k {r['k']:6} n {r['n']:6}: {r['us']:9.1f} us {r['tflops']:6.0f} TFLOP/s")
    t = res.get("tiny", {})
    for f in t.get("fits", []):
        lines.append(f"tiny {f['variant']} P={f['prompt']:<5} {f['mode']:10} {f['phase']:7}: "
                     f"{f['per_layer_s'] * 1e6:8.1f} us/layer + {f['per_forward_s'] * 1e6:8.1f} us/forward")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gpu_calibration.json")
    ap.add_argument("--stages", default="kernel,elementwise,gemv,gemm,sdpa,tiny")
    ap.add_argument("--budget-s", type=float, default=150.0, help="skip later stages past this many seconds")
    ap.add_argument("--render", type=Path, nargs="+", default=None,
                    help="calibration file(s) to read here (later files add their stages); prints the terms")
    ap.add_argument("--yaml", type=Path, default=None,
                    help="with --render: rewrite this device YAML's measured terms (its datasheet numbers stay)")
    args = ap.parse_args()
    if args.render:
        res: dict[str, Any] = {}
        for f in args.render:
            res.update(json.loads(f.read_text()))
        first = json.loads(args.render[0].read_text())
        res.update({k: first[k] for k in ("device", "torch", "transformers", "date") if k in first})
        print(summarize(res))
        if args.yaml:
            import yaml

            template = yaml.safe_load(args.yaml.read_text())
            t = fit_terms(res, template["memory_bandwidth"]["value"], template["peak_flops"]["fp16"]["value"])
            meta = {"device": res["device"], "date": res["date"], "torch": res["torch"],
                    "transformers": res.get("transformers", "?"), "files": ", ".join(f.name for f in args.render)}
            args.yaml.write_text(render_yaml(template, t, meta))
            print(f"wrote {args.yaml}: " + json.dumps({k: v for k, v in t.items()}, default=str))
        return 0
    import torch

    if not torch.cuda.is_available():
        print("measure_gpu needs a CUDA GPU", file=sys.stderr)
        return 2
    res = measure(args.out, args.stages.split(","), time.time() + args.budget_s)
    print(summarize(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
