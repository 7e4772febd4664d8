"""Importance scores and index selection for structural pruning (pure tensor functions).

A *structure* is a set of weights removed together: one MLP channel (a row of gate/up and the matching
column of down), one query head (``head_dim`` rows of q, ``head_dim`` columns of o), or one KV group
(its k and v rows plus the query heads that read them). Its importance aggregates an element score over
those weights:

* ``magnitude``  : sqrt(sum w^2) -- the L2 norm of the structure's weights.
* ``activation`` : sum |w_ij| * ||X_j||_2 -- Wanda's score (Sun et al., 2023), summed over the structure;
  ``||X_j||`` is the norm of input feature j of that matrix over the calibration tokens.
* ``taylor``     : sum |w * dL/dw| -- LLM-Pruner's element-wise first-order term (Ma et al., 2023),
  summed over the group, with dL/dw the gradient of the calibration LM loss.

Depth pruning uses block influence (ShortGPT, Men et al., 2024): BI = 1 - mean_t cos(h_in_t, h_out_t);
a block that barely changes its input has BI ~ 0 and is the first to go.
"""
from __future__ import annotations

from typing import Literal

import torch

Criterion = Literal["magnitude", "activation", "taylor"]


def element_scores(weight: torch.Tensor, criterion: Criterion, input_norm: torch.Tensor | None = None,
                   grad: torch.Tensor | None = None) -> torch.Tensor:
    """Per-weight score [out, in] in float32, to be summed over a structure's rows or columns.

    ``input_norm`` [in] (activation) is ||X_j||_2 over calibration tokens; ``grad`` [out, in] (taylor) is
    dL/dW. For ``magnitude`` the score is w^2 so that ``finish`` can take the square root of the sum.
    """
    w = weight.detach().float()
    if criterion == "magnitude":
        return w.square()
    if criterion == "activation":
        if input_norm is None:
            raise ValueError("activation scores need input_norm")
        return w.abs() * input_norm.float().to(w.device)[None, :]
    if criterion == "taylor":
        if grad is None:
            raise ValueError("taylor scores need grad")
        return (w * grad.float().to(w.device)).abs()
    raise ValueError(f"unknown criterion {criterion!r}")


def finish(total: torch.Tensor, criterion: Criterion) -> torch.Tensor:
    """Turn summed element scores into the structure score (L2 norm for magnitude)."""
    return total.sqrt() if criterion == "magnitude" else total


def row_groups(scores: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Sum of a [out, in] score matrix over consecutive equal row blocks: [n_groups]."""
    return scores.reshape(n_groups, -1).sum(dim=1)


def col_groups(scores: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Sum of a [out, in] score matrix over consecutive equal column blocks: [n_groups]."""
    return scores.reshape(scores.shape[0], n_groups, -1).sum(dim=(0, 2))


def channel_scores(rows: list[torch.Tensor], cols: list[torch.Tensor], criterion: Criterion) -> torch.Tensor:
    """MLP channel importance [I] from the element scores of the producers (rows) and the consumer (columns)."""
    n = rows[0].shape[0]
    total = sum(row_groups(s, n) for s in rows) + sum(col_groups(s, n) for s in cols)
    return finish(total, criterion)


def query_head_sums(q: torch.Tensor, o: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Summed element scores of each query head: its q rows and o columns, [num_heads]."""
    return row_groups(q, num_heads) + col_groups(o, num_heads)


def head_scores(q: torch.Tensor, o: torch.Tensor, num_heads: int, criterion: Criterion) -> torch.Tensor:
    """Query-head importance [num_heads]."""
    return finish(query_head_sums(q, o, num_heads), criterion)


def kv_group_scores(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, num_heads: int,
                    num_kv_heads: int, criterion: Criterion) -> torch.Tensor:
    """KV-group importance [num_kv_heads]: k and v rows of the group plus all its query heads.

    Query heads are grouped as in HF ``repeat_kv``: query head h reads KV head h // (num_heads / num_kv_heads).
    """
    per_q = query_head_sums(q, o, num_heads).reshape(num_kv_heads, -1).sum(dim=1)
    return finish(per_q + row_groups(k, num_kv_heads) + row_groups(v, num_kv_heads), criterion)


def keep_topk(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Indices of the ``n_keep`` highest scores, in ascending index order (ties: lower index kept)."""
    if not 0 < n_keep <= scores.numel():
        raise ValueError(f"n_keep must be in [1, {scores.numel()}], got {n_keep}")
    # stable sort on -score so equal scores keep the lower index: deterministic across runs
    order = torch.sort(-scores.double(), stable=True).indices[:n_keep]
    return order.sort().values


def keep_per_group(scores: torch.Tensor, num_groups: int, n_keep_per_group: int) -> torch.Tensor:
    """Keep the ``n_keep_per_group`` best query heads of every KV group; global head indices, ascending."""
    per = scores.reshape(num_groups, -1)
    size = per.shape[1]
    kept = [keep_topk(per[g], n_keep_per_group) + g * size for g in range(num_groups)]
    return torch.cat(kept)


def expand_heads(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row (or column) indices of the given heads in a [heads * head_dim] projection."""
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)[None, :]).reshape(-1)


def kv_groups_to_query_heads(groups: torch.Tensor, group_size: int) -> torch.Tensor:
    """Query heads that read the given KV groups (``group_size`` query heads per KV head)."""
    return expand_heads(groups, group_size)


def block_influence(h_in: torch.Tensor, h_out: torch.Tensor) -> tuple[float, int]:
    """Sum over tokens of 1 - cos(h_in, h_out), and the number of tokens (to average across windows).

    Computed in float64 so a block that is an exact identity scores 0 up to rounding.
    """
    a = h_in.reshape(-1, h_in.shape[-1]).double()
    b = h_out.reshape(-1, h_out.shape[-1]).double()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12)
    return float((1.0 - cos).sum()), int(a.shape[0])


def blocks_to_remove(scores: list[float], num_remove: int, protected: set[int]) -> list[int]:
    """The ``num_remove`` least important blocks (lowest score) not in ``protected``, ascending."""
    candidates = [i for i in range(len(scores)) if i not in protected]
    if num_remove > len(candidates):
        raise ValueError(f"cannot remove {num_remove} blocks: only {len(candidates)} are removable")
    ranked = sorted(candidates, key=lambda i: (scores[i], i))
    return sorted(ranked[:num_remove])
