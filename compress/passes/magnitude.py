"""Magnitude pruning: zero the smallest |W| of each layer (compared over the whole matrix).

The data-free baseline of the Wanda paper (Sun et al., ICLR 2024, §4; Han et al., NeurIPS 2015).
With an N:M mask the N largest of every M consecutive input weights of a row are kept.

Recipe snippet::

    passes:
      - magnitude: {sparsity: 0.5}                 # or mask: "2:4", or sparsity: plan
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from compress.algos.sparsity import magnitude_scores, mask_for
from compress.context import PassContext, PassReport
from compress.passes.common import timed_report
from compress.passes.pruning import PruneConfig, apply_pruning


class MagnitudeConfig(PruneConfig):
    pass


class Magnitude:
    name: ClassVar[str] = "magnitude"
    kind: ClassVar[str] = "prune"
    config_class: ClassVar[type[MagnitudeConfig]] = MagnitudeConfig
    needs_calibration: ClassVar[bool] = False

    def __init__(self, config: MagnitudeConfig):
        self.config = config

    def apply(self, model: nn.Module, ctx: PassContext) -> PassReport:
        cfg = self.config

        def prune(name: str, W: torch.Tensor, _obs: Any, sparsity: float | None):
            keep = mask_for(magnitude_scores(W), sparsity, cfg.mask, per_row=False)
            return W * keep, keep, {}

        return timed_report(self.name, cfg, lambda r: apply_pruning(model, ctx, cfg, r, prune, None, calibrated=False))
