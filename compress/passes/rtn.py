"""Round-to-nearest weight quantization: the baseline every calibrated method must beat.

Recipe snippet::

    passes:
      - rtn: {bits: 4, group_size: 128, symmetric: true}

With a `calibration:` section the report also gives each layer's relative output error on it.
"""
from __future__ import annotations

from typing import ClassVar

from torch import nn

from compress.algos.quant import default_g_idx, rtn_quantize
from compress.context import PassContext, PassReport
from compress.passes.common import timed_report
from compress.passes.quantize import QuantConfig, apply_quantization, preflight_group_size


class RTNConfig(QuantConfig):
    pass


class RTN:
    name: ClassVar[str] = "rtn"
    kind: ClassVar[str] = "quantize"
    config_class: ClassVar[type[RTNConfig]] = RTNConfig
    needs_calibration: ClassVar[bool] = False

    def __init__(self, config: RTNConfig | None = None):
        self.config = config or RTNConfig()

    def preflight(self, model: nn.Module, adapter, save_format: str) -> list[str]:
        return preflight_group_size(model, adapter, self.config, save_format)

    def apply(self, model: nn.Module, ctx: PassContext) -> PassReport:
        cfg = self.config

        def quantize(W, H):
            codes, scales, zeros = rtn_quantize(W, cfg.bits, cfg.group_size, cfg.symmetric)
            W_hat = None  # the handler measures the error of the QuantizedLinear it builds
            return codes, scales, zeros, default_g_idx(W.shape[1], cfg.group_size, W.device), W_hat, {}

        return timed_report(self.name, cfg, lambda r: apply_quantization(model, ctx, cfg, quantize, False, r))
