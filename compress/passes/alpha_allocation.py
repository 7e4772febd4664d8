"""AlphaPruning allocation: per-layer sparsity from the heavy-tail exponent of each weight's ESD.

Lu et al., "AlphaPruning", NeurIPS 2024 (arXiv:2410.10912). For every linear layer of every decoder
block: α = PL_Alpha_Hill of the eigenvalues of WᵀW (``compress.algos.esd``); α averaged per block
(the reference's default ``block_wise`` mapping); linear map to [1-ε, 1+ε] and scale so the
parameter-weighted mean sparsity is ``target_sparsity`` (``compress.algos.allocation``). Layers with
heavier tails (smaller α) get less sparsity. Writes ``ctx.sparsity_plan`` ({module name: ratio}),
which a later pruning pass reads with ``sparsity: plan``. Needs no calibration data.

Recipe snippet::

    passes:
      - alpha_allocation: {target_sparsity: 0.7, epsilon: 0.3}
      - wanda: {sparsity: plan}
"""
from __future__ import annotations

import logging
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from compress.adapters import get_submodule
from compress.algos.allocation import alpha_to_sparsity, blockwise_mean
from compress.algos.esd import weight_alpha
from compress.context import PassContext, PassReport
from compress.errors import ConfigError
from compress.passes.base import PassConfig
from compress.passes.common import matches, timed_report

log = logging.getLogger(__name__)


class AlphaAllocationConfig(PassConfig):
    target_sparsity: float = Field(ge=0, lt=1, description="parameter-weighted mean sparsity over the allocated layers")
    epsilon: float = Field(0.3, gt=0, lt=1, description="spread: ratios are proportional to [1-ε, 1+ε] (max/min = (1+ε)/(1-ε))")
    xmin_strategy: Literal["peak", "ks", "mid"] = Field(
        "peak", description="how the power-law xmin is chosen: peak (AlphaPruning default), ks (all candidates), mid (median)")
    mapping: Literal["block_wise", "layer_wise"] = Field(
        "block_wise", description="block_wise: average α over each decoder block (AlphaPruning default); layer_wise: per layer")
    max_sparsity: float = Field(0.99, gt=0, le=1, description="no layer is pruned beyond this; the others absorb the rest")
    ignore: list[str] = Field(["lm_head"], description="modules not allocated (and so not prunable with sparsity: plan)")

    @model_validator(mode="after")
    def _target_below_cap(self) -> "AlphaAllocationConfig":
        if self.target_sparsity > self.max_sparsity:
            raise ValueError(f"target_sparsity {self.target_sparsity} exceeds max_sparsity {self.max_sparsity}")
        return self


class AlphaAllocation:
    name: ClassVar[str] = "alpha_allocation"
    kind: ClassVar[str] = "allocate"
    config_class: ClassVar[type[AlphaAllocationConfig]] = AlphaAllocationConfig
    needs_calibration: ClassVar[bool] = False

    def __init__(self, config: AlphaAllocationConfig):
        self.config = config

    def apply(self, model: nn.Module, ctx: PassContext) -> PassReport:
        return timed_report(self.name, self.config, lambda r: self._allocate(model, ctx, r))

    @torch.no_grad()
    def _allocate(self, model: nn.Module, ctx: PassContext, report: PassReport) -> None:
        cfg = self.config
        names: list[str] = []
        block_ids: list[int] = []
        counts: list[int] = []
        fits = []
        for i, block in enumerate(ctx.adapter.blocks(model)):
            for n in ctx.adapter.linear_names():
                full = f"{ctx.adapter.block_prefix(i)}.{n}"
                if matches(full, cfg.ignore):
                    report.ignored.append(full)
                    continue
                mod = get_submodule(block, n)
                if not isinstance(mod, nn.Linear):
                    raise ConfigError(f"{full} is {type(mod).__name__}, not nn.Linear; add it to `ignore`")
                fits.append(weight_alpha(mod.weight.data.to(ctx.device), cfg.xmin_strategy))
                names.append(full)
                block_ids.append(i)
                counts.append(mod.weight.numel())
        if not names:
            raise ConfigError("alpha_allocation: every layer is in `ignore`; nothing to allocate")
        alphas = torch.tensor([f.alpha for f in fits], dtype=torch.float64)
        used = blockwise_mean(alphas, block_ids) if cfg.mapping == "block_wise" else alphas
        alloc = alpha_to_sparsity(used, counts, cfg.target_sparsity, cfg.epsilon, clip=(0.0, cfg.max_sparsity))
        ctx.sparsity_plan = {n: float(r) for n, r in zip(names, alloc.ratios)}
        weighted = alloc.weighted_mean(counts)
        ctx.plan_info = {"source": self.name, "target_sparsity": cfg.target_sparsity, "epsilon": cfg.epsilon,
                         "clipped": alloc.clipped, "weighted_mean": weighted}
        for n, f, a, r in zip(names, fits, used.tolist(), alloc.ratios.tolist()):
            report.modules[n] = {"alpha": f.alpha, "xmin": f.xmin, "ks_distance": f.ks_distance, "n_tail": f.n_tail,
                                 "alpha_used": a, "sparsity": r}
        report.summary = {
            "layers": len(names), "weighted_mean_sparsity": weighted,
            "min_sparsity": float(alloc.ratios.min()), "max_sparsity": float(alloc.ratios.max()),
            "alpha_min": float(alphas.min()), "alpha_max": float(alphas.max()),
            "clipped": alloc.clipped, "n_clipped": alloc.n_clipped,
        }
        if alloc.clipped:
            report.warnings.append(f"{alloc.n_clipped} layers hit max_sparsity {cfg.max_sparsity}; "
                                   "the others were raised to keep the mean at the target")
        log.info("alpha_allocation: %d layers, sparsity %.3f..%.3f (mean %.4f)", len(names),
                 report.summary["min_sparsity"], report.summary["max_sparsity"], weighted)
