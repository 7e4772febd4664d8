"""Bit packing of integer codes into int32 words (pure functions, the inverse of each other).

``pack_rows``: dense little-endian bit stream along the last dim: element i of a row occupies bits
[i·b, (i+1)·b) of the row's stream, words are int32 (two's complement). For b in {2, 4, 8} this is
the classic "32/b codes per word, lowest bits first" layout; for b = 3 codes straddle words. This is
the layout of compressed-tensors' ``pack-quantized`` format (which stores signed codes offset by
2^(b-1), i.e. our unsigned codes) and, transposed, of GPTQ v1's ``qweight``/``qzeros``.
"""
from __future__ import annotations

import math

import torch


def packed_width(n: int, bits: int) -> int:
    return math.ceil(n * bits / 32)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes ``values`` [rows, n] (each < 2^bits) into int32 [rows, ceil(n·bits/32)]."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    v = values.to(torch.int64)
    if v.numel() and (v.min() < 0 or v.max() >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits} bits")
    rows, n = v.shape
    width = packed_width(n, bits)
    out = torch.zeros(rows, width + 1, dtype=torch.int64, device=v.device)
    start = torch.arange(n, device=v.device) * bits
    word, offset = start // 32, start % 32
    shifted = v << offset  # up to 39 bits: the spill goes to the next word
    out.scatter_add_(1, word.expand(rows, n), shifted & 0xFFFFFFFF)
    out.scatter_add_(1, (word + 1).expand(rows, n), shifted >> 32)
    out = out[:, :width]
    # reinterpret the unsigned 32-bit words as int32
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def unpack_rows(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack_rows``: int32 [rows, W] -> uint8 codes [rows, n]."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    words = torch.cat([words, torch.zeros_like(words[:, :1])], 1)
    start = torch.arange(n, device=packed.device) * bits
    word, offset = start // 32, start % 32
    lo = words[:, word] >> offset
    hi = words[:, word + 1] << (32 - offset)
    return ((lo | hi) & ((1 << bits) - 1)).to(torch.uint8)
