"""Prefill and decode timing on a CUDA GPU with a static KV cache, eager or CUDA-graph captured.

Why not ``compress.eval.latency.measure_latency``: on the lent H100/H200 hosts a plain eager decode
step of a 7B model costs tens of milliseconds of Python and launch overhead while its weights need
about 3-5 ms of memory traffic (docs/design/dispatch.md, /work/shared/docs/MEASURING.md), so eager timing
hides what fewer weight bytes buy. Here the forward runs on a transformers ``StaticCache`` whose
write position is a device tensor, so one decode step (forward + greedy argmax written back into
the input buffer) is captured once as a CUDA graph and replayed ``generate`` times with no host work
in between. The prefill (which zeroes the cache length first, inside the graph) is captured too.
``mode="eager"`` runs the very same steps uncaptured, which is what a plain-transformers user sees.
``mode="compile"`` first compiles the model with ``torch.compile`` (Inductor, fixed shapes; the
W4A16 kernels enter as the opaque custom op ``compress::w4a16_linear``), then captures the compiled
steps in CUDA graphs as ``cuda_graph`` does; its ``tokens_match_eager`` compares the compiled model
replayed in the graph with the same compiled model run without one. ``inductor_pdl=True`` (compile
mode, sm_90+) also has Inductor emit its Triton kernels with programmatic dependent launch
(``torch._inductor.config.triton.enable_pdl``, off by default in torch): each fused elementwise
kernel then launches while the kernel before it drains and waits on the device (``gdc_wait``) before
touching its inputs, so the launch gaps between the W4A16 kernels (which use PDL themselves) and
Inductor's kernels shrink.

Timing uses CUDA events around the enqueued work; numbers are medians over ``repeats`` after
``warmup`` untimed runs. The captured run is checked against the eager run: both must produce the
same greedy tokens (``tokens_match_eager``).

Example::

    r = time_generation(model, prompt=128, generate=32, mode="cuda_graph")
    r["prefill_ms"], r["decode_ms_per_token"], r["decode_tokens_per_s"]
"""
from __future__ import annotations

import contextlib
import statistics
from typing import Any, Callable

import torch
from torch import nn

from compress.errors import CompressError, ConfigError

MODES = ("eager", "cuda_graph", "compile")


def random_llama(config: dict[str, Any], dtype: torch.dtype = torch.float16, device: str = "cuda",
                 seed: int = 0, attn_implementation: str = "sdpa") -> nn.Module:
    """A Llama-architecture model with random weights from a config dict (no download)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(**config)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn_implementation)
    return model.eval()


def _zero_lengths(cache: Any) -> None:
    """Reset the cache's write position in place (so a captured graph replays the reset too)."""
    for layer in cache.layers:
        length = getattr(layer, "cumulative_length", None)
        if isinstance(length, torch.Tensor):
            length.zero_()
        else:
            raise CompressError("this transformers StaticCache keeps no tensor write position; "
                                "CUDA-graph timing needs transformers >= 5.17")


class _Steps:
    """Prefill and decode closures over fixed input/output buffers (graph-capturable)."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, generate: int, forward: Callable | None = None):
        from transformers import StaticCache

        from compress.modeling import cache_kwargs

        self.model = model if forward is None else forward
        self.ids = ids
        self.cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + generate + 1)
        self.tok = torch.zeros(ids.shape[0], 1, dtype=torch.long, device=ids.device)
        self.kw = {**cache_kwargs(model, self.cache), "use_cache": True}

    def prefill(self) -> None:
        _zero_lengths(self.cache)
        logits = self.model(input_ids=self.ids, **self.kw).logits
        self.tok.copy_(logits[:, -1:].argmax(-1))

    def step(self) -> None:
        logits = self.model(input_ids=self.tok, **self.kw).logits
        self.tok.copy_(logits[:, -1:].argmax(-1))


def _run(prefill: Callable[[], None], step: Callable[[], None], tok: torch.Tensor, generate: int,
         keep_tokens: bool) -> tuple[float, float, list[torch.Tensor]]:
    """One prefill + ``generate`` decode steps; (prefill ms, decode ms total, tokens)."""
    e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
    tokens = []
    e0.record()
    prefill()
    e1.record()
    for _ in range(generate):
        step()
        if keep_tokens:
            tokens.append(tok.clone())
    e2.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1), e1.elapsed_time(e2), tokens


def graph_time_ms(fns: list[Callable[[], Any]], calls: int = 64, replays: int = 5) -> float:
    """Median device time of one call, with ``calls`` calls captured
    in one CUDA graph, cycling over ``fns`` (e.g. callables on different weight copies, so that a
    weight smaller than L2 is not served from it): no host launch overhead, as in graph-captured
    decode. Used by kernel tuning and every GPU benchmark, so that they all time the same way."""
    side = torch.cuda.Stream()  # warm-up off the capture stream: cuBLAS handles, kernel selection
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    del graph
    return statistics.median(times)


SDPA_BACKENDS = ("default", "flash", "efficient", "cudnn", "math")


def time_generation(model: nn.Module, prompt: int, generate: int, batch: int = 1,
                    mode: str = "cuda_graph", repeats: int = 5, warmup: int = 2, seed: int = 0,
                    sdpa: str = "default", inductor_pdl: bool = False) -> dict[str, Any]:
    """Median prefill latency and decode time per token of ``model`` on its CUDA device.

    ``sdpa``: restrict ``scaled_dot_product_attention`` to one backend for this measurement
    (``torch.nn.attention.sdpa_kernel``, scoped to the call); "default" lets torch choose.
    ``inductor_pdl``: with ``mode="compile"``, compile with Inductor's programmatic dependent launch
    (scoped to the call; see the module docstring)."""
    if sdpa not in SDPA_BACKENDS:
        raise ConfigError(f"sdpa must be one of {', '.join(SDPA_BACKENDS)}; got {sdpa!r}")
    with contextlib.ExitStack() as scope:
        if sdpa != "default":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                       "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[sdpa]
            scope.enter_context(sdpa_kernel([backend]))
        if inductor_pdl:
            scope.enter_context(inductor_pdl_scope(mode))
        r = _time_generation(model, prompt, generate, batch, mode, repeats, warmup, seed)
    r["sdpa"] = sdpa
    r["inductor_pdl"] = inductor_pdl
    return r


def inductor_pdl_scope(mode: str) -> contextlib.AbstractContextManager:
    """``torch._inductor.config`` patched to emit programmatic dependent launches, or a clear error
    where that cannot apply (another mode, a torch without the option, a GPU before sm_90)."""
    if mode != "compile":
        raise ConfigError(f"inductor_pdl applies to mode='compile' only, got mode={mode!r}")
    import torch._inductor.config as inductor_config

    if not hasattr(inductor_config.triton, "enable_pdl"):
        raise ConfigError(f"torch {torch.__version__} has no torch._inductor.config.triton.enable_pdl")
    if torch.cuda.get_device_capability() < (9, 0):
        raise ConfigError("programmatic dependent launch needs compute capability >= 9.0 (Hopper)")
    return inductor_config.patch({"triton.enable_pdl": True})


@torch.inference_mode()
def _time_generation(model: nn.Module, prompt: int, generate: int, batch: int, mode: str, repeats: int,
                     warmup: int, seed: int) -> dict[str, Any]:
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    if prompt <= 0 or generate <= 0 or batch <= 0 or repeats <= 0 or warmup < 0:
        raise ConfigError(f"need prompt, generate, batch, repeats > 0 and warmup >= 0; got prompt={prompt}, "
                          f"generate={generate}, batch={batch}, repeats={repeats}, warmup={warmup}")
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise CompressError(f"time_generation needs the model on a CUDA device, it is on {device}")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, int(model.config.vocab_size), (batch, prompt), generator=gen).to(device)
    forward = None
    if mode == "compile":
        # Inductor fuses the elementwise work between the matmuls (our W4A16 kernel stays one
        # opaque custom op, compress.kernels.ops); shapes are fixed, so no dynamic-shape guards.
        # A fresh compile per call: the model's layers may have changed since the last one (another
        # accelerate() call), and stale compiled code would count against Dynamo's recompile limit.
        torch._dynamo.reset()
        forward = torch.compile(model, dynamic=False)
    steps = _Steps(model, ids, generate, forward)

    # Eager warm-up on a side stream: lazily allocates the cache, compiles/tunes kernels and lets
    # the allocator settle before any capture (capture requires it).
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(max(warmup, 1)):
            steps.prefill()
            steps.step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    _, _, ref_tokens = _run(steps.prefill, steps.step, steps.tok, min(generate, 8), keep_tokens=True)

    prefill, step = steps.prefill, steps.step
    graphs = []
    if mode in ("cuda_graph", "compile"):
        g_pre, g_dec = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(g_pre):
            steps.prefill()
        with torch.cuda.graph(g_dec, pool=g_pre.pool()):
            steps.step()
        graphs = [g_pre, g_dec]
        prefill, step = g_pre.replay, g_dec.replay
    _, _, tokens = _run(prefill, step, steps.tok, min(generate, 8), keep_tokens=True)
    match = all(torch.equal(a, b) for a, b in zip(tokens, ref_tokens))

    pre_ms, dec_ms = [], []
    for i in range(warmup + repeats):
        p, d, _ = _run(prefill, step, steps.tok, generate, keep_tokens=False)
        if i >= warmup:
            pre_ms.append(p)
            dec_ms.append(d / generate)
    del graphs, steps
    torch.cuda.empty_cache()
    decode = statistics.median(dec_ms)
    return {
        "mode": mode, "prompt": prompt, "generate": generate, "batch": batch,
        "prefill_ms": statistics.median(pre_ms), "decode_ms_per_token": decode,
        "decode_tokens_per_s": batch * 1e3 / decode,
        "prefill_ms_runs": pre_ms, "decode_ms_per_token_runs": dec_ms,
        "repeats": repeats, "warmup": warmup, "tokens_match_eager": match,
        "kv_cache": "static", "prefill_logits": "all",
        "device": torch.cuda.get_device_name(device), "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }
