"""GPTQ (Frantar et al., 2023, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"), Algorithm 1, with the lazy batch updates and Cholesky reformulation of the paper.

Given W [out, in] and H = 2 X Xᵀ [in, in] from calibration inputs, quantize one column at a time in
(optionally act-order) sequence and spread each column's error over the not-yet-quantized columns
with the inverse-Hessian rows: W[:, j:] -= (w_j - q_j) / [H⁻¹]_jj · [H⁻¹]_j,j: .

Recipe snippet::

    passes:
      - gptq: {bits: 4, group_size: 128, symmetric: true, act_order: true, dampening: 0.01}
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.algos.hessian import prepare_hessian, upper_cholesky_of_inverse
from compress.algos.quant import QuantGrid, default_g_idx, find_grid


@dataclass
class GPTQResult:
    codes: torch.Tensor  # uint8 [out, in] in the ORIGINAL column order
    scales: torch.Tensor  # float32 [out, n_groups]
    zeros: torch.Tensor  # float32 (integer-valued) [out, n_groups]
    g_idx: torch.Tensor  # int32 [in]
    weight: torch.Tensor  # float32 dequantized weight [out, in]
    loss: float  # Σ_j (w_j - q_j)² / [H⁻¹]_jj² / 2 summed over columns (the reference code's Losses)


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int = 128, symmetric: bool = True,
                  act_order: bool = False, static_groups: bool = False, dampening: float = 0.01,
                  block_size: int = 128) -> GPTQResult:
    """Quantize ``W`` [out, in] with Hessian ``H`` [in, in]. ``group_size=-1`` is per output channel.

    With ``act_order`` columns are processed by decreasing H_ii. Groups are then formed along that
    order (``g_idx`` records each column's group, the GPTQ "desc_act" layout) unless
    ``static_groups``, which fixes the grids of contiguous groups before the loop (g_idx stays trivial,
    friendlier to kernels).
    """
    out_f, in_f = W.shape
    # Weights that are exactly zero (pruned by an earlier pass) stay exactly zero: their code is the
    # zero point, which every grid here represents exactly, and their error is compensated like any other.
    pruned = W == 0
    H, W, _dead = prepare_hessian(H.float(), W.float(), dampening)

    static: list[QuantGrid] | None = None
    if group_size != -1 and static_groups:
        static = [find_grid(W[:, g : g + group_size], bits, symmetric) for g in range(0, in_f, group_size)]
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(in_f, device=W.device)
    W = W[:, perm]
    pruned = pruned[:, perm]
    has_pruned = bool(pruned.any())
    H = H[perm][:, perm]
    Hinv = upper_cholesky_of_inverse(H)

    Q = torch.zeros_like(W)
    codes = torch.zeros_like(W)
    maxq = float((1 << bits) - 1)
    grid = find_grid(W, bits, symmetric) if group_size == -1 else None
    grids: list[QuantGrid] = [grid] if grid is not None else []
    perm_list = perm.tolist()
    col_group = [0] * in_f  # group index of permuted column j (dynamic groups)
    loss = 0.0

    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        C1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if group_size != -1:
                if static is not None:
                    grid = static[perm_list[j] // group_size]
                elif j % group_size == 0:
                    # dynamic groups: the grid sees the columns as updated by earlier errors
                    grid = find_grid(torch.cat([W1[:, i:], W[:, i2:]], 1)[:, :group_size], bits, symmetric)
                    grids.append(grid)
                col_group[j] = len(grids) - 1
            w = W1[:, i]
            q_int = torch.clamp(torch.round(w / grid.scale[:, 0]) + grid.zero[:, 0], 0, maxq)
            if has_pruned:
                q_int = torch.where(pruned[:, j], grid.zero[:, 0], q_int)
            q = (q_int - grid.zero[:, 0]) * grid.scale[:, 0]
            C1[:, i] = q_int
            Q1[:, i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        codes[:, i1:i2] = C1
        Q[:, i1:i2] = Q1
        # the paper's objective, Σ (w - q)² / [H⁻¹]_jj² / 2 = Σ err² / 2
        loss += float((Err1**2).sum()) / 2
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    inv = torch.argsort(perm)
    if group_size == -1:
        g_idx = default_g_idx(in_f, -1, W.device)
        use = grids
    elif static is not None:
        g_idx = default_g_idx(in_f, group_size, W.device)
        use = static
    else:
        g_idx = torch.tensor(col_group, device=W.device)[inv].to(torch.int32)
        use = grids
    scales = torch.cat([g.scale for g in use], 1)
    zeros = torch.cat([g.zero for g in use], 1)
    return GPTQResult(codes=codes[:, inv].to(torch.uint8), scales=scales, zeros=zeros, g_idx=g_idx,
                      weight=Q[:, inv], loss=loss)
