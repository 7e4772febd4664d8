"""Decode attention on the GPU: one query token per sequence over the KV cache, split over the cache.

Why: in a compiled decode step of a Llama-7B-shaped model, attention over a 193-slot static cache
took about 10 us per layer (cuDNN's SDPA kernel 7.6 us plus glue; docs/design/dispatch.md), a sixth of the
INT4 step, and the same in fp16. A query of one token reads each head's keys and values once
(193 x 128 x 2 x 2 bytes = 99 KB per head); 32 heads on 132 multiprocessors leave most of the GPU
idle unless the cache is split. Here each block takes one (sequence, head) and a slice of the
cache positions and keeps an online softmax (running max, sum and weighted values) over its slice.
The slices of a head are then merged in one of three ways (``choose_config`` picks by cache length,
heads and GPU): no split (one block per head); a thread block cluster per head (sm_90), merged
through distributed shared memory; or partials in global memory merged by the last block of the
head to finish (an atomic counter per head that wraps back to zero, so no reset launch is needed).
One launch, with programmatic dependent launch so that the next kernel (o_proj) starts early. The
CUDA source is ``cuda/decode_attention.cu``.

``compress.kernels.attention.install(model)`` registers this as a transformers attention
implementation ("compress_decode") for the model: decode calls it takes (one query token,
fp16/bf16 on CUDA, head dim 64/128/256, a boolean or additive mask, no dropout, softcap or sinks)
run the kernel; everything else (prefill, CPU, other dtypes) runs transformers' SDPA function
unchanged. Masked positions are skipped in the
sums, but their keys are still read (as SDPA reads a static cache's unfilled slots).

Numerics: scores, softmax and the weighted sum in float32 (exp2 of log2-scaled scores), one rounding
of the output to the activation dtype, as SDPA's kernels do; the tests bound the error against a
float32 reference by a multiple of SDPA's own.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compress.kernels.cuda_launch import Launcher, cuda_source, pdl_supported

NAME = "compress_decode"  # the transformers attention implementation ``install`` registers
HEAD_DIMS = (64, 128, 256)
MAX_SPLITS = 256  # as in the source

_SOURCE = cuda_source("decode_attention.cu")  # CUDA C++: cuda/common.cuh + cuda/decode_attention.cu


@dataclass(frozen=True)
class Config:
    """``warps`` per block; ``t``: cache positions each warp loads per step; ``blocks_per_sm``: the
    grid's target size, which sets how many slices the cache is split into."""
    warps: int = 4
    t: int = 4
    blocks_per_sm: float = 2.0
    cluster: int = 0  # > 0: exactly this many slices, one thread block cluster (sm_90) per head


SHORT = Config(16, 8, 0.0)  # one block per head, 128 positions per step
SHORT_CLUSTER = Config(8, 8, 0.0, 4)  # 4 blocks per head, one 64-position step each up to 256 positions
LONG = Config(8, 4, 2.0)
LONG_CLUSTER = Config(8, 8, 0.0, 8)
SHORT_MAX = 256  # cache positions
LONG_MIN = 2048


def choose_config(length: int, heads: int = 32, sms: int = 132, clusters: bool = True) -> Config:
    """The config for ``length`` cache positions and ``heads`` (sequences x heads), from
    ``bench/speed/decode_attention.py`` on an H100 (docs/design/dispatch.md). Short caches: a cluster of 4 blocks
    per head while the grid stays within 1.5 blocks per multiprocessor (4.9 us at 193 positions
    and 32 heads, against 5.3 for one block per head and 10.7 for cuDNN), else one block per head
    (no combine step); middle lengths: about 2 blocks per multiprocessor with the counter combine;
    long caches and few heads: a cluster of 8. ``clusters``: thread block clusters available (sm_90)."""
    if length <= SHORT_MAX:
        return SHORT_CLUSTER if clusters and heads * SHORT_CLUSTER.cluster <= 1.5 * sms else SHORT
    if length >= LONG_MIN and clusters and heads * LONG_CLUSTER.cluster <= 2 * sms:
        return LONG_CLUSTER
    return LONG


@functools.lru_cache(maxsize=None)
def _kernel(device_index: int, head_dim: int, bf16: bool, mask_kind: int, warps: int, t: int,
            cluster: int = 0) -> Any:
    defines = {"HD": head_dim, "BF16": int(bf16), "MASK": mask_kind, "WARPS": warps, "T": t, "CLUSTER": cluster}
    src = "".join(f"#define {k} {v}\n" for k, v in defines.items()) + _SOURCE
    with torch.cuda.device(device_index):
        return torch.cuda._compile_kernel(src, "decode_attn")


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def split(length: int, heads: int, sms: int, cfg: Config) -> tuple[int, int]:
    """(slices, positions per slice) for ``heads`` (sequences x heads) over ``length`` positions:
    about ``cfg.blocks_per_sm`` blocks per multiprocessor, slices a multiple of one step of the
    block's warps (``blocks_per_sm`` 0: one slice)."""
    step = cfg.warps * cfg.t
    if cfg.cluster:
        return cfg.cluster, max(step, math.ceil(math.ceil(length / cfg.cluster) / step) * step)
    want = max(1, math.ceil(cfg.blocks_per_sm * sms / heads))
    per = max(step, math.ceil(math.ceil(length / want) / step) * step)
    per = max(per, math.ceil(math.ceil(length / MAX_SPLITS) / step) * step)
    return math.ceil(length / per), per


def unsupported_reason(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       mask: torch.Tensor | None) -> str | None:
    """Why the kernel cannot take this call (None when it can)."""
    if not query.is_cuda:
        return "not on a CUDA device"
    if query.dtype not in (torch.float16, torch.bfloat16) or key.dtype != query.dtype or value.dtype != query.dtype:
        return f"dtype {query.dtype} (fp16/bf16 query, keys and values)"
    if query.dim() != 4 or key.dim() != 4 or value.shape != key.shape:
        return "query/key/value are not [batch, heads, positions, head_dim] with equal key and value shapes"
    b, h, n, d = query.shape
    if n != 1:
        return f"{n} query positions (decode only: one)"
    if d not in HEAD_DIMS or key.shape[-1] != d:
        return f"head dim {d} (one of {HEAD_DIMS})"
    if key.shape[0] != b or h % key.shape[1]:
        return f"key heads {key.shape[1]} do not divide query heads {h}"
    if torch.cuda.get_device_capability(query.device) < (8, 0):
        return "needs compute capability >= 8.0"
    if not hasattr(torch.cuda, "_compile_kernel"):
        return f"torch {torch.__version__} has no torch.cuda._compile_kernel (NVRTC)"
    if mask is not None:
        if mask.dim() != 4 or mask.shape[-1] != key.shape[2] or mask.shape[-2] != 1 or mask.shape[0] not in (1, b) \
                or mask.shape[1] not in (1, h):
            return f"mask shape {tuple(mask.shape)} (needs [1 or batch, 1 or heads, 1, {key.shape[2]}])"
        if mask.device != query.device:
            return "mask on another device"
    big = max(t.numel() for t in (query, key, value))
    if big >= 2**31:
        return "tensors of 2^31 elements or more (32-bit offsets)"
    return None


def _rows(t: torch.Tensor, vec: int) -> torch.Tensor:
    """``t`` with unit last stride and every row start aligned to ``vec`` elements (vector loads)."""
    if t.stride(-1) != 1 or t.data_ptr() % (2 * vec) or any(s % vec for s in t.stride()[:-1]):
        return t.contiguous()
    return t


class DecodeAttention:
    """What ``install`` keeps on a model: the per-head arrival counters (zeros between launches),
    the launchers built so far and the config (None: ``choose_config`` per call). ``pdl``:
    programmatic dependent launch (sm_90+)."""

    def __init__(self, cfg: Config | None = None, pdl: bool = True):
        self.cfg = cfg
        self.pdl = pdl
        self.counters: dict[torch.device, torch.Tensor] = {}
        self.launchers: dict[tuple, Launcher] = {}
        from compress.kernels import ops

        self.handle = ops.register(self)  # for torch.compile (ops.decode_attention)

    def counter(self, device: torch.device, n: int) -> torch.Tensor | None:
        """``n`` zeroed counters on ``device`` (None when they would have to be allocated during a
        CUDA graph capture: the call then runs unsplit, which needs none)."""
        c = self.counters.get(device)
        if c is None or c.numel() < n:
            if torch.cuda.is_current_stream_capturing():
                return None
            c = self.counters[device] = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
        return c

    def run(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
            scaling: float) -> torch.Tensor:
        """The kernel where ``unsupported_reason`` allows, else SDPA (same layout)."""
        if unsupported_reason(query, key, value, mask) is None:
            return self(query, key, value, mask, scaling)
        g = query.shape[1] // key.shape[1]
        k, v = key.repeat_interleave(g, dim=1), value.repeat_interleave(g, dim=1)
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(query.dtype)
        return nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scaling).transpose(1, 2)

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                 scaling: float, cfg: Config | None = None) -> torch.Tensor:
        """softmax(q k^T * scaling + mask) v for one query position: [B, 1, H, D] (transformers'
        layout after attention). ``mask``: bool (True = attend) or additive, broadcastable as
        ``unsupported_reason`` says. The caller has checked ``unsupported_reason``."""
        b, h, _, d = query.shape
        hk, length = key.shape[1], key.shape[2]
        dev = query.device
        sms = _sm_count(dev.index)
        sm90 = torch.cuda.get_device_capability(dev) >= (9, 0)  # thread block clusters
        cfg = cfg or self.cfg or choose_config(length, b * h, sms, sm90)
        if cfg.cluster and not sm90:
            cfg = LONG
        vec = d // 32
        q, k, v = _rows(query, vec), _rows(key, vec), _rows(value, vec)
        kind = 0
        if mask is not None:
            if mask.dtype == torch.bool:
                kind = 1
            else:
                kind, mask = 2, mask.float()
        slices, per = split(length, b * h, sms, cfg)
        merged = slices > 1 and not cfg.cluster  # partials merged in global memory, by per-head counters
        counters = self.counter(dev, b * h) if merged else None
        if merged and counters is None:  # none yet and a CUDA graph is being captured: one slice per head
            slices, per, merged = 1, length, False
        out = torch.empty(b, 1, h, d, device=dev, dtype=query.dtype)
        ws = torch.empty(b * h * slices * (d + 2), device=dev, dtype=torch.float32) if merged else None
        bf16 = query.dtype == torch.bfloat16
        pdl = self.pdl and pdl_supported(dev)
        key_ = (dev.index, d, bf16, kind, cfg.warps, cfg.t, cfg.cluster, slices, b * h, pdl)
        ms = (0, 0, 0) if mask is None else tuple(0 if mask.shape[i] == 1 else mask.stride(i) for i in (0, 1, 3))
        args = [q, k, v, mask, out, ws, counters, h, h // hk, length, per,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2), *ms, scaling * 1.4426950408889634]
        run = self.launchers.get(key_)
        if run is None:  # the argument array is built once per launch shape; later calls rewrite it
            kern = _kernel(dev.index, d, bf16, kind, cfg.warps, cfg.t, cfg.cluster)
            run = self.launchers[key_] = Launcher(kern, (slices, b * h), 32 * cfg.warps, args, pdl)
        else:
            for i, a in enumerate(args):
                run.set(i, a.data_ptr() if isinstance(a, torch.Tensor) else 0 if a is None else a)
        run(torch.cuda.current_stream(dev).cuda_stream)
        return out


def reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
              scaling: float) -> torch.Tensor:
    """The same function in float32 ([B, 1, H, D]), for tests."""
    g = query.shape[1] // key.shape[1]
    k = key.float().repeat_interleave(g, dim=1)
    v = value.float().repeat_interleave(g, dim=1)
    s = (query.float() @ k.transpose(-1, -2)) * scaling
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.float()
    return (s.softmax(-1) @ v).transpose(1, 2)
