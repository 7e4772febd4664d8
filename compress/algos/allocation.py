"""Layer-wise sparsity allocation from heavy-tail metrics (AlphaPruning) and the uniform baseline.

AlphaPruning (Lu et al., NeurIPS 2024, arXiv:2410.10912, §3.2 and ``ww_sparsity`` in
github.com/haiquanlu/AlphaPruning ``lib/prune.py``):
1. per-layer PL_Alpha_Hill α_l (``compress.algos.esd``), averaged over the layers of each
   transformer block (``mapping_type=block_wise``, the code's default; ``blockwise_mean`` here);
2. linear map of α onto [s1, s2] = [1 - ε, 1 + ε]:  φ_l = s1 + (α_l - α_min)/(α_max - α_min)·(s2 - s1).
   Higher α (lighter tail, "less trained") → more sparsity; lower α → less (paper §3.2; the code's
   min-max map sends α_min to s1);
3. scale by c so the parameter-weighted mean sparsity is the target S:
   c = S · Σ_l P_l / Σ_l P_l φ_l, ratio_l = c · φ_l.
   So ratios keep the spread max/min = (1+ε)/(1-ε) and lie in [S(1-ε)/φ̄, S(1+ε)/φ̄], where φ̄ is the
   weighted mean of φ (not necessarily exactly [S(1-ε), S(1+ε)]).

Beyond the reference (which can exceed 1 at high S·(1+ε)): ratios are clipped to ``clip`` and c is
re-solved so the weighted mean of the *clipped* ratios is S again (bisection on the monotone map
c ↦ mean(clip(c·φ)); the order of layers by α is kept). ``clipped`` in the result says whether that
happened.

Recipe snippet::

    - alpha_allocation: {target_sparsity: 0.7, epsilon: 0.3}
    - sparsegpt: {sparsity: plan, mask: unstructured}
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from compress.errors import ConfigError


@dataclass
class Allocation:
    ratios: torch.Tensor  #: float64 [L]: sparsity of each layer
    clipped: bool  #: True if any ratio hit the clip range and the rest were re-balanced
    n_clipped: int
    scale: float  #: the factor c (1.0 has no meaning for the uniform plan beyond ratios == S)

    def weighted_mean(self, param_counts: Sequence[int] | torch.Tensor) -> float:
        p = torch.as_tensor(param_counts, dtype=torch.float64)
        return float((p * self.ratios).sum() / p.sum())


def _as_vector(x: Sequence[float] | torch.Tensor, field: str) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.float64).reshape(-1).clone()
    if t.numel() == 0:
        raise ConfigError(f"{field} is empty")
    if not bool(torch.isfinite(t).all()):
        raise ConfigError(f"{field} contains NaN or infinite values")
    return t


def _check_target(target: float) -> float:
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 <= target < 1.0:
        raise ConfigError(f"target_sparsity must be a number in [0, 1), got {target!r}")
    return float(target)


def _check_counts(param_counts: Sequence[int] | torch.Tensor, n: int | None) -> torch.Tensor:
    p = _as_vector(param_counts, "param_counts")
    if n is not None and p.numel() != n:
        raise ConfigError(f"param_counts has {p.numel()} entries but alphas has {n}")
    if bool((p <= 0).any()):
        raise ConfigError("param_counts must all be positive")
    return p


def blockwise_mean(values: Sequence[float] | torch.Tensor, block_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Replace each value by the mean over the entries sharing its block id (float64).

    Example: 7 linear layers per Llama block → every layer of block b gets the block's mean α.
    """
    v = _as_vector(values, "values")
    b = torch.as_tensor(block_ids, dtype=torch.long).reshape(-1)
    if b.numel() != v.numel():
        raise ConfigError(f"block_ids has {b.numel()} entries but values has {v.numel()}")
    _, inverse = torch.unique(b, return_inverse=True)
    sums = torch.zeros(int(inverse.max()) + 1, dtype=torch.float64).index_add_(0, inverse, v)
    counts = torch.bincount(inverse).to(torch.float64)
    return (sums / counts)[inverse]


def _solve_scale(phi: torch.Tensor, p: torch.Tensor, target: float, lo: float, hi: float) -> float:
    """c with Σ p·clip(c·φ, lo, hi) / Σ p = target (the map is continuous and non-decreasing in c)."""

    def mean(c: float) -> float:
        return float((p * torch.clamp(c * phi, lo, hi)).sum() / p.sum())

    a, b = 0.0, hi / float(phi.min())  # mean(a) = lo ≤ target ≤ hi = mean(b)
    for _ in range(200):  # 200 halvings reach float64 resolution from any bracket
        mid = 0.5 * (a + b)
        if mean(mid) < target:
            a = mid
        else:
            b = mid
    return b


def alpha_to_sparsity(
    alphas: Sequence[float] | torch.Tensor,
    param_counts: Sequence[int] | torch.Tensor,
    target: float,
    epsilon: float,
    clip: tuple[float, float] = (0.0, 0.99),
) -> Allocation:
    """AlphaPruning's per-layer sparsity: linear in α within [1-ε, 1+ε]·c, weighted mean = target.

    ``alphas`` are per layer (already block-averaged if wanted), ``param_counts`` the number of
    weights of each layer. If all alphas are equal the plan is uniform (the reference would divide
    by zero).
    """
    a = _as_vector(alphas, "alphas")
    p = _check_counts(param_counts, a.numel())
    target = _check_target(target)
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not 0.0 < epsilon < 1.0:
        raise ConfigError(f"epsilon must be a number in (0, 1), got {epsilon!r}")
    lo, hi = clip
    if not 0.0 <= lo < hi <= 1.0:
        raise ConfigError(f"clip must be (low, high) with 0 <= low < high <= 1, got {clip!r}")
    if not lo <= target <= hi:
        raise ConfigError(f"target_sparsity {target} lies outside the clip range [{lo}, {hi}]")

    span = float(a.max() - a.min())
    if span == 0.0:
        phi = torch.ones_like(a)
    else:
        phi = (1 - epsilon) + (a - a.min()) / span * (2 * epsilon)
    if target == 0.0:
        return Allocation(torch.zeros_like(a), clipped=False, n_clipped=0, scale=0.0)
    c = target * float(p.sum()) / float((p * phi).sum())
    ratios = c * phi
    outside = (ratios < lo) | (ratios > hi)
    if not bool(outside.any()):
        return Allocation(ratios, clipped=False, n_clipped=0, scale=c)
    c = _solve_scale(phi, p, target, lo, hi)
    ratios = torch.clamp(c * phi, lo, hi)
    n_clipped = int(((ratios <= lo) | (ratios >= hi)).sum())
    return Allocation(ratios, clipped=True, n_clipped=n_clipped, scale=c)


def uniform_plan(param_counts: Sequence[int] | torch.Tensor, target: float) -> Allocation:
    """The baseline: every layer at the target sparsity."""
    p = _check_counts(param_counts, None)
    target = _check_target(target)
    return Allocation(torch.full_like(p, target), clipped=False, n_clipped=0, scale=1.0)

