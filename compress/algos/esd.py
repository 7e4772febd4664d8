"""Empirical spectral density (ESD) of a weight matrix and its power-law tail exponent (PL_Alpha_Hill).

AlphaPruning (Lu, Zhou, Liu, Hu, Yaoqing Yang et al., "AlphaPruning: Using Heavy-Tailed Self
Regularization Theory for Improved Layer-wise Pruning of Large Language Models", NeurIPS 2024,
arXiv:2410.10912; code github.com/haiquanlu/AlphaPruning, ``lib/esd_utils.py``) fits a power law
p(λ) ∝ λ^(-α) to the tail λ ≥ λ_min of the eigenvalues of WᵀW (Martin & Mahoney's heavy-tailed
self-regularization). A smaller α means a heavier tail, read as a better-trained layer, which then
gets *less* sparsity (``compress.algos.allocation``).

The estimator, exactly as in the AlphaPruning code (``net_esd_estimator``):
- eigenvalues sorted ascending, λ_1 ≤ … ≤ λ_N; a candidate xmin = λ_i (every eigenvalue but the
  largest) gives the Hill / maximum-likelihood estimate over the n = N - i + 1 tail values
      α_i = 1 + n / Σ_{j ≥ i} log(λ_j / λ_i);
- its Kolmogorov-Smirnov distance compares the fitted tail CDF with the empirical one, evaluated at
  the left limit (k/n, k = 0..n-1) as the reference does:
      D_i = max_k | 1 - (λ_{i+k}/λ_i)^(1-α_i) - k/n |;
  candidates with α_i ≤ 1 get D = 1 (the reference's initial value);
- xmin is the candidate with the smallest D (first on ties). Which candidates are searched is the
  ``xmin_strategy``:
  * ``"peak"`` (AlphaPruning's default ``--ww_metric alpha_peak``, fix_fingers ``xmin_peak``):
    histogram log10(λ) into 100 equal bins, take the left edge p of the fullest bin, and search the
    candidates with λ ≤ 1.5·p and λ ≥ log10(0.95·p). The lower bound compares an eigenvalue with a
    *logarithm*; that is what the published code (and so the published alphas) does, kept here on
    purpose. WeightWatcher's own ``xmin_peak`` searches (0.95·p, 1.05·p) instead.
  * ``"ks"``: every candidate (the classic Clauset-Shalizi-Newman choice, WeightWatcher's default).
  * ``"mid"``: xmin fixed at the median eigenvalue λ_{⌊N/2⌋} (the code's ``xmin_mid``), no search.

Recipe snippet (the pass built on these functions)::

    - alpha_allocation: {target_sparsity: 0.7, epsilon: 0.3}
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.errors import CompressError, ConfigError

XMIN_STRATEGIES = ("peak", "ks", "mid")


def esd(weight: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Eigenvalues of WᵀW in ascending order: the squared singular values of W (min(out, in) of
    them; the other eigenvalues of the larger Gram matrix are structurally zero and left out, as in
    the reference).

    float64 by default (the reference uses float32): the Hill sum takes logs of ratios down to
    xmin, and float32's SVD error is absolute (≈1e-7·σ_max), so small eigenvalues lose relative
    accuracy; float64 makes alpha independent of the SVD backend at a cost of ~2× the SVD time,
    which is small next to calibration. Pass ``dtype=torch.float32`` to mirror the reference.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    s = torch.linalg.svdvals(weight.detach().to(dtype))
    return torch.sort(s.square()).values


@dataclass
class PowerLawFit:
    alpha: float  #: tail exponent α of p(λ) ∝ λ^(-α)
    xmin: float  #: smallest eigenvalue of the fitted tail
    ks_distance: float  #: Kolmogorov-Smirnov distance D of the chosen fit
    n_tail: int  #: number of eigenvalues in the tail (λ ≥ xmin)
    xmin_strategy: str


def _hill_and_ks(log_eigs: torch.Tensor, candidates: torch.Tensor, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """α_i and D_i for the candidate indices ``candidates`` (into ascending ``log_eigs``)."""
    N = log_eigs.numel()
    suffix = torch.flip(torch.cumsum(torch.flip(log_eigs, [0]), 0), [0])  # Σ_{j≥i} log λ_j
    n = (N - candidates).to(log_eigs.dtype)
    alphas = 1 + n / (suffix[candidates] - n * log_eigs[candidates])
    ds = torch.ones_like(alphas)
    j = torch.arange(N, device=log_eigs.device)
    for c0 in range(0, candidates.numel(), chunk):
        ci = candidates[c0 : c0 + chunk]
        a = alphas[c0 : c0 + chunk].unsqueeze(1)
        k = (j.unsqueeze(0) - ci.unsqueeze(1)).to(log_eigs.dtype)  # position within the tail
        fitted = 1 - torch.exp((1 - a) * (log_eigs.unsqueeze(0) - log_eigs[ci].unsqueeze(1)))
        dev = (fitted - k / n[c0 : c0 + chunk].unsqueeze(1)).abs()
        dev = torch.where(k >= 0, dev, torch.zeros_like(dev))  # only the tail λ_j ≥ xmin counts
        valid = torch.isfinite(a.squeeze(1)) & (a.squeeze(1) > 1)
        ds[c0 : c0 + chunk] = torch.where(valid, dev.amax(dim=1), torch.ones_like(dev[:, 0]))
    return alphas, ds


def _peak_window(eigs: torch.Tensor, bins: int) -> tuple[float, float]:
    """AlphaPruning's xmin_peak search window (see the module docstring for the lower bound)."""
    h = torch.log10(eigs)
    lo, hi = h.min(), h.max()
    counts = torch.histc(h, bins, min=float(lo), max=float(hi))
    edges = torch.linspace(float(lo), float(hi), bins + 1, dtype=eigs.dtype)
    peak = 10 ** edges[int(torch.argmax(counts))]
    return float(torch.log10(0.95 * peak)), float(1.5 * peak)


def alpha_hill(eigs: torch.Tensor, xmin_strategy: str = "peak", bins: int = 100) -> PowerLawFit:
    """Fit the power-law tail of an ESD (``esd(W)``) with the Hill estimator and KS-chosen xmin.

    ``eigs`` must be positive (a rank-deficient matrix has zero eigenvalues, whose log is undefined;
    the caller decides whether to drop them). ``bins`` only matters for ``"peak"``.
    """
    if xmin_strategy not in XMIN_STRATEGIES:
        raise ConfigError(f"xmin_strategy must be one of {', '.join(XMIN_STRATEGIES)}, got {xmin_strategy!r}")
    eigs = torch.sort(eigs.detach().reshape(-1).to(torch.float64)).values
    N = eigs.numel()
    if N < 3:
        raise CompressError(f"need at least 3 eigenvalues to fit a power law, got {N}")
    if not bool(torch.isfinite(eigs).all()) or bool((eigs <= 0).any()):
        raise CompressError(
            "eigenvalues must be finite and positive; the matrix is rank-deficient or not finite "
            f"(min eigenvalue {float(eigs[0]):.3g})"
        )
    logs = torch.log(eigs)

    if xmin_strategy == "mid":
        candidates = torch.tensor([N // 2])
    else:
        candidates = torch.arange(N - 1)  # the largest eigenvalue alone is no tail
        if xmin_strategy == "peak":
            lo, hi = _peak_window(eigs, bins)
            inside = (eigs[:-1] >= lo) & (eigs[:-1] <= hi)
            candidates = candidates[inside]
            if candidates.numel() == 0:
                raise CompressError("no eigenvalue lies in the xmin_peak search window; use xmin_strategy 'ks'")
    alphas, ds = _hill_and_ks(logs, candidates)
    best = int(torch.argmin(ds))
    if xmin_strategy != "mid" and not (bool(torch.isfinite(alphas[best])) and float(alphas[best]) > 1):
        raise CompressError("no candidate xmin gives a power-law fit with alpha > 1")
    i = int(candidates[best])
    return PowerLawFit(
        alpha=float(alphas[best]),
        xmin=float(eigs[i]),
        ks_distance=float(ds[best]),
        n_tail=N - i,
        xmin_strategy=xmin_strategy,
    )


def weight_alpha(weight: torch.Tensor, xmin_strategy: str = "peak", dtype: torch.dtype = torch.float64) -> PowerLawFit:
    """``alpha_hill(esd(weight))``: the per-layer metric AlphaPruning allocates sparsity by."""
    # the SVD runs where the weight is; the small tail fit runs on the CPU (its index tensors live there)
    return alpha_hill(esd(weight, dtype).cpu(), xmin_strategy)
