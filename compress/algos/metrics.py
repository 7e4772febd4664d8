"""Error measures shared by passes and tests."""
from __future__ import annotations

import torch


def relative_output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """||(W - Ŵ) X||_F² / ||W X||_F² over the calibration inputs, from H ∝ X Xᵀ (no activations kept).

    tr(ΔW H ΔWᵀ) / tr(W H Wᵀ): the relative squared output error of the layer, before dampening.
    """
    W = W.double()
    D = W - W_hat.double()
    H = H.double()
    num = ((D @ H) * D).sum()
    den = ((W @ H) * W).sum()
    return float(num / den) if den > 0 else 0.0
