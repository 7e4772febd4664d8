"""Integer quantization grids (uniform, per-channel or per-group, symmetric or asymmetric).

Conventions used everywhere in compress (the in-memory format, the packers and the kernels):
- codes ``q`` are *unsigned* integers in ``[0, 2**bits - 1]``;
- zero points ``z`` are unsigned integers on the same grid (symmetric grids use ``z = 2**(bits-1)``);
- ``w ≈ (q - z) * s``. Zero is always exactly representable because ``z`` is an integer.
- ``scales``/``zeros`` have shape ``[out_features, n_groups]``; ``g_idx[i]`` is the group of input
  column ``i`` (``i // group_size`` without act-order). ``n_groups = ceil(in / group_size)``: when the
  group size does not divide the width (SmolLM2's 576 at g128) the last group is narrower, as in the
  GPTQ reference and compressed-tensors.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def num_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else -(-in_features // group_size)


def qmax(bits: int) -> int:
    return (1 << bits) - 1


@dataclass
class QuantGrid:
    """Scale and zero point for a set of rows (one group of columns). Tensors of shape [rows, 1]."""

    scale: torch.Tensor
    zero: torch.Tensor
    bits: int

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        """Integer codes of ``w`` on this grid (float tensor holding integers)."""
        return torch.clamp(torch.round(w / self.scale) + self.zero, 0, qmax(self.bits))

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        return (q - self.zero) * self.scale

    def fake_quantize(self, w: torch.Tensor) -> torch.Tensor:
        return self.dequantize(self.quantize(w))


def find_grid(w: torch.Tensor, bits: int, symmetric: bool) -> QuantGrid:
    """Min-max grid for each row of ``w`` ([rows, cols]) as in the GPTQ reference.

    Asymmetric: the range [min(w, 0), max(w, 0)] maps onto [0, 2^b - 1] with an integer zero point.
    Symmetric: scale = 2·max|w| / (2^b - 1) and zero = 2^(b-1) (the GPTQ reference convention, which
    uses the full unsigned code range; the code 2^b - 1 gives +max|w|·(2^b-1-2^(b-1))/(…)).
    """
    w = w.float()
    wmin = torch.clamp(w.amin(dim=1, keepdim=True), max=0)
    wmax = torch.clamp(w.amax(dim=1, keepdim=True), min=0)
    maxq = qmax(bits)
    if symmetric:
        amax = torch.maximum(wmin.abs(), wmax)
        scale = 2 * amax / maxq
        zero = torch.full_like(scale, float(1 << (bits - 1)))
    else:
        scale = (wmax - wmin) / maxq
        zero = torch.round(-wmin / torch.where(scale == 0, torch.ones_like(scale), scale))
    # An all-zero row (e.g. fully pruned) would give scale 0; any positive scale represents it exactly.
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return QuantGrid(scale=scale, zero=zero, bits=bits)


def default_g_idx(in_features: int, group_size: int, device=None) -> torch.Tensor:
    """Group of each input column without act-order (per-channel: everything in group 0)."""
    if group_size == -1:
        return torch.zeros(in_features, dtype=torch.int32, device=device)
    return (torch.arange(in_features, device=device) // group_size).to(torch.int32)


def has_contiguous_groups(g_idx: torch.Tensor, in_features: int, n_groups: int) -> bool:
    """Whether the groups are ``n_groups`` equal runs of consecutive columns (no act-order)."""
    return in_features % n_groups == 0 and torch.equal(
        g_idx.cpu().int(), default_g_idx(in_features, in_features // n_groups))


def dequantize_grouped(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """``dequantize_weight`` for contiguous equal groups (``has_contiguous_groups``): broadcast per
    group instead of gathering an [out, in] index twice (same arithmetic, same values; several times
    faster), in place in one float32 [out, in] buffer."""
    n, k = q.shape
    n_groups = scales.shape[1]
    w = q.view(n, n_groups, k // n_groups).float()
    w.sub_(zeros.float().unsqueeze(-1)).mul_(scales.float().unsqueeze(-1))
    return w.view(n, k)


def dequantize_weight(
    q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor
) -> torch.Tensor:
    """w[o, i] = (q[o, i] - zeros[o, g_idx[i]]) * scales[o, g_idx[i]] in float32."""
    if has_contiguous_groups(g_idx, q.shape[1], scales.shape[1]):
        return dequantize_grouped(q, scales, zeros)
    g = g_idx.long()
    return (q.float() - zeros.float()[:, g]) * scales.float()[:, g]


def rtn_quantize(
    w: torch.Tensor, bits: int, group_size: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest baseline. Returns (codes uint8 [out,in], scales [out,G], zeros [out,G])."""
    out_f, in_f = w.shape
    gs = in_f if group_size == -1 else group_size
    codes, scales, zeros = [], [], []
    for start in range(0, in_f, gs):
        grid = find_grid(w[:, start : start + gs], bits, symmetric)
        codes.append(grid.quantize(w[:, start : start + gs].float()))
        scales.append(grid.scale)
        zeros.append(grid.zero)
    return torch.cat(codes, 1).to(torch.uint8), torch.cat(scales, 1), torch.cat(zeros, 1)


def shared_permutations(groups: list[list[str]], in_features: dict[str, int],
                        generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One random column order per group of layers that read the same input (GPTQ's act-order gives
    such layers one order: they share the Hessian), by layer name; with ``rtn_quantize_permuted``
    it builds act-order layers for kernel tests and benchmarks. ``groups``: e.g.
    ``Adapter.input_groups``."""
    out = {}
    for names in groups:
        perm = torch.randperm(in_features[names[0]], generator=generator)
        out.update({n: perm for n in names})
    return out


def rtn_quantize_permuted(
    w: torch.Tensor, bits: int, group_size: int, symmetric: bool, perm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """RTN with groups taken along the column order ``perm`` (the layout GPTQ's act-order writes:
    column ``perm[i]`` belongs to group ``i // group_size``). Returns (codes uint8 [out, in] in the
    ORIGINAL column order, scales [out, G], zeros [out, G], g_idx int32 [in]). Used to build act-order
    layers of known numerics for kernel tests and benchmarks without running GPTQ."""
    in_f = w.shape[1]
    perm = perm.to(device=w.device, dtype=torch.long)
    q, s, z = rtn_quantize(w[:, perm], bits, group_size, symmetric)
    g_idx = torch.empty(in_f, dtype=torch.int32, device=w.device)
    g_idx[perm] = default_g_idx(in_f, group_size, device=w.device)
    return q[:, torch.argsort(perm)], s, z, g_idx
