"""Shared config and driver of the weight-pruning passes (``magnitude``, ``wanda``, ``sparsegpt``).

Each selected ``nn.Linear`` inside the decoder blocks keeps its shape; pruned weights become exact
zeros (a dense-with-zeros checkpoint). The per-layer sparsity is one number for all layers, or
``plan``: the per-module ratios an allocation pass (``alpha_allocation``) wrote to the context.
Layers matching ``ignore`` are left alone and listed in the report; linear layers outside the
decoder blocks (``lm_head``) are never pruned and must stay in ``ignore``.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from compress.adapters import get_submodule, set_submodule
from compress.algos.sparsity import check_nm, parse_mask
from compress.context import PassContext, PassReport
from compress.errors import ConfigError
from compress.passes.base import PassConfig
from compress.passes.common import select_linear, count_zeros, linear_names_outside_blocks, matches, mean_of, run_calibrated

log = logging.getLogger(__name__)


class PruneConfig(PassConfig):
    sparsity: float | Literal["plan"] | None = Field(
        None, description="fraction of each layer's weights set to zero, in [0, 1); 'plan' takes each layer's "
        "ratio from an earlier allocation pass; may be omitted with an N:M mask (fixed at 1 - N/M)")
    mask: str = Field("unstructured", description='unstructured, or "N:M": N weights kept of every M consecutive inputs ("2:4", "4:8")')
    ignore: list[str] = Field(["lm_head"], description="modules left dense: names, suffixes, globs or re:REGEX")

    @field_validator("sparsity")
    @classmethod
    def _sparsity(cls, v: float | str | None) -> float | str | None:
        if isinstance(v, float) and not 0.0 <= v < 1.0:
            raise ValueError("must be in [0, 1) or 'plan'")
        return v

    @field_validator("mask")
    @classmethod
    def _mask(cls, v: str) -> str:
        try:
            parse_mask(v)
        except ConfigError as e:
            raise ValueError(str(e)) from None
        return v

    @model_validator(mode="after")
    def _sparsity_and_mask(self) -> "PruneConfig":
        nm = self.nm
        if nm is None and self.sparsity is None:
            raise ValueError("sparsity is required with mask: unstructured (a number in [0, 1) or 'plan')")
        if nm is not None and self.sparsity == "plan":
            raise ValueError(f"sparsity: plan cannot be combined with mask {self.mask!r}, which fixes every layer at {1 - nm[0] / nm[1]:g}")
        if nm is not None and isinstance(self.sparsity, float) and abs(self.sparsity - (1 - nm[0] / nm[1])) > 1e-9:
            raise ValueError(f"sparsity {self.sparsity} contradicts mask {self.mask!r} (sparsity {1 - nm[0] / nm[1]:g}); drop sparsity")
        return self

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_mask(self.mask)[1]


#: (name, W float32 [out, in], observer or None, sparsity or None for N:M) -> (W_pruned, keep-mask, extra stats)
PruneFn = Callable[[str, torch.Tensor, Any, "float | None"], tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]


class PruneHandler:
    """Sequential-runner handler: choose the modules, look up their sparsity, prune, record stats."""

    def __init__(self, config: PruneConfig, ctx: PassContext, prune: PruneFn,
                 make_observer: Callable[[nn.Linear], Any] | None = None):
        self.config = config
        self.ctx = ctx
        self.prune = prune
        self.make_observer = make_observer
        self.ignored: list[str] = []

    def selected(self, name: str, module: nn.Module) -> bool:
        if not select_linear(name, module, self.config.ignore, self.ignored):
            return False
        nm = self.config.nm
        if nm is not None:
            try:
                check_nm(nm[0], nm[1], module.in_features)
            except ConfigError as e:
                raise ConfigError(f"{name}: {e}; add it to `ignore` or choose another mask") from None
        return True

    def sparsity_for(self, name: str) -> float | None:
        s = self.config.sparsity
        if s != "plan":
            return s  # a number, or None for N:M (fixed by the pattern)
        plan = self.ctx.sparsity_plan
        if plan is None:
            raise ConfigError("sparsity: plan, but no sparsity plan exists; put an allocation pass "
                              "(e.g. alpha_allocation) before this pass")
        if name not in plan:
            raise ConfigError(f"sparsity: plan has no entry for {name}; the allocation pass ignored it, "
                              "so add it to this pass's `ignore` too")
        return float(plan[name])

    def observer(self, name: str, module: nn.Module) -> Any:
        if not self.selected(name, module):
            return None
        return self.make_observer(module) if self.make_observer is not None else True

    def compress(self, name: str, module: nn.Linear, obs: Any, replace: Callable[[nn.Module], None]) -> dict[str, Any]:
        W = module.weight.data.to(torch.float32, copy=True)  # a copy: the module is written below
        target = self.sparsity_for(name)
        W_new, keep, extra = self.prune(name, W, obs, target)
        module.weight.data.copy_(W_new.to(module.weight.dtype))
        nm = self.config.nm
        return {
            "shape": list(W.shape),
            "target_sparsity": target if nm is None else 1 - nm[0] / nm[1],
            "pruned": int((~keep).sum()),
            "zeros": count_zeros(module.weight.data),
            "sparsity": count_zeros(module.weight.data) / W.numel(),
            "rel_weight_error": float((W - W_new).norm() / W.norm()) if W.norm() > 0 else 0.0,
            **extra,
        }


def _selected_names(model: nn.Module, ctx: PassContext, config: PruneConfig) -> list[str]:
    names = []
    for i in range(ctx.adapter.num_blocks(model)):
        for n in ctx.adapter.linear_names():
            full = f"{ctx.adapter.block_prefix(i)}.{n}"
            if not matches(full, config.ignore):
                names.append(full)
    return names


def apply_pruning(model: nn.Module, ctx: PassContext, config: PruneConfig, report: PassReport, prune: PruneFn,
                  make_observer: Callable[[nn.Linear], Any] | None, calibrated: bool) -> None:
    """Check the config against the model, then prune (through the sequential runner if calibrated)."""
    blocks_path = ctx.adapter.blocks_path
    outside = [n for n in linear_names_outside_blocks(model, blocks_path) if not matches(n, config.ignore)]
    if outside:
        raise ConfigError(f"ignore: {', '.join(outside)} lie outside the decoder blocks and cannot be pruned; "
                          "keep them in `ignore` (default: [lm_head])")
    handler = PruneHandler(config, ctx, prune, make_observer)
    selected = _selected_names(model, ctx, config)
    if config.sparsity == "plan":
        for name in selected:  # fail before any calibration work
            handler.sparsity_for(name)
        skipped = sorted(set(ctx.sparsity_plan or {}) - set(selected))
        if skipped:
            report.warnings.append(f"{len(skipped)} modules of the sparsity plan are in `ignore` and stay dense, "
                                   f"so the achieved sparsity misses the plan's target: {', '.join(skipped)}")
    if calibrated:
        report.modules = run_calibrated(model, ctx, handler, desc=report.name)
    else:
        report.modules = _walk_blocks(model, ctx, handler)
    report.ignored = sorted(set(handler.ignored) | set(linear_names_outside_blocks(model, blocks_path)))
    total = sum(m["shape"][0] * m["shape"][1] for m in report.modules.values())
    report.summary = {
        "pruned_modules": len(report.modules),
        "mask": config.mask,
        "sparsity": config.sparsity,
        "achieved_sparsity": sum(m["zeros"] for m in report.modules.values()) / total if total else None,
        "mean_rel_weight_error": mean_of(report.modules, "rel_weight_error"),
        "mean_rel_output_error": mean_of(report.modules, "rel_output_error"),
    }
    if ctx.plan_info and config.sparsity == "plan":
        report.summary["plan"] = {k: ctx.plan_info[k] for k in ("source", "target_sparsity") if k in ctx.plan_info}


def _walk_blocks(model: nn.Module, ctx: PassContext, handler: PruneHandler) -> dict[str, dict[str, Any]]:
    """Data-free pruning: every selected linear of every block, in place."""
    from compress.sequential import iter_blocks

    stats = {}
    for i, block in iter_blocks(model, ctx.adapter, ctx.block_source):
        for n in ctx.adapter.linear_names():
            full = f"{ctx.adapter.block_prefix(i)}.{n}"
            mod = get_submodule(block, n)
            obs = handler.observer(full, mod)
            if obs is not None:
                stats[full] = handler.compress(full, mod, obs, lambda new, b=block, n=n: set_submodule(b, n, new))
    return stats
