"""Pruning scores and masks: magnitude, Wanda, unstructured and N:M keep-masks.

Every mask in compress is a **keep-mask**: a bool tensor shaped like the weight, True where the
weight survives. Weights are ``[out_features, in_features]`` (``nn.Linear`` layout); "rows" are
output channels and N:M groups run along the input dimension, as in NVIDIA's sparse tensor cores.

Exact counts and ties (the same rules everywhere, so results do not depend on the sort kernel):
- a sparsity ``s`` over ``k`` candidates prunes exactly ``floor(s * k)`` of them (the Wanda and
  SparseGPT references use ``int(k * s)``, i.e. floor, too);
- among equal scores the weight with the lower flat index is pruned first (stable ascending sort).

References:
- Magnitude pruning (per layer, the baseline of the Wanda paper): Han et al., "Learning both
  Weights and Connections for Efficient Neural Networks", NeurIPS 2015.
- Wanda: Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for Large Language
  Models", ICLR 2024 (arXiv:2306.11695): score |W_ij| * ||X_j||_2, compared within each output row.
- N:M: Mishra et al., "Accelerating Sparse Deep Neural Networks" (arXiv:2104.08378), 2:4 on Ampere.

Recipe snippets (passes built on these functions)::

    - magnitude: {sparsity: 0.5}
    - wanda: {sparsity: 0.5, mask: "2:4"}
"""
from __future__ import annotations

import math

import torch

from compress.errors import ConfigError

#: The mask specifications ``parse_mask`` accepts, for error messages.
MASK_FORMS = 'unstructured, or "N:M" with positive integers N < M (e.g. "2:4", "4:8")'


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|W|, in float32 (or float64 if ``weight`` is float64). Higher score = more important."""
    return weight.abs().to(torch.promote_types(weight.dtype, torch.float32))


def wanda_scores(weight: torch.Tensor, act_norm_sq: torch.Tensor) -> torch.Tensor:
    """Wanda importance ``S_ij = |W_ij| * ||X_j||_2``.

    ``act_norm_sq[j]`` is the sum over calibration tokens of ``x_j**2`` for input feature ``j``
    (any positive multiple works: the score is compared within a row, so a global scale such as the
    reference's division by the number of samples does not change the mask).
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if act_norm_sq.shape != (weight.shape[1],):
        raise ValueError(
            f"act_norm_sq must have shape ({weight.shape[1]},) = in_features, got {tuple(act_norm_sq.shape)}"
        )
    if bool((act_norm_sq < 0).any()):
        raise ValueError("act_norm_sq must be non-negative (it is a sum of squares)")
    dtype = torch.promote_types(weight.dtype, torch.float32)
    return weight.abs().to(dtype) * act_norm_sq.to(dtype).sqrt().unsqueeze(0)


def check_sparsity(sparsity: float, field: str = "sparsity") -> float:
    """Validate a sparsity ratio in [0, 1]; return it as float."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not math.isfinite(sparsity):
        raise ConfigError(f"{field} must be a number in [0, 1], got {sparsity!r}")
    if not 0.0 <= sparsity <= 1.0:
        raise ConfigError(f"{field} must be in [0, 1], got {sparsity}")
    return float(sparsity)


def n_pruned(count: int, sparsity: float) -> int:
    """How many of ``count`` candidates a sparsity prunes: floor(sparsity * count).

    A tiny epsilon absorbs binary round-off (0.7 * 10 = 6.999999999999999 must prune 7).
    """
    return min(count, int(math.floor(sparsity * count + 1e-9)))


def lowest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask over a 1-D or 2-D score tensor that prunes exactly ``k`` entries *per row*
    (per tensor for 1-D), lowest scores first, ties to the lower index."""
    flat = scores if scores.dim() == 2 else scores.reshape(1, -1)
    order = torch.sort(flat, dim=1, stable=True).indices[:, :k]
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep.scatter_(1, order, False)
    return keep.reshape(scores.shape)


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """Keep-mask pruning the lowest-scoring fraction ``sparsity`` of ``scores`` ([out, in]).

    ``per_row=True`` (Wanda): each output row loses exactly ``floor(sparsity * in_features)``.
    ``per_row=False`` (layer-wise magnitude pruning): the whole matrix loses exactly
    ``floor(sparsity * numel)``.

    Example: ``unstructured_mask(wanda_scores(W, xsq), 0.5, per_row=True)``.
    """
    sparsity = check_sparsity(sparsity)
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D [out, in], got shape {tuple(scores.shape)}")
    if per_row:
        return lowest_k_mask(scores, n_pruned(scores.shape[1], sparsity))
    return lowest_k_mask(scores.reshape(-1), n_pruned(scores.numel(), sparsity)).reshape(scores.shape)


def check_nm(n: int, m: int, in_features: int | None = None) -> None:
    """Validate an N:M pattern (keep N of every M consecutive input weights)."""
    for field, v in (("N", n), ("M", m)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ConfigError(f"mask {field} must be a positive integer, got {v!r}; allowed: {MASK_FORMS}")
    if n >= m:
        raise ConfigError(f"mask N:M needs N < M (N weights kept of every M), got {n}:{m}; allowed: {MASK_FORMS}")
    if in_features is not None and in_features % m:
        raise ConfigError(
            f"mask {n}:{m}: M={m} must divide the layer's in_features={in_features} "
            f"(groups of M consecutive input weights)"
        )


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask with the N:M pattern: in every group of ``m`` consecutive input weights of a row,
    exactly ``n`` are kept (the ``n`` highest scores; ties keep the higher index, i.e. the lower
    index is pruned first, as everywhere in this module).

    Convention (NVIDIA): "2:4" keeps 2 of every 4 (50% sparsity), "4:8" keeps 4 of every 8. The
    SparseGPT and Wanda reference scripts pass N as the number *pruned* per group (``prunen``);
    for the usual 2:4 and 4:8 both readings coincide.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D [out, in], got shape {tuple(scores.shape)}")
    out_f, in_f = scores.shape
    check_nm(n, m, in_f)
    groups = scores.reshape(out_f * in_f // m, m)
    return lowest_k_mask(groups, m - n).reshape(out_f, in_f)


def parse_mask(spec: str) -> tuple[str, tuple[int, int] | None]:
    """``"unstructured"`` -> ``("unstructured", None)``; ``"2:4"`` -> ``("nm", (2, 4))``.

    Only the form is checked here; divisibility by the layer width is checked by ``nm_mask``.
    """
    if not isinstance(spec, str):
        raise ConfigError(f"mask must be a string, got {spec!r}; allowed: {MASK_FORMS}")
    text = spec.strip()
    if text == "unstructured":
        return "unstructured", None
    parts = text.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ConfigError(f"mask {spec!r} is not recognised; allowed: {MASK_FORMS}")
    n, m = int(parts[0]), int(parts[1])
    check_nm(n, m)
    return "nm", (n, m)


def mask_for(scores: torch.Tensor, sparsity: float | None, mask: str, per_row: bool) -> torch.Tensor:
    """One entry point for passes: an unstructured mask at ``sparsity`` or an N:M mask.

    For N:M the sparsity is fixed by the pattern (1 - N/M); a ``sparsity`` given with it must agree.
    """
    kind, nm = parse_mask(mask)
    if kind == "unstructured":
        if sparsity is None:
            raise ConfigError("sparsity is required with mask: unstructured")
        return unstructured_mask(scores, sparsity, per_row=per_row)
    n, m = nm  # type: ignore[misc]
    if sparsity is not None and abs(sparsity - (1 - n / m)) > 1e-9:
        raise ConfigError(
            f"sparsity {sparsity} contradicts mask {mask!r}, which fixes sparsity at {1 - n / m:g}; "
            f"drop sparsity or set it to {1 - n / m:g}"
        )
    return nm_mask(scores, n, m)
