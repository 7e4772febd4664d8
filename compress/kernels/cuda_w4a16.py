"""W4A16 matmul for 1..16 activation rows as a CUDA kernel compiled at run time with NVRTC.

Why not Triton for this: at batch 1 the Triton kernel reached about half the copy bandwidth and
needed split-K (a memset, the kernel and a cast: three graph nodes) to fill 132 multiprocessors
(docs/design/cuda-w4a16.md). Here one launch does everything, each warp streams its weights through a
``cp.async`` pipeline several steps deep (no registers held while loads are in flight, and the
compiler cannot sink the loads next to their use as it does with register loads), and the tensor
cores do the multiply-add for any M <= 16, so one kernel serves decode and small batches.

Layout (``layout.pack_chunked``): codes packed along K, 8 consecutive columns per int32 word in the
order of ``layout.PLANE_SHIFT`` (columns 2p and 2p+1 in the low and high 16-bit halves at shift
4p), K padded to a multiple of 256. A 16-byte copy moves one "chunk" of 32 consecutive columns of
one row; ``lop3(w & 0x000F000F | magic)`` turns two columns into the pair of floats (magic + q)
at once (magic 1024 for fp16, 128 for bf16); one subtraction of (magic + z) leaves the exact
integer q - z (fp16 reads the odd pairs in place as 1024 + 16q and one fma by (1/16, -(64 + z))
does the shift and the subtraction).

Product: D^T = W x^T with ``mma.m16n8k16``: A = 16 weight rows (lane (g, t) holds rows g and g + 8
of a tile), B = up to 8 activation rows (twice for M > 8). A warp step covers 128 * kc columns
(4 lanes x 32, kc times); a lane's column pairs are the instruction's logical k (2t, 2t+1) and
(2t+8, 2t+9): the products sum over K, so any fixed assignment of columns to logical k works as
long as A and B use the same one. When a group spans whole 128-column half-steps (group a multiple
of 128, or per-channel) the products are exact (q - z) x sums in fp32 and are scaled once per
128 columns; narrower groups
scale each weight ((q - z) s rounded once to the activation dtype, as fp16 cuBLAS on dequantized
weights would see it). KW warps of a block take consecutive slices of K for the same rows and add
their partial sums in shared memory at the end.

The kernels are compiled once per configuration and process (``torch.cuda._compile_kernel``,
NVRTC, well under a second each) and launched through the driver API on the current stream, so
CUDA graphs capture them like any other kernel; on sm_90+ with programmatic dependent launch
(``cuLaunchKernelEx``; see GRID_WAIT in the source, ``cuda/w4a16.cu``), so that a kernel's first weight copies overlap
the end of the kernel before it.
"""
from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from compress.kernels.cuda_launch import (  # noqa: F401 (re-exported)
    DEFAULT_SHARED_BYTES, Launcher, cuda_source, launch, pdl_supported)


log = logging.getLogger(__name__)

CHUNK = 32  # columns per 16-byte load

_SOURCE = cuda_source("w4a16.cu")  # CUDA C++: cuda/common.cuh + cuda/w4a16.cu

#: What ``repack`` writes for this kernel: (codes tile-major (``layout.tile_major``), scales and zero
#: points tile-major (``layout.tile_groups``), weight copies with an L2 evict-first policy). The
#: kernels read every combination (``TILED`` / ``SZT`` / ``EVF`` in the source). On an H100 all three
#: took batch-1 speedups over fp16 from 3.33-3.67x (row-major) to 3.74-3.91x on the five Llama shapes
#: (session 11, ``python3 bench/probes/layout_probe.py --stages 2``), and in session 13 the GPU test suite
#: passed on it (145 tests: every row count, bf16, act-order, fused epilogues, the prefill path's
#: dequantize kernel) and the 7B decode step went from 3.04x to 3.21x of fp16 in the same lease
#: (docs/design/cuda-w4a16.md), so it is the default. ``$COMPRESS_TILE_LAYOUT`` (one of TILE_LAYOUTS' names)
#: picks another for a whole process, or ``cuda_w4a16.TILE_MAJOR = cuda_w4a16.TILE_LAYOUTS["row"]``
#: before ``accelerate``.
#: the layouts by name, for the benchmarks' ``--tile-major``: row-major, tile-major codes, both,
#: both with evict-first weight copies (the fastest measured, the default)
TILE_LAYOUTS = {"row": (False, False, False), "codes": (True, False, False), "both": (True, True, False),
                "both_evf": (True, True, True)}
TILE_LAYOUT_ENV = "COMPRESS_TILE_LAYOUT"
DEFAULT_TILE_LAYOUT = "both_evf"


def _layout_from_env() -> tuple[bool, bool, bool]:
    name = os.environ.get(TILE_LAYOUT_ENV) or DEFAULT_TILE_LAYOUT
    if name not in TILE_LAYOUTS:
        raise ValueError(f"${TILE_LAYOUT_ENV}={name!r}: choose one of {', '.join(TILE_LAYOUTS)}")
    return TILE_LAYOUTS[name]


TILE_MAJOR = _layout_from_env()


def tile_layout_name() -> str:
    """The TILE_LAYOUTS name of the layout ``repack`` writes now (``TILE_MAJOR``; for benchmark JSON)."""
    return next(name for name, value in TILE_LAYOUTS.items() if value == TILE_MAJOR)

_GCH_PER_CHANNEL = 1 << 30  # "chunks per group" for one group per row: c / GCH is always 0


STAGE_BYTES = 1024 + 128 + 64  # per 16-row tile, 128 columns and stage: codes, scales, zeros
NORM_STAGE_BYTES = 256  # per 128 columns and stage, with the RMSNorm prologue: the norm's weights
SMEM_LIMIT = DEFAULT_SHARED_BYTES  # shared memory per block without the opt-in attribute (what any GPU allows)


def smem_limit(device: torch.device | str) -> int:
    """Most dynamic shared memory one block may opt in to on ``device`` (H100: 227 KB, A100: 163 KB);
    48 KB where torch does not report it."""
    props = torch.cuda.get_device_properties(torch.device(device))
    return max(SMEM_LIMIT, int(getattr(props, "shared_memory_per_block_optin", 0) or 0))


@dataclass(frozen=True)
class CudaConfig:
    """nt: 16-row mma tiles per warp; kw: warps per block, each a slice of K; stages: depth of each
    warp's copy pipeline (a power of two; steps in flight: stages - 1; the stages live in dynamic
    shared memory, so configs above 48 KB per block run where the GPU allows the opt-in); kc: 128-column halves per
    step (kc = 2: each copy instruction reads whole 128-byte lines of 4 rows); minb: the minimum
    blocks per multiprocessor given to ``__launch_bounds__`` (0: none). It steers ptxas's register
    budget: without it ptxas keeps most configs at 128 registers (16 warps per multiprocessor);
    minb = 1 lets it use more (140-174 for the larger configs, fewer resident warps, more loads
    in flight per warp). Neither wins everywhere, so ``tune`` times both."""

    nt: int
    kw: int
    stages: int
    kc: int = 1
    minb: int = 0  # __launch_bounds__ minimum blocks per multiprocessor (0: no hint)

    def smem_bytes(self, norm: bool = False) -> int:
        """Dynamic shared memory per block (the final reduction reuses it); ``norm``: with the
        RMSNorm prologue, whose weights travel with the codes."""
        per_step = self.nt * STAGE_BYTES + (NORM_STAGE_BYTES if norm else 0)
        return self.kw * self.stages * self.kc * per_step

    def as_dict(self) -> dict[str, Any]:
        return {"kernel": "cuda", **self.__dict__}


def unsupported_reason(group: int, n_groups: int, k: int, n: int, device: torch.device | str) -> str | None:
    """Why this kernel cannot run a layer (None when it can)."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not hasattr(torch.cuda, "_compile_kernel"):
        return f"torch {torch.__version__} has no torch.cuda._compile_kernel (NVRTC)"
    dev = torch.device(device)
    if dev.type != "cuda":
        return "layer is not on a CUDA device"
    if torch.cuda.get_device_capability(dev) < (8, 0):
        return "needs compute capability >= 8.0 (mma.m16n8k16 with bf16)"
    if n_groups > 1 and group % CHUNK:
        return f"group size {group} is not a multiple of {CHUNK}"
    if k % 8:
        return f"in_features {k} is not a multiple of 8 (16-byte activation loads)"
    if n % 16:
        return f"out_features {n} is not a multiple of 16 (16-row tiles, 16-byte scale copies)"
    return compile_error(dev)


@functools.lru_cache(maxsize=None)
def _compile_error_cached(device_index: int) -> str | None:
    try:
        _kernel("w4a16_mma", device_index, _defines(CudaConfig(1, 1, 2), False, 1, False, False, False))
    except Exception as e:  # no NVRTC, no CUDA headers, a driver that rejects the code...
        return f"NVRTC compile failed ({type(e).__name__}: {str(e)[:300]})"
    return None


def compile_error(device: torch.device | str) -> str | None:
    """None when a test kernel compiles and loads on this device (checked once per process)."""
    dev = torch.device(device)
    return _compile_error_cached(dev.index if dev.index is not None else torch.cuda.current_device())


def _defines(cfg: CudaConfig, bf16: bool, gch: int, symmetric: bool, has_bias: bool, mrows2: bool,
             dequant: bool = False, fusion: tuple[bool, bool, bool] = (False, False, False),
             tiled: tuple[bool, bool, bool] = (False, False, False)) -> tuple[tuple[str, int], ...]:
    norm, silu_mul, residual = fusion
    return (("NT", cfg.nt), ("KW", cfg.kw), ("STAGES", cfg.stages), ("KC", cfg.kc), ("MINB", cfg.minb),
            ("BF16", int(bf16)), ("GCH", gch),
            ("SYMMETRIC", int(symmetric)), ("HAS_BIAS", int(has_bias)), ("MROWS2", int(mrows2)),
            ("CHUNK_COLS", CHUNK), ("DEQUANT", int(dequant)),
            ("SCALE_AFTER", int(gch % 4 == 0)),  # one group per 128-column step: scale the fp32 sums
            ("NORM", int(norm)), ("EPI", int(silu_mul)), ("RESID", int(residual)),
            ("TILED", int(tiled[0])), ("SZT", int(tiled[1])), ("EVF", int(tiled[2])))


@functools.lru_cache(maxsize=None)
def _kernel(name: str, device_index: int, defines: tuple[tuple[str, int], ...]) -> Any:
    """Compile (NVRTC) and load one specialization; cached per process and device."""
    src = "".join(f"#define {k} {v}\n" for k, v in defines) + _SOURCE
    with torch.cuda.device(device_index):
        return torch.cuda._compile_kernel(src, name)


def _gch(wt: Any) -> int:
    return _GCH_PER_CHANNEL if wt.n_groups == 1 else wt.group // CHUNK


def _tiled(wt: Any) -> tuple[bool, bool, bool]:
    return (wt.codes_tiled, wt.sz_tiled, wt.evict_first)


def default_config(m: int, n: int, sm_count: int = 132, *, tiled: bool | None = None) -> CudaConfig:
    """Config when none was tuned, fit to H100 sweeps of each layout (``tiled``: the weight's
    ``codes_tiled``; None = the layout ``repack`` writes now). 2, 4 or 8 warps per block (each a
    slice of K), whichever brings the grid nearest a target of resident warps per multiprocessor.

    Row-major (sessions 4-9): up to 8 rows of x, one 16-row tile per warp, 256-column steps and 16
    warps per SM; more rows, two tiles, 128-column steps and 8. Within 1% of the tuned best at M = 1
    on 4096^2, 4096 x 11008 and 8192^2 but 14-29% slower on the tall shapes.

    Tile-major (session 13's sweep of 7 shapes x M = 1, 4, 16): two tiles per warp on layers of 8192
    or more rows, 12 warps per SM, 128-column steps and ``minb = 1``; above 8 rows, two tiles,
    256-column steps and 6 (128-column steps where 256 would not fit 48 KB of shared memory). On
    that sweep (17 shape x M points, stacked q/k/v and gate/up included) 4% slower than the tuned
    best on average (worst 21%), where the row-major rule was 14% (worst 31%). ``tune`` (``compress
    bench`` tunes) is still worth it; the "untuned" column of ``bench/speed/kernel_bench.py`` shows by how
    much."""
    if tiled is None:
        tiled = TILE_MAJOR[0]
    if tiled:
        nt, kc, per_sm, minb = (2, 2, 6, 1) if m > 8 else (2 if n >= 8192 else 1, 1, 12, 1)
    else:
        nt, kc, per_sm, minb = (2, 1, 8, 0) if m > 8 else (1, 2, 16, 0)
    blocks = -(-n // (16 * nt))
    kw = min((2, 4, 8), key=lambda k: abs(math.log(blocks * k / (per_sm * sm_count))))
    cfg = CudaConfig(nt=nt, kw=kw, stages=2, kc=kc, minb=minb)
    if cfg.smem_bytes(norm=True) > SMEM_LIMIT:  # runs on any GPU, fused prologue included
        cfg = CudaConfig(nt=nt, kw=kw, stages=2, kc=1, minb=minb)
    return cfg


def candidate_configs(m: int, n: int, max_smem: int = SMEM_LIMIT) -> list[CudaConfig]:
    """The configs ``tune`` times: those whose stages fit ``max_smem`` bytes per block (pass
    ``smem_limit(device)`` to include pipelines deeper than 48 KB allows)."""
    # (An L2::256B prefetch-size hint on the weight copies was tried as a further option: within
    # +-2% of these on every shape and row count, so it was dropped.)
    # (Asking for 20 resident warps, i.e. at most 96 registers, was timed too and never won.)
    # (8 stages, up to 155 KB per block with dynamic shared memory, never won on the H100: session 5,
    # docs/design/cuda-w4a16.md. What dynamic memory did add is 2 tiles x 8 warps x 256 columns, 78 KB: 4096^2.)
    cfgs = [CudaConfig(nt, kw, st, kc, mb) for mb in (0, 1) for kc in (1, 2) for nt in (1, 2) for kw in (2, 4, 8)
            for st in (2, 4)]
    return [c for c in cfgs if c.smem_bytes() <= max_smem]


def matmul(x2d: torch.Tensor, wt: Any, cfg: CudaConfig, out: torch.Tensor | None = None, *,
           norm: tuple[torch.Tensor, float] | None = None, silu_mul: bool = False,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """y = x2d @ W.T (+ bias) for 1..16 rows of fp16/bf16 activations; ``wt`` a W4A16Weight with
    ``kernel == "cuda"`` (its ``pdl`` flag picks the launch). ``out`` ([M, N], x's dtype,
    row-contiguous) receives the result.

    Fusions (``compress.kernels.fused_block``): ``norm = (weight, eps)``: x is an RMSNorm's input
    and the product is of RMSNorm(x) (weight [K] in x's dtype); ``silu_mul``: the weight's rows are
    gate/up pairs interleaved 8 by 8 (``wt.glu_interleaved``) and the result is silu(gate) * up,
    [M, N / 2]; ``residual`` ([M, N], x's dtype): added to the result."""
    m, k = x2d.shape
    if not 1 <= m <= 16:
        raise ValueError(f"the CUDA W4A16 kernel takes 1..16 rows, got {m}")
    if x2d.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"activations must be fp16 or bf16, got {x2d.dtype}")
    if wt.perm is not None:  # act-order: one gather launch (under torch.compile a graph op: ops.py)
        x2d = x2d.index_select(1, wt.perm)
    elif x2d.stride(1) != 1 or (m > 1 and x2d.stride(0) % 8) or x2d.data_ptr() % 16:
        x2d = x2d.clone(memory_format=torch.contiguous_format)  # 16-byte aligned rows
    n = wt.out_features
    if silu_mul and not getattr(wt, "glu_interleaved", False):
        raise ValueError("silu_mul needs a weight whose gate and up rows are interleaved (fused.stack_glu)")
    if silu_mul and residual is not None:
        raise ValueError("silu_mul and residual do not combine")
    n_out = n // 2 if silu_mul else n
    if norm is not None:
        gamma, eps = norm
        if gamma.shape != (k,) or gamma.dtype != x2d.dtype or not gamma.is_contiguous() or gamma.data_ptr() % 16:
            raise ValueError(f"the norm weight must be a contiguous, 16-byte aligned [{k}] {x2d.dtype} tensor")
    if residual is not None and (residual.shape != (m, n) or residual.dtype != x2d.dtype
                                 or residual.stride(1) != 1):
        raise ValueError(f"residual must be [{m}, {n}] {x2d.dtype} with unit column stride")
    if out is None:
        out = torch.empty(m, n_out, device=x2d.device, dtype=x2d.dtype)
    elif out.shape != (m, n_out) or out.dtype != x2d.dtype or out.stride(1) != 1:
        raise ValueError(f"out must be [{m}, {n_out}] {x2d.dtype} with unit column stride")
    fusion = (norm is not None, silu_mul, residual is not None)
    key = (cfg, x2d.dtype, m > 8, wt.pdl, fusion)
    launchers = wt.launchers
    run = launchers.get(key)
    if run is None:
        kp = wt.words.shape[1] * 8
        if kp % (128 * cfg.kc):
            raise ValueError(f"packed K {kp} is not a multiple of {128 * cfg.kc}")
        kern = _kernel("w4a16_mma", x2d.device.index, _defines(
            cfg, x2d.dtype == torch.bfloat16, _gch(wt), wt.zeros is None, wt.bias is not None, m > 8,
            fusion=fusion, tiled=_tiled(wt)))
        run = launchers[key] = Launcher(
            kern, (-(-n // (16 * cfg.nt)), 1), 32 * cfg.kw,
            [x2d, wt.words, wt.scales_for(x2d.dtype), wt.zeros, wt.bias, out, m, n, k, kp, 0, 0,
             None, 0, None, 0.0], wt.pdl, shared=cfg.smem_bytes(norm=norm is not None))
    # arguments 0 x, 5 out, 6 M, 10 ldx, 11 ldo (12 res, 13 ldr, 14 gam, 15 eps) change per call;
    # the weight's tensors do not
    run.set(0, x2d.data_ptr())
    run.set(5, out.data_ptr())
    run.set(6, m)
    run.set(10, x2d.stride(0))
    run.set(11, out.stride(0))
    if residual is not None:
        run.set(12, residual.data_ptr())
        run.set(13, residual.stride(0))
    if norm is not None:
        run.set(14, norm[0].data_ptr())
        run.set(15, float(norm[1]))
    run(torch.cuda.current_stream(x2d.device).cuda_stream)
    return out


def dequantize(wt: Any, dtype: torch.dtype) -> torch.Tensor:
    """W [N, K] in ``dtype`` (fp16/bf16) with columns in group order."""
    n, k = wt.out_features, wt.in_features
    out = torch.empty(n, k, device=wt.words.device, dtype=dtype)
    scales = wt.scales_for(dtype)
    kp = wt.words.shape[1] * 8
    kern = _kernel("w4a16_dequant", wt.words.device.index, _defines(
        CudaConfig(1, 1, 2), dtype == torch.bfloat16, _gch(wt), wt.zeros is None, False, False, dequant=True,
        tiled=_tiled(wt)))
    threads = 256
    launch(kern, (n, -(-k // (8 * threads))), threads, [wt.words, scales, wt.zeros, out, n, k, kp],
           wt.words.device)
    return out
