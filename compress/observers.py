"""Stateful observers the sequential runner feeds with a layer's inputs and outputs."""
from __future__ import annotations

import torch


class HessianObserver:
    """Running H = 2/N Σ x xᵀ over all N calibration tokens (float32), as GPTQ and SparseGPT need."""

    def __init__(self, in_features: int, device: torch.device):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n = 0

    def add_batch(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        x = inp.reshape(-1, inp.shape[-1]).float()
        m = x.shape[0]
        self.H *= self.n / (self.n + m)
        self.n += m
        x = x * (2.0 / self.n) ** 0.5
        self.H += x.t() @ x
