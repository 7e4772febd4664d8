"""GPTQ weight quantization through the layer-by-layer runner (true-sequential, act-order, groups).

Recipe snippet::

    passes:
      - gptq: {bits: 4, group_size: 128, symmetric: true, act_order: true, dampening: 0.01}

Python::

    from compress.passes.gptq import GPTQ, GPTQConfig
    report = GPTQ(GPTQConfig(bits=4, group_size=128)).apply(model, ctx)
"""
from __future__ import annotations

import time
from typing import ClassVar

from pydantic import Field
from torch import nn

from compress.algos.gptq import gptq_quantize
from compress.context import PassContext, PassReport
from compress.passes.common import timed_report
from compress.passes.quantize import QuantConfig, apply_quantization, preflight_group_size


class GPTQConfig(QuantConfig):
    act_order: bool = Field(True, description="quantize columns by decreasing Hessian diagonal")
    static_groups: bool = Field(True, description="with act_order: group grids fixed in original column order, the layout "
                                "fast kernels read (compressed-tensors `actorder: weight`); false: groups follow the act "
                                "order with per-column g_idx (GPTQ desc_act, save.format gptq only)")
    dampening: float = Field(0.01, gt=0, lt=1, description="fraction of mean(diag H) added to the diagonal")
    block_size: int = Field(128, gt=0, description="columns per lazy-update block")


class GPTQ:
    name: ClassVar[str] = "gptq"
    kind: ClassVar[str] = "quantize"
    config_class: ClassVar[type[GPTQConfig]] = GPTQConfig
    needs_calibration: ClassVar[bool] = True

    def __init__(self, config: GPTQConfig | None = None):
        self.config = config or GPTQConfig()

    def preflight(self, model: nn.Module, adapter, save_format: str) -> list[str]:
        return preflight_group_size(model, adapter, self.config, save_format)

    def apply(self, model: nn.Module, ctx: PassContext) -> PassReport:
        cfg = self.config

        def quantize(W, H):
            t0 = time.perf_counter()
            res = gptq_quantize(W, H, cfg.bits, cfg.group_size, cfg.symmetric, cfg.act_order,
                                cfg.static_groups, cfg.dampening, cfg.block_size)
            return res.codes, res.scales, res.zeros, res.g_idx, res.weight, {
                "gptq_loss": res.loss, "seconds": round(time.perf_counter() - t0, 4)}

        return timed_report(self.name, cfg, lambda r: apply_quantization(
            model, ctx, cfg, quantize, True, r, act_order=cfg.act_order and not cfg.static_groups))
