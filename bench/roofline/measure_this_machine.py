"""Measure this machine's CPU and write compress/eval/devices/this-machine.yaml for the roofline.

What is measured (torch, fp32, the current torch thread count), each the median of several runs:
- memory bandwidth: a copy of a 256 MiB tensor (read + write bytes), a sum over it (read), and fp32
  matrix-vector products over 96 MiB weights with rows of 512..8192 (what decode does). A line fit
  time = bytes / stream + rows x per_row_s gives the streaming rate and the fixed cost per row (short
  rows are much slower on CPUs). The peak is the best single run of anything; the achievable memory
  fraction is the fitted streaming rate over that peak.
- fp32 matmul: square GEMMs of 1024 and 2048 and a grid of prefill-sized GEMMs (tokens 128/512,
  in and out 512/2048): peak = best run, achievable fraction = the grid's median over the peak.
- elementwise work (silu*mul, RMSNorm on 256/1024 x 2048) and causal attention (8 heads, 512
  tokens, head_dim 64/128), each as FLOP/s in the roofline's counting convention, giving the
  ``vector`` and ``attention`` fractions of the fp32 peak.
- framework overhead: decode steps of tiny Llama models (2, 6 and 10 layers, hidden 64) whose
  arithmetic is negligible; a line over layers gives ``per_layer_s`` (slope) and ``per_forward_s``.
  This is the fixed cost of PyTorch eager + transformers per layer on this CPU (not the model's maths).

Usage (the load average is recorded in the file's note)::

    python bench/roofline/measure_this_machine.py                # writes compress/eval/devices/this-machine.yaml
    python bench/roofline/measure_this_machine.py --out my.yaml  # or anywhere else
    python bench/roofline/measure_this_machine.py --threads 1 --clock thread   # on a shared machine

With ``--clock thread`` (one torch thread) every probe is timed with the thread's CPU time, which
leaves out the time spent waiting for a core that other jobs hold; measure latencies the same way
(``bench/roofline/roofline_validate.py --measure-cpu ... --threads 1 --clock thread``).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "compress" / "eval" / "devices" / "this-machine.yaml"


def _times(fn, runs: int, now) -> list[float]:
    fn()  # warm-up: first touch of pages, kernel selection
    out = []
    for _ in range(runs):
        t0 = now()
        fn()
        out.append(now() - t0)
    return out


def _cold_rates(make, fn, work: float, runs: int, now, footprint: int = 96 * 1024 * 1024) -> float:
    """Median of ``work / time`` for ``fn(*inputs)`` over rotating copies of ``make()``'s tensors,
    enough copies to exceed ``footprint`` bytes, so no call finds its inputs in the 32 MiB L3 as a
    real forward pass (which streams every weight once) would not."""
    first = make()
    size = sum(t.numel() * t.element_size() for t in first)
    sets = [first] + [make() for _ in range(max(1, -(-footprint // size)) - 1)]
    fn(*sets[-1])
    times = []
    for i in range(max(runs, len(sets))):
        args = sets[i % len(sets)]
        t0 = now()
        fn(*args)
        times.append(now() - t0)
    return statistics.median(work / t for t in times)


def _copy_and_read(runs: int, now) -> tuple[list[float], list[float]]:
    n = 64 * 1024 * 1024  # 256 MiB of fp32, far beyond any cache here
    src, dst = torch.rand(n), torch.empty(n)
    copy = [2 * n * 4 / t for t in _times(lambda: dst.copy_(src), runs, now)]
    read = [n * 4 / t for t in _times(lambda: src.sum(), runs, now)]
    return copy, read


def measure_bandwidth(runs: int, now) -> dict[str, float]:
    """Copy, sum and a row-length sweep of fp32 matrix-vector products over 96 MiB weights.

    The sweep fits time = S / bandwidth + rows x per_row_s over row lengths 512..8192 (rows =
    S / (4 x row length)): CPU GEMV kernels lose bandwidth on short rows, which the per-row term holds."""
    copy, read = _copy_and_read(runs, now)
    size = 96 * 1024 * 1024
    ks = (512, 1024, 2048, 4096, 8192)
    mats = {k: (torch.rand(size // (4 * k), k), torch.rand(1, 1, k)) for k in ks}
    times: dict[int, list[float]] = {k: [] for k in ks}
    for _ in range(runs):  # interleave the shapes so that a change in load hits all of them
        for k, (w, x) in mats.items():
            times[k] += _times(lambda: F.linear(x, w), 1, now)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = [size / (4 * k) for k in ks]
    slope, intercept = _fit_line(rows, [med[k] for k in ks])
    best_mv = max(size / min(v) for v in times.values())
    return {"copy_median": statistics.median(copy), "read_median": statistics.median(read),
            "matvec_long_rows": size / med[8192], "matvec_short_rows": size / med[512],
            "stream": size / intercept, "per_row_s": max(slope, 0.0),
            "peak": max(max(copy), max(read), best_mv)}


def _fit_line(x: list[float], y: list[float]) -> tuple[float, float]:
    """Least-squares slope and intercept."""
    mx, my = statistics.fmean(x), statistics.fmean(y)
    sxx = sum((a - mx) ** 2 for a in x)
    slope = sum((a - mx) * (b - my) for a, b in zip(x, y)) / sxx
    return slope, my - slope * mx


def measure_matmul(runs: int, now) -> dict[str, float]:
    """fp32 GEMM: peak = best run of square 1024/2048 GEMMs (hot in cache); achievable = median over a
    grid of prefill-sized shapes (tokens 128/512 x in 512/2048 x out 512/2048) of each shape's median
    rate with cold weights (rotating copies beyond L3)."""
    best, per_shape = 0.0, []
    for s in (1024, 2048):
        a, b = torch.rand(s, s), torch.rand(s, s)
        best = max(best, max(2 * s**3 / t for t in _times(lambda: a @ b, runs, now)))
    for m in (128, 512):
        for k in (512, 2048):
            for n in (512, 2048):
                rate = _cold_rates(lambda: (torch.rand(m, k), torch.rand(n, k)), F.linear, 2 * m * k * n, runs, now)
                best = max(best, rate)
                per_shape.append(rate)
    return {"peak": best, "grid_median": statistics.median(per_shape)}


def measure_vector(runs: int, now) -> float:
    """Rate of eager elementwise work in the roofline's FLOP convention (silu(g)*u: 5 per element,
    RMSNorm: 4 per element), fresh outputs each call as in eager PyTorch, cold inputs; median over
    2 sizes and the 2 ops."""
    rates = []
    for m in (256, 1024):
        make = lambda: (torch.rand(m, 2048), torch.rand(m, 2048))  # noqa: E731
        w = torch.rand(2048)
        act = lambda g, u: F.silu(g) * u  # noqa: E731
        rms = lambda g, u: g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + 1e-6) * w  # noqa: E731
        rates.append(_cold_rates(make, act, 5 * m * 2048, runs, now))
        rates.append(_cold_rates(make, rms, 4 * m * 2048, runs, now))
    return statistics.median(rates)


def measure_attention(runs: int, now) -> float:
    """Rate of causal scaled_dot_product_attention (8 heads, 512 tokens, head_dim 64 and 128) in the
    roofline's convention: 4*heads*pairs*head_dim + 5*heads*pairs FLOPs, pairs = T(T+1)/2."""
    rates, t_len, heads = [], 512, 8
    pairs = t_len * (t_len + 1) / 2
    for d in (64, 128):
        make = lambda: tuple(torch.rand(1, heads, t_len, d) for _ in range(3))  # noqa: E731
        fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
        rates.append(_cold_rates(make, fn, 4 * heads * pairs * d + 5 * heads * pairs, runs, now))
    return statistics.median(rates)


def _tiny_model(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def _decode_step_times(model, steps: int, now) -> list[float]:
    from transformers import DynamicCache

    from compress.modeling import cache_kwargs

    ids = torch.randint(0, 512, (1, 32))
    cache = cache_kwargs(model, DynamicCache(config=model.config))
    with torch.inference_mode():
        out = model(input_ids=ids, **cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        ts = []
        for _ in range(steps):
            t0 = now()
            out = model(input_ids=nxt, **cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            ts.append(now() - t0)
    return ts


def measure_overhead(steps: int, repeats: int, now) -> dict[str, float]:
    """Decode-step time of tiny Llamas (2, 6, 10 layers, hidden 64: negligible arithmetic), repeats
    interleaved across sizes; a line over layers gives per_layer_s (slope) and per_forward_s."""
    sizes = (2, 6, 10)
    models = {n: _tiny_model(n) for n in sizes}
    for m in models.values():
        _decode_step_times(m, 3, now)  # warm-up
    med: dict[int, list[float]] = {n: [] for n in sizes}
    for _ in range(repeats):
        for n, m in models.items():
            med[n].append(statistics.median(_decode_step_times(m, steps, now)))
    t = {n: statistics.median(v) for n, v in med.items()}
    slope, intercept = _fit_line(list(sizes), [t[n] for n in sizes])
    return {"per_layer_s": max(slope, 0.0), "per_forward_s": max(intercept, 0.0), "t_lo": t[2], "t_hi": t[10]}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _q(value: float, source: str) -> str:
    return f"{{value: {value:.4e}, source: \"{source}\"}}"


def render_yaml(bw: dict, mm: dict, oh: dict, vec: float, att: float, meta: dict) -> str:
    src = (f"measured by bench/roofline/measure_this_machine.py on {meta['date']} ({meta['threads']} threads, "
           f"{meta['clock']} clock, torch {torch.__version__})")
    mem_frac = min(bw["stream"] / bw["peak"], 1.0)
    cmp_frac = mm["grid_median"] / mm["peak"]
    return "\n".join([
        "# Written by bench/roofline/measure_this_machine.py; rerun it to refresh. Numbers are medians unless said.",
        "name: this-machine",
        f"title: \"{meta['cpu']} ({meta['threads']} torch threads)\"",
        "kind: cpu",
        "aliases: [local, cpu]",
        "note: >",
        f"  Measured on {meta['date']} with torch {torch.__version__}, {meta['threads']} threads, "
        f"{meta['clock']} clock,",
        f"  load average {meta['load']} at the start (shared cores: other jobs may depress these numbers;",
        "  the thread clock leaves out time spent waiting for a core).",
        f"  Bandwidth: copy {bw['copy_median'] / 1e9:.1f} GB/s (read+write), sum {bw['read_median'] / 1e9:.1f} GB/s,",
        f"  fp32 matvec {bw['matvec_long_rows'] / 1e9:.1f} GB/s on rows of 8192, "
        f"{bw['matvec_short_rows'] / 1e9:.1f} on rows of 512;",
        f"  fitted streaming rate {bw['stream'] / 1e9:.1f} GB/s plus {bw['per_row_s'] * 1e9:.0f} ns per row;",
        f"  best single run {bw['peak'] / 1e9:.1f} GB/s.",
        f"  fp32 GEMM best {mm['peak'] / 1e9:.1f} GFLOP/s, prefill-sized grid median {mm['grid_median'] / 1e9:.1f};",
        f"  elementwise {vec / 1e9:.2f} GFLOP/s, causal attention {att / 1e9:.1f} GFLOP/s (roofline FLOP counting).",
        f"  Overhead from tiny Llama decode steps: {oh['t_lo'] * 1e3:.2f} ms at 2 layers, "
        f"{oh['t_hi'] * 1e3:.2f} ms at 10.",
        "  No fp16/bf16 matrix units are listed: run the roofline with --dtype float32 here.",
        "memory_bandwidth: " + _q(bw["peak"], f"best single run of copy/sum (256 MiB) and matvec (96 MiB), {src}"),
        "memory_capacity: " + _q(meta["mem_bytes"], "MemTotal in /proc/meminfo"),
        "peak_flops:",
        "  fp32: " + _q(mm["peak"], f"best single run of fp32 GEMMs (1024^2, 2048^2 and the grid), {src}"),
        "achievable:",
        "  compute: " + _q(cmp_frac, f"median over GEMMs m 128/512 x k 512/2048 x n 512/2048 / peak, {src}"),
        "  memory: " + _q(mem_frac, f"streaming rate of the matvec row-length fit / peak, {src}"),
        "  attention: " + _q(att / mm["peak"], f"causal SDPA 8 heads x 512 tokens, head_dim 64/128, / peak, {src}"),
        "  vector: " + _q(vec / mm["peak"], f"eager silu*mul and RMSNorm on 256/1024 x 2048 / peak, {src}"),
        "overhead:",
        "  per_forward_s: " + _q(oh["per_forward_s"], f"intercept of tiny Llama decode-step time over layers, {src}"),
        "  per_layer_s: " + _q(oh["per_layer_s"], f"slope of tiny Llama decode-step time over 2/6/10 layers, {src}"),
        "  per_weight_row_s: " + _q(bw["per_row_s"], f"matvec time per row fitted over row lengths 512..8192, {src}"),
        "sparse_2_4: {value: false, source: \"CPUs have no 2:4 sparse matrix units\"}",
        "",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="YAML file to write")
    ap.add_argument("--runs", type=int, default=15, help="timed runs per bandwidth/matmul probe")
    ap.add_argument("--steps", type=int, default=20, help="decode steps per overhead repeat")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--clock", choices=["wall", "thread"], default="wall",
                    help="wall time, or the thread's CPU time (needs --threads 1): leaves out waiting for "
                         "a core held by other jobs on a shared machine")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "thread" and torch.get_num_threads() != 1:
        ap.error("--clock thread needs --threads 1 (other threads' work would not be counted)")
    now = time.thread_time if args.clock == "thread" else time.perf_counter
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    mem = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal"):
            mem = int(line.split()[1]) * 1024
    meta = {"date": _dt.date.today().isoformat(), "threads": torch.get_num_threads(), "cpu": _cpu_name(),
            "load": load, "mem_bytes": float(mem), "clock": args.clock}
    bw = measure_bandwidth(args.runs, now)
    mm = measure_matmul(args.runs, now)
    vec = measure_vector(args.runs, now)
    att = measure_attention(args.runs, now)
    oh = measure_overhead(args.steps, repeats=5, now=now)
    text = render_yaml(bw, mm, oh, vec, att, meta)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, args.out)
    print(text)


if __name__ == "__main__":
    main()
