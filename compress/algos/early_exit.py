"""Adaptive depth (AdaInfer, Fan et al., 2024, arXiv 2403.02181) as pure tensor functions.

At a probed layer the hidden state goes through the final norm and the LM head; the "gap" (top-1 minus
top-2 probability) and the "top prob" of that prediction are the features of a small linear classifier
whose label is "this layer's top-1 equals the full model's top-1". A request exits at the first probed
layer whose classifier score reaches the threshold. The threshold is chosen on held-out positions so
that a one-sided Wilson lower bound on the agreement with the full model is at least the target.

Nothing here walks a model: callers hand in logits, labels and FLOP counts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: features a classifier may use; each is a function of one layer's next-token distribution
FEATURES = ("gap", "top_prob", "entropy")


def features_from_logits(logits: torch.Tensor, names: tuple[str, ...] | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits`` [..., V] of one layer -> (features [..., len(names)] in float32, top-1 ids [...])."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    top = logp.topk(2, dim=-1)
    p = top.values.exp()
    cols = []
    for n in names:
        if n == "gap":
            cols.append(p[..., 0] - p[..., 1])
        elif n == "top_prob":
            cols.append(p[..., 0])
        elif n == "entropy":
            cols.append(-(logp.exp() * logp).sum(-1))
        else:
            raise ValueError(f"unknown feature {n!r} (known: {', '.join(FEATURES)})")
    return torch.stack(cols, dim=-1), top.indices[..., 0]


def agreement_labels(layer_top1: torch.Tensor, final_top1: torch.Tensor) -> torch.Tensor:
    """1 where a layer's top-1 equals the full model's top-1 (no task labels needed)."""
    return (layer_top1 == final_top1).to(torch.int64)


def linear_score(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The exported classifier at inference: ``features @ weight + bias`` (scaling folded in)."""
    return features.float() @ weight.float() + bias.float()


def wilson_lower(successes: int, n: int, confidence: float = 0.95) -> float:
    """One-sided Wilson score lower bound of a binomial proportion (0 for n == 0)."""
    if n == 0:
        return 0.0
    z = _normal_quantile(confidence)
    p = successes / n
    denom = 1 + z * z / n
    centre = p + z * z / (2 * n)
    margin = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - margin) / denom)


def _normal_quantile(q: float) -> float:
    """Standard normal quantile by bisection on erf (no scipy needed for one number)."""
    lo, hi = -10.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@dataclass(frozen=True)
class ExitPolicy:
    """Outcome of a threshold on held-out positions."""

    threshold: float
    probes: tuple[int, ...]  # probed layer indices (0-based block index whose output is checked)
    agreement: float
    agreement_lower: float
    n: int
    mean_layers: float  # decoder blocks executed per position, averaged
    mean_checks: float  # probes evaluated per position, averaged
    exit_histogram: dict[int, int]  # executed blocks -> positions


def simulate(scores: torch.Tensor, agree: torch.Tensor, probes: list[int], threshold: float,
             num_layers: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Apply "exit at the first probe whose score >= threshold" to every position.

    ``scores``/``agree``: [P, n] for the probes in order (block index ascending). Returns per position the
    executed block count, the number of checks made and whether the answer equals the full model's."""
    n = scores.shape[1]
    executed = torch.full((n,), num_layers, dtype=torch.int64)
    checks = torch.full((n,), len(probes), dtype=torch.int64)
    ok = torch.ones(n, dtype=torch.bool)
    done = torch.zeros(n, dtype=torch.bool)
    for i, layer in enumerate(probes):
        fire = (scores[i] >= threshold) & ~done
        executed[fire] = layer + 1
        checks[fire] = i + 1
        ok[fire] = agree[i][fire].bool()
        done |= fire
    return executed, checks, ok


def choose_policy(scores: torch.Tensor, agree: torch.Tensor, candidates: list[int], num_layers: int,
                  target: float, confidence: float = 0.95, check_cost: float = 0.25,
                  max_probes: int = 4, grid: int = 200) -> ExitPolicy:
    """Pick probed layers (greedily, at most ``max_probes`` of ``candidates``) and one threshold that
    minimise ``mean executed layers + check_cost * mean checks`` subject to the Wilson lower bound of
    the agreement >= ``target``, all on held-out positions.

    ``scores``/``agree``: [len(candidates), n]. A threshold above every score never exits (the full
    model, agreement 1), so a policy always exists."""
    row = {layer: i for i, layer in enumerate(candidates)}
    n = scores.shape[1]
    never = float(scores.max()) + 1.0
    qs = torch.linspace(0, 1, grid, dtype=torch.float64)

    def best_for(probes: list[int]) -> tuple[float, float]:
        s = scores[[row[p] for p in probes]]
        a = agree[[row[p] for p in probes]]
        best = (float(num_layers), never)
        for t in sorted(set(torch.quantile(s.double().flatten()[:200_000], qs).tolist())):
            executed, checks, ok = simulate(s, a, probes, t, num_layers)
            if wilson_lower(int(ok.sum()), n, confidence) < target:
                continue
            cost = float(executed.float().mean()) + check_cost * float(checks.float().mean())
            if cost < best[0]:
                best = (cost, t)
        return best

    chosen: list[int] = []
    best_cost, best_t = float(num_layers), never
    while len(chosen) < max_probes:
        trial = [(best_for(sorted(chosen + [c])), c) for c in candidates if c not in chosen]
        if not trial:
            break
        (cost, t), c = min(trial, key=lambda x: x[0][0])
        if cost >= best_cost - 1e-9:
            break
        chosen, best_cost, best_t = sorted(chosen + [c]), cost, t
    probes = chosen or [candidates[-1]]
    s = scores[[row[p] for p in probes]]
    a = agree[[row[p] for p in probes]]
    executed, checks, ok = simulate(s, a, probes, best_t, num_layers)
    hist = torch.bincount(executed, minlength=num_layers + 1)
    return ExitPolicy(threshold=best_t, probes=tuple(probes), agreement=float(ok.float().mean()),
                      agreement_lower=wilson_lower(int(ok.sum()), n, confidence), n=n,
                      mean_layers=float(executed.float().mean()), mean_checks=float(checks.float().mean()),
                      exit_histogram={int(i): int(c) for i, c in enumerate(hist.tolist()) if c})


# --- FLOPs ---------------------------------------------------------------------------------
def scoring_flops(block_flops_per_token: float, head_flops_per_token: float, tokens: int, executed_blocks: int,
                  checks: int, checked_positions: int) -> float:
    """FLOPs of one scored sequence: ``executed_blocks`` blocks over all ``tokens``, the output head over all
    tokens (what the caller receives), and each check = final norm + head on the checked positions
    (the norm's few FLOPs are counted with the head). Attention's length-dependent part is in
    ``block_flops_per_token`` at the caller's sequence length."""
    return (executed_blocks * block_flops_per_token * tokens + head_flops_per_token * tokens
            + checks * head_flops_per_token * checked_positions)


def speculative_speedup(acceptance: float, k: int, exit_layer: int, num_layers: int, draft_head: float,
                        full_head: float, verify_overhead: float = 0.1) -> tuple[float, float]:
    """Expected (tokens per cycle, speedup) of greedy self-speculative decoding, costs in decoder-layer units.

    A cycle drafts ``k`` tokens with the first ``exit_layer`` blocks + a draft head of cost ``draft_head``,
    runs the last draft through the early blocks too (k + 1 early passes, so the verifier can start at
    ``exit_layer``), then verifies the k + 1 positions through the remaining blocks and the full head
    (``full_head``) in one forward; processing k + 1 positions at once is taken to cost
    ``1 + verify_overhead * k`` times one (decode at small batch reads weights, so extra positions are
    cheap). ``acceptance``: per-token probability that the draft equals the full model's greedy token
    (independent tokens assumed)."""
    tokens = 1 + sum(acceptance ** i for i in range(1, k + 1))
    draft = (k + 1) * exit_layer + k * draft_head
    verify = (num_layers - exit_layer + full_head) * (1 + verify_overhead * k)
    return tokens, tokens * (num_layers + full_head) / (draft + verify)
