"""Decode attention over the listed KV blocks on the GPU (Triton).

The contract of ``compress.attention_span.decode.span_decode_attention``: one query position per
sequence, ``ids`` [B, Hkv, M] block ids (``-1``: padding), keys and values [B, Hkv, L, D] read only
at the listed blocks. Structure as in ``compress.kernels.decode_attention``: each program takes one
(sequence, KV head) and a slice of the block list (the split, so that short lists still fill the
GPU), keeps an online softmax (running max, sum and weighted values, float32, exp2 of log2-scaled
scores) over its slice, and writes the partial state; a small merge combines the slices. Grouped
query aware: the G query heads of a KV head are the rows of one tile against the block's keys, so
each K/V block is loaded once per KV head, never per query head. Padding entries and positions past
the cache are masked loads (no memory traffic). The list length M and the split are fixed for a
given budget, so shapes stay constant across steps (CUDA graphs, torch.compile).

Checked against the float32 masked reference under ``TRITON_INTERPRET=1`` on the CPU
(tests/test_attention_span_triton.py); timings on a GPU are not part of this module.
"""
from __future__ import annotations

import functools
import math

import torch

try:  # Triton is optional: without it the gather + SDPA path runs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None
    tl = None


def available() -> bool:
    return triton is not None and torch.cuda.is_available()


def splits_for(batch_kv_heads: int, max_blocks: int, programs: int = 264) -> tuple[int, int]:
    """(slices, blocks per slice): about ``programs`` programs in all (two per multiprocessor of
    an H100), at least one block per slice."""
    want = max(1, min(max_blocks, math.ceil(programs / max(batch_kv_heads, 1))))
    per = math.ceil(max_blocks / want)
    return math.ceil(max_blocks / per), per


if triton is not None:
    @triton.jit
    def _span_decode_kernel(Q, K, V, IDS, MASK, ACC, ML, L, M, HK, scale_log2,
                            sqb, sqh, skb, skh, skl, svb, svh, svl, sib, sih, smb, sml,
                            G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                            PER: tl.constexpr, S: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr):
        bh = tl.program_id(0)
        sp = tl.program_id(1)
        b = bh // HK
        kh = bh % HK
        g = tl.arange(0, GP)
        dd = tl.arange(0, D)
        t = tl.arange(0, BS)
        gmask = g < G
        q = tl.load(Q + b * sqb + (kh * G + g)[:, None] * sqh + dd[None, :], mask=gmask[:, None] & (dd[None, :] < D),
                    other=0.0)
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        for j in range(PER):
            e = sp * PER + j
            bid = tl.load(IDS + b * sib + kh * sih + e, mask=e < M, other=-1)
            pos = bid * BS + t
            ok = (pos >= 0) & (pos < L)  # padding (-1) gives negative positions
            if HAS_MASK:
                ok = ok & (tl.load(MASK + b * smb + pos * sml, mask=ok, other=0) != 0)
            okd = ok[:, None] & (dd[None, :] < D)  # full-tile mask
            k = tl.load(K + b * skb + kh * skh + pos[:, None] * skl + dd[None, :], mask=okd, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2  # [GP, BS]
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # an all-masked step leaves the state as it is
            alpha = tl.exp2(m_i - m_ref)
            p = tl.exp2(s - m_ref[:, None])
            v = tl.load(V + b * svb + kh * svh + pos[:, None] * svl + dd[None, :], mask=okd, other=0.0)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new
        base = (bh * S + sp) * GP
        tl.store(ACC + (base + g)[:, None] * D + dd[None, :], acc)
        tl.store(ML + (base + g) * 2, m_i)
        tl.store(ML + (base + g) * 2 + 1, l_i)


def _bool_mask(mask: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """The caller's [B or 1, 1, 1, L] mask as uint8 [B or 1, L] (1 = attend)."""
    if mask is None:
        return None
    m = mask[:, 0, 0, :]
    m = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
    return m.to(torch.uint8)


def span_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, ids: torch.Tensor, block_size: int,
                scaling: float, mask: torch.Tensor | None = None, programs: int = 264) -> torch.Tensor:
    """softmax(q k^T * scaling) v over the listed blocks: [B, 1, H, D]. ``query`` [B, H, 1, D];
    ``key``/``value`` [B, Hkv, L, D] with unit last stride; ``ids`` int [B, Hkv, M]."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    b, h, _, d = query.shape
    hk, length = key.shape[1], key.shape[2]
    g = h // hk
    m = ids.shape[-1]
    if d & (d - 1) or d < 16 or block_size < 16:
        raise ValueError(f"head dim {d} and block size {block_size}: powers of two of at least 16")
    q = query[:, :, 0]
    k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (key, value))
    ids = ids.to(torch.int32).contiguous()
    s, per = splits_for(b * hk, m, programs)
    gp = max(16, triton.next_power_of_2(g))
    acc = torch.empty(b * hk * s * gp, d, device=q.device, dtype=torch.float32)
    ml = torch.empty(b * hk * s * gp, 2, device=q.device, dtype=torch.float32)
    bm = _bool_mask(mask, b)
    smb, sml = (0, 0) if bm is None else (bm.stride(0) if bm.shape[0] > 1 else 0, bm.stride(1))
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    _span_decode_kernel[(b * hk, s)](
        q, k, v, ids, bm if bm is not None else ids, acc, ml, length, m, hk, scaling * 1.4426950408889634,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        ids.stride(0), ids.stride(1), smb, sml,
        G=g, GP=gp, D=d, BS=block_size, PER=per, S=s, HAS_MASK=bm is not None, PREC=prec)
    return merge(acc.view(b, hk, s, gp, d), ml.view(b, hk, s, gp, 2), g, query.dtype)


def merge(acc: torch.Tensor, ml: torch.Tensor, g: int, dtype: torch.dtype) -> torch.Tensor:
    """Combine the slices' (unnormalised sum, max, denominator): [B, 1, H, D]."""
    mx, den = ml[..., 0], ml[..., 1]  # [B, Hkv, S, GP] (log2 units)
    top = mx.amax(2, keepdim=True)
    w = torch.exp2(mx - top.masked_fill(top == float("-inf"), 0.0))
    out = (acc * w.unsqueeze(-1)).sum(2) / (den * w).sum(2).unsqueeze(-1)  # [B, Hkv, GP, D]
    b, hk, _, d = out.shape
    return out[:, :, :g].reshape(b, 1, hk * g, d).to(dtype)
