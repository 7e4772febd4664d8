"""Shared config and driver of the weight-quantization passes (``rtn`` and ``gptq``).

Both replace each selected ``nn.Linear`` inside the decoder blocks with a ``QuantizedLinear`` holding
real integer codes. Layers matching ``ignore`` are left in float and listed in the report. Layers
outside the decoder blocks (``lm_head``) are not quantized and must stay in ``ignore``.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Literal

import torch
from pydantic import Field
from torch import nn

from compress.algos.metrics import relative_output_error
from compress.context import PassContext, PassReport
from compress.errors import ConfigError
from compress.nn.qlinear import QuantizedLinear
from compress.observers import HessianObserver
from compress.passes.base import PassConfig
from compress.passes.common import select_linear, linear_names_outside_blocks, matches, mean_of, run_calibrated

log = logging.getLogger(__name__)


class QuantConfig(PassConfig):
    bits: Literal[2, 3, 4, 8] = Field(4, description="bits per weight")
    group_size: Literal[-1, 32, 64, 128] = Field(128, description="input columns per scale; -1 = one scale per output channel")
    symmetric: bool = Field(True, description="symmetric grid (zero point fixed at 2^(bits-1)) or asymmetric")
    ignore: list[str] = Field(["lm_head"], description="modules left in float: names, suffixes, globs or re:REGEX")


# (W float32 [out,in], H or None) -> (codes, scales, zeros, g_idx, dequantized W, extra stats)
QuantizeFn = Callable[[torch.Tensor, torch.Tensor | None], tuple[Any, ...]]


class QuantHandler:
    """Sequential-runner handler: observe Hessians, quantize, swap in QuantizedLinear."""

    def __init__(self, config: QuantConfig, quantize: QuantizeFn, device: torch.device, act_order: bool = False):
        self.config = config
        self.quantize = quantize
        self.device = device
        self.act_order = act_order
        self.ignored: list[str] = []

    def selected(self, name: str, module: nn.Module) -> bool:
        return select_linear(name, module, self.config.ignore, self.ignored)

    def observer(self, name: str, module: nn.Module) -> HessianObserver | None:
        return HessianObserver(module.in_features, self.device) if self.selected(name, module) else None

    def compress(self, name: str, module: nn.Linear, obs: HessianObserver | None, replace) -> dict[str, Any]:
        W = module.weight.data.float()
        H = obs.H if obs is not None and obs.n else None
        codes, scales, zeros, g_idx, W_hat, extra = self.quantize(W, H)
        cfg = self.config
        q = QuantizedLinear.from_codes(
            codes, scales.to(module.weight.dtype), zeros, g_idx, cfg.bits, cfg.group_size, cfg.symmetric,
            bias=None if module.bias is None else module.bias.data, act_order=self.act_order)
        replace(q)
        stats: dict[str, Any] = {"shape": list(W.shape), **extra}
        # error of what the model actually computes (scales cast to the model dtype)
        W_q = q.dequantize()
        stats["rel_weight_error"] = float((W - W_q).norm() / W.norm()) if W.norm() > 0 else 0.0
        if H is not None:
            stats["rel_output_error"] = relative_output_error(W, W_q, H)
        return stats


def preflight_group_size(model: nn.Module, adapter, config: QuantConfig, save_format: str) -> list[str]:
    """Check before any work that the group size suits the layers and the checkpoint format.

    A group size that does not divide a layer's width leaves a narrower last group (GPTQ reference
    behaviour). compressed-tensors loaders (transformers, vLLM) refuse that, so it is an error there;
    for other formats it is a warning.
    """
    gs = config.group_size
    if gs == -1:
        return []
    bad = []
    for i, block in enumerate(adapter.blocks(model)):
        for n, m in adapter.block_linears(block).items():
            full = f"{adapter.block_prefix(i)}.{n}"
            if isinstance(m, nn.Linear) and m.in_features % gs and not matches(full, config.ignore):
                bad.append(f"{full} ({m.in_features})")
    if not bad:
        return []
    msg = (f"group_size {gs} does not divide the input width of {len(bad)} layers, e.g. {bad[0]}; their last group "
           f"is narrower")
    if save_format == "compressed-tensors":
        raise ConfigError(f"{msg}, which compressed-tensors loaders (transformers, vLLM) refuse. Use a group_size that "
                          f"divides every width (e.g. 64 or -1), or save.format: gptq / none")
    return [f"{msg}; vLLM and most GPTQ kernels refuse such layers (compress.formats.load_quantized reads them)"]


def apply_quantization(model: nn.Module, ctx: PassContext, config: QuantConfig, quantize: QuantizeFn,
                       needs_hessian: bool, report: PassReport, act_order: bool = False) -> None:
    outside = [n for n in linear_names_outside_blocks(model, ctx.adapter.blocks_path) if not matches(n, config.ignore)]
    if outside:
        raise ConfigError(f"ignore: {', '.join(outside)} lie outside the decoder blocks and cannot be quantized "
                          "yet; keep them in `ignore` (default: [lm_head])")
    handler = QuantHandler(config, quantize, ctx.device, act_order)
    if needs_hessian or ctx.has_calibration:
        report.modules = run_calibrated(model, ctx, handler, desc=report.name)
    else:
        report.modules = _apply_without_data(model, ctx, handler)
    report.ignored = sorted(set(handler.ignored) | set(linear_names_outside_blocks(model, ctx.adapter.blocks_path)))
    report.summary = {
        "quantized_modules": len(report.modules),
        "mean_rel_output_error": mean_of(report.modules, "rel_output_error"),
        "max_rel_output_error": max((m.get("rel_output_error") or 0.0 for m in report.modules.values()), default=None),
        "mean_rel_weight_error": mean_of(report.modules, "rel_weight_error"),
    }


def _apply_without_data(model: nn.Module, ctx: PassContext, handler: QuantHandler) -> dict[str, dict[str, Any]]:
    from compress.adapters import get_submodule, set_submodule
    from compress.sequential import iter_blocks

    stats = {}
    for i, block in iter_blocks(model, ctx.adapter, ctx.block_source):
        for n in ctx.adapter.linear_names():
            full = f"{ctx.adapter.block_prefix(i)}.{n}"
            mod = get_submodule(block, n)
            if handler.selected(full, mod):
                stats[full] = handler.compress(full, mod, None, lambda new, b=block, n=n: set_submodule(b, n, new))
    return stats
