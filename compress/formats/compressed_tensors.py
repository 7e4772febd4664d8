"""compressed-tensors ``pack-quantized`` tensors and config for QuantizedLinear layers.

Per quantized layer ``N``: ``N.weight_packed`` int32 [out, ceil(in·b/32)] (codes along the input dim),
``N.weight_scale`` [out, G], ``N.weight_shape`` [2], and for asymmetric grids ``N.weight_zero_point``
packed along the output dim, int32 [ceil(out·b/32), G]. compressed-tensors keeps codes and zero points
signed (our unsigned value minus 2^(b-1)) and packs them with that offset added back, so the packed
bits equal our unsigned codes. It dropped per-column group indices (actorder "group") in 2026, so
act-order layers must use static groups here (``actorder: weight``).
"""
from __future__ import annotations

from typing import Any

import torch

from compress.algos.packing import pack_rows, unpack_rows
from compress.errors import CompressError
from compress.nn.qlinear import QuantizedLinear


def layer_tensors(name: str, m: QuantizedLinear) -> dict[str, torch.Tensor]:
    if m.act_order and m.group_size != -1:
        raise CompressError(
            f"{name}: act-order with dynamic groups needs per-column group indices, which compressed-tensors no "
            "longer stores; quantize with `static_groups: true` or save with `save: {format: gptq}`")
    t = {
        f"{name}.weight_packed": pack_rows(m.qweight, m.bits),
        f"{name}.weight_scale": m.scales.contiguous(),
        f"{name}.weight_shape": torch.tensor([m.out_features, m.in_features], dtype=torch.int64),
    }
    if not m.symmetric:
        t[f"{name}.weight_zero_point"] = pack_rows(m.zeros.t(), m.bits).t().contiguous()
    if m.bias is not None:
        t[f"{name}.bias"] = m.bias.data
    return t


def quantization_config(layers: dict[str, QuantizedLinear], ignore: list[str]) -> dict[str, Any]:
    schemes: dict[tuple, list[str]] = {}
    for name, m in layers.items():
        key = (m.bits, m.group_size, m.symmetric, m.act_order)
        schemes.setdefault(key, []).append(name)
    groups = {}
    for i, ((bits, gs, sym, act), names) in enumerate(sorted(schemes.items())):
        groups[f"group_{i}"] = {
            # one target per layer: exact names are unambiguous when schemes differ between layers
            "targets": names if len(schemes) > 1 else ["Linear"],
            "weights": {
                "num_bits": bits, "type": "int", "symmetric": sym,
                "strategy": "channel" if gs == -1 else "group",
                "group_size": None if gs == -1 else gs,
                # static-group act-order changes only calibration, not the stored layout
                "actorder": None,
                "dynamic": False, "observer": "minmax", "block_structure": None,
            },
            "input_activations": None, "output_activations": None,
        }
    return {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": groups, "ignore": ignore, "kv_cache_scheme": None,
    }


def read_layer(prefix: str, tensors: dict[str, torch.Tensor], scheme: dict[str, Any]) -> QuantizedLinear:
    bits = scheme["num_bits"]
    out_f, in_f = (int(x) for x in tensors[f"{prefix}.weight_shape"].tolist())
    gs = -1 if scheme["strategy"] == "channel" else scheme["group_size"]
    scales = tensors[f"{prefix}.weight_scale"]
    codes = unpack_rows(tensors[f"{prefix}.weight_packed"], bits, in_f)
    if scheme["symmetric"]:
        zeros = torch.full_like(scales, 1 << (bits - 1), dtype=torch.uint8)
    else:
        zp = tensors[f"{prefix}.weight_zero_point"]
        zeros = unpack_rows(zp.t().contiguous(), bits, out_f).t()
    g = torch.arange(in_f) // (in_f if gs == -1 else gs)
    return QuantizedLinear.from_codes(codes, scales, zeros, g.to(torch.int32), bits, gs, scheme["symmetric"],
                                      bias=tensors.get(f"{prefix}.bias"))
