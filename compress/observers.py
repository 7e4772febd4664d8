"""Stateful observers the sequential runner feeds with a layer's inputs and outputs."""
from __future__ import annotations

import torch

from compress.algos.hessian import accumulate_hessian


class HessianObserver:
    """Running H = 2/N Σ x xᵀ over all N calibration tokens (float32 unless asked), as GPTQ and SparseGPT need.

    ``state()``/``merge()`` combine the observers of several processes (``compress.distributed``): the
    token-weighted mean of their means, which is the mean over all their tokens."""

    #: solved by one owner process, which broadcasts the result
    solve_everywhere = False

    def __init__(self, in_features: int, device: torch.device, dtype: torch.dtype = torch.float32):
        self.H = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self.n = 0

    def add_batch(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        self.H, self.n = accumulate_hessian(self.H, self.n, inp, self.H.dtype)

    def state(self) -> list[torch.Tensor]:
        return [self.H]

    def merge(self, parts: list[list[torch.Tensor]], counts: list[int]) -> None:
        from compress.distributed import merge_mean

        (self.H,), self.n = merge_mean(parts, counts)
