"""GPTQ v1 checkpoint tensors (``quant_method: gptq``, ``checkpoint_format: gptq``).

Per layer ``N``: ``N.qweight`` int32 [in·b/32, out] (codes packed along the input dim),
``N.qzeros`` int32 [G, out·b/32] holding (zero − 1) packed along the output dim (the v1 convention
that AutoGPTQ introduced; loaders add 1 back), ``N.scales`` float16 [G, out], ``N.g_idx`` int32 [in].
Supports 2, 4 and 8 bits (3-bit GPTQ packing is not implemented: use compressed-tensors).
"""
from __future__ import annotations

from typing import Any

import torch

from compress.algos.packing import pack_rows, unpack_rows
from compress.errors import CompressError
from compress.nn.qlinear import QuantizedLinear


def layer_tensors(name: str, m: QuantizedLinear, warnings: list[str]) -> dict[str, torch.Tensor]:
    if m.bits not in (2, 4, 8):
        raise CompressError(f"save.format gptq supports 2, 4 and 8 bits; {name} has {m.bits}. Use compressed-tensors")
    mask = (1 << m.bits) - 1
    z = m.zeros.to(torch.int64)
    if (z == 0).any():
        warnings.append(f"{name}: zero point 0 stored as {mask} in GPTQ v1 (z-1 wraps); loaders that mask to "
                        f"{m.bits} bits recover it, older ones do not")
    t = {
        f"{name}.qweight": pack_rows(m.qweight, m.bits).t().contiguous(),
        f"{name}.qzeros": pack_rows(((z - 1) & mask).t().contiguous(), m.bits),
        f"{name}.scales": m.scales.t().contiguous().to(torch.float16),
        f"{name}.g_idx": m.g_idx.to(torch.int32),
    }
    if m.bias is not None:
        t[f"{name}.bias"] = m.bias.data.to(torch.float16)
    return t


def quantization_config(layers: dict[str, QuantizedLinear], dampening: float | None) -> dict[str, Any]:
    kinds = {(m.bits, m.group_size, m.symmetric) for m in layers.values()}
    if len(kinds) != 1:
        raise CompressError("save.format gptq needs one bits/group_size/symmetric setting for all layers; "
                            "use compressed-tensors for mixed schemes")
    (bits, gs, sym), = kinds
    return {
        "quant_method": "gptq", "checkpoint_format": "gptq", "bits": bits, "group_size": gs, "sym": sym,
        "desc_act": any(m.act_order for m in layers.values()), "damp_percent": dampening,
        "true_sequential": True, "static_groups": False,
    }


def read_layer(prefix: str, tensors: dict[str, torch.Tensor], qcfg: dict[str, Any]) -> QuantizedLinear:
    bits, gs, sym = qcfg["bits"], qcfg["group_size"], qcfg["sym"]
    qweight = tensors[f"{prefix}.qweight"]
    scales = tensors[f"{prefix}.scales"].t().contiguous()
    out_f = scales.shape[0]
    g_idx = tensors[f"{prefix}.g_idx"]
    in_f = g_idx.numel()
    codes = unpack_rows(qweight.t().contiguous(), bits, in_f)
    zeros = ((unpack_rows(tensors[f"{prefix}.qzeros"], bits, out_f).to(torch.int64) + 1) & ((1 << bits) - 1)).t()
    return QuantizedLinear.from_codes(codes, scales, zeros, g_idx, bits, gs, sym,
                                      bias=tensors.get(f"{prefix}.bias"), act_order=bool(qcfg.get("desc_act")))
