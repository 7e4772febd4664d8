"""Numeric tests of the pruning algos: masks, Wanda, SparseGPT, ESD/alpha fit, AlphaPruning allocation."""
from __future__ import annotations

import math

import pytest
import torch

from compress.algos.allocation import alpha_to_sparsity, blockwise_mean, uniform_plan
from compress.algos.esd import alpha_hill, esd, weight_alpha
from compress.algos.hessian import HessianAccumulator, accumulate_hessian
from compress.algos.sparsegpt import sparsegpt_prune
from compress.algos.sparsity import (
    magnitude_scores,
    mask_for,
    nm_mask,
    parse_mask,
    unstructured_mask,
    wanda_scores,
)
from compress.errors import CompressError, ConfigError


def correlated_inputs(n_tokens: int, d: int, seed: int) -> torch.Tensor:
    """[tokens, d] activations with strongly correlated features and unequal scales (so OBS matters)."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n_tokens, d // 4, generator=g, dtype=torch.float64)
    mix = torch.randn(d // 4, d, generator=g, dtype=torch.float64)
    noise = 0.1 * torch.randn(n_tokens, d, generator=g, dtype=torch.float64)
    scales = torch.logspace(-1, 1, d, dtype=torch.float64)[torch.randperm(d, generator=g)]
    return (latent @ mix + noise) * scales


def rel_out_err(W: torch.Tensor, W_hat: torch.Tensor, X: torch.Tensor) -> float:
    return float(torch.linalg.norm((W - W_hat) @ X.T) / torch.linalg.norm(W @ X.T))


# ---------------------------------------------------------------- masks


def test_unstructured_per_tensor_exact_count():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(37, 53, generator=g)
    keep = unstructured_mask(magnitude_scores(W), 0.7, per_row=False)
    assert int((~keep).sum()) == math.floor(0.7 * W.numel())
    # the pruned ones are the smallest magnitudes
    assert float(W.abs()[~keep].max()) <= float(W.abs()[keep].min())


def test_unstructured_per_row_exact_count_wanda():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(16, 50, generator=g)
    act = torch.rand(50, generator=g) * 10 + 0.1
    keep = unstructured_mask(wanda_scores(W, act), 0.5, per_row=True)
    assert torch.equal((~keep).sum(1), torch.full((16,), 25))


def test_wanda_score_formula_and_row_comparison():
    W = torch.tensor([[1.0, -2.0, 3.0, -4.0]])
    act = torch.tensor([16.0, 4.0, 1.0, 0.25])  # ||X_j|| = 4, 2, 1, 0.5
    s = wanda_scores(W, act)
    assert torch.allclose(s, torch.tensor([[4.0, 4.0, 3.0, 2.0]]))
    keep = unstructured_mask(s, 0.5, per_row=True)
    assert keep.tolist() == [[True, True, False, False]]  # magnitude alone would keep columns 2 and 3


def test_ties_are_deterministic_lower_index_pruned_first():
    scores = torch.ones(2, 8)
    keep = unstructured_mask(scores, 0.25, per_row=True)
    assert keep.tolist() == [[False, False] + [True] * 6] * 2
    keep_nm = nm_mask(scores, 2, 4)
    assert keep_nm[0].tolist() == [False, False, True, True] * 2


def test_floor_counts_with_binary_roundoff():
    keep = unstructured_mask(torch.arange(10.0).reshape(1, 10) + 1, 0.7, per_row=True)
    assert int((~keep).sum()) == 7  # 0.7 * 10 is 6.999… in binary


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_structure_every_group(n, m):
    g = torch.Generator().manual_seed(2)
    W = torch.randn(12, 32, generator=g)
    keep = nm_mask(magnitude_scores(W), n, m)
    per_group = keep.reshape(12, 32 // m, m).sum(-1)
    assert torch.equal(per_group, torch.full_like(per_group, n))
    # within each group the kept ones are the largest
    a = W.abs().reshape(12, -1, m)
    k = keep.reshape(12, -1, m)
    kept_min = torch.where(k, a, torch.full_like(a, float("inf"))).amin(-1)
    pruned_max = torch.where(~k, a, torch.full_like(a, -1.0)).amax(-1)
    assert bool((kept_min >= pruned_max).all())


def test_nm_rejects_bad_patterns():
    s = torch.rand(4, 12)
    with pytest.raises(ConfigError, match="N < M"):
        nm_mask(s, 4, 4)
    with pytest.raises(ConfigError, match="divide"):
        nm_mask(s, 2, 8)
    with pytest.raises(ConfigError, match="positive integer"):
        nm_mask(s, 0, 4)


def test_parse_mask_forms_and_errors():
    assert parse_mask("unstructured") == ("unstructured", None)
    assert parse_mask("2:4") == ("nm", (2, 4))
    assert parse_mask("4:8") == ("nm", (4, 8))
    with pytest.raises(ConfigError, match="allowed"):
        parse_mask("2-4")
    with pytest.raises(ConfigError, match="N < M"):
        parse_mask("4:2")
    with pytest.raises(ConfigError, match="allowed"):
        parse_mask("structured")


def test_sparsity_validation_names_field():
    with pytest.raises(ConfigError, match="sparsity"):
        unstructured_mask(torch.rand(2, 4), 1.5, per_row=True)
    with pytest.raises(ConfigError, match="contradicts"):
        mask_for(torch.rand(2, 4), 0.7, "2:4", per_row=True)


# ---------------------------------------------------------------- hessian


def test_accumulate_hessian_matches_batch_formula():
    X = correlated_inputs(300, 16, seed=3)
    H, n = None, 0
    for chunk in X.split(70):
        H, n = accumulate_hessian(H, n, chunk.reshape(1, -1, 16), dtype=torch.float64)
    ref = 2 * X.T @ X / X.shape[0]
    assert n == 300
    assert float(torch.linalg.norm(H - ref) / torch.linalg.norm(ref)) < 1e-12
    acc = HessianAccumulator(16, dtype=torch.float64)
    acc.add(X[:100])
    acc.add(X[100:])
    assert float(torch.linalg.norm(acc.H - ref) / torch.linalg.norm(ref)) < 1e-12


# ---------------------------------------------------------------- SparseGPT


def brute_force_sparsegpt(W, H, sparsity, block, percdamp):
    """Float64 SparseGPT with explicit inverses of H_F = H[i:, i:] for every column (no Cholesky,
    no lazy batching): the paper's sequential OBS update written out directly."""
    W, H = W.clone(), H.clone()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype)
    keep = torch.ones(rows, cols, dtype=torch.bool)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        hinv_diag = torch.stack([torch.linalg.inv(H[i:, i:])[0, 0] for i in range(i1, i2)])
        k = math.floor(sparsity * rows * i2 + 1e-9) - math.floor(sparsity * rows * i1 + 1e-9)
        sal = (W[:, i1:i2] ** 2 / hinv_diag).reshape(-1)
        blk = torch.ones(sal.numel(), dtype=torch.bool)
        blk[torch.argsort(sal)[:k]] = False
        keep[:, i1:i2] = blk.reshape(rows, i2 - i1)
        for i in range(i1, i2):
            hinv = torch.linalg.inv(H[i:, i:])
            q = torch.where(keep[:, i], W[:, i], torch.zeros_like(W[:, i]))
            err = (W[:, i] - q) / hinv[0, 0]
            W[:, i:] -= err.unsqueeze(1) * hinv[0].unsqueeze(0)
            W[:, i] = q
    return W, keep


@pytest.mark.parametrize("block", [24, 8])
def test_sparsegpt_matches_bruteforce_float64(block):
    g = torch.Generator().manual_seed(4)
    X = correlated_inputs(200, 24, seed=5)
    X[:, 3] = 0  # a dead input
    W = torch.randn(3, 24, generator=g, dtype=torch.float64)
    H = 2 * X.T @ X / X.shape[0]
    res = sparsegpt_prune(W, H, sparsity=0.5, block_size=block, percdamp=0.01)
    W_ref, keep_ref = brute_force_sparsegpt(W, H, 0.5, block, 0.01)
    assert torch.equal(res.mask, keep_ref)
    assert float(torch.linalg.norm(res.weight - W_ref) / torch.linalg.norm(W_ref)) < 1e-9
    assert bool(res.dead[3]) and bool((res.weight[:, 3] == 0).all())


def test_sparsegpt_single_pruned_weight_is_closed_form_obs():
    """Block = all columns, one row, one weight pruned (the first column has the lowest saliency):
    the update must be the OBS formula δ = -w_q / [H⁻¹]_qq · H⁻¹_{:,q}, which is optimal."""
    X = correlated_inputs(100, 6, seed=6)
    H = 2 * X.T @ X / 100
    W = torch.tensor([[0.01, 1.0, -2.0, 1.5, 3.0, -1.0]], dtype=torch.float64)
    res = sparsegpt_prune(W, H, sparsity=1 / 6 + 1e-6, block_size=6, percdamp=0.0)
    assert res.mask[0].tolist() == [False] + [True] * 5
    Hinv = torch.linalg.inv(H)
    expected = W[0] - W[0, 0] / Hinv[0, 0] * Hinv[0]
    assert float((res.weight[0] - expected).abs().max()) < 1e-10
    assert res.weight[0, 0] == 0


def test_sparsegpt_beats_magnitude_and_wanda_on_correlated_inputs():
    X = correlated_inputs(2048, 128, seed=7).float()
    g = torch.Generator().manual_seed(8)
    W = torch.randn(64, 128, generator=g)
    H, _ = accumulate_hessian(None, 0, X)
    res = sparsegpt_prune(W, H, sparsity=0.5, block_size=32)
    assert int((~res.mask).sum()) == 64 * 128 // 2
    assert bool((res.weight[~res.mask] == 0).all())
    mag = W * unstructured_mask(magnitude_scores(W), 0.5, per_row=False)
    wan = W * unstructured_mask(wanda_scores(W, (X**2).sum(0)), 0.5, per_row=True)
    e_sgpt, e_mag, e_wan = (rel_out_err(W, Wh, X) for Wh in (res.weight, mag, wan))
    assert e_sgpt < 0.7 * e_wan, (e_sgpt, e_wan)
    assert e_wan < e_mag, (e_wan, e_mag)


@pytest.mark.parametrize("sparsity", [0.3, 0.65])
def test_sparsegpt_exact_sparsity_unaligned_blocks(sparsity):
    X = correlated_inputs(256, 40, seed=9).float()
    W = torch.randn(7, 40, generator=torch.Generator().manual_seed(10))
    res = sparsegpt_prune(W, accumulate_hessian(None, 0, X)[0], sparsity=sparsity, block_size=16)
    assert int((~res.mask).sum()) == math.floor(sparsity * 7 * 40 + 1e-9)
    assert bool((res.weight[~res.mask] == 0).all())


def test_sparsegpt_nm_pattern():
    X = correlated_inputs(512, 64, seed=11).float()
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(12))
    H = accumulate_hessian(None, 0, X)[0]
    res = sparsegpt_prune(W, H, nm=(2, 4), block_size=32)
    per_group = res.mask.reshape(16, 16, 4).sum(-1)
    assert torch.equal(per_group, torch.full_like(per_group, 2))
    assert bool((res.weight[~res.mask] == 0).all())
    wan = W * nm_mask(wanda_scores(W, (X**2).sum(0)), 2, 4)
    assert rel_out_err(W, res.weight, X) < rel_out_err(W, wan, X)
    with pytest.raises(ConfigError, match="block_size"):
        sparsegpt_prune(W, H, nm=(4, 8), block_size=12)


def test_sparsegpt_quantizer_hook_keeps_zeros():
    X = correlated_inputs(256, 32, seed=13).float()
    W = torch.randn(8, 32, generator=torch.Generator().manual_seed(14))
    res = sparsegpt_prune(W, accumulate_hessian(None, 0, X)[0], sparsity=0.5,
                          quantizer=lambda col, i: torch.round(col * 4) / 4 + 0.125)
    assert bool((res.weight[~res.mask] == 0).all())
    kept = res.weight[res.mask]
    assert bool((((kept - 0.125) * 4).round() == (kept - 0.125) * 4).all())


def test_sparsegpt_requires_sparsity():
    with pytest.raises(ConfigError, match="sparsity"):
        sparsegpt_prune(torch.randn(2, 4), torch.eye(4))


# ---------------------------------------------------------------- ESD / alpha


def pareto(n: int, alpha: float, xmin: float, seed: int) -> torch.Tensor:
    u = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return xmin * u ** (-1 / (alpha - 1))  # density ∝ λ^(-alpha) on [xmin, ∞)


def test_esd_is_squared_singular_values():
    W = torch.randn(30, 50, generator=torch.Generator().manual_seed(15))
    ev = esd(W)
    ref = torch.linalg.eigvalsh(W.double().T @ W.double())[-30:]
    assert ev.dtype == torch.float64 and ev.numel() == 30
    assert float((ev - ref).abs().max() / ref.max()) < 1e-10


@pytest.mark.parametrize("strategy", ["ks", "peak"])
@pytest.mark.parametrize("alpha", [2.0, 3.5])
def test_alpha_hill_recovers_pareto_exponent(alpha, strategy):
    fit = alpha_hill(pareto(3000, alpha, 1.0, seed=16), xmin_strategy=strategy)
    assert abs(fit.alpha - alpha) < 0.08 * alpha, fit
    assert 0 < fit.ks_distance < 0.05
    assert fit.xmin < 1.1  # a pure Pareto sample is power law from its minimum on


def test_alpha_hill_ks_finds_tail_above_bulk():
    g = torch.Generator().manual_seed(17)
    bulk = 0.05 + 0.9 * torch.rand(3000, generator=g, dtype=torch.float64)  # [0.05, 0.95]
    tail = pareto(1500, 2.5, 1.0, seed=18)
    fit = alpha_hill(torch.cat([bulk, tail]), xmin_strategy="ks")
    assert 0.8 <= fit.xmin <= 2.0, fit
    assert abs(fit.alpha - 2.5) < 0.3, fit
    assert fit.n_tail <= 1600


def naive_fit(ev: torch.Tensor, lo: float, hi: float) -> tuple[float, float]:
    """Loop over candidate xmin in [lo, hi] (not the largest eigenvalue): Hill α and left-limit KS D."""
    s = torch.sort(ev).values
    best = (2.0, 0.0, 0.0)  # (D, alpha, xmin)
    for i in range(len(s) - 1):
        if not lo <= float(s[i]) <= hi:
            continue
        tail = s[i:]
        n = len(tail)
        a = 1 + n / float(torch.log(tail / s[i]).sum())
        d = max(abs(1 - float(tail[k] / s[i]) ** (1 - a) - k / n) for k in range(n)) if a > 1 else 1.0
        if d < best[0]:
            best = (d, a, float(s[i]))
    return best[1], best[2]


def test_alpha_hill_matches_naive_loop_on_heavy_tailed_matrix():
    g = torch.Generator().manual_seed(21)
    # heavy-tailed entries (a ratio of normals), seeded
    num = torch.randn(80, 120, generator=g, dtype=torch.float64)
    den = torch.randn(80, 120, generator=g, dtype=torch.float64).abs() + 0.3
    ev = esd(num / den)
    a, x = naive_fit(ev, 0.0, float("inf"))
    fit = alpha_hill(ev, xmin_strategy="ks")
    assert math.isclose(fit.alpha, a, rel_tol=1e-10) and fit.xmin == x
    h = torch.log10(ev)
    counts = torch.histc(h, 100, min=float(h.min()), max=float(h.max()))
    peak = 10 ** float(torch.linspace(float(h.min()), float(h.max()), 101, dtype=torch.float64)[int(counts.argmax())])
    a, x = naive_fit(ev, math.log10(0.95 * peak), 1.5 * peak)
    fit = alpha_hill(ev, xmin_strategy="peak")
    assert math.isclose(fit.alpha, a, rel_tol=1e-10) and fit.xmin == x


def test_alpha_hill_peak_window_limits_xmin():
    g = torch.Generator().manual_seed(22)
    bulk = 0.9 + 0.2 * torch.rand(2000, generator=g, dtype=torch.float64)  # the ESD's peak sits near 1
    ev = torch.cat([bulk, pareto(500, 2.5, 10.0, seed=23)])
    ks, peak = alpha_hill(ev, xmin_strategy="ks"), alpha_hill(ev, xmin_strategy="peak")
    assert 9.0 <= ks.xmin <= 12.0 and abs(ks.alpha - 2.5) < 0.3, ks
    assert peak.xmin <= 1.5 * 1.1 and peak.ks_distance > ks.ks_distance, peak


def test_alpha_hill_mid_is_hill_at_median():
    ev = pareto(101, 3.0, 1.0, seed=19)
    fit = alpha_hill(ev, xmin_strategy="mid")
    s = torch.sort(ev).values
    tail = s[50:]
    assert math.isclose(fit.alpha, 1 + tail.numel() / float(torch.log(tail / s[50]).sum()), rel_tol=1e-12)
    assert fit.n_tail == 51


def test_alpha_float32_and_float64_agree():
    W = torch.randn(96, 160, generator=torch.Generator().manual_seed(20)) @ torch.diag(torch.logspace(0, 1, 160))
    a64 = weight_alpha(W, dtype=torch.float64).alpha
    a32 = weight_alpha(W, dtype=torch.float32).alpha
    assert abs(a64 - a32) < 1e-3 * a64


def test_alpha_hill_rejects_bad_input():
    with pytest.raises(ConfigError, match="xmin_strategy"):
        alpha_hill(pareto(50, 3.0, 1.0, 0), xmin_strategy="median")
    with pytest.raises(CompressError, match="positive"):
        alpha_hill(torch.tensor([0.0, 1.0, 2.0, 3.0]))


# ---------------------------------------------------------------- allocation


def test_alpha_to_sparsity_mean_monotone_and_spread():
    alphas = torch.tensor([2.1, 3.5, 2.8, 4.9, 3.0, 2.5])
    counts = torch.tensor([100, 400, 250, 400, 100, 1000])
    eps, S = 0.3, 0.5
    alloc = alpha_to_sparsity(alphas, counts, S, eps)
    assert not alloc.clipped
    assert abs(alloc.weighted_mean(counts) - S) < 1e-12
    order = torch.argsort(alphas)
    assert bool((alloc.ratios[order].diff() > 0).all())  # higher alpha -> more sparsity
    assert math.isclose(float(alloc.ratios.max() / alloc.ratios.min()), (1 + eps) / (1 - eps), rel_tol=1e-12)
    phi_mean = float(alloc.ratios.mul(counts).sum() / counts.sum()) / alloc.scale
    lo, hi = S * (1 - eps) / phi_mean, S * (1 + eps) / phi_mean
    assert bool((alloc.ratios >= lo - 1e-12).all() and (alloc.ratios <= hi + 1e-12).all())


def test_alpha_to_sparsity_clipping_keeps_mean():
    alphas = torch.tensor([2.0, 2.2, 2.4, 5.0, 6.0])
    counts = torch.tensor([10, 10, 10, 10, 10])
    alloc = alpha_to_sparsity(alphas, counts, 0.8, 0.3, clip=(0.0, 0.9))
    assert alloc.clipped and alloc.n_clipped >= 1
    assert float(alloc.ratios.max()) <= 0.9
    assert abs(alloc.weighted_mean(counts) - 0.8) < 1e-6
    assert bool((alloc.ratios.diff() >= 0).all())


def test_alpha_to_sparsity_equal_alphas_is_uniform():
    alloc = alpha_to_sparsity([3.0, 3.0, 3.0], [1, 2, 3], 0.6, 0.2)
    assert torch.allclose(alloc.ratios, torch.full((3,), 0.6, dtype=torch.float64))
    assert torch.equal(uniform_plan([1, 2, 3], 0.6).ratios, torch.full((3,), 0.6, dtype=torch.float64))


def test_blockwise_mean():
    out = blockwise_mean([1.0, 3.0, 10.0, 20.0, 30.0], [0, 0, 1, 1, 1])
    assert out.tolist() == [2.0, 2.0, 20.0, 20.0, 20.0]


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"epsilon": 0.0}, "epsilon"),
        ({"epsilon": 1.0}, "epsilon"),
        ({"target": 1.0}, "target_sparsity"),
        ({"target": -0.1}, "target_sparsity"),
        ({"param_counts": [1, 2]}, "param_counts"),
        ({"param_counts": [1, 0, 3]}, "param_counts"),
        ({"alphas": [2.0, float("nan"), 3.0]}, "alphas"),
        ({"clip": (0.5, 0.4)}, "clip"),
        ({"target": 0.95, "clip": (0.0, 0.9)}, "clip range"),
    ],
)
def test_alpha_to_sparsity_bad_inputs_name_the_field(kwargs, field):
    args = {"alphas": [2.0, 3.0, 4.0], "param_counts": [1, 1, 1], "target": 0.5, "epsilon": 0.3}
    args.update(kwargs)
    with pytest.raises(ConfigError, match=field):
        alpha_to_sparsity(**args)
