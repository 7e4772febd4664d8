"""QuantizedLinear: the in-memory form of a weight-quantized linear layer.

It holds real integer codes (not fake-quantized floats), so what is evaluated in memory is exactly
what the checkpoint writers pack. Layout (see ``compress.algos.quant`` for the conventions):

- ``qweight``: uint8 codes, shape [out_features, in_features], values in [0, 2**bits - 1]
- ``scales``: float, shape [out_features, n_groups]
- ``zeros``: uint8 unsigned zero points, shape [out_features, n_groups] (2**(bits-1) when symmetric)
- ``g_idx``: int32, shape [in_features]: group of each input column (act-order permutes it)
- ``bias``: optional float [out_features]

Forward dequantizes to the activation dtype and calls ``F.linear``. Fast kernels (``compress.kernels``)
repack these buffers once and replace ``forward`` through ``set_backend``.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from compress.algos.quant import dequantize_weight, num_groups


class QuantizedLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        symmetric: bool,
        bias: bool = False,
        act_order: bool = False,
        dtype: torch.dtype = torch.float32,
        device=None,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.symmetric = symmetric
        self.act_order = act_order
        n_groups = num_groups(in_features, group_size)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, n_groups, dtype=dtype, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, n_groups, dtype=torch.uint8, device=device))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self._backend = None  # callable(x) -> y installed by a fast kernel, or None for dequantize+matmul

    @classmethod
    def from_codes(
        cls,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        g_idx: torch.Tensor,
        bits: int,
        group_size: int,
        symmetric: bool,
        bias: torch.Tensor | None = None,
        act_order: bool = False,
    ) -> "QuantizedLinear":
        out_f, in_f = qweight.shape
        m = cls(in_f, out_f, bits, group_size, symmetric, bias is not None, act_order,
                dtype=scales.dtype, device=qweight.device)
        m.qweight.copy_(qweight.to(torch.uint8))
        m.scales.copy_(scales)
        m.zeros.copy_(zeros.to(torch.uint8))
        m.g_idx.copy_(g_idx.to(torch.int32))
        if bias is not None:
            m.bias.data.copy_(bias)
        return m

    @property
    def n_groups(self) -> int:
        return self.scales.shape[1]

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [out, in] that this layer computes with."""
        return dequantize_weight(self.qweight, self.scales, self.zeros, self.g_idx)

    def release_codes(self, restore: Callable[[], torch.Tensor]) -> None:
        """Free the uint8 ``qweight`` (1 byte per weight) once a kernel holds a packed copy.

        ``restore()`` must rebuild the codes exactly (e.g. ``W4A16Weight.restore_codes``). Anything
        that still reads ``qweight`` gets them back on first access and keeps them: the dequantize
        forward (``set_backend(None)``), checkpoint writers, ``state_dict()``, re-running
        ``accelerate`` (e.g. after moving the model, which does not move released codes)."""
        # a second release keeps the restore already held: the codes are gone either way
        self._buffers.pop("qweight", None)
        if self.__dict__.get("_restore_codes") is None:
            self._restore_codes = restore

    def __getattr__(self, name: str) -> Any:
        if name == "qweight" and self.__dict__.get("_restore_codes") is not None:
            restore, self._restore_codes = self._restore_codes, None
            self.register_buffer("qweight", restore().to(torch.uint8))
            return self._buffers["qweight"]
        return super().__getattr__(name)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        self.qweight  # restores released codes so that a state dict always holds them
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.qweight  # a released buffer must exist again to be loaded into
        super()._load_from_state_dict(*args, **kwargs)

    def set_backend(self, fn) -> None:
        """Install a fast forward ``fn(x) -> y`` (kernels call this after repacking); None restores the default."""
        self._backend = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._backend is not None:
            return self._backend(x)
        w = self.dequantize().to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}, act_order={self.act_order}")
