"""W4A16 GEMM for prefill-sized inputs (more than 16 rows of x) on the CUDA kernel's packed weights.

Until session 13 those inputs dequantized the whole layer to fp16 (written, then read again by
cuBLAS): 0.54-0.63x of fp16 at M = 512 and about half its speed on a 7B prompt of 128 tokens
(docs/design/gemm-and-triton.md). Here each program unpacks a [BLOCK_N, BLOCK_K] tile of 4-bit codes in registers,
scales it and feeds it to ``tl.dot``, so the weight crosses memory once, at 4 bits. It reads both
layouts ``repack`` writes for the CUDA kernel (``layout.pack_chunked`` words row-major or
``layout.tile_major``; scales and zero points [G, N] or ``layout.tile_groups``), so it needs no
second copy of the weight.

Word format (``layout.pack_chunked``): word ``c`` of a row holds columns 8c .. 8c + 7, column j at
bit ``layout.PLANE_SHIFT[j]`` = 4 * (j // 2) + 16 * (j % 2). BLOCK_K divides the group size (or the
layer is per-channel), so one scale and zero point per output row serve a whole tile.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from compress.kernels.packed import W4A16Weight

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install: the configs and the policy below still import (and test)
    triton = None


if triton is not None:
    @triton.jit
    def _bit_of(j):
        """Bit offset of column j (0..7) of a word: ``layout.PLANE_SHIFT[j]``."""
        return (j // 2) * 4 + (j % 2) * 16

    @triton.jit
    def _gemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, perm_ptr, b_ptr, out_ptr,
                     M, N, K, G, GROUP, WPR, stride_xm, stride_om,
                     TILED: tl.constexpr, SZT: tl.constexpr, SYMMETRIC: tl.constexpr, HAS_PERM: tl.constexpr,
                     HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, MAGIC: tl.constexpr, GATHER: tl.constexpr, IS_FP16: tl.constexpr):
        # programs that share a weight tile run side by side, so the tile comes from DRAM once
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        rows_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % rows_m
        pid_n = (pid % per_group) // rows_m

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < N
        x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
        WK: tl.constexpr = BLOCK_K // 8  # words per row and tile
        shifts = _bit_of(tl.arange(0, 8))
        if TILED:  # [N/16][Kp/256][2][16 rows][16 words]: 16 rows x 128 columns are one 1 KB block
            row_base = (offs_n // 16).to(tl.int64) * (WPR * 16) + (offs_n % 16) * 16  # a tile: 16 rows
        else:
            row_base = offs_n.to(tl.int64) * WPR
        if SZT:  # [N/16][G][16]
            sz_row = (offs_n // 16) * (G * 16) + offs_n % 16
            sz_g = 16
        else:  # [G, N]
            sz_row = offs_n
            sz_g = N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            if HAS_PERM:
                cols = tl.load(perm_ptr + offs_k, mask=k_mask, other=0)
            else:
                cols = offs_k
            x = tl.load(x_rows + cols[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            if GATHER:  # each column loads its own word (8 loads of one word, served by L1): no reshape
                kw = offs_k // 8
            else:
                kw = k0 // 8 + tl.arange(0, WK)
            if TILED:
                w_off = (kw // 32) * 512 + ((kw // 16) % 2) * 256 + kw % 16
            else:
                w_off = kw
            words = tl.load(w_ptr + row_base[:, None] + w_off[None, :], mask=n_mask[:, None], other=0)
            if GATHER:
                q = (words >> _bit_of(offs_k % 8)[None, :]) & 0xF
            else:
                q = tl.reshape((words[:, :, None] >> shifts[None, None, :]) & 0xF, (BLOCK_N, BLOCK_K))
            g = k0 // GROUP
            s = tl.load(s_ptr + g * sz_g + sz_row, mask=n_mask, other=0.0)
            if SYMMETRIC:
                z = tl.full((BLOCK_N,), 8, tl.int32)
            else:
                z = tl.load(z_ptr + g * sz_g + sz_row, mask=n_mask, other=0).to(tl.int32)
            if MAGIC:
                # q | exponent bits is the float (base + q) exactly: no int-to-float conversion,
                # which runs at 1/8 of the FMA rate (base 1024 in fp16, 128 in bf16)
                if IS_FP16:
                    qf = (q | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
                    zf = (z + 1024).to(tl.float16)
                else:
                    qf = (q | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
                    zf = (z + 128).to(tl.bfloat16)
                w = (qf - zf[:, None]) * s.to(qf.dtype)[:, None]  # q - z exact; one rounding, as below
            else:
                w = ((q - z[:, None]).to(tl.float32) * s.to(tl.float32)[:, None]).to(x.dtype)
            acc = tl.dot(x, tl.trans(w), acc)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
        out = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
else:
    _gemm_kernel = None


#: ``large_m="auto"`` runs the GEMM for 17 .. AUTO_MAX_M rows and dequantize + cuBLAS above
#: (0: never; set from the H100 sweep of ``bench/speed/gemm_bench.py``, docs/design/gemm-and-triton.md)
AUTO_MAX_M = 0


def takes(wt: W4A16Weight, m: int) -> bool:
    """Whether ``m`` rows of x (more than the CUDA kernel's 16) go through this GEMM for ``wt``."""
    return wt.large_m == "gemm" or (wt.large_m == "auto" and m <= AUTO_MAX_M)


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8
    magic: bool = True  # unpack by exponent bits (no int-to-float conversion); False: convert
    gather: bool = False  # each column loads its word (no reshape of [N, K / 8, 8] codes); False: reshape

    def as_dict(self) -> dict[str, Any]:
        return {"kernel": "gemm", **self.__dict__}


def block_k_for(wt: W4A16Weight, block_k: int) -> int:
    """The largest of 128 / 64 / 32 that is at most ``block_k`` and divides the group (one scale per
    row and tile); per-channel layers take ``block_k`` as it is."""
    if wt.n_groups == 1:
        return block_k
    for bk in (128, 64, 32):
        if bk <= block_k and wt.group % bk == 0:
            return bk
    raise ValueError(f"group size {wt.group} is not a multiple of 32 columns")


def default_config(m: int, n: int) -> GemmConfig:
    """Config when none was tuned: row tiles of 32, 64 or 128 (the smallest covering ``m``, up to
    128), 128 output rows and 64 columns per step."""
    if m <= 32:
        return GemmConfig(32, 128, 64, num_warps=4, num_stages=4)
    if m <= 64:
        return GemmConfig(64, 128, 64, num_warps=4, num_stages=4)
    return GemmConfig(128, 128, 64, num_warps=8, num_stages=3)


def candidate_configs(m: int) -> list[GemmConfig]:
    """What ``bench/speed/gemm_bench.py`` sweeps for ``m`` rows: 32-row tiles up to 64 rows, 64-row ones
    for 33 to 256, 128-row ones from 65; 64 to 256 output rows per tile, 64 or 128 columns per step;
    the default tiles also without the exponent-bit unpack and with per-column word loads."""
    out = []
    if m <= 64:
        out += [GemmConfig(32, 64, 64, 4, 4), GemmConfig(32, 64, 128, 4, 4), GemmConfig(32, 128, 64, 4, 4),
                GemmConfig(32, 128, 128, 4, 3), GemmConfig(32, 256, 64, 8, 3)]
    if 32 < m <= 256:
        out += [GemmConfig(64, 64, 128, 4, 4), GemmConfig(64, 128, 64, 4, 4), GemmConfig(64, 128, 128, 4, 3),
                GemmConfig(64, 128, 64, 8, 4), GemmConfig(64, 256, 64, 8, 3)]
    if m > 64:
        out += [GemmConfig(128, 64, 128, 4, 4), GemmConfig(128, 128, 64, 4, 4), GemmConfig(128, 128, 64, 8, 3),
                GemmConfig(128, 128, 128, 8, 3), GemmConfig(128, 256, 64, 8, 3)]
    # the default tile of each size with int-to-float conversion instead of exponent bits, and with
    # per-column word loads instead of the reshape (A/Bs of the unpack)
    base = [c for c in out if c in (GemmConfig(32, 128, 64, 4, 4), GemmConfig(64, 128, 64, 4, 4),
                                    GemmConfig(128, 128, 64, 8, 3))]
    return out + [replace(c, magic=False) for c in base] + [replace(c, gather=True) for c in base]


def gemm(x2d: torch.Tensor, wt: W4A16Weight, cfg: GemmConfig | None = None,
         out: torch.Tensor | None = None) -> torch.Tensor:
    """y = x2d @ W.T (+ bias) for any number of rows of fp16/bf16 x [M, K] (columns in the
    layer's original order: act-order's gather happens in the activation load); ``wt`` a
    W4A16Weight with ``kernel == "cuda"``."""
    if _gemm_kernel is None:
        raise RuntimeError("the W4A16 GEMM needs Triton (a CUDA install of torch brings it)")
    if wt.kernel != "cuda":
        raise ValueError(f"the W4A16 GEMM reads the CUDA kernel's packed layout, got kernel={wt.kernel!r}")
    if x2d.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"activations must be fp16 or bf16, got {x2d.dtype}")
    m, k = x2d.shape
    if k != wt.in_features:
        raise ValueError(f"x has {k} columns, the layer {wt.in_features}")
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    n = wt.out_features
    cfg = cfg or default_config(m, n)
    bk = block_k_for(wt, cfg.block_k)
    if out is None:
        out = torch.empty(m, n, device=x2d.device, dtype=x2d.dtype)
    scales = wt.scales_for(x2d.dtype)
    dummy = scales  # pointer arguments the kernel never reads (constexpr-disabled)
    grid = (-(-m // cfg.block_m) * -(-n // cfg.block_n),)
    _gemm_kernel[grid](
        x2d, wt.words, scales, wt.zeros if wt.zeros is not None else dummy,
        wt.perm if wt.perm is not None else dummy, wt.bias if wt.bias is not None else dummy, out,
        m, n, k, wt.n_groups, wt.group, wt.words.shape[1], x2d.stride(0), out.stride(0),
        TILED=wt.codes_tiled, SZT=wt.sz_tiled, SYMMETRIC=wt.zeros is None, HAS_PERM=wt.perm is not None,
        HAS_BIAS=wt.bias is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=bk, GROUP_M=cfg.group_m,
        MAGIC=cfg.magic, GATHER=cfg.gather, IS_FP16=x2d.dtype == torch.float16,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out
