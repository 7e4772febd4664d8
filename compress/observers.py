"""Stateful observers the sequential runner feeds with a layer's inputs and outputs."""
from __future__ import annotations

import torch

from compress.algos.hessian import accumulate_hessian


class HessianObserver:
    """Running H = 2/N Σ x xᵀ over all N calibration tokens (float32), as GPTQ and SparseGPT need."""

    def __init__(self, in_features: int, device: torch.device):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n = 0

    def add_batch(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        self.H, self.n = accumulate_hessian(self.H, self.n, inp)
