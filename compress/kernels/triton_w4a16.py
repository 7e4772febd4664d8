"""W4A16 matmul in Triton: ``y = x @ W.T`` with 4-bit group-quantized W, fp16/bf16 activations.

This module is also the entry point of the GPU path (``repack``, ``w4a16_matmul``, ``tune``): where
it can run, ``repack`` packs a layer for the CUDA kernel of ``cuda_w4a16`` (1..16 rows in one
launch; 1.5-2x faster than the Triton kernels below at M <= 16, docs/design/gemm-and-triton.md), and
``w4a16_matmul`` routes to it (M > 16: its dequantize kernel + cuBLAS; ``large_m`` is ignored for
such layers). The Triton kernels serve the other layers (groups of 16 columns, dimensions not
multiples of 8/16, no NVRTC).

Design (numbers and measurements: docs/design/gemm-and-triton.md):

- Weights are repacked once at load by ``compress.kernels.layout.pack_planar``: int32 words, 8 codes
  per word along K, in blocks of 8 * PW columns cut into 8 "planes" of PW columns (PW = 16, 32 or
  64; 16 measured fastest). A program loads a [BLOCK_N, PW]-word tile (4 * PW contiguous bytes per
  row, 16-byte loads), unpacks each plane and multiplies it with PW activations. No register
  reshuffle is needed: a plane is already a tile. The next block's words are loaded before this
  block computes (register double buffering).
- Unpacking subtracts the zero point on the way (``(q - z)`` is an exact small integer in fp16 and
  bf16), so no ``z * sum(x)`` correction is needed later (that correction cancels catastrophically
  when products are summed in fp16). For fp16 the unpack is inline PTX: ``(w & 0x000F000F) |
  0x64006400`` reads two codes as the fp16 numbers 1024 + q, and one ``sub.f16x2`` with 1024 + z
  leaves q - z, two codes per instruction.
- The scale multiplies once per block (or per plane when groups are narrower than a block):
  ``acc += s * sum_k x_k (q_k - z)``.
  Scales are stored [G, N] fp16 and zeros [G, N] uint8 so that a row tile reads them contiguously.
- Decode, M = 1: an FMA kernel accumulates [BLOCK_N, PW] products elementwise in the layout of the
  loaded words and reduces once at the end (no shared memory or barriers in the loop; checked in the
  SASS). ``FP16_ACC`` sums the 8 planes of a block in fp16 (packed HFMA2) before the fp32 update.
- 1 < M <= 16: a tensor-core kernel, one [16, PW] x [PW, BLOCK_N] product per plane (rows past M
  are masked to zero). M > 16 (prefill): the same kernel with BLOCK_M = 64 and a grid over M, or
  dequantize + cuBLAS (``W4A16Weight.large_m``), whichever measured faster (docs/design/gemm-and-triton.md).
- Split-K: with few output rows (4096) each program takes a slice of K so that the grid fills 132
  multiprocessors; partial sums meet in an fp32 buffer by atomic adds.
- Act-order: columns were sorted by group at load; ``perm`` gathers the matching activations inside
  the kernel (``x[..., perm]`` costs one extra index load, no extra launch).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
import triton
import triton.language as tl

from compress.kernels import layout
from compress.kernels.packed import W4A16Weight, dequantize_packed  # noqa: F401 (re-exported)
from compress.kernels.gpu_timing import graph_time_ms

log = logging.getLogger(__name__)

# Two planes per lop3: low half = plane 2p (bits 4p..4p+3), high half = plane 2p+1 (bits 16+4p..).
# $9 holds the fp16 pair (1024 + z, 1024 + z); (1024 + q) - (1024 + z) = q - z exactly.
_ASM_UNPACK = tl.constexpr("""
{
.reg .b32 t0, t1, t2, t3, s;
lop3.b32 t0, $8, 0x000F000F, 0x64006400, 0xea;
shr.b32 s, $8, 4;
lop3.b32 t1, s, 0x000F000F, 0x64006400, 0xea;
shr.b32 s, $8, 8;
lop3.b32 t2, s, 0x000F000F, 0x64006400, 0xea;
shr.b32 s, $8, 12;
lop3.b32 t3, s, 0x000F000F, 0x64006400, 0xea;
sub.f16x2 t0, t0, $9;
sub.f16x2 t1, t1, $9;
sub.f16x2 t2, t2, $9;
sub.f16x2 t3, t3, $9;
mov.b32 {$0, $1}, t0;
mov.b32 {$2, $3}, t1;
mov.b32 {$4, $5}, t2;
mov.b32 {$6, $7}, t3;
}
""")


@triton.jit
def _planes(w, z, DTYPE: tl.constexpr, USE_ASM: tl.constexpr):
    """The 8 planes of a [BLOCK_N, PW] word tile as exact values q - z in DTYPE (a tuple indexed by
    plane). ``z`` is an int32 [BLOCK_N] zero point per row."""
    if USE_ASM:
        zz = (z + 0x6400) * 0x10001  # fp16 bits of 1024 + z, in both halves
        zz = tl.broadcast_to(zz[:, None], w.shape)
        return tl.inline_asm_elementwise(
            _ASM_UNPACK, "=h,=h,=h,=h,=h,=h,=h,=h,r,r", [w, zz],
            dtype=(tl.float16,) * 8, is_pure=True, pack=1)
    else:
        zc = z[:, None]
        return (
            ((w & 0xF) - zc).to(DTYPE), (((w >> 16) & 0xF) - zc).to(DTYPE),
            (((w >> 4) & 0xF) - zc).to(DTYPE), (((w >> 20) & 0xF) - zc).to(DTYPE),
            (((w >> 8) & 0xF) - zc).to(DTYPE), (((w >> 24) & 0xF) - zc).to(DTYPE),
            (((w >> 12) & 0xF) - zc).to(DTYPE), (((w >> 28) & 0xF) - zc).to(DTYPE),
        )


@triton.jit
def _zero(z_ptr, g, N, offs_n, n_mask, SYMMETRIC: tl.constexpr):
    """Zero points of group g for a tile of rows, int32 [BLOCK_N] (8 on a symmetric grid)."""
    if SYMMETRIC:
        return tl.full(offs_n.shape, 8, tl.int32)
    else:
        return tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0).to(tl.int32)


@triton.jit
def _scale(s_ptr, g, N, offs_n, n_mask):
    return tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)


@triton.jit
def _x_plane(x_rows, perm_ptr, cols, k_mask, row_mask, HAS_PERM: tl.constexpr):
    """Activations for the PW columns of a plane, [rows, PW], gathered through perm (act-order)."""
    if HAS_PERM:
        src = tl.load(perm_ptr + cols, mask=k_mask, other=0)
    else:
        src = cols
    return tl.load(x_rows + src[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)


@triton.jit
def _tile_start(w_ptr, N, K, n_blocks, per_split, PW: tl.constexpr, BLOCK_N: tl.constexpr):
    """Shared prologue of the GEMV and tensor-core kernels: this program's rows (grid axis 0) and
    K slice (axis 1), its word-tile pointers, and the first block's words already loaded."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_i = tl.arange(0, PW)
    n_mask = offs_n < N
    w_tile = w_ptr + offs_n[:, None].to(tl.int64) * (n_blocks * PW) + offs_i[None, :]
    b0 = tl.program_id(1) * per_split
    w_first = tl.load(w_tile + b0 * PW, mask=n_mask[:, None] & (b0 * 8 * PW + offs_i < K)[None, :], other=0)
    return offs_n, offs_i, n_mask, w_tile, b0, w_first


@triton.jit
def _next_words(w_tile, b, i, per_split, n_mask, offs_i, K, PW: tl.constexpr):
    """Words of block b + 1, loaded before block b computes: register double buffering (Triton does
    not software-pipeline loads that feed no tl.dot). Words whose columns all lie past K (padding
    of the last block) or past this program's slice are not read."""
    return tl.load(w_tile + (b + 1) * PW,
                   mask=n_mask[:, None] & ((b + 1) * 8 * PW + offs_i < K)[None, :] & (i + 1 < per_split),
                   other=0)


@triton.jit
def _w4a16_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, perm_ptr, bias_ptr, out_ptr,
    N, K, G, GROUP, n_blocks, per_split,
    PW: tl.constexpr, PER_PLANE: tl.constexpr, SYMMETRIC: tl.constexpr,
    HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_ASM: tl.constexpr, ATOMIC: tl.constexpr, FP16_ACC: tl.constexpr,
):
    """One activation row on the FMA units (see the module docstring). PW: words per row and block
    (a block is 8 * PW columns)."""
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    BK: tl.constexpr = 8 * PW
    offs_n, offs_i, n_mask, w_tile, b0, w_next = _tile_start(w_ptr, N, K, n_blocks, per_split, PW, BLOCK_N)
    one_row = tl.full((1,), 1, tl.int1)
    acc = tl.zeros((BLOCK_N, PW), dtype=tl.float32)
    for i in range(0, per_split):
        b = b0 + i
        valid = b < n_blocks
        w = w_next
        w_next = _next_words(w_tile, b, i, per_split, n_mask, offs_i, K, PW)
        if PER_PLANE:
            # Groups narrower than a block: zero and scale per plane (a plane never straddles one).
            planes = _planes(w, tl.zeros_like(offs_n), DTYPE, USE_ASM)
            for j in tl.static_range(8):
                cols = b * BK + j * PW + offs_i
                k_mask = (cols < K) & valid
                xj = _x_plane(x_ptr, perm_ptr, cols, k_mask, one_row, HAS_PERM).to(tl.float32)
                g = tl.minimum((b * BK + j * PW) // GROUP, G - 1)
                z = _zero(z_ptr, g, N, offs_n, n_mask, SYMMETRIC).to(tl.float32)
                s = _scale(s_ptr, g, N, offs_n, n_mask)
                acc += (planes[j].to(tl.float32) - z[:, None]) * (xj * s[:, None])
        else:
            g = tl.minimum((b * BK) // GROUP, G - 1)
            planes = _planes(w, _zero(z_ptr, g, N, offs_n, n_mask, SYMMETRIC), DTYPE, USE_ASM)
            if FP16_ACC:
                blk16 = tl.zeros((BLOCK_N, PW), dtype=tl.float16)
            else:
                blk = tl.zeros((BLOCK_N, PW), dtype=tl.float32)
            for j in tl.static_range(8):
                cols = b * BK + j * PW + offs_i
                k_mask = (cols < K) & valid
                xj = _x_plane(x_ptr, perm_ptr, cols, k_mask, one_row, HAS_PERM)
                if FP16_ACC:
                    blk16 += planes[j] * xj
                else:
                    blk += planes[j].to(tl.float32) * xj.to(tl.float32)
            if FP16_ACC:
                blk = blk16.to(tl.float32)
            acc += blk * _scale(s_ptr, g, N, offs_n, n_mask)[:, None]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        if tl.program_id(1) == 0:
            y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    if ATOMIC:
        tl.atomic_add(out_ptr + offs_n, y, mask=n_mask, sem="relaxed")
    else:
        tl.store(out_ptr + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _w4a16_mma_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, perm_ptr, bias_ptr, out_ptr,
    M, N, K, G, GROUP, n_blocks, per_split, stride_xm, stride_om,
    PW: tl.constexpr, PER_PLANE: tl.constexpr, SYMMETRIC: tl.constexpr,
    HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_ASM: tl.constexpr, ATOMIC: tl.constexpr,
):
    """BLOCK_M (>= 16) activation rows; each plane is one [BLOCK_M, PW] x [PW, BLOCK_N]
    tensor-core product (rows past M are masked to zero)."""
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    BK: tl.constexpr = 8 * PW
    offs_n, offs_i, n_mask, w_tile, b0, w_next = _tile_start(w_ptr, N, K, n_blocks, per_split, PW, BLOCK_N)
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, per_split):
        b = b0 + i
        valid = b < n_blocks
        w = w_next
        w_next = _next_words(w_tile, b, i, per_split, n_mask, offs_i, K, PW)
        if PER_PLANE:
            for j in tl.static_range(8):
                g = tl.minimum((b * BK + j * PW) // GROUP, G - 1)
                # Unpacking per plane with its own zero point; the compiler keeps only plane j.
                planes = _planes(w, _zero(z_ptr, g, N, offs_n, n_mask, SYMMETRIC), DTYPE, USE_ASM)
                cols = b * BK + j * PW + offs_i
                xj = _x_plane(x_rows, perm_ptr, cols, (cols < K) & valid, m_mask, HAS_PERM)
                part = tl.dot(xj, tl.trans(planes[j]), out_dtype=tl.float32)
                acc += part * _scale(s_ptr, g, N, offs_n, n_mask)[None, :]
        else:
            g = tl.minimum((b * BK) // GROUP, G - 1)
            planes = _planes(w, _zero(z_ptr, g, N, offs_n, n_mask, SYMMETRIC), DTYPE, USE_ASM)
            blk = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for j in tl.static_range(8):
                cols = b * BK + j * PW + offs_i
                xj = _x_plane(x_rows, perm_ptr, cols, (cols < K) & valid, m_mask, HAS_PERM)
                blk = tl.dot(xj, tl.trans(planes[j]), acc=blk, out_dtype=tl.float32)
            acc += blk * _scale(s_ptr, g, N, offs_n, n_mask)[None, :]
    if HAS_BIAS:
        if tl.program_id(1) == 0:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    o_mask = m_mask[:, None] & n_mask[None, :]
    if ATOMIC:
        tl.atomic_add(out, acc, mask=o_mask, sem="relaxed")
    else:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, G, GROUP, n_blocks,
                    PW: tl.constexpr, PER_PLANE: tl.constexpr, SYMMETRIC: tl.constexpr,
                    BLOCK_N: tl.constexpr, USE_ASM: tl.constexpr):
    """W in group order, [N, K] in out's dtype (for large M: dequantize + cuBLAS)."""
    pid_n = tl.program_id(0)
    b = tl.program_id(1)
    DTYPE: tl.constexpr = out_ptr.dtype.element_ty
    BK: tl.constexpr = 8 * PW
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_i = tl.arange(0, PW)
    n_mask = offs_n < N
    w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * (n_blocks * PW) + b * PW + offs_i[None, :],
                mask=n_mask[:, None] & (b * BK + offs_i < K)[None, :], other=0)
    out_rows = out_ptr + offs_n[:, None].to(tl.int64) * K
    for j in tl.static_range(8):
        if PER_PLANE:
            g = tl.minimum((b * BK + j * PW) // GROUP, G - 1)
        else:
            g = tl.minimum((b * BK) // GROUP, G - 1)
        planes = _planes(w, _zero(z_ptr, g, N, offs_n, n_mask, SYMMETRIC), DTYPE, USE_ASM)
        wj = planes[j].to(tl.float32) * _scale(s_ptr, g, N, offs_n, n_mask)[:, None]
        cols = b * BK + j * PW + offs_i
        tl.store(out_rows + cols[None, :], wj.to(DTYPE), mask=n_mask[:, None] & (cols < K)[None, :])


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    split_k: int
    use_dot: bool
    use_asm: bool
    num_warps: int = 4
    num_stages: int = 3
    fp16_acc: bool = False

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def fits_width(group: int, n_groups: int, width: int) -> bool:
    """A plane of ``width`` columns must never straddle two groups."""
    return n_groups == 1 or group % width == 0


KERNELS = ("auto", "cuda", "triton")


def repack(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
           bits: int, symmetric: bool, bias: torch.Tensor | None, device: torch.device | str,
           width: int = layout.PLANE_WIDTH, kernel: str = "auto", pdl: bool = True) -> W4A16Weight:
    """Repack QuantizedLinear buffers (see ``compress.nn.qlinear``) once, at load.

    ``kernel``: "cuda" (``cuda_w4a16``: 1..16 rows in one launch; groups a multiple of 32 columns,
    in_features and out_features multiples of 8, NVRTC available), "triton" (``width`` is lowered to the widest of
    layout.WIDTHS that divides the group), or "auto": cuda where it can run, else triton (logged).
    Raises ValueError for grids no kernel here handles (not 4-bit, groups not a multiple of 16
    columns), or for kernel="cuda" on a layer it cannot run.
    ``pdl``: launch the CUDA kernel with programmatic dependent launch where the GPU has it (sm_90+)."""
    if bits != 4:
        raise ValueError(f"the W4A16 kernel needs 4-bit codes, got bits={bits}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    n, k = qweight.shape
    order = layout.contiguous_group_order(g_idx, scales.shape[1])
    if not fits_width(order.group_size, scales.shape[1], layout.PLANE_WIDTH):
        raise ValueError(f"group size {order.group_size} is not a multiple of {layout.PLANE_WIDTH}")
    if kernel != "triton":
        from compress.kernels import cuda_w4a16

        why = cuda_w4a16.unsupported_reason(order.group_size, scales.shape[1], k, n, device)
        if why is not None and kernel == "cuda":
            raise ValueError(f"the CUDA W4A16 kernel cannot run this layer: {why}")
        if why is not None:
            log.info("W4A16: Triton kernel for a %dx%d layer (CUDA kernel: %s)", n, k, why)
            kernel = "triton"
        else:
            kernel = "cuda"
    if kernel == "triton":
        while not fits_width(order.group_size, scales.shape[1], width):
            width //= 2
    # Packing runs where the codes are (a 7B model's codes are too large to pack on the host).
    codes = layout.ordered_codes(qweight.to(device), order)
    # Symmetric grids store z = 8 everywhere; only then may the kernel drop the zero-point load.
    sym = bool(symmetric) and bool((zeros == 8).all())
    tiled = (False, False, False)  # (codes, scales/zeros) tile-major, evict-first copies: cuda_w4a16.TILE_MAJOR
    if kernel == "cuda":
        words, width = layout.pack_chunked(codes), 1
        sdtype = scales.dtype if scales.dtype in (torch.float16, torch.bfloat16) else torch.float16
        tiled = cuda_w4a16.TILE_MAJOR
    else:
        words, sdtype = layout.pack_planar(codes, width), torch.float16
    scales_g = layout.group_major(scales, sdtype)
    zeros_g = None if sym else layout.group_major(zeros, torch.uint8)
    if tiled[0]:
        words = layout.tile_major(words)
    if tiled[1]:
        scales_g = layout.tile_groups(scales_g)
        zeros_g = None if zeros_g is None else layout.tile_groups(zeros_g)
    return W4A16Weight(
        words=words,
        scales=scales_g.to(device),
        zeros=None if zeros_g is None else zeros_g.to(device),
        codes_tiled=tiled[0], sz_tiled=tiled[1], evict_first=tiled[2],
        perm=None if order.perm is None else order.perm.to(torch.int32).to(device),
        bias=None if bias is None else bias.detach().to(torch.float32).to(device),
        in_features=k, out_features=n, group=order.group_size, width=width, kernel=kernel,
        # kernel == "cuda" only when the branch above imported cuda_w4a16
        pdl=bool(pdl) and kernel == "cuda" and cuda_w4a16.pdl_supported(device),
    )


def per_plane(wt: W4A16Weight) -> bool:
    """True when scales change inside a block (groups narrower than 8 * width columns)."""
    return wt.n_groups > 1 and wt.group % (8 * wt.width) != 0


def _split_for(n: int, n_blocks: int, block_n: int, sm_count: int) -> int:
    """Split K until there are about four programs per multiprocessor, keeping >= 2 blocks each."""
    programs = -(-n // block_n)
    split = 1
    while programs * split < 4 * sm_count and n_blocks // (split * 2) >= 2:
        split *= 2
    return split


def default_config(m: int, n: int, n_blocks: int, sm_count: int = 132) -> KernelConfig:
    """Heuristic config when none was tuned (docs/design/gemm-and-triton.md has the sweep behind it)."""
    if m > 16:
        return KernelConfig(block_m=64, block_n=64, split_k=1, use_dot=True, use_asm=True, num_stages=2)
    if m == 1:
        return KernelConfig(block_m=1, block_n=64, split_k=_split_for(n, n_blocks, 64, sm_count),
                            use_dot=False, use_asm=True, fp16_acc=True)
    return KernelConfig(block_m=16, block_n=64, split_k=_split_for(n, n_blocks, 64, sm_count),
                        use_dot=True, use_asm=True)


def launch(x2d: torch.Tensor, wt: W4A16Weight, cfg: Any, out: torch.Tensor | None = None
           ) -> torch.Tensor:
    """One matmul with an explicit config: a ``cuda_w4a16.CudaConfig`` for layers packed for the
    CUDA kernel, else a Triton ``KernelConfig`` through ``_launch`` with one retry: a tensor-core
    config whose tile needs more shared memory than the device has (seen on the H100 for
    BLOCK_M=64 with 64-word planes) is halved and retried once."""
    if wt.kernel == "cuda":
        from compress.kernels import cuda_w4a16

        return cuda_w4a16.matmul(x2d, wt, cfg, out)
    try:
        return _launch(x2d, wt, cfg, out)
    except triton.runtime.errors.OutOfResources as e:
        if not cfg.use_dot or cfg.block_n <= 16:
            raise
        smaller = replace(cfg, block_n=cfg.block_n // 2, num_stages=1)
        log.warning("W4A16 config %s is out of resources (%s); using %s", cfg, e, smaller)
        for key, c in list(wt.configs.items()):
            if c == cfg:
                wt.configs[key] = smaller
        return _launch(x2d, wt, smaller, out)


def _launch(x2d: torch.Tensor, wt: W4A16Weight, cfg: KernelConfig, out: torch.Tensor | None = None
            ) -> torch.Tensor:
    """One kernel launch (plus the zero-fill and cast that split-K needs). ``out`` ([M, N], x's
    dtype) receives the result when the config does not split K (tests pass a poisoned buffer)."""
    m, k = x2d.shape
    n = wt.out_features
    # The exponent trick is fp16-only (and inline PTX cannot run in the interpreter).
    use_asm = cfg.use_asm and x2d.dtype == torch.float16 and not _interpreting()
    n_blocks = wt.n_blocks
    per_split = triton.cdiv(n_blocks, cfg.split_k)
    splits = triton.cdiv(n_blocks, per_split)
    atomic = splits > 1  # partial sums of K slices meet in fp32 by atomic adds
    if atomic:
        out = torch.zeros(m, n, device=x2d.device, dtype=torch.float32)
    elif out is None:
        out = torch.empty(m, n, device=x2d.device, dtype=x2d.dtype)
    grid = (triton.cdiv(n, cfg.block_n), splits, triton.cdiv(m, cfg.block_m))
    dummy = wt.words  # never read when the matching flag is off
    ptrs = (x2d, wt.words, wt.scales, dummy if wt.zeros is None else wt.zeros,
            dummy if wt.perm is None else wt.perm, dummy if wt.bias is None else wt.bias, out)
    flags = dict(PW=wt.width, PER_PLANE=per_plane(wt), SYMMETRIC=wt.zeros is None,
                 HAS_PERM=wt.perm is not None, HAS_BIAS=wt.bias is not None, BLOCK_N=cfg.block_n,
                 USE_ASM=use_asm, ATOMIC=atomic, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.use_dot:
        _w4a16_mma_kernel[grid](*ptrs, m, n, k, wt.n_groups, wt.group, n_blocks, per_split,
                                x2d.stride(0), out.stride(0), BLOCK_M=cfg.block_m, **flags)
    else:
        if m != 1:
            raise ValueError("the FMA (use_dot=False) kernel takes one activation row")
        fp16_acc = cfg.fp16_acc and x2d.dtype == torch.float16
        _w4a16_gemv_kernel[grid[:2]](*ptrs, n, k, wt.n_groups, wt.group, n_blocks, per_split,
                                     FP16_ACC=fp16_acc, **flags)
    return out.to(x2d.dtype) if atomic else out


def dequantize_sorted(wt: W4A16Weight, dtype: torch.dtype) -> torch.Tensor:
    """The weight [N, K] in ``dtype`` with columns in GROUP order (pair it with ``x[..., perm]``)."""
    out = torch.empty(wt.out_features, wt.in_features, device=wt.words.device, dtype=dtype)
    block_n = 64
    _dequant_kernel[(triton.cdiv(wt.out_features, block_n), wt.n_blocks)](
        wt.words, wt.scales, wt.words if wt.zeros is None else wt.zeros, out,
        wt.out_features, wt.in_features, wt.n_groups, wt.group, wt.n_blocks,
        PW=wt.width, PER_PLANE=per_plane(wt), SYMMETRIC=wt.zeros is None,
        BLOCK_N=block_n, USE_ASM=dtype == torch.float16 and not _interpreting(), num_warps=4)
    return out


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dequant_matmul(x2d: torch.Tensor, wt: W4A16Weight) -> torch.Tensor:
    """Large-M path: dequantize once per call (``_dequant_kernel`` or the CUDA layout's own), then
    cuBLAS."""
    if wt.perm is not None:
        x2d = x2d.index_select(1, wt.perm.long())
    if wt.kernel == "cuda":
        from compress.kernels import cuda_w4a16

        w = cuda_w4a16.dequantize(wt, x2d.dtype)
    else:
        w = dequantize_sorted(wt, x2d.dtype)
    return torch.nn.functional.linear(x2d, w, None if wt.bias is None else wt.bias.to(x2d.dtype))


def _bucket(m: int) -> int:
    for b in (1, 2, 4, 8, 16):
        if m <= b:
            return b
    return 64


def w4a16_matmul(x: torch.Tensor, wt: W4A16Weight, gathered: bool = False) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for x [..., K] in fp16 or bf16 on the GPU. ``gathered``: x's columns are
    already in the weight's group order (``x[..., wt.perm]``, act-order), so no gather here."""
    if gathered:
        wt = wt.in_group_order()
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    m = x2d.shape[0]
    if m > wt.max_small_m and wt.kernel == "cuda":
        from compress.kernels import triton_gemm

        if triton_gemm.takes(wt, m):  # unpack in the GEMM's tiles instead of a dequantized copy
            return triton_gemm.gemm(x2d, wt).reshape(*lead, wt.out_features)
        return dequant_matmul(x2d, wt).reshape(*lead, wt.out_features)
    if m > wt.max_small_m and wt.large_m != "triton":
        return dequant_matmul(x2d, wt).reshape(*lead, wt.out_features)
    cfg = wt.configs.get(_bucket(m)) or _default_for(wt, m)
    return launch(x2d, wt, cfg).reshape(*lead, wt.out_features)


def _default_for(wt: W4A16Weight, m: int) -> Any:
    if wt.kernel == "cuda":
        from compress.kernels import cuda_w4a16

        return cuda_w4a16.default_config(m, wt.out_features, tiled=wt.codes_tiled)
    return default_config(m, wt.out_features, wt.n_blocks)


def candidate_configs(m: int, n: int, n_blocks: int, width: int = layout.PLANE_WIDTH) -> list[KernelConfig]:
    """The configs ``tune`` times for one M bucket. Tiles above 4096 words spill registers with 4
    warps (checked in the compiler's resource report), so they are left out."""
    if m > 16:
        return [KernelConfig(64, bn, 1, True, True, warps, 3) for bn in (64, 128) for warps in (4, 8)
                if bn * width <= 2048 * warps]
    splits = [s for s in (1, 2, 4, 8, 16) if n_blocks // s >= 2] or [1]
    out = []
    if m == 1:  # FMA kernel
        for bn in (16, 32, 64, 128):
            if bn * width > 4096:
                continue
            for split in splits:
                out.append(KernelConfig(1, bn, split, False, True, 4, 1, True))
                if bn == 32:
                    out.append(KernelConfig(1, bn, split, False, True, 4, 1, False))
    for bn in (32, 64, 128):
        if bn * width > 4096:
            continue
        for split in splits:
            out.append(KernelConfig(16, bn, split, True, True, 4, 2))
    return out


def copies_for(nbytes: int, l2_bytes: int = 50 * 2**20) -> int:
    """How many weight copies to rotate so that they are together several times the L2."""
    return max(2, -(-4 * l2_bytes // max(nbytes, 1)))


def tune(wt: W4A16Weight, m: int, dtype: torch.dtype = torch.float16,
         candidates: list[Any] | None = None, run: Callable[..., torch.Tensor] | None = None,
         reference: Callable[[torch.Tensor], torch.Tensor] | None = None, key: Any = None
         ) -> tuple[Any, list[dict[str, Any]]]:
    """Time candidate configs for M rows (CUDA-graph timing over rotated weight copies); remember
    the best in ``wt.configs`` and return (best, rows of {config, ms, err}). A config whose output
    misses the dequantized reference is skipped with a warning. Run it before CUDA-graph capture
    of a model (it synchronizes).

    For a fused variant of the kernel (``compress.kernels.fused_block``): ``run(x, wt, cfg)`` makes
    the call, ``reference(x)`` its float32 result, and the winner is stored under ``key`` (default:
    the M bucket, which the plain matmul reads)."""
    if candidates is None:
        if wt.kernel == "cuda":
            from compress.kernels import cuda_w4a16

            candidates = cuda_w4a16.candidate_configs(m, wt.out_features, cuda_w4a16.smem_limit(wt.words.device))
        else:
            candidates = candidate_configs(m, wt.out_features, wt.n_blocks, wt.width)
    wt.scales_for(dtype)  # converted before any capture
    copies = [wt] + [wt.clone() for _ in range(copies_for(wt.nbytes()) - 1)]
    x = torch.randn(m, wt.in_features, device=wt.words.device, dtype=dtype)
    # Every candidate must compute the function before its time counts (the dequantized weight in
    # float32 is the reference; bounds as in tests/test_kernels.py).
    if run is None:
        run = launch
    if reference is not None:
        ref = reference(x)
    else:
        ref = x.float() @ dequantize_packed(wt, torch.float32).t()
        if wt.bias is not None:
            ref += wt.bias.float()
    bound = 3e-3 if dtype == torch.float16 else 1.5e-2
    rows = []
    for cfg in candidates:
        try:
            err = float((run(x, wt, cfg).float() - ref).norm() / ref.norm())
            if not err < bound:
                raise ValueError(f"relative error {err:.2e} against the dequantized weight (bound {bound})")
            ms = graph_time_ms([lambda c=c, cfg=cfg: run(x, c, cfg) for c in copies])
        except Exception as e:  # a config the compiler rejects (e.g. out of resources) is skipped
            (log.warning if wt.kernel == "cuda" else log.debug)("config %s skipped: %s", cfg, e)
            continue
        rows.append({"config": cfg.as_dict(), "ms": ms, "err": err, "cfg": cfg})
    del copies
    if not rows:
        raise RuntimeError(f"no W4A16 config ran correctly for M={m} on a {wt.out_features}x{wt.in_features} "
                           "layer (warnings above say why)")
    best = min(rows, key=lambda r: r["ms"])
    cfg = best.pop("cfg")
    for r in rows:
        r.pop("cfg", None)
    wt.configs[_bucket(m) if key is None else key] = cfg
    return cfg, rows
