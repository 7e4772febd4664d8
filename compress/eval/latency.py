"""Measured latency of a causal LM: one prefill forward, then single-token decode steps on a KV cache.

``model.generate`` mixes sampling, stopping criteria and cache bookkeeping into its timing, so this
times the two phases directly: a forward over the prompt into an empty ``DynamicCache`` (its logits
over all prompt tokens, as the roofline's ``prefill_logits: all`` assumes), then ``generate`` forwards
of one token each (greedy next token), synchronising CUDA around every timed region. Each repeat uses
a fresh cache; the reported numbers are medians over repeats after ``warmup`` untimed repeats.

``clock="thread"`` reports the calling thread's CPU time instead of wall time: on a shared CPU with
one torch thread (all work on the calling thread) it leaves out the time spent waiting for a core
that other jobs hold, i.e. it is the latency on an idle core. Both clocks are always returned
(``wall_*`` and ``cpu_*`` keys).

Example::

    from compress.eval.latency import measure_latency
    r = measure_latency(model, prompt=128, generate=32, batch=1, repeats=5, warmup=1)
    r["prefill_ms"], r["decode_ms_per_token"]
"""
from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn

from compress.errors import CompressError


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prompt_ids(model: nn.Module, prompt: int | torch.Tensor, batch: int, seed: int,
                device: torch.device) -> torch.Tensor:
    if isinstance(prompt, torch.Tensor):
        ids = prompt if prompt.dim() == 2 else prompt.unsqueeze(0)
        return ids.to(device)
    if prompt <= 0:
        raise CompressError(f"prompt must be a positive token count, got {prompt}")
    vocab = int(getattr(model.config, "vocab_size"))
    # Random ids with a fixed seed: timing does not depend on the text, and no tokenizer is needed.
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, prompt), generator=gen).to(device)


_Times = tuple[float, float]  # (wall, thread CPU) seconds


def _now() -> _Times:
    return time.perf_counter(), time.thread_time()


def _since(t0: _Times) -> _Times:
    t1 = _now()
    return t1[0] - t0[0], t1[1] - t0[1]


def _check_counts(generate: int, repeats: int, warmup: int, batch: int) -> None:
    if generate <= 0 or repeats <= 0 or warmup < 0 or batch <= 0:
        raise CompressError(f"need generate > 0, repeats > 0, warmup >= 0, batch > 0; got "
                            f"generate={generate}, repeats={repeats}, warmup={warmup}, batch={batch}")


def _run_meta(ids: torch.Tensor, generate: int, repeats: int, warmup: int, param: torch.Tensor) -> dict[str, Any]:
    """The workload and setting keys both timing functions return."""
    return {"prompt": int(ids.shape[1]), "generate": generate, "batch": int(ids.shape[0]), "repeats": repeats,
            "warmup": warmup, "device": str(param.device), "dtype": str(param.dtype).replace("torch.", ""),
            "threads": torch.get_num_threads()}


@torch.inference_mode()
def _one_run(model: nn.Module, ids: torch.Tensor, generate: int) -> tuple[_Times, list[_Times]]:
    """(wall, thread-CPU) seconds of the prefill and of each decode step."""
    from transformers import DynamicCache

    from compress.modeling import cache_kwargs

    device = ids.device
    cache = cache_kwargs(model, DynamicCache(config=model.config))
    _sync(device)
    t0 = _now()
    out = model(input_ids=ids, **cache, use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    _sync(device)
    prefill = _since(t0)
    steps = []
    for _ in range(generate):
        _sync(device)
        t0 = _now()
        out = model(input_ids=nxt, **cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        _sync(device)
        steps.append(_since(t0))
    return prefill, steps


def measure_latency(model: nn.Module, prompt: int | torch.Tensor, generate: int, batch: int = 1,
                    repeats: int = 5, warmup: int = 1, seed: int = 0, clock: str = "wall") -> dict[str, Any]:
    """Median prefill time and mean-per-step decode time (median over repeats) of ``model``.

    ``prompt`` is a token count (random ids, seeded) or a [batch, P] tensor of ids. ``clock`` picks
    what ``prefill_ms``/``decode_ms_per_token`` report: "wall" or "thread" (CPU time of the calling
    thread; CPU models with one torch thread only). Returns those two, ``*_runs`` lists, ``wall_*``
    and ``cpu_*`` variants, and ``prompt, generate, batch, repeats, warmup, device, dtype, threads,
    clock``.
    """
    _check_counts(generate, repeats, warmup, batch)
    param = next(model.parameters())
    if clock not in ("wall", "thread"):
        raise CompressError(f"clock must be 'wall' or 'thread', got {clock!r}")
    if clock == "thread" and (param.device.type != "cpu" or torch.get_num_threads() != 1):
        raise CompressError("clock='thread' needs a CPU model and torch.set_num_threads(1): with more threads "
                            "(or a GPU) the calling thread's CPU time misses work done elsewhere")
    ids = _prompt_ids(model, prompt, batch, seed, param.device)
    was_training = model.training
    model.eval()
    try:
        for _ in range(warmup):
            _one_run(model, ids, generate)
        runs: dict[str, list[float]] = {"wall_prefill": [], "wall_decode": [], "cpu_prefill": [], "cpu_decode": []}
        for _ in range(repeats):
            pf, steps = _one_run(model, ids, generate)
            for i, name in enumerate(("wall", "cpu")):
                runs[f"{name}_prefill"].append(pf[i] * 1e3)
                runs[f"{name}_decode"].append(sum(s[i] for s in steps) / len(steps) * 1e3)
    finally:
        model.train(was_training)
    key = "wall" if clock == "wall" else "cpu"
    return {
        "prefill_ms": statistics.median(runs[f"{key}_prefill"]),
        "decode_ms_per_token": statistics.median(runs[f"{key}_decode"]),
        "prefill_ms_runs": runs[f"{key}_prefill"],
        "decode_ms_per_token_runs": runs[f"{key}_decode"],
        "wall_prefill_ms": statistics.median(runs["wall_prefill"]),
        "wall_decode_ms_per_token": statistics.median(runs["wall_decode"]),
        "cpu_prefill_ms": statistics.median(runs["cpu_prefill"]),
        "cpu_decode_ms_per_token": statistics.median(runs["cpu_decode"]),
        "clock": clock,
        **_run_meta(ids, generate, repeats, warmup, param),
    }


def measure_compiled_latency(model: nn.Module, prompt: int | torch.Tensor, generate: int, batch: int = 1,
                             repeats: int = 3, warmup: int = 1, seed: int = 0) -> dict[str, Any]:
    """``measure_latency`` for ``torch.compile(model, dynamic=False)`` on a CPU, over a static KV cache.

    Why a separate path: a compiled decode step needs fixed shapes (a ``StaticCache`` of prompt +
    generate positions) and pays minutes of compilation on its first prefill and step, which
    ``warmup_s`` reports apart from the timed runs. The model's quantized layers enter the graph as
    our custom ops (``compress.kernels.ops``). Wall clock, medians over ``repeats`` after one
    compiling run and ``warmup`` more. Returns the same keys as ``measure_latency`` (wall clock) plus
    ``warmup_s`` and ``mode: "compile"``.
    """
    from compress.kernels.gpu_timing import _Steps

    _check_counts(generate, repeats, warmup, batch)
    param = next(model.parameters())
    if param.device.type != "cpu":
        raise CompressError("measure_compiled_latency times CPU models (on a GPU: gpu_timing.time_generation)")
    ids = _prompt_ids(model, prompt, batch, seed, param.device)
    was_training = model.training
    model.eval()
    torch._dynamo.reset()  # a previous model's graphs would otherwise be guarded against and kept
    runs: dict[str, list[float]] = {"prefill": [], "decode": []}
    try:
        with torch.inference_mode():
            steps = _Steps(model, ids, generate, torch.compile(model, dynamic=False))
            t0 = time.perf_counter()
            for _ in range(1 + warmup):  # the first prefill and step compile
                steps.prefill()
                steps.step()
            warm = time.perf_counter() - t0
            for _ in range(repeats):
                t0 = time.perf_counter()
                steps.prefill()
                t1 = time.perf_counter()
                for _ in range(generate):
                    steps.step()
                runs["prefill"].append((t1 - t0) * 1e3)
                runs["decode"].append((time.perf_counter() - t1) / generate * 1e3)
    finally:
        model.train(was_training)
        torch._dynamo.reset()
    return {
        "prefill_ms": statistics.median(runs["prefill"]),
        "decode_ms_per_token": statistics.median(runs["decode"]),
        "prefill_ms_runs": runs["prefill"],
        "decode_ms_per_token_runs": runs["decode"],
        "warmup_s": warm,
        "mode": "compile",
        "clock": "wall",
        **_run_meta(ids, generate, repeats, warmup, param),
    }
