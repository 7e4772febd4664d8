"""A runtime INT8 lm_head for CPU decode: the output projection quantized at load, not in the checkpoint.

Why: on a small model the lm_head is the largest single read of a decode step. SmolLM2-135M's is its
tied fp32 embedding, 49152 x 576 = 113 MB per token, 9.6 of a 35.6 ms one-thread step on session 9's
Xeon (docs/design/cpu-kernels.md). INT4 there costs +13% perplexity (``bench/quality/lm_head_quality.py``); 8-bit codes
with one scale per output row read a quarter of the bytes and cost far less (measured by the same
script, docs/design/cpu-kernels.md).

What it does: ``quantize_lm_head`` replaces ``model.get_output_embeddings()`` (the transformers API,
so no per-family names) with a ``QuantizedLinear`` of RTN codes, which ``accelerate`` then puts on the
C kernel's 8-bit path. A tied input embedding keeps its own float tensor: the embedding lookup reads
one row per token, so only the lm_head's bytes matter. The checkpoint on disk is untouched, and
``restore_lm_head`` puts the float layer back (``compress bench`` does, for its baseline).

Only for CPU inference: the GPU kernels take 4-bit codes, so there an 8-bit layer would run the
dequantize fallback. ``quantize_lm_head`` raises ``ConfigError`` for a model on a CUDA device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compress.algos.quant import default_g_idx, rtn_quantize
from compress.errors import ConfigError
from compress.nn.qlinear import QuantizedLinear

@dataclass
class LmHeadSwap:
    """What ``quantize_lm_head`` replaced, to put back and to report."""

    original: nn.Module
    tied: bool  # the float weight was shared with the input embedding
    bits: int
    group_size: int
    symmetric: bool
    float_bytes: int  # bytes the float lm_head read per token
    #: what the C kernel reads per token: the codes, and an fp32 scale and zero-point term per row and group
    quantized_bytes: int

    def as_dict(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric, "tied": self.tied,
                "float_bytes": self.float_bytes, "quantized_bytes": self.quantized_bytes}


def quantize_lm_head(model: nn.Module, bits: int = 8, group_size: int = -1, symmetric: bool = False) -> LmHeadSwap:
    """Replace the model's lm_head (``get_output_embeddings()``, an ``nn.Linear``) by RTN codes in place.

    ``group_size`` -1: one scale (and zero point, unless ``symmetric``) per output row. Call before
    ``accelerate``. Raises ConfigError for a model without a float linear lm_head or on a GPU."""
    if bits not in (4, 8):
        raise ConfigError(f"lm_head bits must be 4 or 8; got {bits!r}")
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Linear):
        what = "no get_output_embeddings()" if head is None else f"a {type(head).__name__}"
        raise ConfigError(f"cannot quantize the lm_head: the model has {what}, not an nn.Linear")
    if head.weight.is_cuda:
        raise ConfigError("a quantized lm_head runs on the CPU kernel only; this model is on a CUDA device "
                          "(the GPU kernels take 4-bit decoder layers; keep the lm_head in float there)")
    w = head.weight.detach()
    if group_size != -1 and w.shape[1] % group_size:
        raise ConfigError(f"lm_head group_size {group_size} does not divide its {w.shape[1]} input columns")
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = emb is not None and getattr(emb, "weight", None) is head.weight
    codes, scales, zeros = rtn_quantize(w.float(), bits, group_size, symmetric)
    q = QuantizedLinear.from_codes(codes, scales.to(w.dtype), zeros, default_g_idx(w.shape[1], group_size), bits,
                                   group_size, symmetric, None if head.bias is None else head.bias.detach())
    q.eval()
    model.set_output_embeddings(q)
    if tied and getattr(model.config, "tie_word_embeddings", False):
        # transformers re-ties output to input embeddings on tie_weights() while this flag is set,
        # which would put the float weight back over the codes
        model.config.tie_word_embeddings = False
    n_groups = scales.shape[1]
    return LmHeadSwap(original=head, tied=tied, bits=bits, group_size=group_size, symmetric=symmetric,
                      float_bytes=w.numel() * w.element_size(),
                      quantized_bytes=w.numel() * bits // 8 + w.shape[0] * n_groups * 8)


def restore_lm_head(model: nn.Module, swap: LmHeadSwap) -> None:
    """Put the float lm_head ``quantize_lm_head`` replaced back (re-tied where it was tied)."""
    model.set_output_embeddings(swap.original)
    if swap.tied:
        model.config.tie_word_embeddings = True
