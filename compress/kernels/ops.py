"""The W4A16 matmul as a torch custom op, so that ``torch.compile`` can compile a model around it.

Why: our kernels are launched through ctypes, which TorchDynamo cannot trace. Under compilation
``QuantizedLinear``'s installed forward calls ``torch.ops.compress.w4a16_linear`` instead: Dynamo
records one opaque node with a known output shape (the fake implementation), and Inductor fuses
and compiles everything around it (RMSNorm, rotary, SiLU * up, residual adds) — the parts of a
decode step that INT4 does not shrink. Outside compilation the forward calls the kernel directly
(a custom-op dispatch costs host time per call in eager mode). For act-order layers on the CUDA
kernel the activation gather ``x[..., perm]`` is left in the graph (``gathered=True``), where it
becomes a small Inductor kernel launched with the rest (with PDL when Inductor's is on) instead of
the ``index_select`` launch the eager path makes; a gather inside our kernel measured slower
(docs/design/dispatch.md, "Act-order").

The op takes a handle to the packed weight (a ``W4A16Weight`` is not a tensor): ``register``
returns it. The table holds weak references, so a packed weight that its layer drops (another
``accelerate`` call) goes away with its entry; a handle whose weight is gone raises.
"""
from __future__ import annotations

import itertools
import weakref
from typing import Any

import torch

_WEIGHTS: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()
_NEXT = itertools.count(1)


def _registered(handle: int, op: str, what: str, redo: str) -> Any:
    obj = _WEIGHTS.get(handle)
    if obj is None:
        raise RuntimeError(f"compress::{op}: {what} {handle} no longer exists (re-run {redo} and recompile)")
    return obj


def register(wt: Any) -> int:
    """A handle for ``wt`` (a ``triton_w4a16.W4A16Weight``) to pass to ``w4a16_linear``."""
    handle = next(_NEXT)
    _WEIGHTS[handle] = wt
    return handle


@torch.library.custom_op("compress::w4a16_linear", mutates_args=())
def w4a16_linear(x: torch.Tensor, handle: int, out_features: int, gathered: bool = False) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for the packed weight registered as ``handle`` (fp16/bf16 x on CUDA);
    ``gathered``: x is already in the weight's act-order group order (gathered in the graph)."""
    from compress.kernels import triton_w4a16 as tw

    return tw.w4a16_matmul(x, _registered(handle, "w4a16_linear", "packed weight", "accelerate"), gathered)


@w4a16_linear.register_fake
def _(x: torch.Tensor, handle: int, out_features: int, gathered: bool = False) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.custom_op("compress::w4a16_fused", mutates_args=())
def w4a16_fused(x: torch.Tensor, handle: int, out_features: int,
                residual: torch.Tensor | None = None) -> torch.Tensor:
    """A ``fused_block.FusedLinear`` registered as ``handle``: its matmul with the fusions it was
    built with (RMSNorm prologue, SiLU-gate epilogue, residual add)."""
    return _registered(handle, "w4a16_fused", "fused layer", "accelerate").run(x, residual)


@w4a16_fused.register_fake
def _(x: torch.Tensor, handle: int, out_features: int, residual: torch.Tensor | None = None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.custom_op("compress::decode_attention", mutates_args=())
def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                     scaling: float, handle: int) -> torch.Tensor:
    """One decode step's attention by the ``decode_attention.DecodeAttention`` registered as
    ``handle``: [B, 1, H, D]. Its per-head counters are written and left at zero by the kernel, a
    scratch it owns, so the op declares no mutation."""
    return _registered(handle, "decode_attention", "attention", "install").run(query, key, value, mask, scaling)


@decode_attention.register_fake
def _(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
      scaling: float, handle: int) -> torch.Tensor:
    b, h, _, d = query.shape
    return query.new_empty((b, 1, h, d))


# The CPU op is registered one level lower than the GPU ones (a schema and a CPU kernel instead of
# ``torch.library.custom_op``): on the CPU the host time of each call is the cost, paid by 210
# layers per SmolLM2 token, and custom_op's wrapper adds about 3 us per call in inference mode
# (8.9 vs 5.9 us for a do-nothing op: ``python bench/probes/cpu_compile_probe.py --op-overhead``,
# bench/results/cpu_op_overhead_cpu_2026-12-06.txt). Inference only: no autograd formula, like the kernel.
_CPU_LIB = torch.library.Library("compress", "FRAGMENT")
_CPU_LIB.define("cpu_int4_linear(Tensor x, int handle, int out_features) -> Tensor")


def cpu_int4_linear(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    """A CPU INT4 layer's eager forward registered as ``handle`` (``cpu_backend.backend``: the C
    kernel, or its dense path for prefill-sized x), as one opaque node under ``torch.compile``."""
    return _registered(handle, "cpu_int4_linear", "CPU INT4 layer", "accelerate")(x)


_CPU_LIB.impl("cpu_int4_linear", cpu_int4_linear, "CPU")


@torch.library.register_fake("compress::cpu_int4_linear")
def _(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))
