"""Weight layouts for the INT4 kernels: pure tensor functions, no I/O, testable on any machine.

Two things every backend needs from a ``QuantizedLinear``'s buffers (conventions in
``compress.algos.quant``: codes ``q`` in [0, 15], unsigned zero points ``z``, ``w = (q - z) * s``):

1. **Contiguous groups.** Kernels read one scale per run of ``group_size`` adjacent columns. With
   act-order (GPTQ ``desc_act``) ``g_idx`` scatters a group's columns over the row. Because
   ``y = x @ W.T`` is unchanged when the columns of ``W`` and of ``x`` are permuted alike, we sort the
   columns by group once at load (``perm = argsort(g_idx)``) and gather ``x[..., perm]`` at run time
   (the Triton kernel fuses that gather into its activation load; the CPU path does one
   ``index_select``). Per-channel layers (one group) need no permutation at all.
2. **Packed codes** in the layout the kernel reads fastest (``pack_planar`` for the Triton kernels,
   ``pack_chunked`` for the CUDA kernel).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.errors import CompressError

# Triton layout: K is cut into blocks of 8 * width columns (width = 16, 32 or 64 words); each block
# is ``width`` int32 words per output row. Word i of a block holds 8 codes, one from each "plane" j
# (columns j * width + i of the block). A plane is a [rows, width] tile that the kernel multiplies
# with ``width`` consecutive activations, so no register reshuffle is needed after unpacking. Plane j
# sits at bit offset PLANE_SHIFT[j]: pairs (0, 1), (2, 3), ... share the two 16-bit halves of the
# word so that one `lop3` with mask 0x000F000F plus the fp16 exponent 0x6400 turns a pair into two
# fp16 values (1024 + q) at once (the "magic number" unpack). Wider blocks mean longer contiguous
# row segments and more bytes per load (width 16: 64 bytes per row and block).
PLANE_WIDTH = 16  # the default width (and the smallest)
WIDTHS = (16, 32, 64)
PACK_BLOCK = 8 * PLANE_WIDTH
PLANE_SHIFT = (0, 16, 4, 20, 8, 24, 12, 28)


@dataclass(frozen=True)
class GroupOrder:
    """How columns must be reordered so that groups are contiguous.

    ``perm`` (int64 [in]) or None when the columns are already in group order; ``group_size`` is the
    number of adjacent columns sharing a scale after reordering (``in_features`` for per-channel).
    """

    perm: torch.Tensor | None
    group_size: int


def contiguous_group_order(g_idx: torch.Tensor, n_groups: int) -> GroupOrder:
    """Find the column order that makes every group a contiguous run of equal length.

    Raises CompressError when ``g_idx`` gives groups of unequal size (no kernel here handles that;
    the caller falls back to dequantize + matmul).
    """
    k = g_idx.numel()
    if n_groups == 1:
        return GroupOrder(None, k)
    if k % n_groups:
        raise CompressError(f"in_features {k} is not a multiple of the number of groups {n_groups}")
    gs = k // n_groups
    g = g_idx.to(torch.int64).cpu()
    expected = torch.arange(k) // gs
    if torch.equal(g, expected):
        return GroupOrder(None, gs)
    perm = torch.argsort(g, stable=True)
    if not torch.equal(g[perm], expected):
        raise CompressError(
            "g_idx does not give every group exactly in_features / n_groups columns; "
            "only the dequantize fallback can run this layer")
    return GroupOrder(perm, gs)


def ordered_codes(qweight: torch.Tensor, order: GroupOrder) -> torch.Tensor:
    """Codes with columns in group order (the permuted weight that pairs with ``x[..., perm]``)."""
    if order.perm is None:
        return qweight
    return qweight.index_select(1, order.perm.to(qweight.device))


def padded_k(k: int, width: int = PLANE_WIDTH) -> int:
    block = 8 * width
    return -(-k // block) * block


def pack_planar(codes: torch.Tensor, width: int = PLANE_WIDTH) -> torch.Tensor:
    """Pack uint8 codes [N, K] (values 0..15) into int32 words [N, Kp / 8], Kp = K rounded up to a
    block of 8 * width columns.

    Padded columns get code 0; the kernel masks the matching activations to 0, so they add nothing.
    """
    if width not in WIDTHS:
        raise ValueError(f"plane width must be one of {WIDTHS}, got {width}")
    return _pack(codes, width, padded_k(codes.shape[1], width))


# CUDA layout: width 1 of the planar scheme, i.e. each word holds 8 CONSECUTIVE columns (column j of
# the word at PLANE_SHIFT[j], so one lop3 reads columns 2p and 2p + 1 as a pair), K padded to a
# multiple of CHUNK_STEP (the widest step of the kernel) so that copies never leave the row.
CHUNK_STEP = 256


def pack_chunked(codes: torch.Tensor) -> torch.Tensor:
    """Pack uint8 codes [N, K] into int32 words [N, Kp / 8] for the CUDA kernel (Kp = K rounded up to
    a multiple of 256; padded columns get code 0). ``unpack_planar(words, K, 1)`` inverts it."""
    k = codes.shape[1]
    return _pack(codes, 1, -(-k // CHUNK_STEP) * CHUNK_STEP)


def tile_major(words: torch.Tensor) -> torch.Tensor:
    """``pack_chunked`` words [N, Kp / 8] reordered tile-major for the CUDA kernel (same shape):
    [N / 16][Kp / 256][2][16 rows][4 chunks] x 4 words, so that one kernel step of a 16-row tile
    (128 or 256 columns) reads one contiguous 1 or 2 KB region instead of 16 row segments 2 x Kp
    bytes apart. A tile's rows stay in its own [16, Kp / 8] block, so whole tiles slice as rows."""
    n, wpr = words.shape
    return words.view(n // 16, 16, wpr // 32, 2, 4, 4).permute(0, 2, 3, 1, 4, 5).reshape(n, wpr)


def row_major(words: torch.Tensor) -> torch.Tensor:
    """Inverse of ``tile_major``."""
    n, wpr = words.shape
    return words.view(n // 16, wpr // 32, 2, 16, 4, 4).permute(0, 3, 1, 2, 4, 5).reshape(n, wpr)


def tile_groups(t: torch.Tensor) -> torch.Tensor:
    """[G, N] scales or zero points reordered [N / 16][G][16] (same shape): a 16-row tile's values
    for consecutive groups are contiguous, as the CUDA kernel reads them."""
    g, n = t.shape
    return t.view(g, n // 16, 16).permute(1, 0, 2).reshape(g, n)


def untile_groups(t: torch.Tensor) -> torch.Tensor:
    """Inverse of ``tile_groups``."""
    g, n = t.shape
    return t.view(n // 16, g, 16).permute(1, 0, 2).reshape(g, n)


def _pack(codes: torch.Tensor, width: int, kp: int) -> torch.Tensor:
    n, k = codes.shape
    q = torch.zeros(n, kp, dtype=torch.int64, device=codes.device)
    q[:, :k] = codes.to(torch.int64)
    q = q.view(n, kp // (8 * width), 8, width)  # [N, block, plane, word]
    shifts = torch.tensor(PLANE_SHIFT, dtype=torch.int64, device=codes.device).view(1, 1, 8, 1)
    words = (q << shifts).sum(dim=2)  # planes occupy disjoint bits, so the sum is a bitwise or
    words = torch.where(words >= 2**31, words - 2**32, words)  # reinterpret as signed int32
    return words.to(torch.int32).reshape(n, kp // 8).contiguous()


def unpack_planar(words: torch.Tensor, k: int, width: int = PLANE_WIDTH) -> torch.Tensor:
    """Inverse of ``pack_planar``: uint8 codes [N, k]."""
    n, w = words.shape
    kp = w * 8
    shifts = torch.tensor(PLANE_SHIFT, dtype=torch.int64, device=words.device).view(1, 1, 8, 1)
    blocks = words.to(torch.int64).view(n, kp // (8 * width), 1, width)
    q = (blocks >> shifts) & 0xF  # [N, block, plane, word]
    return q.reshape(n, kp)[:, :k].to(torch.uint8)


def original_order(t: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """Inverse of ``ordered_codes``: a [N, K] tensor whose columns are in group order (``perm`` from
    ``contiguous_group_order``, or None) back in the original column order."""
    if perm is None:
        return t
    return torch.empty_like(t).index_copy_(1, perm.to(t.device).long(), t)


def restore_codes(words: torch.Tensor, k: int, width: int, perm: torch.Tensor | None) -> torch.Tensor:
    """The uint8 codes [N, k] in the ORIGINAL column order from packed words whose columns were
    stored in group order (``perm`` from ``contiguous_group_order``, or None)."""
    return original_order(unpack_planar(words, k, width), perm)


def group_major(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[N, G] scales or zeros -> [G, N] so that a tile of output rows reads them contiguously."""
    return t.t().to(dtype).contiguous()
