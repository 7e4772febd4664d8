"""SparseGPT: one-shot pruning of one weight matrix with the blocked OBS update.

Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot",
ICML 2023 (arXiv:2301.00774), Algorithm 1; reference code github.com/IST-DASLab/sparsegpt.

Columns are processed left to right. When column i is pruned (or quantized), its error is
compensated on the not-yet-processed columns i+1.. by the OBS update
    δ = -(w_i - q_i) / [H_F⁻¹]_ii · [H_F⁻¹]_{i,:}      (F = columns i..),
computed from the upper Cholesky factor U of H⁻¹ (``hessian.upper_cholesky_of_inverse``), whose
row i is [H_F⁻¹]_{i,:} / sqrt([H_F⁻¹]_ii). Updates inside a block of ``block_size`` columns are
applied immediately; the block's accumulated error reaches the columns right of it in one matmul
("lazy batch" update, as in GPTQ).

Mask selection is adaptive, per block, on the weights *as updated so far*, with the OBS saliency
w²/[H_F⁻¹]_ii = w² / U_ii²:
- unstructured: over all rows × the block's columns, the lowest-saliency weights are pruned. So that
  the whole matrix ends at exactly floor(s · rows · cols) pruned weights, block b prunes
  floor(s · rows · end_b) - floor(s · rows · start_b) (the reference prunes ``int(numel · s)``
  per block plus ties, which drifts slightly above s);
- N:M: at the start of every group of M columns, each row keeps its N highest-saliency weights.

Recipe snippet (the pass built on this function)::

    - sparsegpt: {sparsity: 0.5, mask: unstructured}      # or sparsity: plan, or mask: "2:4"
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from compress.algos.hessian import prepare_hessian, upper_cholesky_of_inverse
from compress.algos.sparsity import check_nm, check_sparsity, lowest_k_mask, n_pruned
from compress.errors import ConfigError

#: ``quantizer(column, column_index) -> fake-quantized column`` (optional joint quantization);
#: it must map 0 to 0 (every compress grid does), and pruned entries are re-zeroed after it anyway.
ColumnQuantizer = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass
class SparseGPTResult:
    weight: torch.Tensor  #: [out, in], float32 (float64 if W or H was): pruned entries exactly 0
    mask: torch.Tensor  #: keep-mask, bool [out, in]; exactly the requested number of False entries
    loss: torch.Tensor  #: per-row OBS loss estimate Σ_i (w_i - q_i)² / (2 [H_F⁻¹]_ii), [out]
    dead: torch.Tensor  #: bool [in]: inputs never active in calibration (their weights are zeroed)


def sparsegpt_prune(
    weight: torch.Tensor,
    H: torch.Tensor,
    sparsity: float | None = None,
    nm: tuple[int, int] | None = None,
    block_size: int = 128,
    percdamp: float = 0.01,
    quantizer: ColumnQuantizer | None = None,
) -> SparseGPTResult:
    """Prune ``weight`` ([out, in]) to ``sparsity`` (unstructured) or to the ``nm`` = (N, M) pattern
    (N kept of every M consecutive inputs), compensating with the OBS update under ``H`` ([in, in],
    e.g. from ``hessian.accumulate_hessian``). ``percdamp``: dampening as a fraction of mean(diag H).

    ``sparsity`` is per call, so a per-layer allocation plan simply passes each layer's ratio.
    Neither input tensor is modified.
    """
    rows, cols = weight.shape
    if nm is None:
        if sparsity is None:
            raise ConfigError("sparsity is required for unstructured SparseGPT (or give an N:M pattern)")
        sparsity = check_sparsity(sparsity)
    else:
        n, m = nm
        check_nm(n, m, cols)
        if sparsity is not None and abs(sparsity - (1 - n / m)) > 1e-9:
            raise ConfigError(f"sparsity {sparsity} contradicts the {n}:{m} pattern (sparsity {1 - n / m:g})")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ConfigError(f"block_size must be a positive integer, got {block_size!r}")
    if nm is not None and block_size % nm[1]:
        raise ConfigError(f"block_size {block_size} must be a multiple of M={nm[1]} so N:M groups do not straddle blocks")

    dtype = torch.float64 if torch.float64 in (weight.dtype, H.dtype) else torch.float32
    Hd, W, dead = prepare_hessian(H.to(dtype), weight.to(dtype), percdamp)
    U = upper_cholesky_of_inverse(Hd)

    keep = torch.ones(rows, cols, dtype=torch.bool, device=W.device)
    losses = torch.zeros(rows, dtype=dtype, device=W.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        d2 = torch.diag(U1).square().unsqueeze(0)  # [H_F⁻¹]_ii for each column of the block
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        keep1 = keep[:, i1:i2]  # view: writes land in ``keep``
        if nm is None:
            k = n_pruned(rows * i2, sparsity) - n_pruned(rows * i1, sparsity)  # type: ignore[arg-type]
            keep1.copy_(lowest_k_mask((W1.square() / d2).reshape(-1), k).reshape(W1.shape))

        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                g = slice(i, i + nm[1])
                saliency = W1[:, g].square() / d2[:, g]
                keep1[:, g] = lowest_k_mask(saliency, nm[1] - nm[0])
            w = W1[:, i]
            d = U1[i, i]
            q = torch.where(keep1[:, i], w, torch.zeros_like(w))
            if quantizer is not None:
                q = quantizer(q, i1 + i).to(dtype) * keep1[:, i]
            Q1[:, i] = q
            err = (w - q) / d
            losses += err.square() / 2
            # OBS: compensate on the remaining columns of this block at once.
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            Err1[:, i] = err

        W[:, i1:i2] = Q1
        # Lazy batch: the block's error reaches every column to its right in one matmul.
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    return SparseGPTResult(weight=W, mask=keep, loss=losses, dead=dead)
