"""CPU INT4 path: torch's weight-only int4 kernel (``_weight_int4pack_mm_for_cpu``).

The kernel takes bf16 activations, codes packed by ``_convert_weight_to_int4pack_for_cpu`` (an int32
[N, K] tensor of values 0..15; N must be a multiple of 16), a group size of 32, 64, 128 or 256, and
one bf16 tensor ``scales_and_zeros`` [K / group, N, 2]. Its dequantization is
``w = (q - 8) * scale + zero`` (worked out numerically: docs/design/cpu-kernels.md), while ours is
``w = (q - z) * s``; so ``scale = s`` and ``zero = (8 - z) * s``.

- Per-channel layers (one group) and groups wider than 256 are expressed exactly with a supported
  group size by repeating each scale and zero point over its sub-groups.
- Act-order layers: columns are sorted by group once (``layout.contiguous_group_order``) and the
  activations gathered with ``index_select`` at run time.
- Rows are padded to a multiple of 16 with code 8 and scale 0 (they compute zero) and cut off.

Numerics: activations are rounded to bf16 and scales/zeros stored in bf16, so expect a relative
error of a few 1e-3 against the float64 reference (tests/test_kernels.py bounds it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.algos.quant import dequantize_grouped, dequantize_weight, has_contiguous_groups
from compress.kernels import layout

SUPPORTED_GROUPS = (32, 64, 128, 256)
_ROW_MULTIPLE = 16


def available() -> tuple[bool, str]:
    """Whether this torch build has the CPU int4 operators."""
    ops = torch.ops.aten
    if not (hasattr(ops, "_convert_weight_to_int4pack_for_cpu") and hasattr(ops, "_weight_int4pack_mm_for_cpu")):
        return False, f"torch {torch.__version__} has no _weight_int4pack_mm_for_cpu"
    return True, ""


def kernel_group_size(group: int, in_features: int) -> int | None:
    """A supported group size that tiles ``group`` exactly (None if there is none)."""
    if group in SUPPORTED_GROUPS:
        return group
    for cand in sorted(SUPPORTED_GROUPS, reverse=True):
        if group % cand == 0 and in_features % cand == 0:
            return cand
    return None


def unsupported_reason(bits: int, in_features: int, group: int) -> str | None:
    """Why a layer cannot run on this path, or None. ``group`` is the contiguous group width."""
    if bits != 4:
        return f"{bits}-bit codes (the CPU kernel takes 4-bit)"
    if kernel_group_size(group, in_features) is None:
        return (f"group of {group} columns is not a multiple of any supported group size "
                f"{SUPPORTED_GROUPS}")
    return None


@dataclass
class CpuInt4Weight:
    packed: torch.Tensor  # opaque, from _convert_weight_to_int4pack_for_cpu
    scales_and_zeros: torch.Tensor  # bf16 [K / group, N_padded, 2]
    group: int
    perm: torch.Tensor | None  # int64 [K] or None
    bias: torch.Tensor | None
    in_features: int
    out_features: int


def repack(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
           bits: int, bias: torch.Tensor | None) -> CpuInt4Weight:
    """Repack QuantizedLinear buffers once. Raises ValueError when the layer is unsupported."""
    n, k = qweight.shape
    order = layout.contiguous_group_order(g_idx, scales.shape[1])
    reason = unsupported_reason(bits, k, order.group_size)
    if reason:
        raise ValueError(reason)
    group = kernel_group_size(order.group_size, k)
    rep = order.group_size // group
    codes = layout.ordered_codes(qweight, order).to(torch.int32)
    s = scales.to(torch.float32).repeat_interleave(rep, dim=1)
    z = zeros.to(torch.float32).repeat_interleave(rep, dim=1)
    pad = -n % _ROW_MULTIPLE
    if pad:
        codes = torch.cat([codes, torch.full((pad, k), 8, dtype=torch.int32)], 0)
        s = torch.cat([s, torch.zeros(pad, s.shape[1])], 0)
        z = torch.cat([z, torch.full((pad, z.shape[1]), 8.0)], 0)
    sz = torch.stack([s.t(), ((8.0 - z) * s).t()], dim=-1).to(torch.bfloat16).contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
    return CpuInt4Weight(packed=packed, scales_and_zeros=sz, group=group, perm=order.perm,
                         bias=None if bias is None else bias.detach().clone(),
                         in_features=k, out_features=n)


def fast_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AMX tiles or AVX512-BF16, which oneDNN
    uses for torch's bf16 GEMMs; with session 5's AMX, dequantize + bf16 GEMM took 0.81 ms against
    1.82 for dequantize + fp32 on a 1536x576 layer at 128 rows, ``bench/speed/cpu_crossover.py``).
    Elsewhere bf16 GEMMs are emulated and slower than fp32."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def dense_linear(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
                 bias: torch.Tensor | None, dtype: torch.dtype):
    """``f(x) = x @ W.T (+ bias)`` that dequantizes W to ``dtype`` on every call and runs a dense GEMM
    (prefill-sized inputs, where the int4 kernel's per-row cost loses). float32: exact, as the
    layer's own forward. bfloat16: the weight is the float32 dequantized value rounded once to bf16,
    activations are rounded to bf16, the GEMM accumulates in fp32 (oneDNN); the bias is added in
    x's dtype."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dense CPU path computes in float32 or bfloat16, not {dtype}")
    n = qweight.shape[0]
    contiguous = has_contiguous_groups(g_idx, qweight.shape[1], scales.shape[1])
    # bf16 from contiguous groups: exact fp32 values, rounded once, made in row blocks of ~256 KB so
    # the fp32 temporary stays in cache (bf16 arithmetic in torch's CPU kernels was slower:
    # docs/design/cpu-kernels.md)
    rows = max(1, (1 << 16) // qweight.shape[1])

    def weight() -> torch.Tensor:
        if not contiguous:
            return dequantize_weight(qweight, scales, zeros, g_idx).to(dtype)
        if dtype == torch.float32:
            return dequantize_grouped(qweight, scales, zeros)
        w = torch.empty(qweight.shape, dtype=dtype)
        for r in range(0, n, rows):
            w[r:r + rows].copy_(dequantize_grouped(qweight[r:r + rows], scales[r:r + rows], zeros[r:r + rows]))
        return w

    def forward(x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.linear(x.to(dtype), weight()).to(x.dtype)
        return y if bias is None else y + bias.to(x.dtype)

    return forward


def int4_matmul(x: torch.Tensor, wt: CpuInt4Weight) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for x [..., K] of any float dtype; returns x's dtype."""
    lead = x.shape[:-1]
    x2d = x.reshape(-1, wt.in_features)
    if wt.perm is not None:
        x2d = x2d.index_select(1, wt.perm)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(
        x2d.to(torch.bfloat16).contiguous(), wt.packed, wt.group, wt.scales_and_zeros)
    y = y[:, : wt.out_features].to(x.dtype)
    if wt.bias is not None:
        y = y + wt.bias.to(x.dtype)
    return y.reshape(*lead, wt.out_features)
