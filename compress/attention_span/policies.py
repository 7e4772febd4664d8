"""Span policies as pure tensor functions: which KV blocks one decode step reads.

The cache of a layer is cut into blocks of ``block_size`` positions (block ``j`` holds positions
``[j * block_size, (j + 1) * block_size)``; the last one may be partial). A policy returns, for every
sequence and KV head, a fixed-size list of block ids, ``max_blocks = budget_tokens // block_size``
entries, ascending, padded with ``-1``. A fixed size keeps tensor shapes constant across steps (CUDA
graphs, torch.compile). Three kinds of blocks are always kept: the sinks (the blocks overlapping the
first ``sink_tokens`` positions; StreamingLLM, Xiao et al. 2023), the scaffold (blocks a caller names,
e.g. the instruction of a prompt) and the recent window (the blocks overlapping the last
``recent_tokens`` positions, which always includes the block of the current token). The rest of the
budget goes to the blocks a policy scores highest:

- ``window``: the newest blocks (sinks + a recent window as large as the budget allows).
- ``quest``: Tang et al. 2024 (Quest, arXiv 2406.10774): an upper bound of ``q . k`` over a block
  from the block's per-dimension key minimum and maximum, ``sum_d max(q_d min_d, q_d max_d)``.
- ``snapkv``: Li et al. 2024 (SnapKV, arXiv 2404.14469): the attention that the last ``window``
  prompt queries (the observation window) pay to each prompt position at prefill, pooled over
  neighbouring positions, summed per block; positions generated after the prompt outrank every
  prompt block (SnapKV compresses the prompt only), newest first.

Selection is per KV head: the scores of the query heads of a group are combined (maximum for quest,
sum of attention for snapkv) before one top-k, so the group reads one set of K/V blocks and no K/V
is repeated per query head (which would erase the grouped-query saving).

Example::

    ids = select_blocks(quest_scores(q, kmin, kmax), forced_blocks(L, 64, 4, 256), max_blocks=16)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

NEG = float("-inf")


def num_blocks(length: int, block_size: int) -> int:
    return math.ceil(length / block_size)


def forced_blocks(length: int, block_size: int, sink_tokens: int, recent_tokens: int,
                  scaffold: torch.Tensor | None = None) -> torch.Tensor:
    """Bool [blocks]: the sink blocks, the scaffold blocks (``scaffold``: bool [blocks] or shorter,
    True = keep) and the recent blocks (always at least the block of position ``length - 1``)."""
    nb = num_blocks(length, block_size)
    keep = torch.zeros(nb, dtype=torch.bool)
    keep[: num_blocks(min(sink_tokens, length), block_size)] = True
    keep[max(length - max(recent_tokens, 1), 0) // block_size:] = True
    if scaffold is not None:
        n = min(nb, scaffold.numel())
        keep[:n] |= scaffold[:n].to(torch.bool).cpu()
    return keep


def forced_block_count(block_size: int, sink_tokens: int, recent_tokens: int) -> int:
    """The most blocks sinks and the recent window can take at any length (the recent window may
    straddle one more block than its size in blocks)."""
    return num_blocks(sink_tokens, block_size) + num_blocks(max(recent_tokens, 1), block_size) + 1


def select_blocks(scores: torch.Tensor, forced: torch.Tensor, max_blocks: int) -> torch.Tensor:
    """Int64 [B, Hkv, max_blocks]: forced blocks plus the highest-scoring others, ascending, ``-1``
    padded. ``scores``: [B, Hkv, blocks] (``-inf``: never selected); ``forced``: bool [blocks] or
    [B, Hkv, blocks]. The forced blocks must fit in ``max_blocks`` (``SpanSpec`` validates that)."""
    b, h, nb = scores.shape
    s = torch.where(forced.to(scores.device), float("inf"), scores)  # forced blocks rank above any score
    k = min(max_blocks, nb)
    top, ids = s.topk(k, dim=-1)
    ids = torch.where(top == NEG, -1, ids)
    if k < max_blocks:
        ids = F.pad(ids, (0, max_blocks - k), value=-1)
    # ascending, padding last: sort with -1 mapped past the end
    ordered = torch.where(ids < 0, nb, ids).sort(dim=-1).values
    return ordered.masked_fill(ordered == nb, -1)


def window_scores(batch: int, kv_heads: int, blocks: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Newer blocks score higher: the budget becomes sinks + the longest recent window."""
    return torch.arange(blocks, dtype=torch.float32, device=device).expand(batch, kv_heads, blocks).clone()


def block_minmax(key: torch.Tensor, block_size: int, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block, per-dimension minimum and maximum of ``key`` [B, Hkv, L, D] over its first
    ``length`` positions: two [B, Hkv, blocks, D] tensors (a partial last block over its filled
    positions only)."""
    length = key.shape[2] if length is None else length
    b, h, _, d = key.shape
    nb = num_blocks(length, block_size)
    pad = nb * block_size - length
    k = key[:, :, :length].float()
    lo = F.pad(k, (0, 0, 0, pad), value=float("inf")).view(b, h, nb, block_size, d).amin(3)
    hi = F.pad(k, (0, 0, 0, pad), value=NEG).view(b, h, nb, block_size, d).amax(3)
    return lo, hi


def quest_scores(query: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Upper bounds of the attention logit per block, combined over each KV head's query group by
    the maximum: [B, Hkv, blocks]. ``query``: [B, H, D] (one decode position); ``kmin``/``kmax``:
    [B, Hkv, blocks, D]. ``max(q_d lo_d, q_d hi_d)`` is ``q+ hi + q- lo`` with q+ / q- the positive
    and negative parts, i.e. two products."""
    b, h, d = query.shape
    hk = kmin.shape[1]
    q = query.float().view(b, hk, h // hk, d)
    s = q.clamp(min=0) @ kmax.transpose(-1, -2) + q.clamp(max=0) @ kmin.transpose(-1, -2)  # [B, Hkv, G, blocks]
    return s.amax(2)


def snapkv_scores(query_obs: torch.Tensor, key: torch.Tensor, scaling: float, block_size: int,
                  pool_kernel: int = 7) -> torch.Tensor:
    """Votes of the observation window per prompt block: [B, Hkv, blocks]. ``query_obs``: the last
    W prompt queries [B, H, W, D]; ``key``: the prompt's keys [B, Hkv, L, D]. The window's causal
    softmax attention is summed over its queries, average-pooled over ``pool_kernel`` neighbouring
    positions (SnapKV's clustering), summed over the query group and over each block."""
    b, h, w, d = query_obs.shape
    hk, length = key.shape[1], key.shape[2]
    g = h // hk
    q = query_obs.float().reshape(b, hk, g * w, d)
    s = (q @ key.float().transpose(-1, -2)) * scaling  # [B, Hkv, G*W, L]
    pos = torch.arange(length, device=key.device)
    qpos = (length - w + torch.arange(w, device=key.device)).repeat(g)
    s = s.masked_fill(pos[None, :] > qpos[:, None], NEG)
    votes = s.softmax(-1).sum(2)  # [B, Hkv, L]
    if pool_kernel > 1:
        votes = F.avg_pool1d(votes, pool_kernel, stride=1, padding=pool_kernel // 2, count_include_pad=False)
    nb = num_blocks(length, block_size)
    votes = F.pad(votes, (0, nb * block_size - length))
    return votes.view(b, hk, nb, block_size).sum(-1)


def snapkv_decode_scores(prompt_scores: torch.Tensor, blocks: int) -> torch.Tensor:
    """Scores at a decode step with ``blocks`` blocks: the prompt's votes for prompt blocks; blocks
    past the prompt above every prompt block, newer first. [B, Hkv, blocks]."""
    b, h, npb = prompt_scores.shape
    if blocks <= npb:
        return prompt_scores[..., :blocks]
    top = prompt_scores.amax() + 1.0 if npb else torch.tensor(0.0, device=prompt_scores.device)
    extra = top + torch.arange(1, blocks - npb + 1, device=prompt_scores.device, dtype=prompt_scores.dtype)
    return torch.cat([prompt_scores, extra.expand(b, h, -1)], -1)


def block_token_mask(ids: torch.Tensor, block_size: int, length: int) -> torch.Tensor:
    """Bool [B, Hkv, length]: the positions the block lists ``ids`` [B, Hkv, M] cover."""
    b, h, m = ids.shape
    nb = num_blocks(length, block_size)
    hit = torch.zeros(b, h, nb + 1, dtype=torch.bool, device=ids.device)
    hit.scatter_(2, torch.where(ids < 0, nb, ids), True)
    return hit[..., :nb].repeat_interleave(block_size, dim=2)[..., :length]
