"""Sparsity masks during fine-tuning: which weight entries are pruned, and keeping them exactly zero.

A mask here is a **prune-mask**: a bool tensor shaped like the weight, True where the entry was exactly
zero when fine-tuning started (the complement of ``compress.algos.sparsity``'s keep-masks). Enforcement is
twofold, because either alone is not enough: gradients of masked entries are zeroed before the optimizer
step (so they do not enter the gradient-norm clip or Adam's moments), and the mask is re-applied to the
weights after the step (AdamW's decoupled weight decay and any moment left from elsewhere would otherwise
move them off zero).
"""
from __future__ import annotations

import torch


def capture_masks(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Prune-masks of the weights that have exact zeros (weights without any zero need no mask)."""
    masks = {}
    for name, w in weights.items():
        m = w.detach() == 0
        if bool(m.any()):
            masks[name] = m
    return masks


@torch.no_grad()
def zero_masked_grads(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> None:
    for name, m in masks.items():
        g = weights[name].grad
        if g is not None:
            g.masked_fill_(m, 0.0)


@torch.no_grad()
def apply_masks(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> None:
    for name, m in masks.items():
        weights[name].masked_fill_(m, 0.0)


@torch.no_grad()
def masked_nonzero(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> int:
    """How many masked entries are not exactly 0.0 (the guarantee is that this is 0)."""
    return sum(int((weights[name][m] != 0).sum()) for name, m in masks.items())


def masked_count(masks: dict[str, torch.Tensor]) -> int:
    return sum(int(m.sum()) for m in masks.values())
