"""Wanda: prune by |W_ij| · ||X_j||_2, compared within each output row (no weight update).

Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for Large Language Models",
ICLR 2024 (arXiv:2306.11695). ||X_j||² is summed over all calibration tokens reaching the layer.
Blocks are processed by the sequential runner, true-sequentially: a layer's inputs come from the
already-pruned layers before it (the reference hooks all layers of a block at once; true-sequential
inputs match what the pruned model will see).

Recipe snippet::

    calibration: {nsamples: 128, seqlen: 2048}
    passes:
      - wanda: {sparsity: 0.5, mask: "2:4"}        # or {sparsity: 0.5}, or {sparsity: plan}
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from compress.algos.sparsity import mask_for, wanda_scores
from compress.context import PassContext, PassReport
from compress.errors import CompressError
from compress.passes.common import timed_report
from compress.passes.pruning import PruneConfig, apply_pruning


class WandaConfig(PruneConfig):
    pass


class ActNormObserver:
    """Per input feature j: Σ over calibration tokens of x_j² (float64, so long sums stay exact enough).

    Several processes all-gather their sums and every one computes the same mask (``compress.distributed``)."""

    solve_everywhere = True

    def __init__(self, in_features: int, device: torch.device):
        self.sq = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.n = 0

    def add_batch(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        x = inp.reshape(-1, inp.shape[-1]).float()
        self.sq += x.square().sum(0).to(torch.float64)
        self.n += x.shape[0]

    def state(self) -> list[torch.Tensor]:
        return [self.sq]

    def merge(self, parts: list[list[torch.Tensor]], counts: list[int]) -> None:
        from compress.distributed import merge_sum

        (self.sq,), self.n = merge_sum(parts, counts)


class Wanda:
    name: ClassVar[str] = "wanda"
    kind: ClassVar[str] = "prune"
    config_class: ClassVar[type[WandaConfig]] = WandaConfig
    needs_calibration: ClassVar[bool] = True

    def __init__(self, config: WandaConfig):
        self.config = config

    def apply(self, model: nn.Module, ctx: PassContext) -> PassReport:
        cfg = self.config

        def prune(name: str, W: torch.Tensor, obs: ActNormObserver, sparsity: float | None):
            if obs.n == 0:
                raise CompressError(f"{name} received no calibration tokens")
            keep = mask_for(wanda_scores(W, obs.sq.to(W.device)), sparsity, cfg.mask, per_row=True)
            return W * keep, keep, {}

        def observer(module: nn.Linear) -> ActNormObserver:
            return ActNormObserver(module.in_features, ctx.device)

        return timed_report(self.name, cfg, lambda r: apply_pruning(model, ctx, cfg, r, prune, observer, calibrated=True))
