"""``early_exit``: calibrate an AdaInfer exit policy (lossy mode) and a self-speculative draft (exact mode)
on the model as it is at this point of the recipe. Weights are not changed.

Recipe snippet::

    passes:
      - gptq: {bits: 4, group_size: 64}
      - early_exit: {dataset: ../shared/assets/data/text/dolly_hhrlhf_train_small.jsonl, nsamples: 256, seqlen: 512,
                     features: [gap, top_prob], classifier: svm, layers: all, target_agreement: 0.99}
    eval:
      tasks: {names: [piqa, arc_easy, boolq], early_exit: true}

Calibration windows run block by block (the sequential runner's capture + ``run_block``); at
``positions_per_sample`` random positions of each window every candidate layer's output goes through the
final norm + head, giving the features and the label "this layer's top-1 == the full model's top-1".
Windows are split in half: the classifier (scikit-learn, standardised features, exported as one weight
vector) is fitted on the first half; probes and the threshold are chosen on the second so that the
one-sided Wilson lower bound of the agreement is at least ``target_agreement``. The exact mode's exit
layer E and draft length k maximise the expected speedup from the held-out per-layer agreement of the
(vocabulary-restricted) draft head. The artifact (``early_exit.json`` + ``early_exit/classifier.safetensors``) is
written beside the checkpoint, stamped with the weights' hash.
"""
from __future__ import annotations

import hashlib
import logging
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from compress.adapters import Adapter
from compress.algos import early_exit as A
from compress.context import PassContext, PassReport
from compress.errors import ConfigError
from compress.passes.base import PassConfig
from compress.passes.common import timed_report
from compress.runtime.early_exit import EarlyExit, exit_modules, flops_per_token
from compress.sequential import capture_block_inputs, run_block

log = logging.getLogger(__name__)


class EarlyExitConfig(PassConfig):
    dataset: str | None = Field(None, description="calibration text (.txt/.jsonl or a datasets name); default: "
                                "the recipe's calibration section")
    nsamples: int = Field(64, gt=1, description="calibration windows (half fit the classifier, half choose the threshold)")
    seqlen: int = Field(256, gt=1, description="tokens per window")
    positions_per_sample: int = Field(64, gt=0, description="random positions per window where every layer is read "
                                      "out (the head costs ~8 blocks per position on SmolLM2)")
    features: list[str] = Field(["gap", "top_prob"], min_length=1, description=f"classifier inputs, from {', '.join(A.FEATURES)}")
    classifier: Literal["svm", "logistic"] = Field("svm", description="scikit-learn LinearSVC or LogisticRegression")
    layers: Literal["all"] | list[int] = Field("all", description="candidate probe layers (0-based block indices "
                                               "whose outputs may be checked); all: every block but the last")
    target_agreement: float = Field(0.99, description="held-out agreement with the full model's top-1, as a "
                                    "one-sided lower confidence bound, in (0, 1]")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="confidence of the Wilson lower bound")
    max_probes: int = Field(4, gt=0, description="at most this many layers are checked per request")
    check_cost: float = Field(0.25, ge=0, description="cost of one check in decoder-block units when choosing probes "
                              "(scoring: head FLOPs x scored positions / block FLOPs x tokens); reports count real FLOPs")
    max_draft: int = Field(6, gt=0, description="exact mode: largest k (draft tokens per cycle) considered")
    draft_vocab: int | None = Field(8192, gt=0, description="exact mode: the draft head scores only the N most frequent "
                                    "calibration tokens (null: the whole vocabulary); outputs stay exact")

    @field_validator("features")
    @classmethod
    def _features(cls, v: list[str]) -> list[str]:
        bad = [f for f in v if f not in A.FEATURES]
        if bad:
            raise ValueError(f"unknown feature(s) {bad} (known: {', '.join(A.FEATURES)})")
        if len(set(v)) != len(v):
            raise ValueError("a feature is listed twice")
        return v

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v or any(i < 0 for i in v) or len(set(v)) != len(v):
                raise ValueError("a non-empty list of distinct block indices >= 0, or 'all'")
            return sorted(v)
        return v

    @field_validator("target_agreement")
    @classmethod
    def _target(cls, v: float) -> float:
        if not 0 < v <= 1:
            raise ValueError(f"must be in (0, 1] (got {v})")
        return v

    @property
    def needs_calibration(self) -> bool:
        return self.dataset is None


class EarlyExitPass:
    name: ClassVar[str] = "early_exit"
    kind: ClassVar[str] = "runtime"
    config_class: ClassVar[type[EarlyExitConfig]] = EarlyExitConfig

    def __init__(self, config: EarlyExitConfig):
        self.config = config

    def preflight(self, model: nn.Module, adapter: Adapter, save_format: str) -> list[str]:
        """Checks that need the model's shape, before any model work."""
        exit_modules(model, adapter)
        n = adapter.num_blocks(model)
        if isinstance(self.config.layers, list) and max(self.config.layers) >= n - 1:
            raise ConfigError(f"early_exit.layers: {max(self.config.layers)} is not a probe layer of this {n}-block "
                              f"model (0..{n - 2}; the last block is the full model)")
        if save_format == "none":
            return ["early_exit: save.format none writes no checkpoint, so no early-exit artifact is saved"]
        return []

    def apply(self, model: nn.Module, ctx: PassContext) -> PassReport:
        return timed_report(self.name, self.config, lambda r: self._run(model, ctx, r))

    def _run(self, model: nn.Module, ctx: PassContext, report: PassReport) -> None:
        self.preflight(model, ctx.adapter, "")
        ee, summary = calibrate(model, ctx.adapter, _windows(self.config, ctx), self.config, ctx.device, ctx.seed)
        ctx.artifacts["early_exit"] = ee
        report.summary.update(summary)


def _windows(cfg: EarlyExitConfig, ctx: PassContext) -> torch.Tensor:
    if cfg.dataset is None:
        return ctx.calibration.input_ids
    from compress.calibration import build_calibration

    return build_calibration(ctx.tokenizer, cfg.dataset, cfg.nsamples, cfg.seqlen, ctx.seed,
                             eval_texts=ctx.eval_texts).input_ids


@torch.no_grad()
def layer_readouts(model: nn.Module, adapter: Adapter, windows: torch.Tensor, positions: torch.Tensor,
                   features: list[str], device: torch.device, draft_vocab: torch.Tensor | None):
    """Features and top-1 of every block's output at ``positions`` [W, P] of each window.

    Returns (feats [L, W*P, F], top1 [L, W*P], draft_top1 [L, W*P]); row L-1 is the full model."""
    norm, head = exit_modules(model, adapter)
    inputs, kwargs = capture_block_inputs(model, adapter, windows, device)
    blocks = adapter.blocks(model)
    feats, top1, dtop1 = [], [], []
    rows = torch.arange(windows.shape[0]).unsqueeze(1).expand_as(positions)
    from tqdm.auto import tqdm

    for block in tqdm(blocks, desc="early_exit: read out layers", leave=False):
        inputs = run_block(block, inputs, kwargs)
        h = torch.stack([x[0] for x in inputs])[rows.flatten(), positions.flatten()]
        logits = head(norm(h.to(device)))
        f, t = A.features_from_logits(logits, features)
        feats.append(f.cpu())
        top1.append(t.cpu())
        if draft_vocab is not None:
            dtop1.append(draft_vocab[logits[:, draft_vocab.to(logits.device)].argmax(-1).cpu()])
        else:
            dtop1.append(t.cpu())
    return torch.stack(feats), torch.stack(top1), torch.stack(dtop1)


def fit_classifier(x: torch.Tensor, y: torch.Tensor, kind: str, seed: int) -> tuple[torch.Tensor, float]:
    """scikit-learn linear classifier on standardised features, exported as (weight, bias) on raw features."""
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler
        from sklearn.svm import LinearSVC
    except ImportError:
        raise ConfigError("early_exit needs scikit-learn: pip install 'compress[early-exit]'") from None
    xn, yn = x.double().numpy(), y.numpy()
    if len(set(yn.tolist())) < 2:
        raise ConfigError("early_exit: every calibration position has the same label (all layers agree or none "
                          "does); use more or other calibration data")
    scaler = StandardScaler().fit(xn)
    clf = (LinearSVC(C=1.0, random_state=seed) if kind == "svm"
           else LogisticRegression(max_iter=1000, random_state=seed)).fit(scaler.transform(xn), yn)
    w = clf.coef_[0] / scaler.scale_
    b = float(clf.intercept_[0] - (clf.coef_[0] * scaler.mean_ / scaler.scale_).sum())
    return torch.tensor(w, dtype=torch.float32), b


def calibrate(model: nn.Module, adapter: Adapter, windows: torch.Tensor, cfg: EarlyExitConfig,
              device: torch.device, seed: int = 0) -> tuple[EarlyExit, dict[str, Any]]:
    """Fit and choose everything; returns the EarlyExit object and the report summary."""
    n_layers = adapter.num_blocks(model)
    W, T = windows.shape
    if W < 2:
        raise ConfigError("early_exit.nsamples: at least 2 windows (one half fits, the other chooses)")
    gen = torch.Generator().manual_seed(seed)
    P = min(cfg.positions_per_sample, T)
    positions = torch.stack([torch.randperm(T, generator=gen)[:P] for _ in range(W)])
    vocab = None
    if cfg.draft_vocab is not None and cfg.draft_vocab < model.config.vocab_size:
        counts = torch.bincount(windows.flatten(), minlength=model.config.vocab_size)
        vocab = counts.topk(cfg.draft_vocab).indices.sort().values
    feats, top1, dtop1 = layer_readouts(model, adapter, windows, positions, cfg.features, device, vocab)
    agree = A.agreement_labels(top1, top1[-1:])  # [L, W*P]
    dagree = A.agreement_labels(dtop1, top1[-1:])
    cands = list(range(n_layers - 1)) if cfg.layers == "all" else list(cfg.layers)
    half = (W // 2) * P  # first half of the windows fits, second half chooses (no window in both)
    x = feats[cands, :half].reshape(-1, feats.shape[-1])
    y = agree[cands, :half].reshape(-1)
    if x.shape[0] > 200_000:  # a linear model on 2-3 features needs no more
        keep = torch.randperm(x.shape[0], generator=gen)[:200_000]
        x, y = x[keep], y[keep]
    weight, bias = fit_classifier(x, y, cfg.classifier, seed)
    held_scores = torch.stack([A.linear_score(feats[c, half:], weight, torch.tensor(bias)) for c in cands])
    policy = A.choose_policy(held_scores, agree[cands, half:], cands, n_layers, cfg.target_agreement,
                             cfg.confidence, cfg.check_cost, cfg.max_probes)
    block_f, head_f = flops_per_token(model, adapter, T)
    exact = choose_draft(dagree[:, half:], n_layers, cfg.max_draft, head_f / block_f,
                         (len(vocab) if vocab is not None else model.config.vocab_size) / model.config.vocab_size)
    calib = {"sha256": hashlib.sha256(windows.numpy().tobytes()).hexdigest(), "windows": W, "seqlen": T,
             "positions_per_window": P, "held_out_positions": policy.n, "agreement": policy.agreement,
             "agreement_lower": policy.agreement_lower, "confidence": cfg.confidence,
             "mean_layers": policy.mean_layers, "layers_saved": 1 - policy.mean_layers / n_layers,
             "mean_checks": policy.mean_checks, "exit_histogram": policy.exit_histogram,
             "layer_agreement": [float(a) for a in agree[:, half:].float().mean(1)]}
    if vocab is not None:
        calib["draft_vocab_coverage"] = float(torch.isin(top1[-1, half:], vocab).float().mean())
    ee = EarlyExit(features=list(cfg.features), classifier=cfg.classifier, probes=list(policy.probes),
                   threshold=float(policy.threshold), weight=weight, bias=bias, num_layers=n_layers,
                   hidden_size=model.config.hidden_size, vocab_size=model.config.vocab_size,
                   target_agreement=cfg.target_agreement, calibration=calib, exact=exact, draft_vocab=vocab)
    summary = {"probes": list(policy.probes), "threshold": policy.threshold, "held_out_agreement": policy.agreement,
               "agreement_lower_bound": policy.agreement_lower, "mean_layers": policy.mean_layers,
               "layers_saved": calib["layers_saved"], "exact": exact}
    log.info("early_exit: probes %s, threshold %.4g: held-out agreement %.4f (>= %.4f at %.0f%%), %.2f of %d layers",
             policy.probes, policy.threshold, policy.agreement, policy.agreement_lower, 100 * cfg.confidence,
             policy.mean_layers, n_layers)
    return ee, summary


def choose_draft(dagree: torch.Tensor, n_layers: int, max_draft: int, head_cost: float,
                 vocab_fraction: float) -> dict[str, Any]:
    """Exit layer E and k maximising the expected speedup (``algos.early_exit.speculative_speedup``) from the
    held-out agreement of the draft head at each layer. ``head_cost``: head / block FLOPs per token."""
    best: dict[str, Any] = {"expected_speedup": 0.0}
    for e in range(1, n_layers):
        a = float(dagree[e - 1].float().mean())
        for k in range(1, max_draft + 1):
            tokens, sp = A.speculative_speedup(a, k, e, n_layers, head_cost * vocab_fraction, head_cost)
            if sp > best["expected_speedup"]:
                best = {"exit_layer": e, "k": k, "acceptance_estimate": a, "tokens_per_cycle_estimate": tokens,
                        "expected_speedup": sp}
    best["head_cost_blocks"] = head_cost
    return best
