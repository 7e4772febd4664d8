"""Decode attention over the kept blocks only (CPU and any device: gather, then SDPA).

One query position per sequence attends to the positions of the blocks listed in ``ids``
[B, Hkv, M] (``-1`` entries are padding). Only those positions are gathered from the cache, once per
KV head: the G query heads of a group are laid out as G query rows against the group's gathered
keys, so K/V are never repeated per query head. The GPU kernel with the same contract is
``compress.attention_span.triton_decode``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from compress.attention_span.policies import block_token_mask


def block_positions(ids: torch.Tensor, block_size: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions [B, Hkv, M * block_size] the listed blocks cover (clamped into the cache) and
    whether each is real (a listed block, inside the cache)."""
    offs = torch.arange(block_size, device=ids.device)
    pos = (ids.clamp(min=0).unsqueeze(-1) * block_size + offs).flatten(2)
    valid = ((ids >= 0).unsqueeze(-1) & (pos.view(*ids.shape, block_size) < length)).flatten(2)
    return pos.clamp(max=length - 1), valid


def _keep_mask(mask: torch.Tensor | None, pos: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``valid`` and the caller's attention mask ([B or 1, 1, 1, L], bool or additive) at ``pos``."""
    if mask is None:
        return valid
    m = mask[:, 0, 0, :] if mask.dtype == torch.bool else mask[:, 0, 0, :] > torch.finfo(mask.dtype).min / 2
    m = m.expand(pos.shape[0], -1).unsqueeze(1).expand(-1, pos.shape[1], -1)
    return valid & torch.gather(m, 2, pos)


def span_decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, ids: torch.Tensor,
                          block_size: int, scaling: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T * scaling) v over the listed blocks: [B, 1, H, D] (transformers' layout after
    attention). ``query`` [B, H, 1, D]; ``key``/``value`` [B, Hkv, L, D]; ``ids`` [B, Hkv, M]."""
    b, h, _, d = query.shape
    hk, length = key.shape[1], key.shape[2]
    pos, valid = block_positions(ids, block_size, length)
    keep = _keep_mask(mask, pos, valid)
    idx = pos.unsqueeze(-1).expand(-1, -1, -1, d)
    k = torch.gather(key, 2, idx)
    v = torch.gather(value, 2, idx)
    q = query.reshape(b, hk, h // hk, d)  # head h reads KV head h // G (transformers' repeat_kv order)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep.unsqueeze(2), scale=scaling)
    return out.reshape(b, h, 1, d).transpose(1, 2)


def masked_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, ids: torch.Tensor,
                     block_size: int, scaling: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Dense attention in float32 over the whole cache with the positions outside the listed blocks
    masked: the reference both decode paths are tested against. [B, 1, H, D]."""
    b, h, _, d = query.shape
    hk, length = key.shape[1], key.shape[2]
    g = h // hk
    keep = block_token_mask(ids, block_size, length)  # [B, Hkv, L]
    if mask is not None:
        m = mask[:, 0, 0, :] if mask.dtype == torch.bool else mask[:, 0, 0, :] > torch.finfo(mask.dtype).min / 2
        keep = keep & m.unsqueeze(1)
    k = key.float().repeat_interleave(g, 1)
    v = value.float().repeat_interleave(g, 1)
    s = (query.float() @ k.transpose(-1, -2)) * scaling  # [B, H, 1, L]
    s = s.masked_fill(~keep.repeat_interleave(g, 1).unsqueeze(2), float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2)
