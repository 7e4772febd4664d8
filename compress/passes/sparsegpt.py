"""SparseGPT: prune with the blocked OBS update, compensating the error on the remaining weights.

Frantar & Alistarh, ICML 2023 (arXiv:2301.00774); maths in ``compress.algos.sparsegpt``. The
Hessian H = 2XXᵀ/n of each layer comes from the sequential runner (true-sequential inputs).

Recipe snippet::

    calibration: {nsamples: 128, seqlen: 2048}
    passes:
      - alpha_allocation: {target_sparsity: 0.7, epsilon: 0.3}
      - sparsegpt: {sparsity: plan, mask: unstructured}     # or sparsity: 0.5, or mask: "2:4"
"""
from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field, model_validator
from torch import nn

from compress.algos.metrics import relative_output_error
from compress.algos.sparsegpt import sparsegpt_prune
from compress.context import PassContext, PassReport
from compress.errors import CompressError
from compress.observers import HessianObserver
from compress.passes.common import timed_report
from compress.passes.pruning import PruneConfig, apply_pruning


class SparseGPTConfig(PruneConfig):
    block_size: int = Field(128, gt=0, description="columns per mask-selection and lazy-update block")
    dampening: float = Field(0.01, gt=0, lt=1, description="fraction of mean(diag H) added to the diagonal")

    @model_validator(mode="after")
    def _block_fits_groups(self) -> "SparseGPTConfig":
        nm = self.nm
        if nm is not None and self.block_size % nm[1]:
            raise ValueError(f"block_size {self.block_size} must be a multiple of M={nm[1]} (mask {self.mask!r})")
        return self


class SparseGPT:
    name: ClassVar[str] = "sparsegpt"
    kind: ClassVar[str] = "prune"
    config_class: ClassVar[type[SparseGPTConfig]] = SparseGPTConfig
    needs_calibration: ClassVar[bool] = True

    def __init__(self, config: SparseGPTConfig):
        self.config = config

    def apply(self, model: nn.Module, ctx: PassContext) -> PassReport:
        cfg = self.config

        def prune(name: str, W: torch.Tensor, obs: HessianObserver, sparsity: float | None):
            if obs.n == 0:
                raise CompressError(f"{name} received no calibration tokens")
            res = sparsegpt_prune(W, obs.H, sparsity=sparsity, nm=cfg.nm, block_size=cfg.block_size,
                                  percdamp=cfg.dampening)
            extra = {"rel_output_error": relative_output_error(W, res.weight, obs.H),
                     "obs_loss": float(res.loss.sum()), "dead_inputs": int(res.dead.sum())}
            return res.weight, res.mask, extra

        def observer(module: nn.Linear) -> HessianObserver:
            return HessianObserver(module.in_features, ctx.device)

        return timed_report(self.name, cfg, lambda r: apply_pruning(model, ctx, cfg, r, prune, observer, calibrated=True))
